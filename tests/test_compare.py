"""tools/compare.py on two real (tiny) runs: settings and metrics side by side, and the curves as a PNG."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from tests.helpers import fit, scalars
from tools.compare import compare


def test_two_runs_side_by_side(tiny_cfg, tmp_path):
    common = ("trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1")
    a = fit(tiny_cfg(*common, "optim.lr=0.01", "logging.run_name=a")).logger.log_dir
    b = fit(tiny_cfg(*common, "optim.lr=0.001", "logging.run_name=b")).logger.log_dir
    png = str(tmp_path / "curves.png")
    text = compare([os.path.dirname(a)], png)  # the experiment folder: both runs
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines()[1:]}
    assert text.splitlines()[0].split() == ["a", "b"]
    assert lines["lr"] == ["0.01", "0.001"]
    assert lines["encoder"] == ["timm:vit_tiny_patch16_224"] * 2
    for run, column in ((a, 0), (b, 1)):
        val = list(scalars(run, "val/loss").values())
        assert float(lines_value(text, "val/loss last", column)) == pytest.approx(val[-1], rel=1e-3)
        assert float(lines_value(text, "val/loss best", column)) == pytest.approx(min(val), rel=1e-3)
    with Image.open(png) as image:
        assert image.size[0] > 600 and image.size[1] > 200


def lines_value(text: str, row: str, column: int) -> str:
    line = next(line for line in text.splitlines() if line.startswith(row + " "))
    return line[len(row) :].split()[column]


def test_not_a_run_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.yaml here"):
        compare([str(tmp_path)])
