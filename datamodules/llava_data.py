"""LLaVA-format records -> checked, tokenised samples -> padded batches.

A record is `{"id", "image"?: path relative to the image folder, "conversations": [{"from": "human" |
"gpt", "value"}, ...]}` with `<image>` in a human turn when there is an image. Records are checked when
the DataModule is set up (structure, placeholder count, image file present, template, length), so a
bad record fails in seconds, not hours into an epoch; the verdicts are kept in the file's record index
(datamodules/record_index.py), so a second start does not check again. With `on_error="skip"` bad records
are dropped and counted instead; images that turn out unreadable when loaded are skipped (and counted) the same way.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules.images import load_image
from datamodules.json_scan import DataError, not_utf8
from datamodules.templates import IGNORE_INDEX, Encoded

__all__ = ["DataError", "ImagePaths", "LLaVADataset", "Sample", "check_record", "collate", "load_records"]

log = logging.getLogger(__name__)


@dataclass
class Sample:
    record: dict
    index: int  # the record's number in its file
    length: int  # tokens after image expansion
    has_image: bool


def load_records(json_path: str) -> list[dict]:
    """A whole JSON list of records in memory (prediction inputs, benchmark files); training data is read
    through its record index instead (datamodules/record_index.py)."""
    if not os.path.exists(json_path):
        raise DataError(f"data file not found: {json_path}")
    try:
        with open(json_path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{json_path}: not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise not_utf8(json_path, err, 0) from None
    if not isinstance(records, list):
        raise DataError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def reason_key(message: str) -> str:
    """What skipped records are counted by: a message's head ("missing image file", "too long", ...)."""
    return message.split(":")[0].split("(")[0].strip()


class ImagePaths:
    """`image_folder`/`image`, refused when it resolves (`..`, absolute paths, symlinks) outside the folder:
    a record must not make the run read arbitrary files (`data.images_outside_folder: true` allows it). The
    resolved folder of each directory is kept, so a record costs one `lstat` (not a `realpath` per record).

    Args:
        image_folder: the folder record paths are relative to.
        outside_allowed: `data.images_outside_folder`.
    """

    def __init__(self, image_folder: str, outside_allowed: bool = False) -> None:
        self.folder, self.outside_allowed = image_folder, outside_allowed
        self.real_folder = os.path.realpath(image_folder)
        self.dirs: dict[str, str] = {}

    def check(self, image: str) -> str:
        """The image's path; DataError when it is outside the folder or not a file."""
        path = os.path.join(self.folder, image)
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if not self.outside_allowed:
            if st is not None and stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(path)
            else:
                head, tail = os.path.split(path)
                if head not in self.dirs:
                    self.dirs[head] = os.path.realpath(head)
                real = os.path.join(self.dirs[head], tail)
            real = os.path.normpath(real)
            if real != self.real_folder and not real.startswith(self.real_folder.rstrip(os.sep) + os.sep):
                raise DataError(
                    f"image path {image!r} resolves outside data.image_folder {self.folder} "
                    f"(set data.images_outside_folder=true to allow it)"
                )
        if st is None or not (stat.S_ISREG(st.st_mode) or os.path.isfile(path)):
            raise DataError(f"missing image file: {path}")
        return path


def check_record(
    rec,
    images: ImagePaths | None,
    count: Callable[[dict], tuple[int, bool]],
    num_image_tokens: int,
    max_length: int,
    image_token: str,
) -> tuple[int, bool]:
    """A record's (tokens after image expansion, has an image), or DataError / TemplateError saying why it is
    unusable. `count(record)` gives (ids before expansion, whether any of them is an answer token).

    The checks, in this order: the record's structure, placeholders against images, the image file, the
    template (turn order, empty answers), the length, and that something is left to learn."""
    if not isinstance(rec, dict):
        raise DataError("record is not a JSON object")
    image = rec.get("image")
    if isinstance(image, list):
        raise DataError(f"'image' is a list of {len(image)} paths: multi-image records are not supported yet")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise DataError(f"'image' is {type(image).__name__} {image!r}, not a path")
    if not rec.get("conversations"):
        raise DataError("no conversations")
    turns = rec["conversations"]
    if not isinstance(turns, list):
        raise DataError("'conversations' is not a list")
    placeholders = sum(str(t.get("value", "")).count(image_token) for t in turns if isinstance(t, dict))
    has_image = rec.get("image") is not None
    if placeholders != int(has_image):
        raise DataError(
            f"placeholder count mismatch: {placeholders} {image_token} in the text, "
            f"{int(has_image)} image(s) in the record"
        )
    if has_image:
        if images is None:
            raise DataError("record has an image but data.image_folder is not set")
        images.check(rec["image"])
        if any(image_token in str(t.get("value", "")) for t in turns[1::2]):
            raise DataError(f"{image_token} appears in a gpt turn; it belongs in a human turn")
    ids, has_answer = count(rec)
    length = ids + (num_image_tokens - 1) * int(has_image)
    if length > max_length:
        raise DataError(
            f"too long: {length} tokens (with {num_image_tokens * has_image} image tokens) > "
            f"max_length {max_length}; raise data.max_length or skip it (data.on_error=skip)"
        )
    if not has_answer:
        raise DataError("no answer tokens to learn")
    return length, has_image


class LLaVADataset(Dataset):
    """Checked samples -> dicts of tensors; the image placeholder id is expanded to N image tokens.

    Args:
        samples: records that passed `check_record`: a list of `Sample`, or `record_index.IndexedSamples`,
            which reads each record from its file by its offset when it is asked for.
        json_path: the records' file, for error messages.
        image_folder: folder that record image paths are relative to.
        encode_fn: record -> `Encoded` (template + tokenizer).
        image_transform: PIL image -> [3, S, S] normalised tensor.
        image_token_id: id of the placeholder in `input_ids`.
        num_image_tokens: N, the image embeddings the model puts in place of each placeholder.
        on_error: "raise" or "skip" for images that cannot be read.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        json_path: str,
        image_folder: str | None,
        encode_fn: Callable[[dict], Encoded],
        image_transform: Callable,
        image_token_id: int,
        num_image_tokens: int,
        on_error: str = "raise",
    ) -> None:
        self.samples = samples
        self.json_path = json_path
        self.image_folder = image_folder
        self.encode_fn = encode_fn
        self.image_transform = image_transform
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.on_error = on_error
        self.image_size = getattr(image_transform, "image_size", None)  # S of the stand-in for a bad image

    def __len__(self) -> int:
        return len(self.samples)

    def _expand(self, ids: list[int], labels: list[int] | None = None):
        out_ids, out_labels = [], []
        for k, tok in enumerate(ids):
            n = self.num_image_tokens if tok == self.image_token_id else 1
            out_ids += [tok] * n
            if labels is not None:
                out_labels += [IGNORE_INDEX] * n if tok == self.image_token_id else [labels[k]]
        return out_ids, out_labels

    def __getitem__(self, i: int) -> dict | None:
        sample = self.samples[i]
        rec = sample.record
        pixels, skipped = None, False
        if sample.has_image:
            path = os.path.join(self.image_folder, rec["image"])
            try:
                pixels = self.image_transform(load_image(path))  # [3, S, S]
            except (OSError, ValueError, Image.DecompressionBombError) as err:  # a bomb is refused, not decoded
                if self.on_error == "raise":
                    raise DataError(
                        f"{self.json_path}: record {rec.get('id')!r}: unreadable image {path}: {err}"
                    ) from None
                log.warning("skipping %s record %r: unreadable image %s: %s", self.json_path, rec.get("id"), path, err)
                skipped = True
        enc = self.encode_fn(rec)
        ids, labels = self._expand(enc.input_ids, enc.labels)
        prompt, _ = self._expand(enc.prompt_ids)
        if skipped:
            # A stand-in, not a hole: the sample keeps its place (a batch is never empty, every DDP rank keeps
            # stepping in lockstep) with a blank image and no label, so it scores nothing; counted as skipped.
            pixels = torch.zeros(3, self.image_size, self.image_size)
            labels = [IGNORE_INDEX] * len(labels)
        return {
            "id": str(rec.get("id", sample.index)),
            "input_ids": ids,
            "labels": labels,
            "prompt_ids": prompt,
            "answer": enc.answer,
            "question": _last_question(rec),
            "pixel_values": pixels,
            "skipped": skipped,
        }


def _last_question(rec: dict) -> str:
    return str(rec["conversations"][-2]["value"]).replace("<image>", "").strip()


def collate(items: list[dict | None], pad_id: int) -> dict:
    """Pad to the longest sample: input_ids/labels/attention_mask [B, T] right-padded, prompt_ids [B, P]
    left-padded (for generation), pixel_values [M, 3, S, S] for the M samples that have an image, in order.
    `num_skipped` counts the samples whose image could not be read (`on_error: skip`): they stay in the
    batch as stand-ins with a blank image and no label."""
    kept = [x for x in items if x is not None]
    batch: dict = {"num_skipped": count_skipped(items)}
    if not kept:
        return batch
    T = max(len(x["input_ids"]) for x in kept)
    P = max(len(x["prompt_ids"]) for x in kept)
    ids = torch.full((len(kept), T), pad_id, dtype=torch.long)
    labels = torch.full((len(kept), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(kept), T), dtype=torch.long)
    prompt = torch.full((len(kept), P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(kept), P), dtype=torch.long)
    for b, x in enumerate(kept):
        n, p = len(x["input_ids"]), len(x["prompt_ids"])
        ids[b, :n] = torch.tensor(x["input_ids"])
        labels[b, :n] = torch.tensor(x["labels"])
        mask[b, :n] = 1
        prompt[b, P - p :] = torch.tensor(x["prompt_ids"])
        prompt_mask[b, P - p :] = 1
    batch.update(input_ids=ids, labels=labels, attention_mask=mask, prompt_ids=prompt, prompt_mask=prompt_mask)
    batch.update(per_sample_fields(kept))
    return batch


def count_skipped(items: list[dict | None]) -> int:
    """Samples of a batch whose image could not be read (stand-ins that score nothing)."""
    return sum(1 for x in items if x is None or x.get("skipped"))


def per_sample_fields(items: list[dict]) -> dict:
    """What a batch carries per sample, in `items` order: pixel_values [M, 3, S, S] of the M samples
    that have an image (the order `VisionLanguageModel.embed` fills image slots in), and the lists."""
    images = [x["pixel_values"] for x in items if x["pixel_values"] is not None]
    return {
        "pixel_values": torch.stack(images) if images else None,
        "has_image": torch.tensor([x["pixel_values"] is not None for x in items]),
        "skipped": torch.tensor([bool(x.get("skipped")) for x in items]),
        "ids": [x["id"] for x in items],
        "answers": [x["answer"] for x in items],
        "questions": [x["question"] for x in items],
        "sources": [x.get("source") for x in items],  # a mixture's source names (datamodules/mixture.py), or None
    }
