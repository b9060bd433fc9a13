"""Building a record index's arrays: the records checked and counted in chunks, by a pool of processes.

Each process reads its chunk's bytes in one read, parses each record from its own bytes, runs the DataModule's
checks (`llava_data.check_record`) and counts its tokens: from cached word counts where that is exact
(datamodules/token_count.py), else by encoding it in full. The first 256 records of the file and every 1,000th
are encoded in full as well; should a count ever differ, the whole file is counted again by full encoding.
The pool forks (the tokenizer and the token counter, analysed once in the parent, are inherited, not pickled and
built again), and a worker dies with its parent.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import signal
import sys
import zlib
from dataclasses import dataclass

import numpy as np

from datamodules.json_scan import DataError, Spans, not_utf8
from datamodules.llava_data import ImagePaths, check_record
from datamodules.templates import IGNORE_INDEX, TemplateError, encode
from datamodules.token_count import TokenCounter

ARRAYS = ("offsets", "sizes", "crc", "tokens", "images", "image_tokens", "status", "id_hash")
# What the checks find per record (offsets and sizes come from json_scan): CRC-32 of its bytes, tokens after
# image expansion, images, the image tokens among those tokens, 0 = usable / 1 = refused, a hash of its id (0: none).
DTYPES = {
    "crc": np.uint32,
    "tokens": np.int32,
    "images": np.uint8,
    "image_tokens": np.int32,
    "status": np.uint8,
    "id_hash": np.uint64,
}
CHUNK = 2048  # records per task
VERIFY_FIRST, VERIFY_EVERY = 256, 1000  # records also encoded in full, to check the fast counts
MISSING = "missing image file: "


@dataclass
class Job:
    path: str
    spans: Spans
    settings: object  # record_index.CheckSettings
    tokenizer: object
    image_tokens: object = None  # image_tokens.ImageTokens, or None: settings.num_image_tokens per image
    fast: bool = True
    counter: TokenCounter | None = None  # analysed once, in the parent: the forked workers share it


_JOB: Job | None = None
_COUNTER: TokenCounter | None = None


def _init_worker(job: Job) -> None:
    global _JOB, _COUNTER
    _JOB, _COUNTER = job, job.counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which ends the pool
    if sys.platform == "linux":  # die with the parent (a SIGKILLed build must not leave workers waiting forever)
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _id_hash(rid) -> int:
    h = int.from_bytes(hashlib.blake2b(str(rid).encode(), digest_size=8).digest(), "little")
    return h or 1  # 0 means "no id"


def check_chunk(bounds: tuple[int, int]) -> dict:
    """Records [lo, hi) of the job's file: their arrays, the refused ones, and whether a fast count differed."""
    global _COUNTER
    job, (lo, hi) = _JOB, bounds
    s = job.settings
    if _COUNTER is None:
        _COUNTER = TokenCounter(job.tokenizer, s.template, s.system_prompt, s.image_first, s.image_token)
    counter = _COUNTER
    fast = job.fast and counter.why_not is None
    offsets, sizes = job.spans.offsets, job.spans.sizes
    base = int(offsets[lo])
    with open(job.path, "rb") as f:
        f.seek(base)
        buf = f.read(int(offsets[hi - 1] + sizes[hi - 1]) - base)
    n = hi - lo
    out = {name: np.zeros(n, dtype) for name, dtype in DTYPES.items()}
    bad, mismatch, fatal, encoded = [], False, None, 0
    images = ImagePaths(s.image_folder, s.images_outside_folder) if s.image_folder else None
    for k in range(lo, hi):
        start = int(offsets[k]) - base
        raw = buf[start : start + int(sizes[k])]
        out["crc"][k - lo] = zlib.crc32(raw)
        try:
            rec = json.loads(raw)
        except UnicodeDecodeError as err:
            fatal = str(not_utf8(job.path, err, int(offsets[k])))
            break
        except json.JSONDecodeError as err:
            fatal = f"{job.path}: not valid JSON: {err.msg} in record #{k} (byte {int(offsets[k]) + err.pos})"
            break
        rid = rec.get("id", f"#{k}") if isinstance(rec, dict) else f"#{k}"
        if isinstance(rec, dict) and "id" in rec:
            out["id_hash"][k - lo] = _id_hash(rec["id"])

        def count(record: dict) -> tuple[int, bool]:
            nonlocal mismatch, encoded
            quick = counter.count(record["conversations"]) if fast else None
            if quick is not None and not (k < VERIFY_FIRST or k % VERIFY_EVERY == 0):
                return quick, True  # a whole answer segment is tokens of its own: something to learn
            enc = encode(
                job.tokenizer, record["conversations"], s.template, s.system_prompt, s.image_first, s.image_token
            )
            encoded += 1
            mismatch |= quick is not None and quick != len(enc.input_ids)
            return len(enc.input_ids), any(label != IGNORE_INDEX for label in enc.labels)

        try:
            length, num_images, image_tokens = check_record(
                rec,
                images,
                count,
                job.image_tokens or s.num_image_tokens,
                s.max_length,
                s.image_token,
                s.video_frames,
                s.video_time_prompt,
            )
        except (DataError, TemplateError) as err:
            out["status"][k - lo] = 1
            entry = {"k": k, "id": rid, "message": str(err)}
            if str(err).startswith(MISSING):
                entry["image"] = str(err)[len(MISSING) :]
            bad.append(entry)
            continue
        out["tokens"][k - lo] = length
        out["images"][k - lo] = min(num_images, 255)
        out["image_tokens"][k - lo] = image_tokens
    return {"arrays": out, "bad": bad, "mismatch": mismatch, "fatal": fatal, "encoded": encoded}


def _run(job: Job, workers: int) -> list[dict]:
    n = len(job.spans.offsets)
    chunks = [(lo, min(lo + CHUNK, n)) for lo in range(0, n, CHUNK)]
    if workers <= 1 or len(chunks) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        _init_local(job)
        return [check_chunk(c) for c in chunks]
    with multiprocessing.get_context("fork").Pool(min(workers, len(chunks)), _init_worker, (job,)) as pool:
        return list(pool.imap(check_chunk, chunks))


def _init_local(job: Job) -> None:
    global _JOB, _COUNTER
    _JOB, _COUNTER = job, job.counter


def build_arrays(path: str, spans: Spans, settings, tokenizer, workers: int, image_tokens=None) -> tuple[dict, dict]:
    """The index arrays of `path` (ARRAYS, one value per record) and its meta: refused records, how tokens
    were counted. DataError for a file that is not UTF-8 or holds a record that is not JSON."""
    s = settings
    counter = TokenCounter(tokenizer, s.template, s.system_prompt, s.image_first, s.image_token)
    job = Job(path, spans, settings, tokenizer, image_tokens, counter=counter)
    results = _run(job, workers)
    fatal = next((r["fatal"] for r in results if r["fatal"]), None)
    if fatal:
        raise DataError(fatal)
    why_not = counter.why_not
    counting = f"exact, every record encoded ({why_not})" if why_not else "fast (cached word counts)"
    if any(r["mismatch"] for r in results):
        job.fast = False
        results = _run(job, workers)
        counting = "exact, every record encoded (a fast count differed from the encoding)"
    encoded = sum(r["encoded"] for r in results)
    arrays = {"offsets": spans.offsets, "sizes": spans.sizes}
    for name, dtype in DTYPES.items():
        arrays[name] = np.concatenate([r["arrays"][name] for r in results] or [np.zeros(0, dtype)])
    bad = [entry for r in results for entry in r["bad"]]
    return arrays, {"bad": bad, "counting": f"{counting}; {encoded} records encoded in full"}
