"""Where each record of a data file lies: byte offset and size, found without parsing the records.

A JSON Lines file (`.jsonl`) holds one record per non-blank line. A JSON list (`[{...}, {...}]`) is scanned
for its structure with numpy, block by block: backslash runs mark escaped characters, unescaped quotes open and
close strings, and outside strings the brackets give the depth; the commas at depth 1 separate the records. The
records themselves are parsed later, each from its own bytes, by the index build (datamodules/record_index.py),
which is what lets that build run in many processes and `__getitem__` read one record by its offset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from foundation.errors import UserError

BLOCK = 4 << 20  # bytes scanned at once (buffers that stay in cache: 8 MiB and more were slower)
QUOTE, BACKSLASH, COMMA = 34, 92, 44
OPEN, CLOSE = (ord("{"), ord("[")), (ord("}"), ord("]"))
WHITESPACE = b" \t\r\n"


class DataError(UserError):
    """A bad data file or record; the message names the file and the record id."""


@dataclass
class Spans:
    offsets: np.ndarray  # [N] int64, byte offset of each record's first byte
    sizes: np.ndarray  # [N] int64, its bytes (surrounding whitespace included)
    kind: str  # "list" | "jsonl"


def check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: not readable (permission denied)")


def record_spans(path: str) -> Spans:
    """The byte span of every record of `path`, a JSON list or (`.jsonl`) JSON Lines file."""
    check_readable(path)
    size = os.path.getsize(path)
    if path.endswith(".jsonl"):
        return _jsonl_spans(path, size)
    if size == 0:
        _raise_json_error(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    first = _first_non_space(data)
    if first is None or data[first] != ord("["):
        if first is not None and data[first] == ord("{"):
            raise DataError(f"{path}: expected a JSON list of records, got dict (JSON Lines files end in .jsonl)")
        _raise_json_error(path)
    return Spans(*_list_spans(path, data, first), kind="list")


def _first_non_space(data: np.ndarray) -> int | None:
    head = bytes(data[: 1 << 16])
    stripped = head.lstrip(WHITESPACE)
    return len(head) - len(stripped) if stripped else None


def _jsonl_spans(path: str, size: int) -> Spans:
    if size == 0:
        return Spans(np.zeros(0, np.int64), np.zeros(0, np.int64), "jsonl")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    ends = [np.flatnonzero(data[s : s + BLOCK] == ord("\n")) + s for s in range(0, size, BLOCK)]
    newlines = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
    stops = np.concatenate([newlines, [size]]).astype(np.int64)
    sizes = stops - starts
    keep = sizes > 0
    # A line holding only "\r" (a Windows file's blank line) is blank too.
    short = np.flatnonzero(keep & (sizes <= 2))
    for k in short:
        if not bytes(data[starts[k] : stops[k]]).strip():
            keep[k] = False
    return Spans(starts[keep], sizes[keep], "jsonl")


def _escaped(block: np.ndarray, carry: int) -> np.ndarray:
    """Positions in `block` escaped by a backslash run of odd length; `carry` = backslashes that ended the
    previous block (they belong to a run that starts this one)."""
    bs = np.flatnonzero(block == BACKSLASH)
    if len(bs) == 0 or bs[0] != 0:
        head = [0] if carry % 2 else []  # the previous block's odd run escapes this block's first byte
        carry = 0
    else:
        head = []
    if len(bs) == 0:
        return np.array(head, dtype=np.int64)
    new_run = np.concatenate([[True], np.diff(bs) != 1])
    run_lengths = np.diff(np.concatenate([np.flatnonzero(new_run), [len(bs)]]))
    run_lengths[0] += carry
    after = bs[np.concatenate([np.flatnonzero(new_run)[1:] - 1, [len(bs) - 1]])] + 1  # the byte after each run
    escaped = np.concatenate([np.array(head, dtype=np.int64), after[run_lengths % 2 == 1]])
    return escaped[escaped < len(block)]


def _trailing_backslashes(block: np.ndarray, carry: int) -> int:
    tail = bytes(block[-4096:])
    run = len(tail) - len(tail.rstrip(b"\\"))
    if run < len(tail):
        return run
    not_bs = np.flatnonzero(block != BACKSLASH)  # a block ending in over 4 KiB of backslashes
    return carry + len(block) if len(not_bs) == 0 else len(block) - 1 - int(not_bs[-1])


def _list_spans(path: str, data: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Record spans of a JSON list whose "[" is at `first`: the structural characters outside strings, their
    depth, and the depth-1 commas between the records."""
    size = len(data)
    in_string, depth, carry = 0, 0, 0
    seps: list[np.ndarray] = []  # absolute positions of "[" (depth 0), depth-1 commas and the closing "]"
    close = None
    # Buffers reused block after block: a fresh array per operation costs more in page faults than the
    # comparison itself.
    folded, mask, other = np.empty(BLOCK, np.uint8), np.empty(BLOCK, bool), np.empty(BLOCK, bool)
    for s in range(first, size, BLOCK):
        block = data[s : s + BLOCK]
        n = len(block)
        escaped = _escaped(block, carry)
        carry = _trailing_backslashes(block, carry)
        is_quote = np.equal(block, QUOTE, out=mask[:n])
        is_quote[escaped] = False
        quotes = np.flatnonzero(is_quote)
        # "[" and "]" differ from "{" and "}" in bit 0x20 alone, and no other byte ORed with it gives "{" or "}".
        np.bitwise_or(block, 0x20, out=folded[:n])
        np.equal(folded[:n], OPEN[0], out=mask[:n])
        mask[:n] |= np.equal(folded[:n], CLOSE[0], out=other[:n])
        mask[:n] |= np.equal(block, COMMA, out=other[:n])
        structural = np.flatnonzero(mask[:n])
        outside = (np.searchsorted(quotes, structural) + in_string) % 2 == 0
        structural = structural[outside]
        in_string = (in_string + len(quotes)) % 2
        chars = block[structural]
        delta = np.where((chars == OPEN[0]) | (chars == OPEN[1]), 1, np.where(chars == COMMA, 0, -1))
        after = depth + np.cumsum(delta)
        before = after - delta
        if (after < 0).any() or (close is not None and len(structural)):
            _raise_json_error(path)
        top = ((before == 1) & (chars == COMMA)) | ((before == 0) & (delta == 1)) | ((before == 1) & (delta == -1))
        seps.append(structural[top] + s)
        ends = np.flatnonzero((after == 0) & (delta == -1))
        if len(ends):
            if ends[0] != len(structural) - 1:  # something after the list's "]"
                _raise_json_error(path)
            close = int(structural[ends[0]]) + s
        depth = int(after[-1]) if len(after) else depth
    if close is None or in_string or bytes(data[close + 1 :]).strip(WHITESPACE):
        _raise_json_error(path)
    bounds = np.concatenate(seps).astype(np.int64)  # "[", commas..., "]"
    starts, stops = bounds[:-1] + 1, bounds[1:]
    if len(starts) == 1 and not bytes(data[starts[0] : stops[0]]).strip(WHITESPACE):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)  # "[]"
    return starts, stops - starts


def _raise_json_error(path: str) -> None:
    """A file whose structure is broken: the JSON parser's own message (the error path reads it whole)."""
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise not_utf8(path, err, 0) from None
    with open(path, encoding="utf-8") as f:
        kind = type(json.load(f)).__name__
    raise DataError(f"{path}: expected a JSON list of records, got {kind}")


def not_utf8(path: str, err: UnicodeDecodeError, base: int) -> DataError:
    return DataError(
        f"{path}: not UTF-8 text (byte {err.object[err.start]:#x} at offset {base + err.start}); JSON files must "
        f"be UTF-8: re-encode it, e.g. `iconv -f latin1 -t utf-8`"
    )
