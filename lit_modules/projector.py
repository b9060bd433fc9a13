"""Projectors from vision width C to LLM width D, with LLaVA's module layout.

`mlp2x_gelu` is an `nn.Sequential(Linear, GELU, Linear)` so its keys (`0.*`, `2.*`) match LLaVA-1.5's
and INF-LLaVA's `mm_projector` and their released weights load as they are.
"""

from __future__ import annotations

from torch import nn


def build_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """The projector named `name`, mapping [B, N, in_dim] -> [B, N, out_dim].

    Args:
        name: "linear" (LLaVA-1) or "mlp2x_gelu" (LLaVA-1.5).
        in_dim: vision token width C.
        out_dim: LLM hidden size D.
    """
    if name == "linear":
        return nn.Linear(in_dim, out_dim)
    if name == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector {name!r}; choose one of: linear, mlp2x_gelu")
