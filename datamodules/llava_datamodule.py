"""LightningDataModules for the two LLaVA training stages on LLaVA-format JSON + an image folder.

`AlignmentDataModule` (stage 1) uses the "plain" template: image tokens then the caption, loss on the
caption only. `SFTDataModule` (stage 2) uses a chat template (the tokenizer's own by default, or a
named one), multi-turn, loss on assistant turns only, text-only records allowed.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections import Counter

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from datamodules.llava_data import LLaVADataset, Sample, check_records, collate, load_records
from datamodules.packing import pack
from datamodules.sampler import GroupedSampler
from datamodules.templates import encode, stop_token_ids

log = logging.getLogger(__name__)

# Mid-epoch resume is exact here: the DataModule's state_dict carries the epoch position to the sampler
# (`GroupedSampler.skip`), which Lightning's check for resumable *DataLoaders* does not look at.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the short side symmetrically with `fill` (LLaVA-1.5's pad-to-square with the mean colour)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def image_transform(image_size: int, pixel_mean, pixel_std, pad_to_square: bool):
    """PIL RGB -> [3, S, S] float, normalised with the encoder's mean/std.

    Without padding: shortest edge to S (bicubic) and a centre crop, as CLIP's processor does.
    """
    steps = []
    if pad_to_square:
        fill = tuple(int(round(m * 255)) for m in pixel_mean)
        steps += [
            functools.partial(expand_to_square, fill=fill),
            v2.Resize((image_size, image_size), v2.InterpolationMode.BICUBIC),
        ]
    else:
        steps += [v2.Resize(image_size, v2.InterpolationMode.BICUBIC), v2.CenterCrop(image_size)]
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pixel_mean), list(pixel_std))]
    return v2.Compose(steps)


class LLaVADataModule(L.LightningDataModule):
    """Shared by both stages; subclasses fix or default the template.

    Args:
        tokenizer: the LLM's tokenizer, with the image placeholder and a pad token (see `load_tokenizer`).
        image_size: encoder input side S (the encoder's `image_size`).
        pixel_mean: encoder normalisation mean (0-1 scale).
        pixel_std: encoder normalisation std (0-1 scale).
        num_image_tokens: N image embeddings per image, what each placeholder expands to.
        train_json: LLaVA-format JSON for training.
        image_folder: folder that record image paths are relative to.
        val_json: held-out JSON; else `val_fraction` of train_json is held out.
        val_fraction: share of train_json held out when there is no val_json.
        template: conversation template name (see datamodules/templates.py).
        system_prompt: system text for chat templates (None: the template's default).
        max_length: longest sequence in tokens, image tokens included; longer records are errors.
        pad_to_square: pad images to square with the mean colour before resizing (LLaVA-1.5 SFT).
        batch_size: per-device training batch size.
        val_batch_size: per-device validation batch size (default: batch_size).
        num_workers: DataLoader workers.
        group_by_length: group batches by modality and length.
        packing: pack each training batch's samples into rows of up to max_length tokens, samples kept
            apart by position ids (datamodules/packing.py); batch_size still counts samples. Validation
            batches stay one sample per row.
        on_error: "raise" on the first bad record, or "skip" and count.
        seed: data order seed.
        image_token: placeholder string in the records.
    """

    default_template = "chat_template"

    def __init__(
        self,
        tokenizer,
        *,
        image_size: int,
        pixel_mean,
        pixel_std,
        num_image_tokens: int,
        train_json: str,
        image_folder: str | None = None,
        val_json: str | None = None,
        val_fraction: float = 0.0,
        template: str | None = None,
        system_prompt: str | None = None,
        max_length: int = 2048,
        pad_to_square: bool = False,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        group_by_length: bool = False,
        packing: bool = False,
        on_error: str = "raise",
        seed: int = 0,
        image_token: str = "<image>",
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.template = template or self.default_template
        self.system_prompt = system_prompt
        self.train_json, self.val_json, self.image_folder = train_json, val_json, image_folder
        self.val_fraction = val_fraction
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.group_by_length = group_by_length
        self.packing = packing
        self.on_error = on_error
        self.seed = seed
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.transform = image_transform(image_size, pixel_mean, pixel_std, pad_to_square)
        self.stop_ids = stop_token_ids(tokenizer, self.template)
        self.skipped: Counter = Counter()  # reason -> records dropped (logged to TensorBoard)
        self._resume_samples = 0
        self.train_set = self.val_set = None

    def encode(self, record: dict):
        return encode(self.tokenizer, record["conversations"], self.template, self.system_prompt)

    def _check(self, records: list[dict], path: str) -> list[Sample]:
        checked = check_records(
            records,
            path,
            self.image_folder,
            self.encode,
            self.num_image_tokens,
            self.max_length,
            self.image_token,
            self.on_error,
        )
        self.skipped.update(checked.skipped)
        if not checked.samples:
            raise ValueError(f"{path}: no usable records (skipped: {dict(checked.skipped)})")
        return checked.samples

    def _dataset(self, samples: list[Sample], path: str) -> LLaVADataset:
        return LLaVADataset(
            samples,
            path,
            self.image_folder,
            self.encode,
            self.transform,
            self.image_token_id,
            self.num_image_tokens,
            self.on_error,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        records = load_records(self.train_json)
        val_records = load_records(self.val_json) if self.val_json else []
        if not val_records and self.val_fraction > 0:
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = max(1, int(len(records) * self.val_fraction))
            val_records = [records[i] for i in order[:n_val]]
            records = [records[i] for i in sorted(order[n_val:])]
        self.train_set = self._dataset(self._check(records, self.train_json), self.train_json)
        if val_records:
            self.val_set = self._dataset(
                self._check(val_records, self.val_json or self.train_json), self.val_json or self.train_json
            )
        if self.skipped:
            log.warning("skipped records: %s", dict(self.skipped))

    def _loader(self, dataset: LLaVADataset, batch_size: int, train: bool) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = GroupedSampler(
            [s.length for s in dataset.samples],
            [s.has_image for s in dataset.samples],
            batch_size,
            shuffle=train,
            group_by_length=self.group_by_length and train,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
        )
        if train and self._resume_samples:
            sampler.skip(self._resume_samples)
            self._resume_samples = 0
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self._collate_fn(train),
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _collate_fn(self, train: bool):
        if train and self.packing:
            return functools.partial(pack, max_length=self.max_length, pad_id=self.tokenizer.pad_token_id)
        return functools.partial(collate, pad_id=self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, self.val_batch_size, train=False) if self.val_set else []

    def state_dict(self) -> dict:
        # Samples this rank consumed in the current epoch, so a mid-epoch resume continues where it stopped.
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current if self.trainer else None
        return {"samples_in_epoch": (progress.processed if progress else 0) * self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self._resume_samples = state.get("samples_in_epoch", 0)


class AlignmentDataModule(LLaVADataModule):
    """Stage 1: LLaVA's "plain" template (image tokens + caption + newline, loss on the caption)."""

    default_template = "plain"


class SFTDataModule(LLaVADataModule):
    """Stage 2: chat-formatted, multi-turn instruction data; loss on assistant turns only."""

    default_template = "chat_template"
