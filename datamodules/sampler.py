"""A deterministic, resumable, rank-aware sampler with optional modality + length grouping.

Order is a pure function of (seed, epoch) and, with length grouping, of the global batch it is laid out in,
so a resumed run sees the same data as an uninterrupted one. The position is global: `resume_at(epoch, p,
layout)` drops the first p samples of that epoch's order as all ranks together consumed them (laid out in the
global batch `layout` of the run that saved it), and only of that epoch: a checkpoint taken on an epoch's last
batch resumes into the next epoch whole. The ranks and batch of the resumed run may differ from the saved one's:
the rest of the epoch is dealt out to the new ranks, and no sample is repeated or skipped. Grouping follows
LLaVA's `modality_length_grouped`: image and text-only samples never share a global batch, and
within a mega-batch of 50 global batches samples are sorted by length, which cuts padding.
Ranks take interleaved samples of each global batch, so every rank steps on comparable lengths.

When the dataset does not divide among the ranks, the last global batch is padded by repeating samples
(as DistributedSampler does), so every rank runs the same number of steps. The repeats are yielded as
`Padding` indices and `ZeroWeightPadding` trains on none of their tokens: the padded global batch is the
same set of scored tokens as one process's short last batch, and N processes x batch b train like one
process x batch N*b at every step (the loss is the global token mean, lit_modules/vlm_module.py).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from datamodules.templates import IGNORE_INDEX


class Padding(int):
    """A sample index repeated only to even out the ranks' shares of the last global batch."""


class ZeroWeightPadding(Dataset):
    """A training dataset view whose `Padding` items carry no label: they fill a rank's batch and
    score nothing, so the global batch's loss and gradient are those of its real samples.

    Args:
        dataset: LLaVADataset (items are dicts with `labels`, or None for a skipped sample).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[int(i)]
        if item is not None and isinstance(i, Padding):
            item = dict(item, labels=[IGNORE_INDEX] * len(item["labels"]))
        return item


class GroupedSampler(Sampler[int]):
    """Deterministic, resumable indices for one rank, optionally grouped by modality and length.

    Args:
        lengths: token length of each sample (a sequence or an array).
        has_image: whether each sample has an image (a sequence or an array).
        batch_size: per-rank batch size.
        shuffle: shuffle each epoch (False: dataset order, for validation).
        group_by_length: group by modality and sort by length inside mega-batches.
        seed: base seed; the order of epoch e uses seed + e.
        num_replicas: number of ranks (world size).
        rank: this rank.
        plan: epoch -> the indices the epoch holds, repeats included (a mixture of sources,
            datamodules/mixture.py); None: every index once.
    """

    MEGA = 50  # global batches per sorted mega-batch (LLaVA uses 50 as well)

    def __init__(
        self,
        lengths: list[int],
        has_image: list[bool],
        batch_size: int,
        shuffle: bool = True,
        group_by_length: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        plan: Callable[[int], np.ndarray] | None = None,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)  # arrays: a 665K-record order is drawn in a second
        self.has_image = np.asarray(has_image, dtype=bool)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.plan = plan
        self.size = len(plan(0)) if plan is not None else len(self.lengths)  # samples an epoch
        self.epoch = 0
        self._resume: tuple[int, int, int] | None = None  # (epoch, global position, global batch of its layout)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_replicas

    def resume_at(self, epoch: int, position: int, layout: int | None = None) -> None:
        """Start epoch `epoch` after the first `position` samples of its order, laid out in global batches of
        `layout` (None: this sampler's own), for a mid-epoch resume; other epochs start at 0."""
        self._resume = (epoch, position, layout or self.global_batch)

    def __len__(self) -> int:
        return math.ceil(self.size / self.num_replicas)

    def _global_order(self, global_batch: int) -> list[int]:
        population = self.plan(self.epoch) if self.plan is not None else None
        if not self.shuffle:
            return population.tolist() if population is not None else list(range(self.size))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.size, generator=gen).numpy()
        if population is not None:
            perm = population[perm]
        if not self.group_by_length:
            return perm.tolist()
        batches = []
        for modality in (True, False):
            idx = perm[self.has_image[perm] == modality]
            mega = global_batch * self.MEGA
            for s in range(0, len(idx), mega):
                chunk = idx[s : s + mega]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]  # longest first, ties in drawn order
                batches += [chunk[k : k + global_batch] for k in range(0, len(chunk), global_batch)]
        # Full batches in random order; the ragged ones (one per modality and mega-batch) go last.
        full = [b for b in batches if len(b) == global_batch]
        ragged = [b for b in batches if len(b) < global_batch]
        order = torch.randperm(len(full), generator=gen).tolist()
        parts = [full[k] for k in order] + ragged
        return np.concatenate(parts).tolist() if parts else []

    def __iter__(self):
        order, start = self._global_order(self.global_batch), 0
        if self._resume is not None and self._resume[0] <= self.epoch:  # used once, by its epoch (or a later one)
            if self._resume[0] == self.epoch:
                start = self._resume[1]
                if self._resume[2] != self.global_batch:  # the rest of the order of the run that saved it
                    order = self._global_order(self._resume[2])
            self._resume = None
        rest = order[start:]  # a position in the padding tail: nothing left of this epoch
        rest += [Padding(i) for i in order[: -len(rest) % self.num_replicas]]  # every rank gets the same count
        return iter(rest[self.rank :: self.num_replicas])
