"""tools/compare.py on two run directories written here as train.py writes them (the resolved config.yaml and
TensorBoard event files, no training): settings and metrics side by side, and the curves as a PNG."""

from __future__ import annotations

import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from experiment.config import save_config
from tools.compare import compare

# run -> tag -> [(step, value)]; values exact in float32, so the table's 4 significant digits are known
CURVES = {
    "a": {
        "train/loss": [(0, 4.0), (1, 3.5), (2, 3.25), (3, 3.0)],
        "val/loss": [(1, 3.5), (3, 2.75)],
        "val/exact_match": [(1, 0.25), (3, 0.5)],
    },
    "b": {
        "train/loss": [(0, 4.0), (1, 3.75), (2, 3.5), (3, 3.625)],
        "val/loss": [(1, 3.25), (3, 3.375)],  # best before last
        "val/exact_match": [(1, 0.375), (3, 0.125)],  # best before last: max, not min
    },
}


def write_run(run_dir: str, cfg, curves: dict[str, list[tuple[int, float]]]) -> None:
    save_config(cfg, run_dir)  # what train.py writes beside its event files
    with SummaryWriter(run_dir) as writer:
        for tag, points in curves.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)


def test_two_runs_side_by_side(tiny_cfg, tmp_path):
    experiment = tmp_path / "runs" / "quickstart"
    write_run(str(experiment / "a"), tiny_cfg("optim.lr=0.01", "logging.run_name=a"), CURVES["a"])
    tiling = "model.tiling={name: anyres, grid_pinpoints: '(1x1),...,(2x2)', max_tiles: 2}"
    write_run(str(experiment / "b"), tiny_cfg("optim.lr=0.001", "logging.run_name=b", tiling), CURVES["b"])
    png = str(tmp_path / "curves.png")
    text = compare([str(experiment)], png)  # the experiment folder: both runs
    header, *lines = text.splitlines()
    first = len(header) - len(header.lstrip())  # the row names' column
    rows = {line[:first].strip(): line[first:].split() for line in lines}
    assert header.split() == ["a", "b"]
    assert rows["lr"] == ["0.01", "0.001"]
    assert rows["encoder"] == ["timm:vit_tiny_patch16_224"] * 2
    # a tiling with its options: two AnyRes runs can differ by these alone
    assert rows["tiling"] == ["-", "anyres", "grid_pinpoints=(1x1),...,(2x2)", "max_tiles=2"]
    assert rows["llm"] == ["llama", "(inline", "config)"] * 2
    assert rows["val/loss last"] == ["2.75", "3.375"]
    assert rows["val/loss best"] == ["2.75", "3.25"]  # min for a loss
    assert rows["val/exact_match last"] == ["0.5", "0.125"]
    assert rows["val/exact_match best"] == ["0.5", "0.375"]  # max otherwise
    assert rows["train/loss last"] == ["3", "3.625"]
    assert rows["last logged step"] == ["3", "3"]
    assert "train/loss best" not in rows
    # one run directory alone gives the same column
    assert compare([str(experiment / "b")]).splitlines()[0].split() == ["b"]
    with Image.open(png) as image:
        assert image.size[0] > 600 and image.size[1] > 200


def test_not_a_run_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.yaml here"):
        compare([str(tmp_path)])
