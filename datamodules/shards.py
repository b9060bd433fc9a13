"""A mixture source read from litdata shards (`data.sources[k].shards`), written by `python -m tools.write_shards`.

Each shard item is one LLaVA record, a pair of bytes: its JSON (UTF-8, conversations as in the file) and the image
file's bytes as stored (JPEG / PNG; b"" for a text-only record). The shards may be a local folder or an
object-storage URL (s3://, gs://, ...): litdata's `StreamingDataset` downloads the chunk an item lies in and keeps
it in its local cache.

The source is map-style: `ShardDataset[i]` reads item `rows[i]` by its global index, so it takes its place in the
mixture's fixed dataset, `Mixture.plan` and `GroupedSampler` order it as they order a JSON file's records, and a
mid-epoch resume goes on at exactly the next sample (the sampler's position, `LLaVADataModule.state_dict`).
Nothing is read at setup beyond litdata's `index.json` (the record count), so the records are checked when they
are read, by the same code as a JSON file's (`check_record`, the template, the same token expansion): a bad record
becomes a stand-in that scores nothing (one pad token, no label, no image), marked `bad`, which the DataModule
counts (TensorBoard `data/bad_records/<source>`) and caps (`data.max_bad_fraction`, `BadRecordCap`).

The token lengths are not known before a record is read, so a shards source cannot be grouped by length
(`data.group_by_length`, refused in experiment/validate.py); the sampler reads no lengths without grouping.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from datamodules.images import load_image
from datamodules.json_scan import DataError
from datamodules.llava_data import LLaVADataset, _last_question, check_record, reason_key
from datamodules.templates import IGNORE_INDEX, Encoded, TemplateError
from foundation.errors import needs_extra

log = logging.getLogger(__name__)


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def shard_count(path: str) -> int:
    """Records in the shards at `path` (litdata's index.json). A local folder is checked whole first: a missing
    or truncated chunk file is an error naming it here, not a read that waits for it in the middle of an epoch."""
    if is_url(path):
        return len(_streaming(path))
    index_file = os.path.join(path, "index.json")
    if not os.path.isfile(index_file):
        raise DataError(f"{path}: no litdata shards here (no index.json; write them with python -m tools.write_shards)")
    try:
        with open(index_file, encoding="utf-8") as f:
            chunks = json.load(f)["chunks"]
        expected = [(c["filename"], int(c["chunk_bytes"]), int(c["chunk_size"])) for c in chunks]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{index_file}: not a litdata index ({type(err).__name__}: {err})") from None
    for name, size, _ in expected:
        chunk = os.path.join(path, name)
        if not os.path.isfile(chunk):
            raise DataError(f"{path}: shard chunk {name} is missing (index.json lists it)")
        got = os.path.getsize(chunk)
        if got < size:
            raise DataError(f"{path}: shard chunk {name} is truncated: {got} bytes of {size} (rewrite the shards)")
    return sum(n for _, _, n in expected)


def _streaming(path: str):
    with needs_extra("stream", "data.sources[].shards"):
        from litdata import StreamingDataset
    return StreamingDataset(path if is_url(path) else os.path.abspath(path))


class ShardUnavailable(DataError):
    """A chunk of the shards cannot be had (truncated, gone, a download that never ends): no record in it is
    readable, so the run stops, naming the source and the item, instead of skipping the records one by one."""


class EmbeddedImage:
    """`check_record`'s image check for a shard item: the image is its bytes, which must be there. What it gives
    back stands for the file, opened (PIL reads a file object as it reads a path)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def check(self, image: str) -> io.BytesIO:
        if not self.data:
            raise DataError(f"missing image file: {image} (no image bytes in the shard)")
        return io.BytesIO(self.data)


class ShardDataset(Dataset):
    """Rows of litdata shards -> the items `LLaVADataset` gives, checked as they are read.

    Args:
        path: the shards' folder or URL.
        rows: the shard items this dataset serves, in order (a source's training or validation rows).
        name: the source's name (errors, counts).
        encode_fn: record -> `Encoded` (the source's template and system prompt).
        image_transform: PIL image -> [3, S, S] normalised tensor ([V, 3, S, S] views with a tiling).
        image_token_id: id of the placeholder in `input_ids`.
        num_image_tokens: N, the image embeddings the model puts in place of each placeholder.
        max_length: tokens, image tokens included (`data.max_length`).
        image_token: the placeholder string in the records.
        pad_id: the stand-in's one token.
    """

    def __init__(
        self,
        path: str,
        rows: np.ndarray,
        name: str,
        encode_fn: Callable[[dict], Encoded],
        image_transform: Callable,
        image_token_id: int,
        num_image_tokens: int,
        max_length: int,
        image_token: str,
        pad_id: int,
    ) -> None:
        self.path, self.rows, self.name = path, np.asarray(rows, dtype=np.int64), name
        self.encode_fn, self.max_length, self.image_token, self.pad_id = encode_fn, max_length, image_token, pad_id
        # The item is made by LLaVADataset's own expansion: the same ids as the JSON file's record.
        self.expander = LLaVADataset([], path, None, encode_fn, image_transform, image_token_id, num_image_tokens)
        self.samples = ShardSamples(len(self.rows))
        self._stream = None  # opened in the process that reads (each DataLoader worker has its own)

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _stream=None)

    def _read(self, row: int) -> tuple:
        if self._stream is None:
            self._stream = _streaming(self.path)
        return self._stream[row]

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        rid = f"#{row}"
        try:
            try:
                text, data = self._read(row)  # memoryviews into litdata's map of the chunk: copied
                rec, data = json.loads(bytes(text)), bytes(data)
            except Exception as err:  # litdata raises many kinds for a damaged chunk; each is this record's fault
                if type(err).__name__ == "ChunkWaitTimeoutError":  # the chunk never arrived: no record is readable
                    raise ShardUnavailable(f"source {self.name!r} ({self.path}): shard item {row}: {err}") from None
                raise DataError(f"unreadable shard item ({type(err).__name__}: {err})") from None
            if isinstance(rec, dict):
                rid = repr(rec.get("id", rid))
            return self._item(rec, data, row)
        except ShardUnavailable:
            raise
        except (DataError, TemplateError) as err:
            message = f"source {self.name!r} ({self.path}): record {rid} (shard item {row}): {err}"
            log.warning("bad shard record: %s", message)
            return self._stand_in(row, reason_key(str(err)), message)

    def _item(self, rec, data: bytes, row: int) -> dict:
        e = self.expander

        encoded: list[Encoded] = []

        def count(record: dict) -> tuple[int, bool]:  # as the record index counts (index_build.check_chunk)
            encoded.append(self.encode_fn(record))
            return len(encoded[0].input_ids), any(label != IGNORE_INDEX for label in encoded[0].labels)

        _, has_image, _ = check_record(
            rec, EmbeddedImage(data), count, e.num_image_tokens, self.max_length, self.image_token
        )
        pixels, sizes, counts = None, [], []
        if has_image:  # one embedded image: its views [V, 3, S, S], its image_sizes row, its tokens (as LLaVADataset)
            flags = e.rule.image_flags(1)
            try:
                pixels, size = e._pixels(load_image(io.BytesIO(data)), flags)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                raise DataError(f"unreadable image {rec['image']}: {err}") from None
            sizes, counts = [size], [e.rule.tokens(size[:2], flags)]
        enc = encoded[0]
        ids, labels = e._expand(enc.input_ids, counts, enc.labels)
        prompt, _ = e._expand(enc.prompt_ids, counts)
        return {
            "id": str(rec.get("id", row)),
            "input_ids": ids,
            "labels": labels,
            "prompt_ids": prompt,
            "answer": enc.answer,
            "question": _last_question(rec),
            "pixel_values": pixels,
            "image_sizes": sizes,
            "skipped": False,
        }

    def _stand_in(self, row: int, reason: str, message: str) -> dict:
        """One pad token, no label, no image: the sample keeps its place (every DDP rank steps in lockstep)."""
        return {
            "id": f"{self.name}#{row}",
            "input_ids": [self.pad_id],
            "labels": [IGNORE_INDEX],
            "prompt_ids": [self.pad_id],
            "answer": "",
            "question": "",
            "pixel_values": None,
            "image_sizes": [],
            "skipped": True,
            "bad": {"source": self.name, "reason": reason, "message": message},
        }


class ShardSamples:
    """What the sampler reads of a shards source: its size. Lengths and modalities are known only once a record
    is read; the sampler uses them only to group by length, which a shards source refuses (experiment/validate.py).
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    @property
    def lengths(self) -> np.ndarray:
        return np.zeros(self.n, np.int64)

    @property
    def has_image(self) -> np.ndarray:
        return np.zeros(self.n, bool)
