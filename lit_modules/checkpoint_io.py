"""Checkpoint files: written atomically, read without running code from them.

Writing. A checkpoint file is either the old version or the new one, never a torn write. Lightning's
`TorchCheckpointIO` serialises into memory, then writes through an fsspec transaction, whose local
implementation stages the bytes in the system temp directory (`tempfile.mkstemp()`) and `shutil.move`s
them at commit: across filesystems (/tmp vs a scratch or network disk, the usual case on clusters) that
move is a copy into the destination, so a job killed mid-copy (pre-emption, time limit, node failure)
leaves a truncated `last.ckpt`; nothing is fsync'ed either. Here the bytes go to a temporary file in the
checkpoint's own directory, are fsync'ed, and `os.replace` swaps them in (atomic on POSIX within one
filesystem), then the directory entry is fsync'ed.

`AtomicCheckpointIO` serves strategies that save one file through a CheckpointIO (single device, DDP,
FSDP with `state_dict_type: full`). FSDP `sharded` and DeepSpeed write checkpoint directories with
their own writers and do not use it.

Reading. `read_checkpoint` loads with `torch.load(weights_only=True)`: a file holding anything but
tensors and plain data is refused with `CheckpointError`, since unpickling it could run code.
"""

from __future__ import annotations

import glob
import os
import pickle
import zipfile
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from foundation.errors import UserError

TMP_MARK = ".tmp-"  # .<name>.tmp-<pid>: a save in progress, or a torn one if <pid> was killed


def remove_stale_temporaries(directory: str) -> list[str]:
    """Delete the temporary files of saves whose process is gone (killed mid-save); returns them."""
    removed = []
    for tmp in glob.glob(os.path.join(directory, f".*{TMP_MARK}*")):
        pid = tmp.rsplit(TMP_MARK, 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            os.remove(tmp)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointError(UserError):
    """A checkpoint file that is refused (it would run code when unpickled) or does not fit."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` with write-to-temp + fsync + `os.replace` for local paths, and reads that name a
    damaged file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote stores: Lightning's way
        path = os.path.abspath(os.fspath(path))
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)

    def load_checkpoint(
        self, path: _PATH, map_location: Any = lambda storage, loc: storage, weights_only: Optional[bool] = None
    ) -> dict:
        """Lightning's read for `resume=<file>`: a damaged file is a `CheckpointError` that names it."""
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location, weights_only)
        check_intact(os.fspath(path))
        try:
            return super().load_checkpoint(path, map_location, weights_only)
        except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{os.fspath(path)}: damaged: unreadable ({first})") from None


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6: a zip archive of the pickle and tensors


def check_intact(path: str) -> None:
    """Raise `CheckpointError` if the checkpoint file at `path` is damaged (truncated by a partial copy or a
    full disk, or not a checkpoint at all), without unpickling it.

    A zip archive keeps its table of contents at its end, so a truncated file has none; every member must
    also lie within the file. Reading the whole file to check CRCs would catch flipped bits too, but costs
    a read of gigabytes on every rank; `torch.load` still fails on those, and `read_checkpoint` names the
    file then. A directory (FSDP sharded, DeepSpeed) is left to its own reader.
    """
    if os.path.isdir(path):
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(len(ZIP_MAGIC))
    if magic != ZIP_MAGIC:
        if size == 0 or magic[:1] != b"\x80":  # not a zip archive, nor a legacy pickle (protocol 2+)
            raise CheckpointError(f"{path}: damaged: not a checkpoint file ({size} bytes, starts {magic!r})")
        return  # a legacy (pre-1.6) file: torch.load checks it
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"{path}: damaged: truncated or corrupt ({size} bytes; {err})") from None
    ends = [m.header_offset + m.compress_size for m in members]
    if not members or max(ends) > size:
        raise CheckpointError(f"{path}: damaged: its contents reach byte {max(ends, default=0)} of {size}")


def read_checkpoint(path: str) -> dict:
    """A checkpoint file's contents, read without running code from it (`weights_only`); a damaged file or
    one that would run code is a `CheckpointError` naming it."""
    check_intact(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        if "weights only load failed" not in str(err).lower():
            raise CheckpointError(f"{path}: damaged: unreadable ({first})") from None
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain data, which could run code when "
            f"loaded ({first}). Checkpoints written by this repo never do; re-save the weights as a plain state dict."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: damaged: unreadable ({first})") from None


def load_weights(module, checkpoint: str | dict) -> dict:
    """Load a checkpoint's trained weights into a `VLMModule` (frozen ones come from their own sources)."""
    state = read_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    module.on_load_checkpoint(state)  # checks the keys
    module.load_state_dict(state["state_dict"], strict=False)
    return state
