"""The LightningDataModule for LLaVA-format JSON + an image folder, in either training stage.

The stage only picks the default template (`foundation.stages.STAGES`): alignment's "plain" (image tokens
then the caption, loss on the caption only), SFT's chat template (the tokenizer's own), multi-turn, loss
on assistant turns only, text-only records allowed. `data.template` names another.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
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
from datamodules.image_tokens import ImageTokenStats, image_token_stats, image_tokens_of
from datamodules.images import ImageSpec
from datamodules.llava_data import LLaVADataset, collate
from datamodules.mixture import Mixture
from datamodules.packing import pack
from datamodules.sampler import GroupedSampler, ZeroWeightPadding
from datamodules.sources import DataSources, report_mixture
from datamodules.templates import stop_token_ids
from foundation.schema import DataConfig
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
            datamodules/sources.py) set; every option is documented in foundation/schema.py `DataConfig`. Each
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
        # the files and shards read into datasets (datamodules/sources.py); their checks' counts
        self.sources = DataSources(
            tokenizer, data, image, self.image_tokens, self.transform, stage=stage, seed=seed, image_token=image_token
        )
        self._resume: tuple[int, int, int] | None = None  # (epoch, global position, its global batch): checkpoint
        self.train_set = self.val_set = None
        self.mixture: Mixture | None = None  # data.sources: what an epoch takes from each
        self._sampler: GroupedSampler | None = None  # the training loader's (samples seen per source)
        self._seen_order: tuple[int, np.ndarray] | None = None  # (epoch, its global order's sources)
        self.bad_cap: BadRecordCap | None = None  # shards sources: bad records met while streaming, capped
        self._bad_state: dict | None = None  # a checkpoint's counts, for a cap set up after it was loaded

    @property
    def skipped(self) -> Counter:
        """Reason -> records dropped by the checks (logged to TensorBoard)."""
        return self.sources.skipped

    @property
    def duplicate_ids(self) -> int:
        """Records whose id an earlier record has (kept; logged to TensorBoard)."""
        return self.sources.duplicate_ids

    def image_token_stats(self) -> ImageTokenStats | None:
        """Image tokens per image over the training set's images (TensorBoard's HPARAMS), from the counts the
        record indexes hold: numpy over arrays already mapped, no image opened. A mixture's records weigh as often
        as an epoch takes them. None before `setup`, without images, or when a source has no per-record counts
        (shards, checked as the run reads them)."""
        samples = getattr(self.train_set, "samples", None)
        tokens, images = getattr(samples, "image_tokens", None), getattr(samples, "num_images", None)
        if tokens is None or images is None:
            return None
        weights = None
        if self.mixture is not None:
            m = self.mixture
            weights = np.repeat([n / max(1, r) for n, r in zip(m.samples, m.records)], m.records)
        return image_token_stats(tokens, images, weights)

    @property
    def val_sources(self) -> list[str]:
        """The sources whose validation is reported apart (`val/loss/<source>`, lit_modules/source_metrics.py): a
        mixture's sources with held-out rows, by the names their batches carry (`sources`); none without a mixture."""
        return list(self.val_set.names) if self.mixture is not None and self.val_set is not None else []

    def encode(self, record: dict):
        """A record of the data group's file as the model sees it (the stage's template and system prompt)."""
        return self.sources.encoder()(record)

    def prepare_data(self) -> None:
        # Lightning runs this once per node, before `setup` on every rank: the indexes are built here, with every
        # core, and the ranks map them in `setup` (which also builds them when called alone, as in tests).
        for path in dict.fromkeys(p for p in (self.data.train_json, self.data.val_json) if p):
            self.sources.index(path)
        for source in self.data.sources:
            if source.file:  # shards are read as the run goes, with no index
                self.sources.index(source.file, source)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.data.sources:
            return self._setup_mixture()
        self.train_set, self.val_set = self.sources.single()
        if self.skipped:
            log.warning("skipped records: %s", dict(self.skipped))

    def _setup_mixture(self) -> None:
        """data.sources (datamodules/sources.py): the training and validation mixtures; the epoch's counts printed
        and saved with the run (mixture.json); the cap on bad records of the sources read from shards."""
        d = self.data
        sets = self.sources.mixture()
        self.mixture, self.train_set, self.val_set = sets.mixture, sets.train, sets.val
        names = self.mixture.names
        streamed = {names[k]: n for k, n in enumerate(self.mixture.samples) if d.sources[k].shards}
        if streamed:
            self.bad_cap = BadRecordCap(streamed, d.max_bad_fraction, self._world()[0])
            if self._bad_state is not None:
                self.bad_cap.load_state_dict(self._bad_state)
        if self.skipped:
            log.warning("skipped records: %s", dict(self.skipped))
        if self.trainer is None or self.trainer.is_global_zero:
            log_dir = self.trainer.logger.log_dir if self.trainer is not None and self.trainer.logger else None
            report_mixture(self.mixture, self.seed, log_dir)

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
