"""Weighted mixtures (`data.sources`, datamodules/mixture.py): counts per source by hand, the epoch's plan as a
function of seed and epoch, each source's own template, errors that name the source, the resolved mixture saved
with the run, samples per source in TensorBoard, and an exact resume of a three-source mixture after SIGKILL and
SIGTERM."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from datamodules import ImageSpec, LLaVADataModule
from datamodules.llava_data import DataError
from datamodules.mixture import Mixture, resolve_counts
from datamodules.sampler import GroupedSampler
from encoders.preprocess import ResizeCrop
from experiment.config import ConfigError
from foundation.schema import DataConfig, SourceConfig
from tests.support.events import scalars
from tests.support.mixtures import split_sources
from tests.support.processes import interrupted_twice

N = 9
IMAGE = ImageSpec(32, (0.5,) * 3, (0.5,) * 3, num_tokens=N, preprocess=ResizeCrop.clip(32, (0.5,) * 3, (0.5,) * 3))


def test_counts_per_source_by_hand():
    names = ["a", "b", "c"]
    # weights share the weighted sources' records (10 + 30 = 40) in proportion: 1:3 -> 10, 30; 1:1 -> 20, 20
    assert resolve_counts(names[:2], [("weight", 1), ("weight", 3)], [10, 30]) == [10, 30]
    assert resolve_counts(names[:2], [("weight", 1), ("weight", 1)], [10, 30]) == [20, 20]
    # 10 / 3 each: largest remainders, ties to the first source
    assert resolve_counts(names, [("weight", 1)] * 3, [4, 3, 3]) == [4, 3, 3]
    assert resolve_counts(names, [("repeat", 2), ("repeat", 0.5), None], [5, 8, 7]) == [10, 4, 7]
    assert resolve_counts(names, [("num_samples", 12), ("weight", 0), ("weight", 2)], [5, 8, 7]) == [12, 0, 15]
    with pytest.raises(DataError, match="data sources 'b', 'c': every weight is 0"):
        resolve_counts(names, [None, ("weight", 0), ("weight", 0)], [5, 8, 7])
    with pytest.raises(DataError, match="data source 'a': repeat -1 is negative"):
        resolve_counts(names, [("repeat", -1), None, None], [5, 8, 7])


def test_the_plan_is_a_function_of_seed_and_epoch():
    mix = Mixture(["a", "b", "c"], [5, 8, 7], [12, 4, 7], seed=3)
    plan = mix.plan(0)
    sources = Counter(mix.source_of(plan).tolist())
    assert sources == {0: 12, 1: 4, 2: 7}  # each source's count, exactly
    a = plan[mix.source_of(plan) == 0]
    assert sorted(Counter(a.tolist()).values()) == [2, 2, 2, 3, 3]  # 12 of 5 records: all twice, 2 a third time
    assert np.array_equal(plan, Mixture(["a", "b", "c"], [5, 8, 7], [12, 4, 7], seed=3).plan(0))
    assert not np.array_equal(plan, mix.plan(1))  # another epoch draws other extras
    assert not np.array_equal(plan, Mixture(["a", "b", "c"], [5, 8, 7], [12, 4, 7], seed=4).plan(0))
    c = plan[mix.source_of(plan) == 2]
    assert sorted(c.tolist()) == list(range(13, 20))  # repeat 1: every record once


def test_a_mixture_sampler_resumes_mid_epoch_on_another_world_size():
    mix = Mixture(["a", "b", "c"], [5, 8, 7], [12, 4, 7], seed=3)
    lengths, has_image = np.arange(20) % 7, np.arange(20) % 3 > 0
    whole = list(GroupedSampler(lengths, has_image, 4, seed=1, group_by_length=True, plan=mix.plan))
    assert len(whole) == 23 and Counter(mix.source_of(np.array(whole)).tolist()) == {0: 12, 1: 4, 2: 7}
    ranks = [GroupedSampler(lengths, has_image, 2, seed=1, group_by_length=True, plan=mix.plan, num_replicas=2,
                            rank=r) for r in (0, 1)]  # fmt: skip
    for r in ranks:
        r.resume_at(0, 8, 4)  # 8 samples done in global batches of 4
    rest = [list(r) for r in ranks]
    merged = [i for pair in zip(*rest) for i in pair]
    assert merged[: 23 - 8] == whole[8:]  # nothing repeated, nothing skipped


def test_a_datamodule_over_three_sources(tokenizer, shapes_root, tmp_path):
    a, b, c = split_sources(shapes_root, tmp_path)
    sources = [
        SourceConfig(file=a, weight=1.0),
        SourceConfig(file=b, name="bee", repeat=0.5, system_prompt="Answer briefly."),
        SourceConfig(file=c, num_samples=10),
    ]
    data = DataConfig(sources=sources, image_folder=shapes_root, template="chatml", max_length=96, batch_size=4)
    dm = LLaVADataModule(tokenizer, data, IMAGE, stage="sft", seed=2)
    dm.setup()
    assert dm.mixture.describe() == [
        {"source": "part0", "records": 12, "samples": 12, "share": 12 / 26},
        {"source": "bee", "records": 8, "samples": 4, "share": 4 / 26},
        {"source": "part2", "records": 7, "samples": 10, "share": 10 / 26},
    ]
    loader = dm.train_dataloader()
    assert len(loader.sampler) == 26
    seen = Counter(s for batch in loader for s in batch["sources"])
    assert seen == {"part0": 12, "bee": 4, "part2": 10}
    items = {dm.train_set[i]["source"]: dm.train_set[i] for i in (0, 12)}
    system = tokenizer("Answer briefly.", add_special_tokens=False)["input_ids"]
    bee = items["bee"]["input_ids"]
    assert any(bee[k : k + len(system)] == system for k in range(len(bee)))  # the source's own system prompt
    plain = items["part0"]["input_ids"]
    assert not any(plain[k : k + len(system)] == system for k in range(len(plain)))  # the data group's (none)


@pytest.mark.parametrize(
    "sources, needle",
    [
        ("[{file: A, weight: -1}]", r"'data.sources\[0\].weight' = -1.0 for source 'part0' is negative"),
        ("[{file: A, weight: 0}, {file: B, weight: 0}]", "every weight of data.sources is 0 \\(part0, part1\\)"),
        ("[{file: A, weight: 1, repeat: 2}]", r"source 'part0' \(data.sources\[0\]\) sets weight and repeat"),
        ("[{file: A, wieght: 1}]", r"part0.json, wieght: 1}\]': unknown key 'wieght' in a SourceConfig item; valid"),
        ("[{file: A}, {file: A}]", "source name 'part0' .* is used twice"),
        ("[{file: A, template: nope}]", r"'data.sources\[0\].template' = 'nope'"),
    ],
)
def test_invalid_sources_name_the_source(tiny_cfg, shapes_root, tmp_path, sources, needle):
    a, b, _ = split_sources(shapes_root, tmp_path)
    spec = sources.replace("file: A", f"file: {a}").replace("file: B", f"file: {b}")
    with pytest.raises(ConfigError, match=needle):
        tiny_cfg("data.builtin=null", f"model.tokenizer={shapes_root}/tokenizer", f"data.sources={spec}")


COMMON = (
    "trainer.max_steps=12",
    "trainer.max_epochs=3",
    "trainer.limit_val_batches=0",
    "trainer.log_every_n_steps=1",
    "optim.lr=0.01",
    "data.group_by_length=true",
    "data.batch_size=4",
)


@pytest.mark.slow  # three train.py processes
def test_a_three_source_mixture_resumes_exactly_after_sigkill_and_sigterm(shapes_root, tmp_path):
    a, b, c = split_sources(shapes_root, tmp_path)
    spec = f"[{{file: {a}, weight: 1}}, {{file: {b}, repeat: 0.5}}, {{file: {c}, num_samples: 10}}]"
    mixture = ("data.builtin=null", f"model.tokenizer={shapes_root}/tokenizer", f"data.image_folder={shapes_root}",
               f"data.sources={spec}", *COMMON)  # fmt: skip
    # 26 samples an epoch in batches of 4: 7 steps. SIGKILL after step 3, SIGTERM in epoch 1.
    ref_dir, run_dir, out = interrupted_twice(shapes_root, tmp_path, mixture, steps_per_epoch=7)
    assert "data mixture (samples an epoch takes from each source)" in out
    full, resumed = scalars(ref_dir, "train/loss"), scalars(run_dir, "train/loss")
    assert sorted(full) == list(range(12)) and set(range(3, 12)) <= set(resumed)
    for step in range(3, 12):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), (step, full, resumed)
    saved = json.load(open(os.path.join(run_dir, "mixture.json")))
    assert [(s["source"], s["records"], s["samples"]) for s in saved["sources"]] == [
        ("part0", 12, 12), ("part1", 8, 4), ("part2", 7, 10)
    ]  # fmt: skip
    # Samples per source in TensorBoard, before each step's batch: step 7 starts epoch 1 (26 samples an epoch in
    # 7 batches), so step 11 has epoch 0 whole and 4 batches of 4 of epoch 1 behind it.
    seen = {name: scalars(run_dir, f"data/samples/{name}") for name in ("part0", "part1", "part2")}
    assert [seen[n][7] for n in seen] == [12, 4, 10]
    assert sum(seen[n][11] for n in seen) == 26 + 16
