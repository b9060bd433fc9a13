"""INF-LLaVA's Dual-perspective Enhancement Module (DEM; `SpatialEmbed` in the reference code).

Parameters (4,400,256 for C = 1024, PyTorch default init, trainable in both of the paper's stages):
one multi-head cross-attention (8 heads, four Linear(C, C) with bias in the order query, key, value,
output, and a LayerNorm(C)) that serves both directions; two fusion FFNs `ffn_crop` / `ffn_stride`
(Linear(C, C/16) -> exact GELU -> Linear(C/16, C/2)); `ln_fuse`, a LayerNorm(C). The names follow
the reference's state dict (`spatial_embed.attention.linears.{0,1,2,3}`, `spatial_embed.attention.ln`,
`spatial_embed.ffn_{crop,stride}.{0,2}`, `spatial_embed.ln_fuse`), so its weights load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DEMAttention(nn.Module):
    """The DEM's cross-attention, shared by both directions (reference: `SpatialEmbed.attention`).

    `LayerNorm(W_o(softmax(Q K^T / sqrt(d_k)) V) + query)`: the residual adds the raw, un-projected
    query input and the LayerNorm comes after it; no mask, no dropout, no FFN.

    Args:
        dim: token width C.
        num_heads: attention heads; d_k = C / num_heads.
    """

    def __init__(self, dim: int, num_heads: int = 8) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"DEM width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        # Order query, key, value, output: the reference's `linears.{0,1,2,3}` key names.
        self.linears = nn.ModuleList(nn.Linear(dim, dim) for _ in range(4))
        self.ln = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """query [M, Nq, C], context [M, Nk, C] -> [M, Nq, C]; M independent attention problems."""
        M, Nq, C = query.shape
        Nk, h = context.shape[1], self.num_heads
        q = self.linears[0](query).view(M, Nq, h, C // h).transpose(1, 2)  # [M, h, Nq, d_k]
        k = self.linears[1](context).view(M, Nk, h, C // h).transpose(1, 2)  # [M, h, Nk, d_k]
        v = self.linears[2](context).view(M, Nk, h, C // h).transpose(1, 2)  # [M, h, Nk, d_k]
        attn = F.scaled_dot_product_attention(q, k, v)  # [M, h, Nq, d_k], default scale 1/sqrt(d_k)
        attn = attn.transpose(1, 2).reshape(M, Nq, C)  # [M, Nq, C]
        return self.ln(self.linears[3](attn) + query)


def fusion_ffn(dim: int) -> nn.Sequential:
    """The fusion FFN: Linear(C, C/16) -> exact GELU -> Linear(C/16, C/2), keys `{0,2}.{weight,bias}` as in
    the reference; the two FFNs' halves concatenate back to width C."""
    return nn.Sequential(nn.Linear(dim, dim // 16), nn.GELU(), nn.Linear(dim // 16, dim // 2))


class DualPerspectiveEnhancement(nn.Module):
    """DEM parameters and the position-wise fusion (reference: `SpatialEmbed`, 4,400,256 params at C=1024).

    Fusion of the two enhanced maps Genh (global as query) and Lenh (local as query), per position:
        perspectives="both",  fusion="concat_ffn" (paper):
            ln_fuse(cat([ffn_crop(Lenh), ffn_stride(Genh)], -1) + Genh + Lenh)
        perspectives="both",  fusion="sum":       ln_fuse(Genh + Lenh)
    Ablations with one perspective X (Lenh for "local", Genh for "global"):
        fusion="concat_ffn": ln_fuse(cat([ffn_crop(X), ffn_stride(X)], -1) + X). Both FFN halves
            read the one map, so the fused width stays C, every parameter gets a gradient, and the
            parameter set (and names) equal the paper's: INF-LLaVA weights load, e.g. to knock one
            branch out of a trained model.
        fusion="sum": ln_fuse(X).
    With fusion="sum" the FFNs are not built (unused parameters would trouble DDP), so INF-LLaVA's
    weights do not load strictly into that ablation.

    Args:
        dim: token width C (divisible by 16 and by num_heads).
        num_heads: attention heads.
        perspectives: "both" | "local" | "global": which enhanced maps are computed and fused.
        fusion: "concat_ffn" (paper) | "sum".
    """

    def __init__(self, dim: int, num_heads: int = 8, perspectives: str = "both", fusion: str = "concat_ffn") -> None:
        super().__init__()
        if dim % 16:
            raise ValueError(f"DEM width {dim} must be divisible by 16 (ffn hidden width is C/16)")
        self.perspectives = perspectives
        self.fusion = fusion
        self.attention = DEMAttention(dim, num_heads)
        if fusion == "concat_ffn":
            self.ffn_crop = fusion_ffn(dim)
            self.ffn_stride = fusion_ffn(dim)
        self.ln_fuse = nn.LayerNorm(dim)

    def fuse(self, genh: torch.Tensor | None, lenh: torch.Tensor | None) -> torch.Tensor:
        """Position-wise fusion; genh / lenh [..., C] (None for the branch an ablation drops) -> [..., C]."""
        if self.perspectives == "both":
            if self.fusion == "concat_ffn":
                x = torch.cat([self.ffn_crop(lenh), self.ffn_stride(genh)], dim=-1) + genh + lenh
            else:
                x = genh + lenh
        else:
            one = lenh if self.perspectives == "local" else genh
            if self.fusion == "concat_ffn":
                x = torch.cat([self.ffn_crop(one), self.ffn_stride(one)], dim=-1) + one
            else:
                x = one
        return self.ln_fuse(x)
