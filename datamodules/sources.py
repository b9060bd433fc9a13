"""Where a run's datasets come from: each data file read through its record index, the held-out split, and a
mixture of `data.sources` (LLaVA files and litdata shards) assembled into its training and validation datasets.

A file is indexed once per content, tokenizer and template (datamodules/record_index.py), its records' verdicts
applied by `data.on_error`, and its duplicate ids counted. With `data.val_fraction` and no `data.val_json`, a
seeded permutation holds that fraction of the records out (at least one); a mixture holds out each source's own
fraction with the seed + the source's position, so adding a source leaves the others' splits as they were.

A mixture (datamodules/mixture.py) is the sources' usable records one after another (`MixtureDataset`), with the
samples an epoch takes from each resolved once (`Mixture`, `resolve_counts`); its validation set is the sources'
held-out rows, one after another, each item naming its source (validation reports each source apart as well as
all of them together: lit_modules/source_metrics.py). `report_mixture` prints the resolved table and saves it with
the run (mixture.json).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from datamodules.image_tokens import ImageTokens
from datamodules.images import ImageSpec
from datamodules.llava_data import LLaVADataset
from datamodules.mixture import Mixture, MixtureDataset, resolve_counts
from datamodules.record_index import CheckSettings, IndexedSamples, RecordIndex, open_index
from datamodules.shards import ShardDataset, shard_count
from datamodules.templates import encode
from foundation.schema import DataConfig, SourceConfig, source_name
from foundation.stages import STAGES

log = logging.getLogger(__name__)

AMOUNTS = ("weight", "repeat", "num_samples")  # how a source says what an epoch takes from it (one of them)


def held_out(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of `n` records: `fraction` of them (at least one) held out by a permutation
    seeded with `seed`; the training rows in file order. No fraction: every row trains."""
    if fraction <= 0:
        return np.arange(n), np.zeros(0, np.int64)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = max(1, int(n * fraction))
    return np.sort(order[n_val:]), order[:n_val]


@dataclass
class MixtureSets:
    """A mixture's datasets: `train` and `val` (None without held-out rows) over the sources, and its `mixture`."""

    mixture: Mixture
    train: MixtureDataset
    val: MixtureDataset | None


class DataSources:
    """Reads a stage's data files and shards into datasets, each with its template, system prompt and image folder.

    Args:
        tokenizer: the LLM's tokenizer, with the image placeholder and a pad token.
        data: the `data` group (foundation/schema.py `DataConfig`).
        image: the vision tower's input spec (its tokens per image, for the index's lengths and a shard's items).
        image_tokens: tokens per image by size and layout (datamodules/image_tokens.py).
        transform: PIL image -> the tower's normalised tensor (pad-to-square first where asked).
        stage: a `STAGES` name: the default template.
        seed: data seed (the held-out split).
        image_token: placeholder string in the records.
    """

    def __init__(
        self,
        tokenizer,
        data: DataConfig,
        image: ImageSpec,
        image_tokens: ImageTokens,
        transform,
        *,
        stage: str,
        seed: int,
        image_token: str,
    ) -> None:
        self.tokenizer, self.data, self.image, self.image_tokens, self.transform = (
            tokenizer, data, image, image_tokens, transform
        )  # fmt: skip
        self.stage, self.seed, self.image_token = stage, seed, image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.skipped: Counter = Counter()  # reason -> records dropped (logged to TensorBoard)
        self.duplicate_ids = 0  # records whose id an earlier record has (kept; logged to TensorBoard)
        self._indexes: dict[tuple, RecordIndex] = {}

    def template(self, source: SourceConfig | None = None) -> str:
        name = source.template if source is not None and source.template else self.data.template
        return STAGES.get(self.stage).template(name)

    def system_prompt(self, source: SourceConfig | None = None) -> str | None:
        return self.data.system_prompt if source is None or source.system_prompt is None else source.system_prompt

    def image_folder(self, source: SourceConfig | None = None) -> str | None:
        return (source.image_folder if source is not None else None) or self.data.image_folder

    def encoder(self, source: SourceConfig | None = None):
        """Record -> Encoded under the source's own template and system prompt (the data group's by default)."""
        template, system = self.template(source), self.system_prompt(source)
        return functools.partial(_encode, self.tokenizer, template, system, self.data.image_first, self.image_token)

    def index(self, path: str, source: SourceConfig | None = None) -> RecordIndex:
        d = self.data
        folder = self.image_folder(source)
        settings = CheckSettings(
            template=self.template(source),
            system_prompt=self.system_prompt(source),
            image_first=d.image_first,
            image_token=self.image_token,
            num_image_tokens=self.image.num_tokens,
            max_length=d.max_length,
            image_folder=os.path.abspath(folder) if folder else None,
            images_outside_folder=d.images_outside_folder,
            image_rule=self.image_tokens.key(),
            video_frames=d.video_frames,
            video_time_prompt=d.video_time_prompt,
        )
        key = (path, settings)
        if key not in self._indexes:  # prepare_data's, reused by setup in the same process
            self._indexes[key] = open_index(
                path, settings, self.tokenizer, d.index_dir, d.index_workers, image_tokens=self.image_tokens
            )
        return self._indexes[key]

    def samples(self, index: RecordIndex, rows: np.ndarray) -> IndexedSamples:
        """The usable records of `rows`, with `data.on_error` applied to the index's verdicts."""
        usable, skipped = index.usable(rows, self.data.on_error, log)
        self.skipped.update(skipped)
        duplicates, shown = index.duplicates(rows)
        if duplicates:  # kept, counted and warned about (evaluation outputs keyed by id would collide)
            log.warning("%s: %d duplicate record ids (kept): %s", index.path, duplicates, ", ".join(map(repr, shown)))
        self.duplicate_ids += duplicates
        if not len(usable):
            raise ValueError(f"{index.path}: no usable records (skipped: {skipped})")
        return IndexedSamples(index, usable)

    def dataset(self, index: RecordIndex, rows: np.ndarray, source: SourceConfig | None = None) -> LLaVADataset:
        """The usable records of `rows` of the file `index` reads, as items."""
        d = self.data
        return LLaVADataset(
            self.samples(index, rows),
            index.path,
            self.image_folder(source),
            self.encoder(source),
            self.transform,
            self.image_token_id,
            self.image_tokens,
            d.on_error,
            video_frames=d.video_frames,
            video_time_prompt=d.video_time_prompt,
            image_token=self.image_token,
        )

    def single(self) -> tuple[LLaVADataset, LLaVADataset | None]:
        """`data.train_json`'s training set and the validation set: `data.val_json`, else (when it is not set or
        has no records) `data.val_fraction` of the training file, else None."""
        d = self.data
        train = self.index(d.train_json)
        rows, val, val_rows = np.arange(len(train)), None, np.zeros(0, np.int64)
        if d.val_json:
            val = self.index(d.val_json)
            val_rows = np.arange(len(val))
        if not len(val_rows) and d.val_fraction > 0:
            (rows, val_rows), val = held_out(len(train), d.val_fraction, self.seed), train
        train_set = self.dataset(train, rows)
        val_set = self.dataset(val, val_rows) if val is not None and len(val_rows) else None
        return train_set, val_set

    def mixture(self) -> MixtureSets:
        """`data.sources`: each source indexed and checked with its own template (a shards source is checked as it
        is read), its `data.val_fraction` held out; the epoch's counts resolved over the training parts."""
        d = self.data
        names = [source_name(s) for s in d.sources]
        train_parts, val_parts, val_names = [], [], []
        for k, source in enumerate(d.sources):
            if source.shards:
                n, part = shard_count(source.shards), functools.partial(self.shard_dataset, source, names[k])
            else:
                index = self.index(source.file, source)
                n, part = len(index), functools.partial(self.dataset, index, source=source)
            rows, val_rows = held_out(n, d.val_fraction, self.seed + k)
            train_parts.append(part(rows))
            if len(val_rows):
                val_parts.append(part(val_rows))
                val_names.append(names[k])
        how = [next(((a, getattr(s, a)) for a in AMOUNTS if getattr(s, a) is not None), None) for s in d.sources]
        records = [len(p) for p in train_parts]
        mixture = Mixture(names, records, resolve_counts(names, how, records), self.seed)
        val = MixtureDataset(val_parts, val_names) if val_parts else None
        return MixtureSets(mixture, MixtureDataset(train_parts, names), val)

    def shard_dataset(self, source: SourceConfig, name: str, rows: np.ndarray) -> ShardDataset:
        """A shards source's `rows` (datamodules/shards.py), read and checked as the run goes."""
        return ShardDataset(
            source.shards, rows, name, self.encoder(source), self.transform, self.image_token_id,
            self.image.num_tokens, self.data.max_length, self.image_token, self.tokenizer.pad_token_id,
        )  # fmt: skip


def report_mixture(mixture: Mixture, seed: int, log_dir: str | None) -> None:
    """The resolved mixture on stderr, and as `mixture.json` in the run directory (when there is one)."""
    print("data mixture (samples an epoch takes from each source):\n" + mixture.table(), file=sys.stderr)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "mixture.json"), "w") as f:
            json.dump({"seed": seed, "sources": mixture.describe()}, f, indent=1)


def _encode(tokenizer, template: str, system: str | None, image_first: bool, image_token: str, record: dict):
    return encode(tokenizer, record["conversations"], template, system, image_first, image_token)
