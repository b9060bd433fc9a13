"""LLaVA-format records -> checked, tokenised samples -> padded batches.

A record is `{"id", "image"?: a path relative to the image folder or a list of them, "video"?: one such path,
"conversations": [{"from": "human" | "gpt", "value"}, ...]}` with one `<image>` per image (in order: the k-th
placeholder takes the k-th image) or one for a video, in human turns. Each placeholder expands to its image's
own token count (datamodules/image_tokens.py); a video's frames share its placeholder (datamodules/video.py).
Records are checked when the DataModule is set up (structure, placeholder count, image file present, template, length),
so a bad record fails in seconds, not hours into an epoch; the verdicts are kept in the file's record index
(datamodules/record_index.py), so a second start does not check again. With `on_error="skip"` bad records are dropped
and counted instead; images that turn out unreadable when loaded are skipped (and counted) the same way.
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

from datamodules.image_tokens import ImageTokens
from datamodules.images import load_image
from datamodules.json_scan import DataError, not_utf8
from datamodules.templates import IGNORE_INDEX, Encoded
from datamodules.video import decode_frames, plan_video, with_video_prompt
from foundation.views import VIEW_BASE_ONLY

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


def record_media(rec: dict) -> tuple[list[str], str | None]:
    """A record's image paths (`image`: one path or a list, in placeholder order) and its video path; DataError
    for a value that is not a path."""
    image, video = rec.get("image"), rec.get("video")
    if image is not None and video is not None:
        raise DataError("both 'image' and 'video' in one record; a record takes images or one video")
    paths = image if isinstance(image, list) else ([] if image is None else [image])
    if isinstance(image, list) and not image:
        raise DataError("'image' is an empty list")
    for k, path in enumerate(paths):
        if not isinstance(path, str) or not path.strip():
            where = f"'image'[{k}]" if isinstance(image, list) else "'image'"
            raise DataError(f"{where} is {type(path).__name__} {path!r}, not a path")
    if video is not None and (not isinstance(video, str) or not video.strip()):
        raise DataError(f"'video' is {type(video).__name__} {video!r}, not a path")
    return paths, video


def check_record(
    rec,
    images: ImagePaths | None,
    count: Callable[[dict], tuple[int, bool]],
    num_image_tokens: int | ImageTokens,
    max_length: int,
    image_token: str,
    video_frames: int = 32,
    video_time_prompt: str | None = None,
) -> tuple[int, int, int]:
    """A record's (tokens after image expansion, images: 0, their number, 1 for a video, the image tokens of them
    all), or DataError / TemplateError saying why it is unusable. `count(record)` gives (ids before expansion,
    whether any of them is an answer token). `num_image_tokens`: tokens per image, or the rule that counts them per
    file (datamodules/image_tokens.py); `video_frames` / `video_time_prompt`: `data.video_*` (datamodules/video.py).

    The checks, in this order: the record's structure, placeholders against images, the image files, the
    template (turn order, empty answers), the length, and that something is left to learn."""
    if not isinstance(rec, dict):
        raise DataError("record is not a JSON object")
    paths, video = record_media(rec)
    if not rec.get("conversations"):
        raise DataError("no conversations")
    turns = rec["conversations"]
    if not isinstance(turns, list):
        raise DataError("'conversations' is not a list")
    placeholders = sum(str(t.get("value", "")).count(image_token) for t in turns if isinstance(t, dict))
    expected = len(paths) if video is None else 1
    if placeholders != expected:
        what = "1 video" if video is not None else f"{expected} image(s)"
        raise DataError(f"placeholder count mismatch: {placeholders} {image_token} in the text, {what} in the record")
    rule = num_image_tokens if isinstance(num_image_tokens, ImageTokens) else ImageTokens(num_image_tokens)
    image_tokens = 0
    if expected:
        if images is None:
            raise DataError("record has an image but data.image_folder is not set")
        files = [images.check(p) for p in paths] if video is None else [images.check(video)]
        if any(image_token in str(t.get("value", "")) for t in turns[1::2]):
            raise DataError(f"{image_token} appears in a gpt turn; it belongs in a human turn")
        if video is not None:
            plan = plan_video(files[0], video_frames)
            image_tokens = rule.of_video(plan.size, len(plan.frames))
            if video_time_prompt:
                rec = with_video_prompt(rec, plan.prompt(video_time_prompt), image_token)
        else:
            try:
                image_tokens = rule.of_files(files)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                raise DataError(f"unreadable image: {err}") from None
    ids, has_answer = count(rec)
    length = ids + image_tokens - placeholders
    if length > max_length:
        raise DataError(
            f"too long: {length} tokens (with {image_tokens} image tokens) > "
            f"max_length {max_length}; raise data.max_length or skip it (data.on_error=skip)"
        )
    if not has_answer:
        raise DataError("no answer tokens to learn")
    return length, expected, image_tokens


class LLaVADataset(Dataset):
    """Checked samples -> dicts of tensors; each image placeholder id is expanded to its image's tokens.

    Args:
        samples: records that passed `check_record`: a list of `Sample`, or `record_index.IndexedSamples`,
            which reads each record from its file by its offset when it is asked for.
        json_path: the records' file, for error messages.
        image_folder: folder that record image and video paths are relative to.
        encode_fn: record -> `Encoded` (template + tokenizer).
        image_transform: PIL image -> normalised [3, S, S], or a tiling's views [T, 3, S, S]
            (`images.ImageTransform`; `base_only=True`: the base view alone).
        image_token_id: id of the placeholder in `input_ids`.
        num_image_tokens: tokens per image, or the rule that counts them per image size and layout
            (datamodules/image_tokens.py).
        on_error: "raise" or "skip" for images and videos that cannot be read.
        video_frames: `data.video_frames`, the most frames sampled from a video.
        video_time_prompt: `data.video_time_prompt`, the frames' times after a video's placeholder.
        image_token: the placeholder string (where a video's time prompt goes).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        json_path: str,
        image_folder: str | None,
        encode_fn: Callable[[dict], Encoded],
        image_transform: Callable,
        image_token_id: int,
        num_image_tokens: int | ImageTokens,
        on_error: str = "raise",
        video_frames: int = 32,
        video_time_prompt: str | None = None,
        image_token: str = "<image>",
    ) -> None:
        self.samples = samples
        self.json_path = json_path
        self.image_folder = image_folder
        self.encode_fn = encode_fn
        self.image_transform = image_transform
        self.image_token_id = image_token_id
        rule = num_image_tokens
        self.rule = rule if isinstance(rule, ImageTokens) else ImageTokens(rule)
        self.num_image_tokens = self.rule.num_tokens
        self.on_error = on_error
        self.video_frames, self.video_time_prompt = video_frames, video_time_prompt
        self.image_token = image_token
        self.image_size = getattr(image_transform, "image_size", None)  # S of the stand-in for a bad image

    def __len__(self) -> int:
        return len(self.samples)

    def _expand(self, ids: list[int], counts: list[int], labels: list[int] | None = None):
        """Placeholder k -> counts[k] copies (labels ignored there)."""
        out_ids, out_labels, k = [], [], 0
        for j, tok in enumerate(ids):
            if tok == self.image_token_id:
                n, k = counts[k], k + 1
                out_ids += [tok] * n
                out_labels += [IGNORE_INDEX] * n
            else:
                out_ids.append(tok)
                if labels is not None:
                    out_labels.append(labels[j])
        return out_ids, out_labels

    def _pixels(self, img: Image.Image, flags: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image -> its views [V, 3, S, S] and its `image_sizes` row (height, width as the tower sees it, flags)."""
        h, w = self.rule.seen_size((img.height, img.width))
        base_only = bool(flags & VIEW_BASE_ONLY)
        pixels = self.image_transform(img, base_only=True) if base_only else self.image_transform(img)
        return (pixels[None] if pixels.ndim == 3 else pixels), (h, w, flags)

    def _media(self, rec: dict) -> tuple[list, list[int], dict]:
        """A record's images (or video frames) as [(views, size row)], the tokens of each placeholder, and the
        record to encode (a video's time prompt added)."""
        paths, video = record_media(rec)
        if video is None:
            flags = self.rule.image_flags(len(paths))
            media = []
            for p in paths:
                path = os.path.join(self.image_folder, p)
                try:
                    media.append(self._pixels(load_image(path), flags))
                except (OSError, ValueError, Image.DecompressionBombError) as err:  # a bomb is refused, not decoded
                    raise DataError(f"unreadable image {path}: {err}") from None
            return media, [self.rule.tokens(m[1][:2], flags) for m in media], rec
        path = os.path.join(self.image_folder, video)
        plan = plan_video(path, self.video_frames)
        frames = decode_frames(path, plan)
        media = [self._pixels(f, self.rule.frame_flags(k == len(frames) - 1)) for k, f in enumerate(frames)]
        if self.video_time_prompt:
            rec = with_video_prompt(rec, plan.prompt(self.video_time_prompt), self.image_token)
        return media, [sum(self.rule.tokens(size[:2], size[2]) for _, size in media)], rec

    def _stand_in(self, rec: dict) -> tuple[list, list[int]]:
        """Blank images of S x S in place of a record's unreadable ones, with as many views and tokens as such an
        image takes, so ids, pixels and image_sizes agree."""
        paths, video = record_media(rec)
        S = self.image_size
        flags = [self.rule.image_flags(len(paths))] * len(paths) if video is None else [self.rule.frame_flags(True)]
        media = [(torch.zeros(self.rule.num_views((S, S), f), 3, S, S), (S, S, f)) for f in flags]
        return media, [self.rule.tokens((S, S), f) for f in flags]

    def __getitem__(self, i: int) -> dict | None:
        sample = self.samples[i]
        rec = sample.record
        media, counts, skipped = [], [], False
        if sample.has_image:
            try:
                media, counts, rec = self._media(rec)
            except DataError as err:  # "unreadable image <path>: why" / "unreadable video <path>: why"
                if self.on_error == "raise":
                    raise DataError(f"{self.json_path}: record {rec.get('id')!r}: {err}") from None
                log.warning("skipping %s record %r: %s", self.json_path, rec.get("id"), err)
                skipped = True
        enc = self.encode_fn(rec)
        if skipped:
            # A stand-in, not a hole: the sample keeps its place (a batch is never empty, every DDP rank keeps
            # stepping in lockstep) with blank images and no label, so it scores nothing; counted as skipped.
            media, counts = self._stand_in(rec)
        ids, labels = self._expand(enc.input_ids, counts, enc.labels)
        prompt, _ = self._expand(enc.prompt_ids, counts)
        if skipped:
            labels = [IGNORE_INDEX] * len(labels)
        return {
            "id": str(rec.get("id", sample.index)),
            "input_ids": ids,
            "labels": labels,
            "prompt_ids": prompt,
            "answer": enc.answer,
            "question": _last_question(rec),
            "pixel_values": torch.cat([m[0] for m in media]) if media else None,  # [V, 3, S, S]: every view
            "image_sizes": [m[1] for m in media],  # per image (height, width, VIEW_* flags)
            "skipped": skipped,
        }


def _last_question(rec: dict) -> str:
    return str(rec["conversations"][-2]["value"]).replace("<image>", "").strip()


def collate(items: list[dict | None], pad_id: int) -> dict:
    """Pad to the longest sample: input_ids/labels/attention_mask [B, T] right-padded, prompt_ids [B, P]
    left-padded (for generation), pixel_values [K, 3, S, S] and image_sizes [M, 3] (`per_sample_fields`).
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
    """What a batch carries per sample, in `items` order: pixel_values [K, 3, S, S], every view of every image
    of the samples that have images, image after image (the order `VisionLanguageModel.embed` fills image slots
    in), image_sizes [M, 3] (height, width, VIEW_* flags: foundation/views.py) of those M images, and the lists."""
    # an item's views [V, 3, S, S] (a hand-made item may hold one image [3, S, S])
    images = [x["pixel_values"] if x["pixel_values"].ndim == 4 else x["pixel_values"][None] for x in items
              if x["pixel_values"] is not None]  # fmt: skip
    sizes = [size for x in items for size in x.get("image_sizes", ())]
    return {
        "pixel_values": torch.cat(images) if images else None,
        "image_sizes": torch.tensor(sizes, dtype=torch.long) if sizes else None,
        "has_image": torch.tensor([x["pixel_values"] is not None for x in items]),
        # images per sample (a video: its frames), which image_sizes rows are whose
        "num_images": torch.tensor(
            [len(x.get("image_sizes") or ()) or int(x["pixel_values"] is not None) for x in items]
        ),
        "skipped": torch.tensor([bool(x.get("skipped")) for x in items]),
        "ids": [x["id"] for x in items],
        "answers": [x["answer"] for x in items],
        "questions": [x["question"] for x in items],
        "sources": [x.get("source") for x in items],  # a mixture's source names (datamodules/mixture.py), or None
    }
