"""Write litdata shards from LLaVA-format records and their images, for a run to stream (`data.sources[].shards`).

    python -m tools.write_shards --data llava_v1_5_mix665k.json --image-folder data/images --out shards/mix665k
    python -m tools.write_shards --data pretrain.jsonl --image-folder images --out s3://bucket/pretrain --workers 8

Each shard item is one record, a pair: the record's JSON (UTF-8 bytes, conversations as in the file) and the image
file's bytes as stored (JPEG / PNG / ..., not decoded; b"" for a text-only record). With --workers 1 (into a local
folder) shard item k is the file's record k; with several workers, or an object-storage --out, litdata's `optimize`
writes them, each worker a share, and the items follow the workers' order.

Records are not checked against a tokenizer or template here: that belongs to the run, which checks each record as
it reads it (datamodules/shards.py). What this tool refuses is what no run could read, each named: a file that is
not LLaVA JSON / JSONL, a record that is not an object, an image missing or outside the image folder
(`--images-outside-folder` allows that). --out is a folder or an object-storage URL (litdata uploads the chunks);
one that already holds shards is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys

from datamodules.json_scan import DataError
from datamodules.llava_data import ImagePaths, load_records
from foundation.errors import UserError, needs_extra, run_command

with needs_extra("stream", "tools.write_shards", command=__name__ == "__main__"):
    import litdata
    from litdata.streaming.writer import BinaryWriter


def read_records(path: str) -> list:
    """A JSON list or JSON Lines (.jsonl) of records."""
    if not path.endswith(".jsonl"):
        return load_records(path)
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {line_no}: not valid JSON: {err.msg}") from None
    return records


def image_of(path: str, k: int, record, images: ImagePaths | None) -> str | None:
    """The image file of record k (None: text-only); DataError naming the record when no run could read it."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: record #{k} is not a JSON object")
    image = record.get("image")
    if image is None:
        return None
    rid = record.get("id", f"#{k}")
    if not isinstance(image, str):
        raise DataError(f"{path}: record {rid!r}: 'image' is {type(image).__name__}: one image path is supported")
    if images is None:
        raise DataError(f"{path}: record {rid!r} has an image; give --image-folder")
    try:
        return images.check(image)
    except DataError as err:
        raise DataError(f"{path}: record {rid!r}: {err}") from None


def shard_item(job: tuple[int, dict, str | None]) -> tuple[bytes, bytes]:
    """One record -> its shard item (in litdata's worker processes with several). A pair of bytes, not a dict: litdata
    0.2.76 stores a dict of strings as Arrow record batches and decodes 256 rows for each item read out of order
    (316 reads/s of 100 KB items in a shuffled order here); a pair is read alone (5,460/s)."""
    _, record, image_path = job
    data = b""
    if image_path is not None:
        with open(image_path, "rb") as f:
            data = f.read()
    return json.dumps(record, ensure_ascii=False).encode("utf-8"), data


def write_here(jobs: list, out: str, chunk_bytes: str) -> None:
    """One process, in the file's order, into a local folder: litdata's writer without `optimize`'s worker
    processes (which cost seconds to start; the chunks and index.json are the same format)."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # a previous set (--overwrite): its chunks would otherwise stay beside the new
        if name.endswith(".bin") or name.endswith("index.json"):
            os.remove(os.path.join(out, name))
    writer = BinaryWriter(out, chunk_bytes=chunk_bytes)
    for k, job in enumerate(jobs):
        writer[k] = shard_item(job)
    writer.done()
    writer.merge()


def write_shards(
    data: str,
    out: str,
    image_folder: str | None = None,
    chunk_bytes: str = "64MB",
    workers: int = 1,
    overwrite: bool = False,
    images_outside_folder: bool = False,
) -> int:
    """Write `data`'s records to shards at `out`; returns the number of records."""
    records = read_records(data)
    if not records:
        raise DataError(f"{data}: no records to write")
    images = ImagePaths(image_folder, images_outside_folder) if image_folder else None
    jobs = [(k, rec, image_of(data, k, rec, images)) for k, rec in enumerate(records)]
    local = "://" not in out
    if local and os.path.exists(os.path.join(out, "index.json")) and not overwrite:
        raise UserError(f"{out} already holds shards; pass --overwrite to replace them")
    if local and workers <= 1:
        write_here(jobs, out, chunk_bytes)
    else:
        # litdata's DataProcessor sets the process-wide multiprocessing start method to spawn (force=True); the
        # caller's is put back, so a DataLoader it starts later in this process still forks its workers
        method = multiprocessing.get_start_method(allow_none=True)
        try:
            litdata.optimize(
                fn=shard_item,
                inputs=jobs,
                output_dir=os.path.abspath(out) if local else out,
                chunk_bytes=chunk_bytes,
                num_workers=max(1, workers),
                mode="overwrite" if overwrite else None,
                verbose=False,
            )
        finally:
            multiprocessing.set_start_method(method, force=True)
    return len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.write_shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="LLaVA-format JSON list or JSONL of records")
    parser.add_argument("--image-folder", help="the folder record image paths are relative to")
    parser.add_argument("--out", required=True, help="shards folder or object-storage URL (s3://...)")
    parser.add_argument("--chunk-bytes", default="64MB", help="target size of each chunk file (default 64MB)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="writer processes")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already at --out")
    parser.add_argument("--images-outside-folder", action="store_true", help="allow images outside --image-folder")
    args = parser.parse_args(argv)
    n = write_shards(
        args.data,
        args.out,
        args.image_folder,
        args.chunk_bytes,
        args.workers,
        args.overwrite,
        args.images_outside_folder,
    )
    print(f"wrote {n} records to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))  # a user-fixable error: one line `error: ...`, status 2
