"""The record index of a data file: where each record lies and what the checks found, kept on disk.

`open_index` returns the index of a JSON list or JSON Lines file for one set of checks (`CheckSettings`), built
once and then memory-mapped by every process that asks for it, for as long as its key holds: the file's size,
modification time and first and last MiB, the tokenizer, the template, the length settings and the image folder.
Per record it holds the byte offset and size (`__getitem__` reads a record by them), a CRC-32 of those bytes (a
file edited under a run is an error, never a wrong record), the tokens after image expansion, the image count
and their image tokens, the id's hash (duplicate ids) and the verdict: usable, or the check's message. A second
start reads the verdicts instead of checking again; `data.on_error` is applied to them when the DataModule sets
up (`RecordIndex.usable`).

Built with one process per core (records are checked and counted in chunks; datamodules/token_count.py counts
tokens from cached word counts where that is exact), by one process at a time: an exclusive `flock` next to the
index; a second process waits for it, then maps what the first built. Written to a temporary folder and renamed
into place, so a build killed or out of disk leaves nothing that is read as an index. The index lives in
`.vlm_index/` beside the data file, or in the user's cache folder when that folder is not writable, or in
`data.index_dir`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from datamodules.index_build import ARRAYS, build_arrays
from datamodules.json_scan import DataError, check_readable, record_spans
from datamodules.llava_data import Sample, reason_key

# Bump when what the checks decide or what the index holds changes: older indexes are then rebuilt
# (3: the image tokens per record, for the HPARAMS figures of the run's own images).
VERSION = 3
HEAD_TAIL = 1 << 20  # bytes of the file's start and end in its content key
MAX_LOGGED = 20  # skipped records named one by one in the log; the rest are counted


@dataclass(frozen=True)
class CheckSettings:
    """What the verdicts and token counts of an index depend on, besides the file and the tokenizer."""

    template: str
    system_prompt: str | None
    image_first: bool
    image_token: str
    num_image_tokens: int
    max_length: int
    image_folder: str | None
    images_outside_folder: bool
    image_rule: str = ""  # `ImageTokens.key()`: a tiling's counts per image size and layout (image_tokens.py)
    video_frames: int = 32
    video_time_prompt: str | None = None


class RecordIndex:
    """A built index, memory-mapped: record `k`'s verdict, tokens and bytes.

    Args:
        data_path: the data file.
        root: the index folder (`<name>.<key>.idx`).
    """

    def __init__(self, data_path: str, root: str) -> None:
        self.path, self.root = data_path, root
        with open(os.path.join(root, "meta.json"), encoding="utf-8") as f:
            self.meta = json.load(f)
        self._map()

    def _map(self) -> None:
        for name in ARRAYS:
            setattr(self, name, np.load(os.path.join(self.root, f"{name}.npy"), mmap_mode="r"))
        if any(len(getattr(self, name)) != self.meta["records"] for name in ARRAYS):
            raise ValueError("arrays and meta.json disagree on the number of records")
        self._fd: tuple[int, int] | None = None  # (pid, descriptor): each process opens its own

    def __len__(self) -> int:
        return int(self.meta["records"])

    def __getstate__(self) -> dict:  # a spawned process maps the arrays again (a pickle would copy them)
        return {"path": self.path, "root": self.root, "meta": self.meta}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map()

    def record(self, k: int) -> dict:
        """Record `k`, read by its offset; DataError when its bytes are no longer the ones indexed."""
        if self._fd is None or self._fd[0] != os.getpid():
            try:
                self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
            except OSError as err:
                raise DataError(f"{self.path}: cannot read the data file during the run: {err.strerror}") from None
        size = int(self.sizes[k])
        raw = os.pread(self._fd[1], size, int(self.offsets[k]))
        if len(raw) != size or zlib.crc32(raw) != int(self.crc[k]):
            raise DataError(
                f"{self.path}: record #{k} is not the one indexed (the file changed during the run); restart "
                f"the run: the file is indexed again, and a resume goes on from the last checkpoint"
            )
        return json.loads(raw)

    def bad(self) -> dict[int, dict]:
        """Record number -> {"id", "message", "image"?} of each record the checks refused."""
        return {entry["k"]: entry for entry in self.meta["bad"]}

    def usable(self, rows: np.ndarray, on_error: str, log) -> tuple[np.ndarray, dict[str, int]]:
        """The rows (record numbers, in order) that passed the checks, and the skipped ones counted by
        reason; with on_error="raise" the first refused row is a DataError naming the file and record."""
        ok = self.status[rows] == 0
        skipped: dict[str, int] = {}
        if not ok.all():
            bad = self.bad()
            refused = rows[~ok]
            if on_error == "raise":
                first = bad[int(refused[0])]
                raise DataError(f"{self.path}: record {first['id']!r}: {first['message']}")
            for n, k in enumerate(refused.tolist()):
                entry = bad[k]
                key = reason_key(entry["message"])
                skipped[key] = skipped.get(key, 0) + 1
                if n < MAX_LOGGED:
                    log.warning("skipping %s record %r: %s", self.path, entry["id"], entry["message"])
            if len(refused) > MAX_LOGGED:
                log.warning("skipping %d more records of %s (counted by reason)", len(refused) - MAX_LOGGED, self.path)
        return rows[ok], skipped

    def duplicates(self, rows: np.ndarray) -> tuple[int, list[str]]:
        """How many of `rows` have an id an earlier row has, and the first five of those ids."""
        ids = self.id_hash[rows]
        with_id = np.flatnonzero(ids != 0)
        _, first = np.unique(ids[with_id], return_index=True)
        repeated = np.ones(len(with_id), bool)
        repeated[first] = False
        later = np.flatnonzero(repeated)
        shown = [str(self.record(int(rows[with_id[i]]))["id"]) for i in later[:5]]
        return len(later), shown


class IndexedSamples:
    """The usable records of an index, in `rows` order, as `Sample`s read from the file when asked for.

    Args:
        index: the file's `RecordIndex`.
        rows: record numbers, int64 [N].
    """

    def __init__(self, index: RecordIndex, rows: np.ndarray) -> None:
        self.index, self.rows = index, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample:
        k = int(self.rows[i])
        return Sample(self.index.record(k), k, int(self.index.tokens[k]), bool(self.index.images[k]))

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.index.tokens[self.rows])

    @property
    def has_image(self) -> np.ndarray:
        return np.asarray(self.index.images[self.rows] > 0)

    @property
    def num_images(self) -> np.ndarray:
        """Images per record (a video: 1), uint8 [N]."""
        return np.asarray(self.index.images[self.rows])

    @property
    def image_tokens(self) -> np.ndarray:
        """Image tokens per record, its images' together, int32 [N]."""
        return np.asarray(self.index.image_tokens[self.rows])


def content_key(path: str) -> dict:
    """The file's identity for the index key: size, modification time, and a hash of its first and last MiB
    (a copy with a new time is indexed again; an edit that keeps both is caught by the per-record CRC)."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(HEAD_TAIL))
        if st.st_size > HEAD_TAIL:
            f.seek(max(HEAD_TAIL, st.st_size - HEAD_TAIL))
            h.update(f.read())
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail": h.hexdigest()}


def tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items())) + json.dumps(tokenizer.all_special_tokens)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def index_folders(data_path: str, index_dir: str | None) -> list[str]:
    """Where an index may be: `data.index_dir` alone when set, else beside the data, then the user's cache."""
    if index_dir:
        return [index_dir]
    data_dir = os.path.dirname(os.path.abspath(data_path))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tag = hashlib.sha256(data_dir.encode()).hexdigest()[:16]
    return [os.path.join(data_dir, ".vlm_index"), os.path.join(cache, "vlm-lab", "index", tag)]


def default_workers() -> int:
    """The cores this process may run on (a job's CPU set, not the whole machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else multiprocessing.cpu_count()


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def open_index(
    data_path: str,
    settings: CheckSettings,
    tokenizer,
    index_dir: str | None = None,
    workers: int | None = None,
    image_tokens=None,
) -> RecordIndex:
    """The index of `data_path` for these checks: mapped when one with the same key exists, else built (by this
    process, or by another one that holds the build lock, waited for). `image_tokens`: the `ImageTokens` rule
    whose `key()` is `settings.image_rule` (None: `settings.num_image_tokens` per image); a tiling's counts read
    each image's size from its header once, here, and the index keeps the record's tokens."""
    check_readable(data_path)
    try:
        content = content_key(data_path)
    except OSError as err:
        raise DataError(f"{data_path}: cannot read it: {err.strerror}") from None
    key_fields = {
        "version": VERSION,
        "content": content,
        "tokenizer": tokenizer_key(tokenizer),
        "settings": asdict(settings),
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    name = f"{os.path.basename(data_path)}.{key}.idx"
    folders = index_folders(data_path, index_dir)
    for folder in folders:
        index = _load(data_path, os.path.join(folder, name))
        if index is not None:
            return index
    folder = next((f for f in folders if _writable(f)), None)
    if folder is None:
        where = "data.index_dir" if index_dir else "the data's folder nor the user's cache folder"
        raise DataError(
            f"{data_path}: cannot write its record index: neither {where} is writable ({', '.join(folders)}); "
            f"set data.index_dir to a writable folder"
        )
    final = os.path.join(folder, name)
    with open(final + ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish indexing {data_path} ({final})", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        index = _load(data_path, final)  # built by the process that held the lock
        if index is None:
            _build(data_path, final, settings, tokenizer, key_fields, workers, image_tokens)
            index = RecordIndex(data_path, final)
    return index


def _load(data_path: str, root: str) -> RecordIndex | None:
    """The index at `root`, or None when there is none (or a damaged or stale one, which is removed)."""
    if not os.path.isdir(root):
        return None
    try:
        index = RecordIndex(data_path, root)
    except (OSError, ValueError, KeyError) as err:
        print(f"record index {root} is damaged ({err}); indexing {data_path} again", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
        return None
    appeared = [e["image"] for e in index.meta["bad"] if "image" in e and os.path.isfile(e["image"])]
    if appeared:  # the verdicts name images that were missing then and exist now: check again
        print(f"{len(appeared)} images missing when {data_path} was indexed exist now; indexing it again",
              file=sys.stderr)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
        return None
    return index


def _build(
    data_path: str,
    final: str,
    settings: CheckSettings,
    tokenizer,
    key_fields: dict,
    workers: int | None,
    image_tokens=None,
):
    folder = os.path.dirname(final)
    for stale in os.listdir(folder):  # temporaries of builds that were killed (this process holds the lock)
        if stale.startswith(os.path.basename(final) + ".tmp-"):
            shutil.rmtree(os.path.join(folder, stale), ignore_errors=True)
    start = time.perf_counter()
    spans = record_spans(data_path)
    workers = workers or default_workers()
    print(f"indexing {data_path}: {len(spans.offsets)} records, {workers} processes", file=sys.stderr)
    arrays, meta = build_arrays(data_path, spans, settings, tokenizer, workers, image_tokens)
    seconds = time.perf_counter() - start
    meta.update(records=len(spans.offsets), kind=spans.kind, key=key_fields, seconds=round(seconds, 3))
    tmp = f"{final}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        for name in ARRAYS:
            with open(os.path.join(tmp, f"{name}.npy"), "wb") as f:
                np.save(f, arrays[name])
                f.flush()
                os.fsync(f.fileno())
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)  # atomic: an index exists whole or not at all
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        hint = "the disk is full: free space there or" if err.errno == errno.ENOSPC else "fix it or"
        raise DataError(
            f"{data_path}: writing its record index to {folder} failed ({err.strerror or err}); {hint} set "
            f"data.index_dir to another folder"
        ) from None
    rate = len(spans.offsets) / max(seconds, 1e-9)
    print(f"indexed {data_path} in {seconds:.1f} s ({rate:,.0f} records/s, token counts: {meta['counting']})",
          file=sys.stderr)  # fmt: skip
