"""Resume wherever a job lands: the data position is global, so a run stopped on one world size (or per-device
batch) and resumed on another goes on at exactly the next sample: nothing repeated, nothing skipped, and with the
same global batch the loss curve of one uninterrupted run."""

from __future__ import annotations

import functools
import itertools
import math
import signal

import pytest

from datamodules.sampler import GroupedSampler, Padding
from tests.support.events import scalars
from tests.support.processes import finished_losses, kill_after_checkpoint, start_sixteen_steps

N = 51  # samples: no world size or batch below divides it, so the ranks' last global batch is padded


def _epoch(world: int, batch: int, group: bool, epoch: int = 1, resume=None) -> list[list[int]]:
    """Each rank's indices for `epoch` (after `resume_at(*resume)`)."""
    lengths, images = [(7 * i) % 23 for i in range(N)], [i % 5 != 0 for i in range(N)]
    ranks = []
    for rank in range(world):
        sampler = GroupedSampler(lengths, images, batch, group_by_length=group, seed=3, num_replicas=world, rank=rank)
        sampler.set_epoch(epoch)
        if resume:
            sampler.resume_at(*resume)
        ranks.append(list(sampler))
    return ranks


def _real(indices) -> list[int]:
    return sorted(i for i in indices if not isinstance(i, Padding))


def _consumed(ranks: list[list[int]], batch: int, steps: int) -> list[int]:
    return [i for r in ranks for i in r[: steps * batch] if not isinstance(i, Padding)]


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("before, after", [((2, 4), (1, 8)), ((1, 8), (2, 4)), ((2, 4), (1, 4)), ((1, 8), (3, 2))])
def test_a_resume_on_other_ranks_sees_every_remaining_sample_once(before, after, group):
    (w0, b0), (w1, b1) = before, after
    whole = _epoch(w0, b0, group)
    for steps in range(1, math.ceil(N / (w0 * b0))):
        seen = _consumed(whole, b0, steps)
        rest = _epoch(w1, b1, group, resume=(1, steps * w0 * b0, w0 * b0))
        left = [i for r in rest for i in r if not isinstance(i, Padding)]
        assert sorted(seen + left) == list(range(N)), (steps, before, after)
        assert len({len(r) for r in rest}) == 1  # every new rank steps the same number of times
        if w0 * b0 == w1 * b1:  # same global batch: the same global batches, in the same order
            old = [_real(itertools.chain(*(r[k * b0 : (k + 1) * b0] for r in whole))) for k in range(steps, 7)]
            new = [_real(itertools.chain(*(r[k * b1 : (k + 1) * b1] for r in rest))) for k in range(7 - steps)]
            assert new == old


def test_the_same_layout_resumes_exactly_as_before():
    # the per-rank sampler of old (each rank skips its own share) is what the global position gives
    for group, steps in itertools.product((False, True), range(7)):
        whole = _epoch(2, 4, group)
        resumed = _epoch(2, 4, group, resume=(1, steps * 8, 8))
        assert [r[steps * 4 :] for r in whole] == resumed


def _run(tmp_path, shapes_root, name: str, *extra: str):
    return start_sixteen_steps(tmp_path, shapes_root, name, "data.num_workers=2", "data.packing=true",
                               "data.group_by_length=true", *extra)  # fmt: skip


def _finish(tmp_path, proc, name: str) -> tuple[dict[int, float], str]:
    losses = finished_losses(tmp_path, proc, name)
    return losses, proc.output


ONE = ("trainer.devices=1", "data.batch_size=8")
TWO = ("trainer.strategy=ddp", "trainer.devices=2", "data.batch_size=4")


@pytest.fixture(scope="module")
def reference(shapes_root, tmp_path_factory):
    """One uninterrupted process x 8, started once for the module (beside the test's own runs); gives its
    train/loss {step: value} once it has ended."""
    root = tmp_path_factory.mktemp("reference")
    proc = _run(root, shapes_root, "reference", *ONE)
    return functools.cache(lambda: _finish(root, proc, "reference")[0])


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(TWO, ONE), (ONE, TWO)], ids=["2x4 then 1x8", "1x8 then 2x4"])
def test_killed_on_one_world_size_and_resumed_on_another_logs_the_uninterrupted_losses(
    reference, shapes_root, tmp_path, first, then
):
    """51 samples at a global batch of 8: 7 steps an epoch. Killed mid-epoch with SIGKILL (after the step-3
    checkpoint, or a later one) and resumed with resume=auto on the other world size: the same global batches,
    so the losses of one uninterrupted process, step by step."""
    stopped = _run(tmp_path, shapes_root, "moved", *first, "checkpoint.every_n_train_steps=3")
    last = tmp_path / "runs" / "quickstart" / "moved" / "checkpoints" / "last.ckpt"
    at = kill_after_checkpoint(stopped, str(last), sig=signal.SIGKILL)
    resumed, out = _finish(tmp_path, _run(tmp_path, shapes_root, "moved", *then, "resume=auto"), "moved")
    assert "the global batch changed" not in out
    reference = reference()
    assert sorted(reference) == list(range(16)) and set(range(at, 16)) <= set(resumed)
    for step in range(at, 16):
        assert resumed[step] == pytest.approx(reference[step], rel=2e-6), (step, at)


@pytest.mark.slow
def test_a_resume_with_another_global_batch_says_so_and_ends_its_epoch_with_its_data(shapes_root, tmp_path):
    """Stopped at step 3 of a 2 x 4 run (24 of 51 samples seen), resumed as 1 x 4 (a global batch of 4): the
    27 samples left are 7 batches of 4, so epoch 0 ends at step 3 + 7 = 10, and epoch 1 has 13 steps."""
    stopped = _run(tmp_path, shapes_root, "halved", *TWO, "checkpoint.every_n_train_steps=3")
    last = tmp_path / "runs" / "quickstart" / "halved" / "checkpoints" / "last.ckpt"
    at = kill_after_checkpoint(stopped, str(last), sig=signal.SIGKILL)
    assert at == 3, stopped.output[-3000:]
    resumed = _run(tmp_path, shapes_root, "halved", "trainer.devices=1", "data.batch_size=4", "resume=auto")
    resumed_losses, out = _finish(tmp_path, resumed, "halved")
    changed = "resume: the global batch changed from 8 to 4 samples (1 x data.batch_size 4): epoch 0 goes on at its"
    assert f"{changed} sample 24" in out
    epochs = scalars(str(tmp_path / "runs" / "quickstart" / "halved"), "epoch")
    assert [epochs[s] for s in range(3, 16)] == [0] * 7 + [1] * 6 and set(range(3, 16)) <= set(resumed_losses)
