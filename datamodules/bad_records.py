"""Bad records found while streaming (a shards source, datamodules/shards.py): counted, logged and capped.

A shards source checks its records when they are read, in the DataLoader workers; a bad one becomes a stand-in
that scores nothing and carries `bad` (its source, the reason and a message naming the record). `with_bad` keeps
those in the batch (`batch["bad"]`), and the training process counts them as each batch reaches the step
(`BadRecordCap.observe`, from `LLaVADataModule.on_before_batch_transfer`): a batch prefetched but not trained on
is not counted, so the counts a checkpoint keeps (`state_dict`) are those of the batches it trained on, and a
resumed run goes on counting from there.

The cap is `data.max_bad_fraction` of the samples an epoch takes from the source, on this rank's share of them
(each rank counts its own batches, with no communication); above it the run stops with an error naming the
source and the record. The count restarts each epoch: a bad record is met again in every epoch.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable

from datamodules.json_scan import DataError


def with_bad(collate_fn: Callable[[list], dict], items: list) -> dict:
    """`collate_fn(items)` plus `bad`: the `bad` entries of the items that have one (in order)."""
    batch = collate_fn(items)
    batch["bad"] = [x["bad"] for x in items if x is not None and x.get("bad")]
    return batch


class BadRecordCap:
    """Counts of bad streamed records per source, and their cap.

    Args:
        samples: samples per epoch of each capped source (its mixture count), by name.
        max_fraction: `data.max_bad_fraction`.
        world: ranks that share each epoch.
    """

    def __init__(self, samples: dict[str, int], max_fraction: float, world: int) -> None:
        self.allowed = {name: math.floor(max_fraction * n / world) for name, n in samples.items()}
        self.max_fraction = max_fraction
        self.epoch = 0
        self.this_epoch: Counter = Counter()  # source -> bad records met this epoch on this rank
        self.total: Counter = Counter()  # source -> bad records met in the run on this rank (logged)
        self.reasons: Counter = Counter()  # (source, reason) -> records

    def observe(self, bad: list[dict], epoch: int) -> None:
        """Count a training batch's bad records; DataError once a source has more than its cap this epoch."""
        if epoch != self.epoch:
            self.epoch, self.this_epoch = epoch, Counter()
        for entry in bad:
            source = entry["source"]
            self.this_epoch[source] += 1
            self.total[source] += 1
            self.reasons[(source, entry["reason"])] += 1
            allowed = self.allowed.get(source, 0)
            if self.this_epoch[source] > allowed:
                n = self.this_epoch[source]
                raise DataError(
                    f"{entry['message']}; that is {n} bad record{'s' * (n != 1)} of source {source!r} this "
                    f"epoch, more than data.max_bad_fraction {self.max_fraction} allows ({allowed} on this rank): "
                    f"fix or rewrite the shards, or raise data.max_bad_fraction"
                )

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "this_epoch": dict(self.this_epoch),
            "total": dict(self.total),
            "reasons": [[s, r, n] for (s, r), n in self.reasons.items()],
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.this_epoch, self.total = Counter(state["this_epoch"]), Counter(state["total"])
        self.reasons = Counter({(s, r): n for s, r, n in state["reasons"]})
