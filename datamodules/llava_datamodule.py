"""The LightningDataModule for LLaVA-format JSON + an image folder, in either training stage.

The stage only picks the default template (`foundation.stages.STAGES`): alignment's "plain" (image tokens
then the caption, loss on the caption only), SFT's chat template (the tokenizer's own), multi-turn, loss
on assistant turns only, text-only records allowed. `data.template` names another.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import warnings
from collections import Counter

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from datamodules.bad_records import BadRecordCap, with_bad
from datamodules.image_tokens import image_tokens_of
from datamodules.images import ImageSpec
from datamodules.llava_data import LLaVADataset, collate
from datamodules.mixture import Mixture, MixtureDataset, resolve_counts
from datamodules.packing import pack
from datamodules.record_index import CheckSettings, IndexedSamples, RecordIndex, open_index
from datamodules.sampler import GroupedSampler, ZeroWeightPadding
from datamodules.shards import ShardDataset, shard_count
from datamodules.templates import encode, stop_token_ids
from foundation.schema import DataConfig, SourceConfig, source_name
from foundation.stages import STAGES

log = logging.getLogger(__name__)

# Mid-epoch resume is exact here: the DataModule's state_dict carries the epoch position to the sampler
# (`GroupedSampler.resume_at`), which Lightning's check for resumable *DataLoaders* does not look at.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def init_worker(worker_id: int, rank: int) -> None:
    """A DataLoader worker ignores SIGTERM: a scheduler (SLURM) signals every process of a job, and a worker
    killed by it fails the training process's next fetch ("DataLoader worker ... is killed by signal") before
    that process can save and exit 143 (lit_modules/callbacks/checkpointing.py); the workers end with it.
    Freed memory goes back to the system (`_return_freed_memory`). Then Lightning's worker seeding
    (`seed_everything(workers=True)`), which it adds only to loaders without an init function."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _return_freed_memory()
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank=rank)


def _return_freed_memory() -> None:
    """glibc's malloc raises its mmap threshold (up to 32 MiB) after the first large free, after which a worker's
    decoded images and pixel tensors (about 1 MB each) come from its heap and stay there once freed: 4 workers held
    about 170 MB more at 336 px and batch 16 (bench/bench_data_scale.py). A fixed threshold gives them back."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)
        libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _kill_leftover_workers() -> None:
    """At exit, SIGKILL the DataLoader workers still alive. multiprocessing's own exit handler stops daemonic
    children with SIGTERM, which these workers ignore (`init_worker`), then joins them: a loader whose iterator
    an exception still holds (SIGTERM during validation: its traceback keeps the frames) hung the exit forever.
    Registered after multiprocessing's handler, so it runs before it (atexit runs last-in first-out). torch's
    SIGCHLD handler, which raises when a worker dies by a signal, is set back to the default first."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]  # not a launcher's ranks
    if not workers:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout=5)


_WORKER_EXIT_HANDLER: list[bool] = []


class LLaVADataModule(L.LightningDataModule):
    """LLaVA-format data for one training stage.

    Args:
        tokenizer: the LLM's tokenizer, with the image placeholder and a pad token (see `load_tokenizer`).
        data: the `data` group with `train_json` (and `image_folder`, `val_json`) or `sources` (a mixture,
            datamodules/mixture.py) set; every option is documented in foundation/schema.py `DataConfig`. Each
            file is read through its record index (datamodules/record_index.py), built in `prepare_data` (once per
            node) or, when that did not run, in `setup`. `data.template=None` takes the stage's
            `default_template` (foundation/stages.py). With `data.packing`, each training batch's samples
            share rows of up to `max_length` tokens, kept apart by position ids (datamodules/packing.py);
            `batch_size` still counts samples and validation batches stay one sample per row.
        image: the vision tower's input size, normalisation, preprocessing and tokens per image.
        stage: a `STAGES` name (align | sft), the experiment's `stage`.
        seed: data order seed.
        image_token: placeholder string in the records.
    """

    def __init__(
        self, tokenizer, data: DataConfig, image: ImageSpec, *, stage: str, seed: int = 0, image_token: str = "<image>"
    ):
        super().__init__()
        if data.train_json is None and not data.sources:
            raise ValueError("the DataModule needs data.train_json or data.sources (built-in data: builtin_data)")
        self.tokenizer = tokenizer
        self.data = data
        self.image = image
        self.stage = stage
        self.template = STAGES.get(stage).template(data.template)
        self.seed = seed
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.transform = image.transform(data.pad_to_square)  # mean-colour pad (optional), then the encoder's own
        # tokens per image: fixed, or by size and layout with a tiling (datamodules/image_tokens.py)
        self.image_tokens = image_tokens_of(image, data.pad_to_square, data.multi_image, data.video_pool)
        self.stop_ids = stop_token_ids(tokenizer, self.template)
        self.skipped: Counter = Counter()  # reason -> records dropped (logged to TensorBoard)
        self.duplicate_ids = 0  # records whose id an earlier record has (kept; logged to TensorBoard)
        self._resume: tuple[int, int, int] | None = None  # (epoch, global position, its global batch): checkpoint
        self.train_set = self.val_set = None
        self._indexes: dict[tuple, RecordIndex] = {}
        self.mixture: Mixture | None = None  # data.sources: what an epoch takes from each
        self._sampler: GroupedSampler | None = None  # the training loader's (samples seen per source)
        self._seen_order: tuple[int, np.ndarray] | None = None  # (epoch, its global order's sources)
        self.bad_cap: BadRecordCap | None = None  # shards sources: bad records met while streaming, capped
        self._bad_state: dict | None = None  # a checkpoint's counts, for a cap set up after it was loaded

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn or forkserver (macOS, Python 3.14's default) pickle the datasets,
        # whose encode_fn is this DataModule's method: they get it without the Trainer, whose callbacks they never
        # use and which does not pickle
        return {**self.__dict__, "trainer": None}

    def encode(self, record: dict):
        d = self.data
        return encode(
            self.tokenizer, record["conversations"], self.template, d.system_prompt, d.image_first, self.image_token
        )

    def _source_encoder(self, source: SourceConfig):
        """Record -> Encoded under the source's own template and system prompt (the data group's by default)."""
        d = self.data
        template = STAGES.get(self.stage).template(source.template or d.template)
        system = d.system_prompt if source.system_prompt is None else source.system_prompt
        return functools.partial(_encode, self.tokenizer, template, system, d.image_first, self.image_token)

    def _index(self, path: str, source: SourceConfig | None = None) -> RecordIndex:
        d = self.data
        folder = source.image_folder or d.image_folder if source else d.image_folder
        settings = CheckSettings(
            template=STAGES.get(self.stage).template(source.template or d.template) if source else self.template,
            system_prompt=source.system_prompt if source and source.system_prompt is not None else d.system_prompt,
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

    def _samples(self, index: RecordIndex, rows: np.ndarray) -> IndexedSamples:
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

    def _dataset(self, samples: IndexedSamples, path: str, source: SourceConfig | None = None) -> LLaVADataset:
        d = self.data
        folder, encode_fn = (
            (source.image_folder or d.image_folder, self._source_encoder(source))
            if source
            else (d.image_folder, self.encode)
        )
        return LLaVADataset(
            samples,
            path,
            folder,
            encode_fn,
            self.transform,
            self.image_token_id,
            self.image_tokens,
            d.on_error,
            video_frames=d.video_frames,
            video_time_prompt=d.video_time_prompt,
            image_token=self.image_token,
        )

    def prepare_data(self) -> None:
        # Lightning runs this once per node, before `setup` on every rank: the indexes are built here, with every
        # core, and the ranks map them in `setup` (which also builds them when called alone, as in tests).
        for path in dict.fromkeys(p for p in (self.data.train_json, self.data.val_json) if p):
            self._index(path)
        for source in self.data.sources:
            if source.file:  # shards are read as the run goes, with no index
                self._index(source.file, source)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.data.sources:
            return self._setup_mixture()
        d = self.data
        train = self._index(d.train_json)
        rows = np.arange(len(train))
        val, val_rows = (self._index(d.val_json), None) if d.val_json else (None, None)
        if val is not None:
            val_rows = np.arange(len(val))
        if (val is None or not len(val_rows)) and d.val_fraction > 0:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).numpy()
            n_val = max(1, int(len(train) * d.val_fraction))
            val, val_rows, rows = train, order[:n_val], np.sort(order[n_val:])
        self.train_set = self._dataset(self._samples(train, rows), d.train_json)
        if val is not None and len(val_rows):
            self.val_set = self._dataset(self._samples(val, val_rows), val.path)
        if self.skipped:
            log.warning("skipped records: %s", dict(self.skipped))

    def _setup_mixture(self) -> None:
        """data.sources: each source indexed and checked with its own template; the epoch's counts resolved, printed
        and saved with the run (mixture.json); validation on each source's `data.val_fraction`, together."""
        d = self.data
        names = [source_name(s) for s in d.sources]
        train_parts, val_parts, val_names = [], [], []
        for k, source in enumerate(d.sources):
            if source.shards:
                self._shard_parts(source, k, names[k], train_parts, val_parts, val_names)
                continue
            index = self._index(source.file, source)
            rows, val_rows = np.arange(len(index)), np.zeros(0, np.int64)
            if d.val_fraction > 0:
                order = torch.randperm(len(index), generator=torch.Generator().manual_seed(self.seed + k)).numpy()
                n_val = max(1, int(len(index) * d.val_fraction))
                val_rows, rows = order[:n_val], np.sort(order[n_val:])
            train_parts.append(self._dataset(self._samples(index, rows), source.file, source))
            if len(val_rows):
                val_parts.append(self._dataset(self._samples(index, val_rows), source.file, source))
                val_names.append(names[k])
        amounts = ("weight", "repeat", "num_samples")
        how = [next(((a, getattr(s, a)) for a in amounts if getattr(s, a) is not None), None) for s in d.sources]
        records = [len(p) for p in train_parts]
        self.mixture = Mixture(names, records, resolve_counts(names, how, records), self.seed)
        self.train_set = MixtureDataset(train_parts, names)
        if val_parts:
            self.val_set = MixtureDataset(val_parts, val_names)
        streamed = {names[k]: n for k, n in enumerate(self.mixture.samples) if d.sources[k].shards}
        if streamed:
            self.bad_cap = BadRecordCap(streamed, d.max_bad_fraction, self._world()[0])
            if self._bad_state is not None:
                self.bad_cap.load_state_dict(self._bad_state)
        if self.skipped:
            log.warning("skipped records: %s", dict(self.skipped))
        if self.trainer is None or self.trainer.is_global_zero:
            print("data mixture (samples an epoch takes from each source):\n" + self.mixture.table(), file=sys.stderr)
            log_dir = self.trainer.logger.log_dir if self.trainer is not None and self.trainer.logger else None
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
                with open(os.path.join(log_dir, "mixture.json"), "w") as f:
                    json.dump({"seed": self.seed, "sources": self.mixture.describe()}, f, indent=1)

    def _shard_parts(self, source: SourceConfig, k: int, name: str, train_parts, val_parts, val_names) -> None:
        """A shards source's training (and validation) rows, split as a file's are (datamodules/shards.py)."""
        d = self.data
        n = shard_count(source.shards)
        rows, val_rows = np.arange(n), np.zeros(0, np.int64)
        if d.val_fraction > 0:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + k)).numpy()
            n_val = max(1, int(n * d.val_fraction))
            val_rows, rows = order[:n_val], np.sort(order[n_val:])

        def part(rows: np.ndarray) -> ShardDataset:
            return ShardDataset(
                source.shards, rows, name, self._source_encoder(source), self.transform, self.image_token_id,
                self.image.num_tokens, d.max_length, self.image_token, self.tokenizer.pad_token_id,
            )  # fmt: skip

        train_parts.append(part(rows))
        if len(val_rows):
            val_parts.append(part(val_rows))
            val_names.append(name)

    def _loader(self, dataset: LLaVADataset, batch_size: int, train: bool) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = GroupedSampler(
            dataset.samples.lengths,
            dataset.samples.has_image,
            batch_size,
            shuffle=train,
            group_by_length=self.data.group_by_length and train,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
            plan=self.mixture.plan if train and self.mixture is not None else None,
        )
        if train:
            self._sampler = sampler
        if train and self._resume is not None:
            # Set the epoch now, not only through Lightning's set_epoch: Lightning creates the training
            # iterator before it restores its loops and calls set_epoch, and DataLoader workers draw their
            # first indices right then (with num_workers=0 the sampler starts lazily, after set_epoch).
            sampler.set_epoch(self._resume[0])
            sampler.resume_at(*self._resume)
            self._resume = None
        return DataLoader(
            # training: the repeats that even out the ranks' last batch score nothing (datamodules/sampler.py);
            # validation keeps DistributedSampler's semantics (a repeat may be scored twice).
            ZeroWeightPadding(dataset) if train else dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.data.num_workers,
            collate_fn=self._collate_fn(train),
            persistent_workers=self.data.persistent_workers and self.data.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=self._worker_init(rank),
        )

    def _worker_init(self, rank: int):
        if self.data.num_workers == 0:
            return None
        if not _WORKER_EXIT_HANDLER:
            atexit.register(_kill_leftover_workers)
            _WORKER_EXIT_HANDLER.append(True)
        return functools.partial(init_worker, rank=rank)

    def _collate_fn(self, train: bool):
        if train and self.data.packing:
            fn = functools.partial(pack, max_length=self.data.max_length, pad_id=self.tokenizer.pad_token_id)
        else:
            fn = functools.partial(collate, pad_id=self.tokenizer.pad_token_id)
        return functools.partial(with_bad, fn) if self.bad_cap is not None else fn

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.data.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        batch_size = self.data.val_batch_size or self.data.batch_size
        return self._loader(self.val_set, batch_size, train=False) if self.val_set else []

    def _world(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)

    def state_dict(self) -> dict:
        # Where the run resumes: the epoch and the samples of its order that all ranks together consumed (each
        # rank takes every world-th sample of each global batch), with the global batch the order was laid out
        # in, so a resume on another world size, batch or accumulation continues at exactly that sample. One
        # saved after an epoch's last batch starts the next epoch whole.
        world = self._world()[0]
        global_batch = self.data.batch_size * world
        epoch, done = 0, 0
        if self.trainer is not None:
            batches = self.trainer.fit_loop.epoch_loop.batch_progress
            epoch, done = self.trainer.current_epoch, batches.current.processed
            if batches.is_last_batch and done >= self.trainer.num_training_batches:
                epoch, done = epoch + 1, 0
        state = {"epoch": epoch, "position": done * global_batch, "global_batch": global_batch}
        if self.bad_cap is not None:
            state["bad_records"] = self.bad_cap.state_dict()
        # The epoch's size: a resume onto other data says so (its order is another one).
        return dict(state, epoch_samples=self._epoch_samples()) if self.train_set is not None else state

    def _epoch_samples(self) -> int:
        return len(self.mixture) if self.mixture is not None else len(self.train_set)

    def load_state_dict(self, state: dict) -> None:
        world, rank = self._world()
        self._bad_state = state.get("bad_records")
        if self._bad_state is not None and self.bad_cap is not None:
            self.bad_cap.load_state_dict(self._bad_state)
        if "position" in state:
            self._resume = (state["epoch"], state["position"], state["global_batch"])
        else:  # a checkpoint from before positions were global: samples per rank, on this world size
            self._resume = (state.get("epoch", 0), state.get("samples_in_epoch", 0) * world, None)
        saved, now = self._resume[2], self.data.batch_size * world
        before = state.get("epoch_samples")
        if before is not None and self.train_set is not None and before != self._epoch_samples() and rank == 0:
            print(
                f"resume: the training data changed since the checkpoint ({before} samples an epoch then, "
                f"{self._epoch_samples()} now): epoch {self._resume[0]} goes on at its sample {self._resume[1]} of "
                f"an order that is not the one the run saw",
                file=sys.stderr,
            )
        if saved not in (None, now) and rank == 0:
            print(
                f"resume: the global batch changed from {saved} to {now} samples ({world} x data.batch_size "
                f"{self.data.batch_size}): epoch {self._resume[0]} goes on at its sample {self._resume[1]}",
                file=sys.stderr,
            )
        if self.trainer is not None:
            # FSDP and DeepSpeed restore after their setup, where configure_optimizers' estimated_stepping_batches
            # may have built the training loader and started its iterator: DataLoader workers drew their first
            # indices from the epoch's start. The fit loop then builds the loader again, from this position
            # (Lightning 2.6 keeps it in a private attribute; `_combined_loader = None` is what a reload does).
            # Other strategies restore before any loader exists, and this changes nothing.
            self.trainer.fit_loop._combined_loader = None

    def batches_done(self, state: dict) -> int | None:
        """How many of this run's per-rank batches of the epoch a checkpoint's data position stands for, when
        it was saved with another global batch (None when the batch is the same, or unknown): the fit loop's
        progress is rewritten to it, so the epoch ends where its data does."""
        world = self._world()[0]
        now = self.data.batch_size * world
        if "position" not in state or state["global_batch"] == now or self.train_set is None:
            return None
        size = self._epoch_samples()
        per_rank = math.ceil(size / world)
        left = math.ceil(max(0, size - state["position"]) / world)
        return math.ceil(per_rank / self.data.batch_size) - math.ceil(left / self.data.batch_size)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # A mixture's samples per source up to this step (data/samples/<source>), from the epoch's order and the
        # position alone: what every rank together trained on, with no communication.
        trainer = self.trainer
        if self.bad_cap is not None and trainer is not None and trainer.training and batch.get("bad"):
            self._count_bad(batch["bad"])
        if self.mixture is None or trainer is None or not trainer.training or self._sampler is None:
            return batch
        step = trainer.global_step
        if not trainer.is_global_zero or trainer.logger is None or step % max(1, trainer.log_every_n_steps):
            return batch
        epoch = trainer.current_epoch
        if self._seen_order is None or self._seen_order[0] != epoch:
            sampler = self._sampler
            saved, sampler.epoch = sampler.epoch, epoch
            order = np.asarray(sampler._global_order(sampler.global_batch), dtype=np.int64)
            sampler.epoch = saved
            self._seen_order = (epoch, order)
        position = trainer.fit_loop.epoch_loop.batch_progress.current.processed * self._sampler.global_batch
        seen = self.mixture.seen(epoch, self._seen_order[1][:position])
        trainer.logger.log_metrics({f"data/samples/{name}": float(n) for name, n in seen.items()}, step=step)
        return batch

    def _count_bad(self, bad: list[dict]) -> None:
        """A training batch's bad streamed records: counted, capped (datamodules/bad_records.py), logged."""
        trainer = self.trainer
        self.bad_cap.observe(bad, trainer.current_epoch)
        if trainer.is_global_zero and trainer.logger is not None:
            counts = {f"data/bad_records/{name}": float(n) for name, n in self.bad_cap.total.items()}
            trainer.logger.log_metrics(counts, step=trainer.global_step)


def _encode(tokenizer, template: str, system: str | None, image_first: bool, image_token: str, record: dict):
    return encode(tokenizer, record["conversations"], template, system, image_first, image_token)
