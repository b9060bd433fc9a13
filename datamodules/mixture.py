"""A training mixture (`data.sources`): several LLaVA files, each taking a set number of samples an epoch.

Each source gives one of `weight` (the weighted sources share the sum of their usable records in proportion to
their weights, by largest remainders), `repeat` (its usable records times r, rounded: 2 = each record twice,
0.5 = half of them) or `num_samples` (that many); none of them is repeat 1. The counts are fixed for the run
(`resolve_counts`); which records fill them changes with the epoch: every record `count // records` times, then
`count % records` more drawn without replacement from a generator seeded with (seed, epoch, source).

The mixture's dataset is the sources' usable records one after another (`MixtureDataset`, fixed), and an epoch
is a population of its indices, repeats included (`Mixture.plan`), which `GroupedSampler` shuffles and groups
as it would one file's. The sampler's position in that order is what a checkpoint keeps, so a resume mid-epoch
goes on at exactly the next sample, and the samples each source gave up to any step follow from the order alone
(`Mixture.seen`), the same on every rank, with no communication.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Dataset

from datamodules.llava_data import DataError, LLaVADataset


def resolve_counts(names: list[str], how: list[tuple[str, float] | None], records: list[int]) -> list[int]:
    """Samples per epoch of each source. `how[k]` is ("weight" | "repeat" | "num_samples", value) or None."""
    counts = [0] * len(names)
    weighted = [k for k, h in enumerate(how) if h is not None and h[0] == "weight"]
    for k, h in enumerate(how):
        kind, value = h or ("repeat", 1.0)
        if value < 0:
            raise DataError(f"data source {names[k]!r}: {kind} {value} is negative")
        if kind == "repeat":
            counts[k] = int(round(value * records[k]))
        elif kind == "num_samples":
            counts[k] = int(value)
    if weighted:
        total_weight = sum(how[k][1] for k in weighted)
        if total_weight <= 0:
            raise DataError(f"data sources {', '.join(repr(names[k]) for k in weighted)}: every weight is 0")
        pool = sum(records[k] for k in weighted)
        exact = {k: pool * how[k][1] / total_weight for k in weighted}
        for k in weighted:
            counts[k] = math.floor(exact[k])
        by_remainder = sorted(weighted, key=lambda k: (-(exact[k] - counts[k]), k))
        for k in by_remainder[: pool - sum(counts[k] for k in weighted)]:
            counts[k] += 1
    for k, n in enumerate(counts):
        if n and not records[k]:
            raise DataError(f"data source {names[k]!r}: {n} samples asked of a source without usable records")
    return counts


class Mixture:
    """Which samples an epoch of the mixture holds.

    Args:
        names: the sources' names.
        records: usable records per source (the `MixtureDataset`'s parts, in order).
        samples: samples per epoch per source (`resolve_counts`).
        seed: the run's data seed.
    """

    def __init__(self, names: list[str], records: list[int], samples: list[int], seed: int) -> None:
        self.names, self.records, self.samples, self.seed = names, records, samples, seed
        self.offsets = np.cumsum([0] + records)

    def __len__(self) -> int:
        return sum(self.samples)

    def plan(self, epoch: int) -> np.ndarray:
        """The epoch's population: dataset indices, each source's `samples` of them (int64 [len(self)])."""
        parts = [np.zeros(0, np.int64)]
        for k, (n, count) in enumerate(zip(self.records, self.samples)):
            if not count:
                continue
            full, rest = divmod(count, n)
            drawn = np.random.default_rng([self.seed, epoch, k]).permutation(n)[:rest]
            parts.append(np.concatenate([np.tile(np.arange(n), full), np.sort(drawn)]) + self.offsets[k])
        return np.concatenate(parts)

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, indices, side="right") - 1

    def seen(self, epoch: int, consumed: np.ndarray) -> dict[str, int]:
        """Samples per source in the epochs before `epoch` and in `consumed` (the indices of `epoch` trained on)."""
        now = np.bincount(self.source_of(np.asarray(consumed, dtype=np.int64)), minlength=len(self.names))
        return {name: epoch * self.samples[k] + int(now[k]) for k, name in enumerate(self.names)}

    def describe(self) -> list[dict]:
        return [
            {"source": name, "records": n, "samples": count, "share": count / max(1, len(self))}
            for name, n, count in zip(self.names, self.records, self.samples)
        ]

    def table(self) -> str:
        lines = [f"{'source':<24} {'records':>10} {'samples/epoch':>14} {'share':>7}"]
        for row in self.describe():
            lines.append(f"{row['source']:<24} {row['records']:>10,} {row['samples']:>14,} {row['share']:>7.1%}")
        return "\n".join(lines + [f"{'total':<24} {sum(self.records):>10,} {len(self):>14,}"])


class MixtureSamples:
    """Lengths and modalities of the parts' samples, one after another (what `GroupedSampler` reads)."""

    def __init__(self, parts: list) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([np.asarray(p.lengths) for p in self.parts])

    @property
    def has_image(self) -> np.ndarray:
        return np.concatenate([np.asarray(p.has_image) for p in self.parts])

    @property
    def num_images(self) -> np.ndarray | None:
        return self._counts("num_images")

    @property
    def image_tokens(self) -> np.ndarray | None:
        return self._counts("image_tokens")

    def _counts(self, name: str) -> np.ndarray | None:
        """A per-record count of every part, None when a part has none (shards, checked as the run reads them)."""
        counts = [getattr(p, name, None) for p in self.parts]
        return None if any(c is None for c in counts) else np.concatenate(counts)


class MixtureDataset(Dataset):
    """The sources' datasets one after another; each item names its source (`source`).

    Args:
        parts: one `LLaVADataset` per source (its template, system prompt and image folder).
        names: the sources' names.
    """

    def __init__(self, parts: list[LLaVADataset], names: list[str]) -> None:
        self.parts, self.names = parts, names
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.samples = MixtureSamples([p.samples for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict | None:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        item = self.parts[k][int(i) - int(self.offsets[k])]
        if item is not None:
            item["source"] = self.names[k]
        return item
