"""Projectors from vision width C to LLM width D: [B, N, C] -> [B, N, D], found by name in `PROJECTORS`.

`mlp2x_gelu` is an `nn.Sequential(Linear, GELU, Linear)` so its keys (`0.*`, `2.*`) match LLaVA-1.5's
and INF-LLaVA's `mm_projector` and their released weights load as they are. A new projector is one
registered function taking `(in_dim, out_dim, **options)`; its options become `model.projector`'s.
"""

from __future__ import annotations

from torch import nn

from foundation.registry import Registry

PROJECTORS = Registry("projector", inputs=("in_dim", "out_dim"))


@PROJECTORS.register("linear")
def linear(in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA-1: one linear layer."""
    return nn.Linear(in_dim, out_dim)


@PROJECTORS.register("mlp2x_gelu")
def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA-1.5: Linear(C, D) -> GELU -> Linear(D, D)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
