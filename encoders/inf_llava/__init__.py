"""INF-LLaVA's dual-perspective cropping (DCM) and enhancement (DEM) as a `VisionEncoder` wrapper.

Paper: "INF-LLaVA: Dual-perspective Perception for High-Resolution Multimodal Large Language Models"
(arXiv 2407.16198); reference code github.com/WeihuangLin/INF-LLaVA (a fork of LLaVA-1.5), where the
DEM is `SpatialEmbed`. The pipeline below is what the reference computes, read from its code and
checked numerically; this package re-implements it (no code copied) and keeps the DEM's parameter
names, so the reference's `mm_projector.bin` loads (`convert.load_inf_llava`).

Notation used in the shape comments:
    B batch, n crops per side (3 in the paper), S inner encoder input side (336), g inner token grid
    side (24), G = n*g (72), C width (1024), K images sent through the inner encoder per input image,
    m = len(centre_offsets(n)).

Pipeline, for pixels [B, 3, n*S, n*S] (the reference trains on images already resized to n*S = 1008):
    DCM: n*n local crops (S x S tiles, row-major, crop k = i*n + j covers rows [S*i, S*(i+1)) and
         columns [S*j, S*(j+1))) and n*n global "strided" views x[..., h::n, w::n] (k = h*n + w),
         plus the whole image resized to S x S (bicubic, align_corners=False, no antialias).
    Inner encoder on every view -> [g, g, C] each (the reference: CLIP ViT-L/14-336 hidden_states[-2],
         CLS dropped), 2*n*n + 1 = 19 passes in the reference.
    Local map  L[g*i + p, g*j + q] = crop_ij[p, q]            -> [B, G, G, C]
    Global map Gm[n*p + h, n*q + w] = strided_hw[p, q]         -> [B, G, G, C]
    DEM (`dem.py`): Genh = cross-attention per g x g block (query Gm block, key/value L block);
         Lenh = cross-attention per strided view (query L[h::n, w::n], key/value Gm[h::n, w::n]);
         the same attention weights serve both directions;
         F = ln_fuse(cat([ffn_crop(Lenh), ffn_stride(Genh)]) + Genh + Lenh)   -> [B, G, G, C]
    out = interpolate(F, (g, g), bilinear, align_corners=False) in float32      -> [B, g*g, C]
    tokens = mean(resized-view features, out), a plain 0.5/0.5 average          -> [B, g*g, C]
    The LLM then sees g*g tokens per image (576), as in LLaVA-1.5.

Files: `layout.py` (crops/strided views <-> G x G maps), `dem.py` (the DEM's parameters and fusion),
`dual_perspective.py` (`DualPerspective`, the wrapper: fast and reference paths), `convert.py`
(the reference's `mm_projector.bin` -> this module's DEM and the projector).
"""

from encoders.inf_llava.convert import load_inf_llava
from encoders.inf_llava.dem import DEMAttention, DualPerspectiveEnhancement, fusion_ffn
from encoders.inf_llava.dual_perspective import (
    COMBINE_GLOBAL,
    FUSIONS,
    MODES,
    PERSPECTIVES,
    DualPerspective,
)
from encoders.inf_llava.layout import blocks_to_map, centre_offsets, deinterleave, interleave, map_to_blocks

__all__ = [
    "COMBINE_GLOBAL",
    "DEMAttention",
    "DualPerspective",
    "DualPerspectiveEnhancement",
    "FUSIONS",
    "MODES",
    "PERSPECTIVES",
    "blocks_to_map",
    "centre_offsets",
    "deinterleave",
    "fusion_ffn",
    "interleave",
    "load_inf_llava",
    "map_to_blocks",
]
