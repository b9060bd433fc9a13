"""`DualPerspective`: INF-LLaVA's DCM + DEM around any square-grid `VisionEncoder` (the pipeline is in
`encoders/inf_llava/__init__.py`; notation B, n, S, g, G, C, K, m as there).

Two modes give the same output (to fp rounding):
    "reference": the computation at every one of the G*G positions, 2*n*n + 1 encoder images
        (19 for n = 3) sent through the encoder in one batched call.
    "fast" (default): every step after the attention is position-wise and the bilinear resize reads
        only the map rows/columns n*y + c, c in `centre_offsets(n)`, so only those positions are
        computed. For odd n that is one offset, (n-1)/2: only the centre strided view reaches the
        output (and it equals the bicubic-resized view exactly), so K = n*n + 1 (10 for n = 3) and
        the global-as-query attention runs (g/n)^2 queries per block (64 for g = 24) instead of g*g.
        For even n the resize averages offsets n/2 - 1 and n/2, so the 2 x 2 centre strided views
        are needed and the resized view is a separate bicubic pass (K = n*n + 4 + 1); fast mode is
        still exact (to rounding) for even n, it just saves less.

Preprocessing (`preprocess`): the inner encoder's own recipe with every size times n
(`preprocess.scaled(n)`), normalised with the inner encoder's mean/std. That is what INF-LLaVA's
training does to get 1008 px images from CLIP-L/336 (train.py: `image_processor.size` and `crop_size`
multiplied by `scale = 3`, so shortest edge to 1008 and a 1008 x 1008 centre crop, bicubic, after
LLaVA's mean-colour pad-to-square with `image_aspect_ratio=pad`). For a SAM or timm inner encoder the
same rule gives its own recipe at n*S (longest side to n*S and pad; timm's crop_pct at n*S).

Deviations from the reference, on purpose:
    - No in-model upsampling to n*S: the module takes n*S pixels and rejects anything else. The
      reference upsamples 336 px inputs to 1008 at inference after training on 1008 px inputs (a
      train/test mismatch); here the datamodule must feed n*S px in both training and evaluation.
    - All encoder images go through the encoder in one batched call (the reference loops per view).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from encoders.base import VisionEncoder
from encoders.inf_llava.dem import DualPerspectiveEnhancement
from encoders.inf_llava.layout import blocks_to_map, centre_offsets, deinterleave, interleave, map_to_blocks
from encoders.wrapper import EncoderWrapper

MODES = ("fast", "reference")
PERSPECTIVES = ("both", "local", "global")
FUSIONS = ("concat_ffn", "sum")
COMBINE_GLOBAL = ("mean", "none")


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    # The reference interpolates in float32 (upcasting bf16/fp16); keep float64 tests in float64.
    return torch.promote_types(dtype, torch.float32)


class DualPerspective(EncoderWrapper):
    """INF-LLaVA's DCM + DEM around any square-grid `VisionEncoder`: [B, 3, n*S, n*S] -> [B, g*g, C].

    The output has as many tokens as the inner encoder (g*g, e.g. 576 for CLIP-L/336 at 1008 px),
    so the projector and LLM see the same token count as without the wrapper.

    Args:
        encoder: the wrapped encoder (kept as `self.inner`); its grid must be square.
        n: crops per side; the module takes n*S px images. Odd n (the paper's 3) gives the largest
            saving in fast mode; even n is supported and exact in both modes (see `centre_offsets`).
        mode: "fast" (default; only the positions that reach the output) | "reference" (every
            position, 2*n*n encoder images + 1 resized one when combine_global="mean", like the
            paper's code). Same output; can be changed after construction (`module.mode = ...`);
            `encoder_passes` gives the encoder images per input image.
        perspectives: "both" (paper) | "local" (only Lenh, local crops as query) | "global" (only
            Genh, strided views as query); see `DualPerspectiveEnhancement` for the fusion then.
        fusion: "concat_ffn" (paper) | "sum".
        combine_global: "mean" (paper: average with the resized whole-image features) | "none"
            (the DEM output alone).
        num_heads: DEM attention heads (8 in the paper); the encoder width C must be divisible by
            it and by 16.
    """

    part = "enhancer"

    def __init__(
        self,
        encoder: VisionEncoder,
        n: int = 3,
        mode: str = "fast",
        perspectives: str = "both",
        fusion: str = "concat_ffn",
        combine_global: str = "mean",
        num_heads: int = 8,
    ) -> None:
        for name, value, choices in (
            ("perspectives", perspectives, PERSPECTIVES),
            ("fusion", fusion, FUSIONS),
            ("combine_global", combine_global, COMBINE_GLOBAL),
        ):
            if value not in choices:
                raise ValueError(f"DualPerspective: {name}={value!r} is not one of {list(choices)}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"DualPerspective: n must be a positive int, got {n!r}")
        gh, gw = encoder.grid_size
        if gh != gw:
            raise ValueError(
                f"DualPerspective needs a square token grid, but {type(encoder).__name__} has grid {gh}x{gw}"
            )
        super().__init__(encoder)
        self.n = n
        self.mode = mode  # validated by the property setter
        self.perspectives = perspectives
        self.combine_global = combine_global
        # the contract attributes that change: grid, width and normalisation are the inner encoder's
        self.image_size = n * encoder.image_size
        self.preprocess = encoder.preprocess.scaled(n)  # the inner recipe at n*S, as INF-LLaVA (see above)
        self.dem = DualPerspectiveEnhancement(encoder.embed_dim, num_heads, perspectives, fusion)
        self._register_fast_indices(n, gh)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"DualPerspective: mode={value!r} is not one of {list(MODES)}")
        self._mode = value

    def _register_fast_indices(self, n: int, g: int) -> None:
        """Index tables for fast mode's global-as-query attention (non-persistent buffers: follow .to())."""
        offsets = centre_offsets(n)
        # The m*g map rows that reach the output, ascending: rows[y*m + ci] = n*y + offsets[ci].
        rows = [n * y + c for y in range(g) for c in offsets]
        # Group them by the g-row block (crop row i) they fall in. When g is not a multiple of n the
        # blocks hold different counts (e.g. g=4, n=3: rows 1 | 4, 7 | 10), so pad each block's list
        # to the longest with index 0; attention queries are independent, the padded ones are dropped.
        per_block: list[list[int]] = [[] for _ in range(n)]
        row_block, row_slot = [], []
        for k, r in enumerate(rows):
            row_block.append(r // g)
            row_slot.append(len(per_block[r // g]))
            per_block[r // g].append(k)
        width = max(len(b) for b in per_block)
        block_rows = [b + [0] * (width - len(b)) for b in per_block]
        self.register_buffer("_offsets", torch.tensor(offsets), persistent=False)  # [m]
        self.register_buffer("_block_rows", torch.tensor(block_rows), persistent=False)  # [n, P]
        self.register_buffer("_row_block", torch.tensor(row_block), persistent=False)  # [m*g]
        self.register_buffer("_row_slot", torch.tensor(row_slot), persistent=False)  # [m*g]

    @property
    def encoder_passes(self) -> int:
        """Images sent through the inner encoder per input image in the current mode (K)."""
        n, m = self.n, len(centre_offsets(self.n))
        resized = self.combine_global == "mean"
        if self.mode == "reference":
            return 2 * n * n + int(resized)
        # Odd n: the resized view is the centre strided view, already among the m*m views.
        return n * n + m * m + int(resized and n % 2 == 0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        if self.mode == "reference":
            return self._forward_reference(pixels)
        return self._forward_fast(pixels)

    # --- DCM: views of the n*S image ----------------------------------------------------------

    def _crops(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, n*S, n*S] -> local crops [B, n, n, 3, S, S]; crop (i, j) = rows S*i.., columns S*j.."""
        B, _, H, _ = pixels.shape
        n, S = self.n, H // self.n
        return pixels.reshape(B, 3, n, S, n, S).permute(0, 2, 4, 1, 3, 5)  # [B, n(i), n(j), 3, S, S]

    def _strided(self, pixels: torch.Tensor, centre_only: bool = False) -> torch.Tensor:
        """[B, 3, n*S, n*S] -> strided views x[..., h::n, w::n], [B, n, n, 3, S, S] (row-major over h, w);
        with centre_only, only h, w in `centre_offsets(n)`: [B, m, m, 3, S, S]."""
        B, _, H, _ = pixels.shape
        n, S = self.n, H // self.n
        views = pixels.reshape(B, 3, S, n, S, n)  # pixel (n*y + h, n*x + w) -> [.., y, h, x, w]
        if centre_only:
            views = views.index_select(3, self._offsets).index_select(5, self._offsets)  # [B, 3, S, m, S, m]
        return views.permute(0, 3, 5, 1, 2, 4)  # [B, m(h), m(w), 3, S, S]

    def _resized(self, pixels: torch.Tensor) -> torch.Tensor:
        """The whole image at S x S as the reference makes it: bicubic, align_corners=False, float32."""
        S = self.inner.image_size
        out = F.interpolate(pixels.to(_at_least_fp32(pixels.dtype)), size=(S, S), mode="bicubic", align_corners=False)
        return out.to(pixels.dtype)  # [B, 3, S, S]

    def _encode(self, views: list[torch.Tensor]) -> torch.Tensor:
        """All views in ONE inner-encoder call: list of [B, k, 3, S, S] -> features [B, K, g, g, C]."""
        images = torch.cat(views, dim=1)  # [B, K, 3, S, S]
        B, K, _, S, _ = images.shape
        g, C = self.grid_size[0], self.embed_dim
        tokens = self.inner(images.reshape(B * K, 3, S, S))  # [B*K, N, C]
        if tokens.shape[1:] != (g * g, C):
            raise ValueError(
                f"inner encoder {type(self.inner).__name__} returned tokens {tuple(tokens.shape[1:])}, "
                f"expected ({g * g}, {C}) from its grid_size/embed_dim (a CLS token must be dropped)"
            )
        # The DEM may sit in another dtype than a frozen encoder (e.g. bf16 tower, fp32 DEM).
        tokens = tokens.to(self.dem.ln_fuse.weight.dtype)
        return tokens.view(B, K, g, g, C)  # [B, K, g, g, C]

    def _combine(self, out: torch.Tensor, resized: torch.Tensor | None) -> torch.Tensor:
        """out, resized [B, g*g, C] -> [B, g*g, C]: the paper's plain 0.5/0.5 average, or out alone."""
        if self.combine_global == "none":
            return out
        return torch.stack([resized, out]).mean(0)

    # --- reference mode: every position, like the paper's code --------------------------------

    def _forward_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        B, n, g, C = pixels.shape[0], self.n, self.grid_size[0], self.embed_dim
        S = self.inner.image_size
        views = [
            self._crops(pixels).reshape(B, n * n, 3, S, S),  # k = i*n + j
            self._strided(pixels).reshape(B, n * n, 3, S, S),  # k = h*n + w
        ]
        if self.combine_global == "mean":
            views.append(self._resized(pixels).unsqueeze(1))  # [B, 1, 3, S, S]
        feats = self._encode(views)  # [B, 2*n*n (+1), g, g, C]
        crops = feats[:, : n * n].reshape(B, n, n, g, g, C)
        strided = feats[:, n * n : 2 * n * n].reshape(B, n, n, g, g, C)
        local_map = blocks_to_map(crops)  # L  [B, G, G, C]
        global_map = interleave(strided)  # Gm [B, G, G, C]

        genh = lenh = None
        attention = self.dem.attention
        if self.perspectives in ("both", "global"):
            # Global as query, per g x g block (i, j): query Gm block, key/value L block (= crop ij).
            q = map_to_blocks(global_map, n, n).reshape(B * n * n, g * g, C)
            kv = map_to_blocks(local_map, n, n).reshape(B * n * n, g * g, C)
            genh = blocks_to_map(attention(q, kv).view(B, n, n, g, g, C))  # [B, G, G, C]
        if self.perspectives in ("both", "local"):
            # Local as query, per offset (h, w): query L[h::n, w::n], key/value Gm[h::n, w::n] (= strided hw).
            q = deinterleave(local_map, n, n).reshape(B * n * n, g * g, C)
            kv = deinterleave(global_map, n, n).reshape(B * n * n, g * g, C)
            lenh = interleave(attention(q, kv).view(B, n, n, g, g, C))  # [B, G, G, C]
        fused = self.dem.fuse(genh, lenh)  # [B, G, G, C]

        # Bilinear G -> g in float32 as the reference (a centre pick for odd n); float64 stays float64.
        out = fused.permute(0, 3, 1, 2).to(_at_least_fp32(fused.dtype))  # [B, C, G, G]
        out = F.interpolate(out, size=(g, g), mode="bilinear", align_corners=False)
        out = out.to(fused.dtype).permute(0, 2, 3, 1).reshape(B, g * g, C)  # [B, C, g, g] -> [B, g*g, C]
        resized = feats[:, -1].reshape(B, g * g, C) if self.combine_global == "mean" else None
        return self._combine(out, resized)

    # --- fast mode: only the positions that reach the output ----------------------------------

    def _forward_fast(self, pixels: torch.Tensor) -> torch.Tensor:
        B, n, g, C = pixels.shape[0], self.n, self.grid_size[0], self.embed_dim
        S = self.inner.image_size
        offsets = centre_offsets(n)
        m = len(offsets)
        views = [
            self._crops(pixels).reshape(B, n * n, 3, S, S),  # k = i*n + j
            self._strided(pixels, centre_only=True).reshape(B, m * m, 3, S, S),  # the m*m centre strided views
        ]
        separate_resized = self.combine_global == "mean" and n % 2 == 0
        if separate_resized:
            # Even n: the bicubic resize falls between pixels, so it is no strided view; one more pass.
            views.append(self._resized(pixels).unsqueeze(1))  # [B, 1, 3, S, S]
        feats = self._encode(views)  # [B, K, g, g, C]
        crops = feats[:, : n * n].reshape(B, n, n, g, g, C)
        centre = feats[:, n * n : n * n + m * m].reshape(B, m, m, g, g, C)
        # Rows/columns n*y + offsets[ci] of the maps, at index y*m + ci of these partial maps:
        global_part = interleave(centre)  # Gm at the needed positions [B, m*g, m*g, C]

        genh = lenh = None
        attention = self.dem.attention
        if self.perspectives in ("both", "global"):
            # Query Gm at the needed positions of block (i, j), key/value crop ij: (g/n)^2 queries per
            # block when n divides g (64 for g = 24, n = 3), padded per block otherwise.
            rows = self._block_rows  # [n, P] indices into the m*g needed rows, per block row
            P = rows.shape[1]
            q = global_part[:, rows.view(n, 1, P, 1), rows.view(1, n, 1, P)]  # [B, n, n, P, P, C]
            out_blocks = attention(q.reshape(B * n * n, P * P, C), crops.reshape(B * n * n, g * g, C))
            out_blocks = out_blocks.view(B, n, n, P, P, C)
            rb, rs = self._row_block, self._row_slot  # block and slot of each needed row [m*g]
            genh = out_blocks[:, rb.view(-1, 1), rb.view(1, -1), rs.view(-1, 1), rs.view(1, -1)]  # [B, m*g, m*g, C]
        if self.perspectives in ("both", "local"):
            # Query L[h::n, w::n] for the needed offsets only, key/value strided view hw: m*m attentions
            # of g*g queries instead of n*n (one of 576 queries for n = 3, g = 24, instead of nine).
            local_map = blocks_to_map(crops).view(B, g, n, g, n, C)  # L, row n*y + h -> [.., y, h, ..]
            local_part = local_map.index_select(2, self._offsets).index_select(4, self._offsets)  # [B, g, m, g, m, C]
            q = local_part.permute(0, 2, 4, 1, 3, 5).reshape(B * m * m, g * g, C)  # [B*m*m, g*g, C]
            out_views = attention(q, centre.reshape(B * m * m, g * g, C)).view(B, m, m, g, g, C)
            lenh = interleave(out_views)  # [B, m*g, m*g, C]
        fused = self.dem.fuse(genh, lenh)  # [B, m*g, m*g, C]

        if m == 1:
            out = fused.reshape(B, g * g, C)  # the centre pick itself
        else:
            # Even n: bilinear's 0.5/0.5 weights in both directions = mean of each 2 x 2 cell, in float32.
            cells = fused.to(_at_least_fp32(fused.dtype)).view(B, g, m, g, m, C)  # [B, g, 2, g, 2, C]
            out = cells.mean(dim=(2, 4)).to(fused.dtype).reshape(B, g * g, C)  # [B, g*g, C]
        if self.combine_global != "mean":
            return self._combine(out, None)
        # Odd n: interpolate(x, (S, S), bicubic) from n*S reads pixel n*y + (n-1)/2 with cubic weights
        # (0, 1, 0, 0), so the resized view IS the centre strided view (bit-exact).
        resized = feats[:, -1] if separate_resized else centre[:, 0, 0]
        return self._combine(out, resized.reshape(B, g * g, C))
