"""Validation per source of a mixture (lit_modules/source_metrics.py): each source's loss is the loss of its held-out
samples alone (a separate forward), its exact match that of its answers, the per-source numbers add up to the
pooled `val/loss` and `val/exact_match`, a run writes them to TensorBoard, and a single-file run has none."""

from __future__ import annotations

import logging
import os

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from datamodules.llava_data import collate
from experiment.assemble import build_datamodule, build_module
from lit_modules.callbacks.run_summary import LAYOUT, PER_SOURCE_LAYOUT, layout
from lit_modules.source_metrics import SourceMeans
from metrics import METRICS
from tests.support.events import scalars
from tests.support.mixtures import sources_overrides, split_sources
from tests.support.processes import run_training, train_cli_args
from tests.support.runs import fit

VAL = ("data.val_fraction=0.25", "data.val_batch_size=4")  # held out: 3 of part0's 12, 2 of part1's 8, 1 of part2's 7


def test_source_means_by_hand():
    means = SourceMeans(["a", "b", "c"])
    means.update(torch.tensor([0, 2, 0]), torch.tensor([3.0, 1.0, 5.0]), torch.tensor([2, 4, 6]))
    means.update(torch.tensor([2]), torch.tensor([7.0]), torch.tensor([4]))
    got = {name: float(v) for name, v in means.compute().items()}
    assert got == pytest.approx({"a": (3 + 5) / (2 + 6), "c": (1 + 7) / (4 + 4)})  # b: nothing scored, no mean


class HalfRight(L.Callback):
    """Makes the model answer every other validation sample right (its reference) and the others wrong, and keeps
    (source, right) of each sample scored."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.scored = tokenizer, []

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        wrong = lambda a: "blue" if a != "blue" else "red"  # noqa: E731
        texts = [a if j % 2 == 0 else wrong(a) for j, a in enumerate(batch["answers"])]
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        module.model.generate = lambda *args, **kwargs: ids
        if not trainer.sanity_checking:
            said = [self.tokenizer.decode(t, skip_special_tokens=True) for t in ids]
            hits = [METRICS.build("exact_match", [t], [a])["accuracy"] for t, a in zip(said, batch["answers"])]
            self.scored += [(s, h) for s, h, skip in zip(batch["sources"], hits, batch["skipped"].tolist()) if not skip]


def validate(module, dm, *callbacks) -> dict[str, float]:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks),
    )  # fmt: skip
    return {k: float(v) for k, v in trainer.validate(module, datamodule=dm, verbose=False)[0].items()}


def test_each_source_is_scored_on_its_held_out_samples_alone(tiny_cfg, shapes_root, tmp_path):
    cfg = tiny_cfg(*sources_overrides(shapes_root, split_sources(shapes_root, tmp_path)), *VAL)
    module = build_module(cfg)
    dm = build_datamodule(cfg, module.tokenizer)
    answers = HalfRight(module.tokenizer)
    metrics = validate(module, dm, answers)
    del module.model.generate  # the model's own again
    assert dm.val_sources == ["part0", "part1", "part2"] and [len(p) for p in dm.val_set.parts] == [3, 2, 1]
    # each source's held-out samples alone, in one batch of their own: the loss by hand (the token mean)
    module.eval()
    tokens = {}
    for name, part in zip(dm.val_set.names, dm.val_set.parts):
        batch = collate([part[i] for i in range(len(part))], module.tokenizer.pad_token_id)
        with torch.no_grad():
            loss = module(batch).loss  # sum over the scored tokens / their count
        tokens[name] = int((batch["labels"][:, 1:] != -100).sum())
        assert metrics[f"val/loss/{name}"] == pytest.approx(float(loss), rel=1e-5), name
    # the pooled loss is the token-weighted mean of the sources'
    pooled = sum(metrics[f"val/loss/{n}"] * t for n, t in tokens.items()) / sum(tokens.values())
    assert metrics["val/loss"] == pytest.approx(pooled, rel=1e-5)
    assert len({round(metrics[f"val/loss/{n}"], 5) for n in tokens}) == 3  # three different numbers
    # exact match: each source's answers, and the pooled one their answer-weighted mean
    assert {s for s, _ in answers.scored} == set(tokens)
    for name in tokens:
        hits = [h for s, h in answers.scored if s == name]
        assert metrics[f"val/exact_match/{name}"] == pytest.approx(sum(hits) / len(hits)), name
    assert metrics["val/exact_match"] == pytest.approx(sum(h for _, h in answers.scored) / len(answers.scored))
    assert 0 < metrics["val/exact_match"] < 1
    # the same module on one file: no per-source keys, and the TensorBoard layout as before
    single = validate(module, build_datamodule(tiny_cfg(), module.tokenizer))
    assert module.val_sources == [] and "val/loss" in single
    assert not [k for k in single if k.startswith(("val/loss/", "val/exact_match/"))]
    assert layout(False) == LAYOUT and layout(True) != LAYOUT


def custom_scalars(run_dir: str) -> layout_pb2.Layout:
    ea = EventAccumulator(run_dir, size_guidance={"tensors": 0})
    ea.Reload()
    (event,) = ea.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def test_a_run_writes_each_sources_validation_to_tensorboard(tiny_cfg, shapes_root, tmp_path, caplog):
    # what train.py runs (experiment.runner.run), in this process: a second of work, not a process of its own
    paths = split_sources(shapes_root, tmp_path)
    mixture = (*sources_overrides(shapes_root, paths), *VAL, "data.batch_size=4", "trainer.max_steps=6")
    caplog.set_level(logging.INFO)
    trainer = fit(tiny_cfg(*mixture, "logging.run_name=mix"))
    run_dir = trainer.logger.log_dir
    console = caplog.text
    assert "  val/loss by source: part0 " in console and "  val/exact_match by source: part0 " in console
    last = next(line for line in console.splitlines() if line.startswith("  last: "))
    assert "val/loss " in last and "val/loss/" not in last  # the closing summary: the pooled numbers only
    # the held-out samples' scored tokens per source, counted from the data
    dm = build_datamodule(tiny_cfg(*mixture))
    dm.setup()
    tokens = {}
    for name, part in zip(dm.val_set.names, dm.val_set.parts):
        tokens[name] = sum(sum(1 for label in part[i]["labels"][1:] if label != -100) for i in range(len(part)))
    pooled = scalars(run_dir, "val/loss")
    answers = {name: len(part) for name, part in zip(dm.val_set.names, dm.val_set.parts)}  # every one scored
    # 21 samples an epoch in 6 batches of 4, validated every 3 (val_check_interval 0.5): recorded at steps 2 and 5
    pooled, pooled_match = scalars(run_dir, "val/loss"), scalars(run_dir, "val/exact_match")
    assert sorted(pooled) == sorted(pooled_match) == [2, 5]
    loss = {name: scalars(run_dir, f"val/loss/{name}") for name in tokens}
    match = {name: scalars(run_dir, f"val/exact_match/{name}") for name in tokens}
    for step in pooled:
        mean = sum(loss[n][step] * t for n, t in tokens.items()) / sum(tokens.values())
        assert mean == pytest.approx(pooled[step], rel=1e-5), step
        mean = sum(match[n][step] * k for n, k in answers.items()) / sum(answers.values())
        assert mean == pytest.approx(pooled_match[step], abs=1e-6), step
    charts = {chart.title: list(chart.multiline.tag) for category in custom_scalars(run_dir).category
              for chart in category.chart}  # fmt: skip
    for category, wanted in PER_SOURCE_LAYOUT.items():
        for title, (_, tags) in wanted.items():
            assert charts[title] == tags


@pytest.mark.slow  # two train.py runs, one of them two gloo processes
def test_two_ddp_processes_report_each_source_as_one_process_does(shapes_root, tmp_path):
    # the per-source sums are added over the ranks: two processes x 3 held-out samples give one process's numbers
    mixture = (*sources_overrides(shapes_root, split_sources(shapes_root, tmp_path)), *VAL, "trainer.max_steps=3")
    root = str(tmp_path / "runs")
    runs = {
        "one": ("data.batch_size=4",),
        "two": ("trainer.strategy=ddp", "trainer.devices=2", "data.batch_size=2", "data.val_batch_size=2"),
    }
    for name, extra in runs.items():
        run = run_training(
            train_cli_args(shapes_root, root, *mixture, *extra, f"logging.run_name={name}"), str(tmp_path)
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    tags = ["val/loss", *(f"val/loss/part{k}" for k in range(3)), *(f"val/exact_match/part{k}" for k in range(3))]
    one, two = ({tag: scalars(os.path.join(root, "quickstart", name), tag) for tag in tags} for name in runs)
    for tag in tags:
        assert sorted(one[tag]) == sorted(two[tag]) == [2], tag
        assert two[tag][2] == pytest.approx(one[tag][2], rel=1e-5, abs=1e-6), tag
