"""The learning-rate schedule of a run: linear warm-up, cosine decay to a floor, and what happens when a resumed
run is made longer or shorter (`optim.extend`).

The factor (times each group's peak lr) at optimizer step s, with W warm-up steps, T total steps and floor f:

    s < W:   s / W
    s >= W:  f + (1 - f) * (1 + cos(pi * (s - W) / (T - W))) / 2        (f from step T on)

which is transformers' `get_cosine_with_min_lr_schedule_with_warmup` (num_cycles 0.5, min_lr_rate f) up to T.

Why an object and not a function: `LambdaLR` saves a callable object's `__dict__` with the scheduler's state
(a plain function it skips), and a resume restores it. So a resumed run keeps the schedule it was trained with
even when `trainer.max_steps` (or `max_epochs`, the world size, the batch) now gives another length. The
length of the run is then changed explicitly, from the current step on (`extend`):

    refuse    the default: an error that names the options (the lr would otherwise jump at the resume)
    cosine    a new cosine from the current lr down to the floor at the new last step
    constant  the current lr held to the new last step

A flat schedule (no warm-up, floor 1) has no shape to keep: its length changes silently.
"""

from __future__ import annotations

import math

from foundation.schema import ConfigError

EXTENSIONS = ("refuse", "cosine", "constant")


class WarmupCosine:
    """Step -> lr factor, for `torch.optim.lr_scheduler.LambdaLR`. Its state is plain data (a checkpoint
    read with `weights_only` restores it).

    Args:
        warmup: warm-up steps (W).
        total: the step where the cosine reaches the floor (T).
        floor: the factor at the end (optim.min_lr_ratio).
    """

    def __init__(self, warmup: int, total: int, floor: float) -> None:
        self.warmup = warmup
        self.total = total
        self.floor = floor
        self.tail: dict | None = None  # {"kind", "start", "end", "peak"}: the schedule after an extension

    @property
    def end(self) -> int:
        """The run's last step as the schedule knows it."""
        return self.tail["end"] if self.tail else self.total

    @property
    def flat(self) -> bool:
        return self.warmup == 0 and self.floor == 1.0 and (self.tail is None or self.tail["peak"] == 1.0)

    def __call__(self, step: int) -> float:
        tail = self.tail
        if tail is not None and step >= tail["start"]:
            if tail["kind"] == "constant":
                return tail["peak"]
            progress = min(1.0, (step - tail["start"]) / max(1, tail["end"] - tail["start"]))
            return self.floor + (tail["peak"] - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if step < self.warmup:
            return step / max(1, self.warmup)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - self.floor) + self.floor)

    def extend(self, step: int, end: int, how: str) -> None:
        """Make the schedule end at `end` from `step` on, as `how` (one of EXTENSIONS) says."""
        if end == self.end:
            return
        if self.flat:
            self.total, self.tail = end, None
            return
        if how == "refuse":
            raise ConfigError(
                f"the resumed run's lr schedule ends at step {self.end}, and trainer.max_steps / max_epochs (or the "
                f"world size, batch or accumulate_grad_batches) now make the run end at step {end}: its lr would "
                f"jump at step {step}. Set optim.extend=cosine (a new cosine from the current lr to the floor at "
                f"step {end}) or optim.extend=constant (the current lr until then), or resume with the run's "
                f"original length"
            )
        if how not in EXTENSIONS:
            raise ConfigError(f"'optim.extend' = {how!r} is not valid; choose one of: {', '.join(EXTENSIONS)}")
        self.tail = {"kind": how, "start": step, "end": end, "peak": self(step)}
