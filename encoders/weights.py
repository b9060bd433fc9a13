"""Checks shared by every encoder that loads weights from disk."""

from __future__ import annotations

import os

import torch


def on_meta_device() -> bool:
    """True inside `with torch.device("meta"):` (or after `torch.set_default_device("meta")`).

    Builders then make shapes only and read no weights (the contract in `encoders.base`).
    """
    return torch.get_default_device().type == "meta"


def require_file(path: str, what: str) -> str:
    """Return `path` if it exists, else raise FileNotFoundError naming it and what it should hold."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def key_mismatch_error(source: str, missing: list[str], unexpected: list[str], limit: int = 20) -> ValueError:
    """A readable error for a state dict that does not fit the model (never load such weights silently)."""

    def show(keys: list[str]) -> str:
        keys = sorted(keys)
        more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more if keys else "none"

    return ValueError(
        f"checkpoint {source} does not match the model:\n"
        f"  missing keys ({len(missing)}): {show(missing)}\n"
        f"  unexpected keys ({len(unexpected)}): {show(unexpected)}"
    )
