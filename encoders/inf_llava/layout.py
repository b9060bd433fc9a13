"""Index layouts of INF-LLaVA's feature maps: views of an n*S image <-> G x G maps (G = n*g).

Two ways to place n x n feature grids [p, q] on one map, both aligned with the n*S image:
    blocks (local crops):      map[p*i + y, q*j + x] = blocks[i, j, y, x]  (`blocks_to_map`)
    interleaved (strided):     map[a*y + h, b*x + w] = views[h, w, y, x]   (`interleave`)
and `centre_offsets`: which map rows/columns the final bilinear resize to g x g reads.
"""

from __future__ import annotations

import torch


def centre_offsets(n: int) -> list[int]:
    """Offsets c in [0, n) of the G x G map rows (and columns) n*y + c that reach the output.

    `F.interpolate(bilinear, align_corners=False)` from n*g to g reads, for output index y, the
    source coordinate (y + 0.5) * n - 0.5 = n*y + (n-1)/2. For odd n it is an integer, read with
    weight 1 (a centre pick, not average pooling); for even n it falls halfway between n*y + n/2 - 1
    and n*y + n/2, read with weights 0.5 / 0.5.
    """
    return [(n - 1) // 2] if n % 2 else [n // 2 - 1, n // 2]


def blocks_to_map(blocks: torch.Tensor) -> torch.Tensor:
    """Place blocks side by side: [B, a, b, p, q, C] -> [B, a*p, b*q, C], map[p*i + y, q*j + x] = blocks[i, j, y, x]."""
    B, a, b, p, q, C = blocks.shape
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(B, a * p, b * q, C)  # [B, a, p, b, q, C] -> [B, a*p, b*q, C]


def map_to_blocks(fmap: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Inverse of `blocks_to_map`: [B, a*p, b*q, C] -> [B, a, b, p, q, C]."""
    B, H, W, C = fmap.shape
    return fmap.view(B, a, H // a, b, W // b, C).permute(0, 1, 3, 2, 4, 5)  # [B, a, b, p, q, C]


def interleave(views: torch.Tensor) -> torch.Tensor:
    """Interleave views: [B, a, b, p, q, C] -> [B, p*a, q*b, C], map[a*y + h, b*x + w] = views[h, w, y, x]."""
    B, a, b, p, q, C = views.shape
    return views.permute(0, 3, 1, 4, 2, 5).reshape(B, p * a, q * b, C)  # [B, p, a, q, b, C] -> [B, p*a, q*b, C]


def deinterleave(fmap: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Inverse of `interleave`: [B, p*a, q*b, C] -> [B, a, b, p, q, C], views[h, w] = map[h::a, w::b]."""
    B, H, W, C = fmap.shape
    return fmap.view(B, H // a, a, W // b, b, C).permute(0, 2, 4, 1, 3, 5)  # [B, a, b, p, q, C]
