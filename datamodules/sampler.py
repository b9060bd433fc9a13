"""A deterministic, resumable, rank-aware sampler with optional modality + length grouping.

Order is a pure function of (seed, epoch), so a resumed run sees the same data as an uninterrupted
one: `skip(n)` drops the first n samples of the next epoch this rank iterates. Grouping follows
LLaVA's `modality_length_grouped`: image and text-only samples never share a global batch, and
within a mega-batch of 50 global batches samples are sorted by length, which cuts padding.
Ranks take interleaved samples of each global batch, so every rank steps on comparable lengths.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


class GroupedSampler(Sampler[int]):
    """Deterministic, resumable indices for one rank, optionally grouped by modality and length.

    Args:
        lengths: token length of each sample.
        has_image: whether each sample has an image.
        batch_size: per-rank batch size.
        shuffle: shuffle each epoch (False: dataset order, for validation).
        group_by_length: group by modality and sort by length inside mega-batches.
        seed: base seed; the order of epoch e uses seed + e.
        num_replicas: number of ranks (world size).
        rank: this rank.
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
    ) -> None:
        self.lengths = lengths
        self.has_image = has_image
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, num_samples: int) -> None:
        """Start the next iteration `num_samples` (per rank) into the epoch, for mid-epoch resume."""
        self._skip = num_samples

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.num_replicas)

    def _global_order(self) -> list[int]:
        n = len(self.lengths)
        if not self.shuffle:
            return list(range(n))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=gen).tolist()
        if not self.group_by_length:
            return perm
        global_batch = self.batch_size * self.num_replicas
        batches = []
        for modality in (True, False):
            idx = [i for i in perm if self.has_image[i] == modality]
            mega = global_batch * self.MEGA
            for s in range(0, len(idx), mega):
                chunk = sorted(idx[s : s + mega], key=lambda i: -self.lengths[i])
                batches += [chunk[k : k + global_batch] for k in range(0, len(chunk), global_batch)]
        # Full batches in random order; the ragged ones (one per modality and mega-batch) go last.
        full = [b for b in batches if len(b) == global_batch]
        ragged = [b for b in batches if len(b) < global_batch]
        order = torch.randperm(len(full), generator=gen).tolist()
        return [i for k in order for i in full[k]] + [i for b in ragged for i in b]

    def __iter__(self):
        order = self._global_order()
        total = len(self) * self.num_replicas
        order += order[: total - len(order)]  # pad so every rank gets the same count (DistributedSampler does too)
        mine = order[self.rank :: self.num_replicas]
        start, self._skip = self._skip, 0
        return iter(mine[start:])
