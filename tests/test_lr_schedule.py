"""The lr schedule: transformers' warm-up + cosine, kept through a resume, and a changed run length extended only
as `optim.extend` says (never a silent jump)."""

from __future__ import annotations

import io
import os

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from foundation.schema import ConfigError
from lit_modules.lr_schedule import WarmupCosine
from tests.support.events import scalars
from tests.support.processes import kill_after_checkpoint, run_training, start_training, train_cli_args


@pytest.mark.parametrize("warmup, total, floor", [(0, 10, 0.0), (3, 50, 0.1), (5, 7, 0.0), (0, 1, 1.0)])
def test_the_schedule_is_transformers_cosine_with_warmup(warmup, total, floor):
    reference = get_cosine_with_min_lr_schedule_with_warmup(
        torch.optim.SGD([torch.zeros(1)], lr=1.0), warmup, total, min_lr_rate=floor
    ).lr_lambdas[0]
    ours = WarmupCosine(warmup, total, floor)
    assert [ours(s) for s in range(total + 1)] == pytest.approx([reference(s) for s in range(total + 1)], abs=1e-12)
    assert ours(total + 5) == pytest.approx(floor)  # the floor holds after the end (transformers' cosine turns up)


def _scheduler(schedule: WarmupCosine):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def test_a_resume_restores_the_schedule_it_was_trained_with():
    trained = _scheduler(WarmupCosine(2, 10, 0.1))
    for _ in range(4):
        trained.optimizer.step()
        trained.step()
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    resumed = _scheduler(WarmupCosine(2, 20, 0.1))  # the resumed run asks for 20 steps
    resumed.load_state_dict(torch.load(buffer, weights_only=True))  # as checkpoints are read here
    assert resumed.lr_lambdas[0].total == 10 and resumed.get_last_lr() == trained.get_last_lr()


@pytest.mark.parametrize("how", ["cosine", "constant"])
def test_an_extension_continues_from_the_current_lr(how):
    schedule = WarmupCosine(2, 10, 0.1)
    at = schedule(6)
    schedule.extend(6, 30, how)
    assert schedule(6) == at and schedule(5) == WarmupCosine(2, 10, 0.1)(5)  # no jump, the past unchanged
    if how == "cosine":
        assert schedule(30) == pytest.approx(0.1) and schedule(7) < at
        assert all(schedule(s) >= schedule(s + 1) for s in range(6, 30))
    else:
        assert {schedule(s) for s in range(6, 31)} == {at}
    schedule.extend(12, 40, "cosine")  # extended again: from where the last extension stands
    assert schedule(12) == pytest.approx(schedule.tail["peak"]) and schedule.end == 40


def test_a_changed_length_is_refused_by_default_unless_the_schedule_is_flat():
    with pytest.raises(ConfigError, match=r"ends at step 10, .* end at step 20: its lr would jump at step 6"):
        WarmupCosine(2, 10, 0.1).extend(6, 20, "refuse")
    flat = WarmupCosine(0, 10, 1.0)
    flat.extend(6, 20, "refuse")
    assert flat.end == 20 and {flat(s) for s in range(25)} == {1.0}


@pytest.mark.slow
def test_train_py_refuses_a_longer_resume_then_extends_it_as_asked(shapes_root, tmp_path):
    """A job killed mid-schedule is requeued with a larger max_steps: refused in one line, then continued with
    optim.extend=cosine: the logged lr follows the first schedule up to the kill and the new cosine after it."""
    root = str(tmp_path / "runs")
    common = (
        "logging.run_name=r",
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        "trainer.max_epochs=9",
    )
    common += ("optim.warmup_ratio=0.25", "optim.min_lr_ratio=0.1", "checkpoint.every_n_train_steps=4")
    args = lambda *extra: train_cli_args(shapes_root, root, *common, *extra)  # noqa: E731
    first = start_training(args("trainer.max_steps=12"), str(tmp_path))
    killed_at = kill_after_checkpoint(first, os.path.join(root, "quickstart", "r", "checkpoints", "last.ckpt"))

    refused = run_training(args("trainer.max_steps=20", "resume=auto"), str(tmp_path))
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the resumed run's lr schedule ends at step 12, and trainer.max_steps")
    extended = run_training(args("trainer.max_steps=20", "resume=auto", "optim.extend=cosine"), str(tmp_path))
    assert extended.returncode == 0, extended.stderr[-3000:]
    lr = scalars(os.path.join(root, "quickstart", "r"), "lr/projector")  # the rate each step trains with
    expected = WarmupCosine(3, 12, 0.1)
    expected.extend(killed_at, 20, "cosine")
    peak = lr[1] / expected(1)
    assert sorted(lr) == list(range(20))
    assert [lr[s] / peak for s in range(20)] == pytest.approx([expected(s) for s in range(20)], abs=1e-6)
