"""Validation per source of a mixture (`data.sources`): weighted means kept apart by source, summed over ranks.

One pooled validation loader serves every source (Lightning logs a key once per loader, and the pooled `val/loss`
and `val/exact_match` stay what the checkpoint monitor, the console and HPARAMS read); each sample names its
source, and `SourceMeans` sums what each source's samples contribute and what they weigh:

    val/loss/<source>        = sum of its samples' token losses / its scored tokens
    val/exact_match/<source> = its answers that match / its answers scored

Both states are sums (torchmetrics adds them over ranks at `compute`), so with the pooled loss the token mean over
the same samples, the token-weighted mean of the per-source losses is the pooled `val/loss`.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class SourceMeans(Metric):
    """A weighted mean per source: `sum(value) / sum(weight)` over the samples of each.

    Args:
        names: the sources' names, in the order of the indices `update` takes.
    """

    full_state_update = False

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.add_state("value", torch.zeros(len(self.names)), dist_reduce_fx="sum")
        self.add_state("weight", torch.zeros(len(self.names)), dist_reduce_fx="sum")

    def update(self, source: torch.Tensor, value: torch.Tensor, weight: torch.Tensor) -> None:
        """`source` [K] long: each sample's source index; `value` [K] and `weight` [K]: what it adds to each."""
        self.value.index_add_(0, source.to(self.value.device), value.to(self.value))
        self.weight.index_add_(0, source.to(self.weight.device), weight.to(self.weight))

    def compute(self) -> dict[str, torch.Tensor]:
        """Name -> mean, for the sources with weight (a source without scored tokens or answers has no mean)."""
        return {name: self.value[k] / self.weight[k] for k, name in enumerate(self.names) if self.weight[k] > 0}
