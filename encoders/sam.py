"""Segment Anything's ViT image encoder (Kirillov et al. 2023, https://arxiv.org/abs/2304.02643).

SAM ViT-B: 1024 px -> 16 px patches -> 64x64 tokens of width 768 -> 12 blocks (14x14 windowed
attention, global attention at blocks 2/5/8/11, decomposed relative position bias in every block) ->
neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) to 256 channels: [B, 4096, 256], 89.7M
parameters, about a third of CLIP-L/14's 304M. Vary and DeepSeek-VL use it as their high-resolution
encoder (usually with a strided-conv token reducer, `encoders/token_reducer.py`).

The blocks are timm's (`timm.models.vision_transformer_sam.Block`, a port of segment-anything's
`Block`, itself adapted from ViTDet), and the parameter names follow timm's `samvit_base_patch16`,
so official checkpoints load through timm's own `checkpoint_filter_fn` (strips `image_encoder.`,
renames `mlp.lin1/2` -> `mlp.fc1/2`). The forward pass mirrors the official `ImageEncoderViT`
(segment_anything/modeling/image_encoder.py); tests/test_sam.py checks parity against it.

Images are prepared as segment-anything does (`encoders.preprocess.LongestSidePad`): the longest side to
S, normalise, pad bottom-right, so a document page stays whole; `resize="square"` squashes instead.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, PatchEmbed, resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import Block, checkpoint_filter_fn
from torch import nn
from torch.utils.checkpoint import checkpoint

from encoders.base import VisionEncoder
from encoders.preprocess import LongestSidePad
from encoders.registry import ENCODERS
from encoders.weights import key_mismatch_error, on_meta_device, require_file

# SAM normalises 0-255 pixels with these (segment_anything/modeling/sam.py: pixel_mean / pixel_std);
# the contract wants the 0-1 scale. They are the ImageNet statistics.
SAM_PIXEL_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_PIXEL_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)


class SamImageEncoder(VisionEncoder):
    """SAM's ViTDet-style image encoder: pixels [B, 3, S, S] -> neck tokens [B, (S/p)^2, out_chans].

    Args:
        image_size: square input side S; a multiple of `patch_size`.
        patch_size: side of the non-overlapping patches (16 in every SAM variant).
        width: transformer width (768 for ViT-B).
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        window_size: side of the attention windows in the windowed blocks (14 in SAM).
        global_attn_indexes: blocks that attend over the whole grid instead of windows.
        out_chans: neck output channels, the width of the returned tokens (256 in SAM).
        mlp_ratio: MLP hidden width / `width`.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        num_heads: int,
        window_size: int,
        global_attn_indexes: Sequence[int],
        out_chans: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if image_size <= 0 or image_size % patch_size != 0:
            raise ValueError(
                f"SAM image_size must be a positive multiple of the patch size {patch_size}, got {image_size}"
            )
        grid = image_size // patch_size
        self.image_size = image_size
        self.grid_size = (grid, grid)
        self.embed_dim = out_chans
        self.pixel_mean = SAM_PIXEL_MEAN
        self.pixel_std = SAM_PIXEL_STD
        self.preprocess = LongestSidePad(image_size, SAM_PIXEL_MEAN, SAM_PIXEL_STD)
        self.grad_checkpointing = False

        # [B, 3, S, S] -> [B, h, w, width]; SAM keeps tokens channels-last as a 2D grid throughout
        self.patch_embed = PatchEmbed(
            img_size=image_size, patch_size=patch_size, in_chans=3, embed_dim=width, output_fmt="NHWC"
        )
        # zeros, as in the official code: pretrained weights (MAE, then SA-1B) fill it in
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, width))
        self.blocks = nn.ModuleList(
            Block(
                dim=width,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                # SAM's build_sam.py uses eps=1e-6; timm's Block default (nn.LayerNorm) would be 1e-5
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                act_layer=nn.GELU,
                use_rel_pos=True,
                # window_size=0 means global attention; its rel-pos tables then span the whole grid
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(width, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),  # eps=1e-6, as segment_anything's LayerNorm2d
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        x = self.patch_embed(pixels) + self.pos_embed  # [B, h, w, width]
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)  # [B, h, w, width]
        x = self.neck(x.permute(0, 3, 1, 2))  # [B, out_chans, h, w]
        return x.flatten(2).transpose(1, 2)  # [B, h*w, out_chans], row-major


def to_timm_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an official SAM state dict (full, or already stripped of `image_encoder.`) to timm's keys.

    timm's `checkpoint_filter_fn` drops the prompt encoder / mask decoder and renames `mlp.lin*`, but
    only renames keys that carry the `image_encoder.` prefix, so a stripped official dict gets it back
    first. timm's own samvit keys (`mlp.fc*`) pass through unchanged.
    """
    has_prefix = any(k.startswith("image_encoder.") for k in state)
    if not has_prefix and any(".mlp.lin" in k for k in state):
        state = {"image_encoder." + k: v for k, v in state.items()}
    return checkpoint_filter_fn(state, None)


def resize_to_grid(state: dict[str, torch.Tensor], encoder: SamImageEncoder) -> dict[str, torch.Tensor]:
    """Adapt position parameters saved for another image size (SAM's are for 1024 px) to `encoder`'s grid.

    - `pos_embed` [1, H, W, C]: bicubic resampling, with the same function timm's samvit applies
      when it runs at another size.
    - global blocks' `rel_pos_h/w` [2*H-1, C]: one row per relative offset across the whole grid, so
      they shrink with it; linear interpolation, exactly what the official `get_rel_pos` does on the
      fly when a table does not fit (so the result equals the official code keeping the 1024 tables).
    - windowed blocks' tables [2*14-1, C] depend only on the window, which stays 14x14: unchanged.
    """
    state = dict(state)
    grid_h, grid_w = encoder.grid_size
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 4 and tuple(pos.shape[1:3]) != (grid_h, grid_w):
        state["pos_embed"] = resample_abs_pos_embed_nhwc(pos, [grid_h, grid_w])
    for i, block in enumerate(encoder.blocks):
        if block.window_size != 0:
            continue
        for axis, size in (("h", grid_h), ("w", grid_w)):
            key = f"blocks.{i}.attn.rel_pos_{axis}"
            table = state.get(key)
            if table is not None and table.ndim == 2 and table.shape[0] != 2 * size - 1:
                # [L, C] -> [1, C, L] -> interpolate -> [2*size-1, C]
                resized = F.interpolate(table.T[None].float(), size=2 * size - 1, mode="linear")
                state[key] = resized[0].T.to(table.dtype)
    return state


def load_sam_checkpoint(encoder: SamImageEncoder, checkpoint_path: str) -> None:
    """Load an official SAM `.pth` (keys `image_encoder.*`, others ignored), a state dict stripped of that
    prefix, or a timm samvit state dict into `encoder`, strictly."""
    path = require_file(checkpoint_path, "SAM checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = resize_to_grid(to_timm_layout(state), encoder)
    own = encoder.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise key_mismatch_error(path, missing, unexpected)
    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if v.shape != own[k].shape
    ]
    if wrong_shape:
        raise ValueError(f"checkpoint {path} has tensors of the wrong shape:\n  " + "\n  ".join(wrong_shape))
    encoder.load_state_dict(state, strict=True)


@ENCODERS.register("sam_vit_b")
def sam_vit_b(
    checkpoint: str | None = None,
    image_size: int = 1024,
    resize: str = "longest_side",
    grad_checkpointing: bool = False,
) -> SamImageEncoder:
    """SAM ViT-B image encoder (segment_anything's `build_sam_vit_b`): 89,670,912 parameters at 1024 px.

    Args:
        checkpoint: path to the official `sam_vit_b_01ec64.pth` (or its `image_encoder` part, or timm's
            `samvit_base_patch16` weights); None = random init. Not read on the meta device (the
            architecture is fixed by the name).
        image_size: input side; 1024 is SAM's native size. Other multiples of 16 (e.g. 512 -> 32x32 =
            1024 tokens) resample the position embedding and the global blocks' relative-position
            tables from the checkpoint, making SAM a cheaper encoder.
        resize: "longest_side" (segment-anything: longest side to image_size, bilinear, normalise, pad
            bottom-right with the mean colour) | "square" (squash to image_size x image_size, bicubic, as
            Vary feeds SAM; keeps SAM's normalisation). DeepSeek-VL's centred mean-colour pad is
            `data.pad_to_square` with "longest_side".
        grad_checkpointing: recompute each block's activations in backward.
    """
    preprocess = LongestSidePad(image_size, SAM_PIXEL_MEAN, SAM_PIXEL_STD, resize)  # checks `resize` first
    load = checkpoint is not None and not on_meta_device()
    if load:
        require_file(checkpoint, "SAM checkpoint")  # before building anything
    device = torch.get_default_device()
    # With a checkpoint: built on the meta device, then given memory without the ~0.6 s random init of 89.7M
    # parameters; the strict load below writes every tensor (the encoder has no buffers).
    with torch.device("meta") if load else contextlib.nullcontext():
        encoder = SamImageEncoder(
            image_size=image_size,
            patch_size=16,
            width=768,
            depth=12,
            num_heads=12,
            window_size=14,
            global_attn_indexes=(2, 5, 8, 11),
            out_chans=256,
        )
    encoder.preprocess = preprocess
    if load:
        encoder.to_empty(device=device)
        load_sam_checkpoint(encoder, checkpoint)
    encoder.set_grad_checkpointing(grad_checkpointing)
    return encoder
