"""Run directories named for what the run changes (experiment/run_dir.py): what TensorBoard shows as run names."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from experiment.config import ConfigError
from experiment.run_dir import ENV, claim_run_directory, run_name_from_overrides
from experiment.runner import run


@pytest.mark.parametrize(
    "overrides, name",
    [
        ([], "defaults"),
        (["model.encoder.name=sam_vit_b", "optim.lr=3e-4"], "encoder=sam_vit_b,lr=3e-4"),
        (["model.llm.path=/models/Llama-3-8B/"], "llm=Llama-3-8B"),  # a path: its last component
        (["model.llm.lora={r: 4, alpha: 8}"], "lora=r-4,alpha-8"),
        (
            ["model.encoder.image_size=336", "data.builtin.image_size=32"],
            "model.encoder.image_size=336,data.builtin.image_size=32",
        ),  # two short names alike: the full keys
        # where the data and logs live, workers, resuming: not what the run computes
        (
            ["data.builtin.root=/tmp/x", "logging.root=/r", "data.num_workers=4", "resume=auto", "stage=align"],
            "stage=align",
        ),
        (["data.image_folder=my images/"], "image_folder=my_images"),
    ],
)
def test_a_run_is_named_by_its_overrides(overrides, name):
    assert run_name_from_overrides(overrides) == name


def test_a_long_name_is_cut_and_stays_unique():
    a = run_name_from_overrides([f"optim.lr={'1' * 200}"])
    b = run_name_from_overrides([f"optim.lr={'1' * 199}2"])
    assert len(a) == len(b) == 120 and a != b and a.startswith("lr=111")


def _short(cfg, *overrides):
    """What the command line would have held: only `overrides` (the tiny test set stays out of the name)."""
    cfg.overrides = list(overrides)
    return cfg


def test_runs_with_the_same_overrides_get_their_own_directories(tiny_cfg, tmp_path):
    fast = ("trainer.max_steps=1", "trainer.max_epochs=3", "trainer.limit_val_batches=0")
    first = run(_short(tiny_cfg(*fast, "optim.lr=3e-4"), "optim.lr=3e-4"))
    second = run(_short(tiny_cfg(*fast, "optim.lr=3e-4"), "optim.lr=3e-4"))
    base = run(_short(tiny_cfg(*fast)))
    assert [t.logger.version for t in (first, second, base)] == ["lr=3e-4", "lr=3e-4-2", "defaults"]
    for trainer in (first, second, base):
        assert os.path.isfile(os.path.join(trainer.logger.log_dir, "checkpoints", "last.ckpt"))
        assert os.path.dirname(trainer.logger.log_dir) == str(tmp_path / "runs" / "quickstart")
    resumed = run(_short(tiny_cfg(*fast[1:], "trainer.max_steps=2", "resume=auto", "optim.extend=constant")))
    assert resumed.logger.version == "defaults" and resumed.global_step == 2  # the newest run it matches


def test_jobs_started_together_claim_different_directories(tiny_cfg, tmp_path):
    cfg = _short(tiny_cfg(), "optim.lr=0.1")
    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(lambda _: claim_run_directory(cfg, None), range(8)))
    assert sorted(names) == sorted(["lr=0.1"] + [f"lr=0.1-{n}" for n in range(2, 9)])
    assert sorted(os.listdir(tmp_path / "runs" / "quickstart")) == sorted(names)


def test_other_ranks_take_rank_zeros_name(tiny_cfg, monkeypatch):
    cfg = _short(tiny_cfg(), "optim.lr=0.1")
    name = claim_run_directory(cfg, None)
    assert os.environ[ENV] == name  # what Lightning's launcher hands to the processes it starts
    claim_run_directory(cfg, None)  # now "lr=0.1" is taken: a second job gets "lr=0.1-2"
    monkeypatch.setenv(ENV, name)
    assert claim_run_directory(cfg, None, rank=1) == name
    monkeypatch.delenv(ENV)
    assert claim_run_directory(cfg, None, rank=1) == "lr=0.1"  # torchrun: LastCheckpoint broadcasts the path


def test_a_requeued_job_without_a_checkpoint_starts_afresh_in_its_directory(tiny_cfg):
    """SLURM requeues a job (`logging.run_name=x resume=auto`) that died before its first checkpoint: the run
    starts over in `x` instead of failing on "already holds a run"; the first attempt's files are kept aside."""
    import lightning as L

    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 1:
                raise RuntimeError("pre-empted")

    job = ("logging.run_name=x", "resume=auto", "trainer.max_steps=2", "trainer.limit_val_batches=0")
    with pytest.raises(RuntimeError, match="pre-empted"):
        run(tiny_cfg(*job), Crash())
    run_dir = os.path.join(tiny_cfg().logging.root, "quickstart", "x")
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "last.ckpt"))
    again = run(tiny_cfg(*job))
    assert again.global_step == 2 and again.logger.log_dir == run_dir
    assert os.path.isfile(os.path.join(run_dir, "attempt-1", "config.yaml"))
    assert [f for f in os.listdir(os.path.join(run_dir, "attempt-1")) if f.startswith("events.out")]
    # its checkpoint now makes it a run of this model: another model's job under that name is refused
    with pytest.raises(ConfigError, match="'logging.run_name' = 'x': .*already holds a run"):
        run(tiny_cfg(*job, "model.projector=linear"))
    assert os.listdir(run_dir).count("attempt-1") == 1 and not os.path.exists(os.path.join(run_dir, "attempt-2"))


def test_a_run_that_fails_while_building_leaves_no_directory(tiny_cfg, tmp_path):
    cfg = _short(tiny_cfg(), "optim.lr=0.1")
    cfg.model.llm.config.model_type = "no_such_model"  # after validation: the build itself fails
    with pytest.raises(Exception, match="no_such_model"):
        run(cfg)
    assert os.listdir(tmp_path / "runs" / "quickstart") == []  # "lr=0.1" is free for the next attempt
