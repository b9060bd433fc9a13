"""Any timm ViT-family model (vit, deit, eva, siglip, samvit, ...) as a `VisionEncoder`.

Tokens come from one block's output (default the second-to-last, as LLaVA does with CLIP) through
timm's own `forward_intermediates`, with prefix (CLS / register) tokens dropped. Blocks after the
selected one are pruned with `prune_intermediate_layers`, so they cost nothing and leave no unused
parameters behind (DDP would complain about those when the encoder trains).

Preprocessing is timm's eval transform for the model (`resolve_data_config` + `create_transform`: its
pretrained config's crop_pct, crop_mode, interpolation, mean, std) at the model's input size; the
`data_config` option overrides those keys (timm's SigLIP configs say crop_pct 0.9 with a centre crop,
while SigLIP as released squashes: `data_config: {crop_pct: 1.0, crop_mode: squash}` gives that).
"""

from __future__ import annotations

import sys
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from timm.models import load_state_dict

from encoders.base import VisionEncoder
from encoders.preprocess import TimmEval
from encoders.registry import ENCODERS
from encoders.weights import key_mismatch_error, on_meta_device, require_file


class TimmViTEncoder(VisionEncoder):
    """Wraps a timm model that implements `forward_intermediates` with a square patch grid.

    Args:
        model: a timm ViT-family model, weights already loaded.
        select_layer: block whose output is returned; negative counts from the end (-2 = second-to-last).
        data_config: overrides for timm's data config (crop_pct, crop_mode, interpolation, mean, std).
    """

    def __init__(
        self, model: torch.nn.Module, select_layer: int = -2, data_config: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "patch_embed"):
            raise ValueError(f"timm model {type(model).__name__} is not a ViT with forward_intermediates")
        num_blocks = len(model.blocks)
        if not -num_blocks <= select_layer < num_blocks:
            raise ValueError(f"select_layer={select_layer} is out of range for a {num_blocks}-block model")
        self.layer = select_layer % num_blocks
        model.prune_intermediate_layers([self.layer], prune_norm=True, prune_head=True)
        self.model = model
        grid = tuple(model.patch_embed.grid_size)
        img = model.patch_embed.img_size
        if grid[0] != grid[1] or img[0] != img[1]:
            raise ValueError(f"timm model has a non-square input {img} / grid {grid}; the contract needs square")
        # the pretrained config's recipe, at the size the model was built for (img_size may differ from it)
        args = {**(data_config or {}), "input_size": (3, int(img[0]), int(img[1]))}
        data_cfg = resolve_data_config(args, model=model)
        self.image_size = int(img[0])
        self.grid_size = (int(grid[0]), int(grid[1]))
        self.embed_dim = int(model.embed_dim)
        self.preprocess = TimmEval(data_cfg)
        self.pixel_mean = self.preprocess.pixel_mean
        self.pixel_std = self.preprocess.pixel_std

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        # [B, 3, S, S] -> [B, grid_h * grid_w, C], prefix tokens dropped by timm
        (tokens,) = self.model.forward_intermediates(
            pixels, indices=[self.layer], output_fmt="NLC", intermediates_only=True
        )
        return tokens


@ENCODERS.register("timm:")
def build_timm_encoder(
    model_name: str,
    checkpoint: str | None = None,
    pretrained: bool = False,
    image_size: int | None = None,
    select_layer: int = -2,
    model_kwargs: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
    grad_checkpointing: bool = False,
) -> TimmViTEncoder:
    """Build `timm:<model_name>`. On the meta device neither `checkpoint` nor `pretrained` weights are read.

    Args:
        model_name: any timm model name with `forward_intermediates` (vit_*, deit_*, eva*, samvit_*, ...).
        checkpoint: a local weights file (.pth / .bin / .safetensors), loaded through the model's own
            timm checkpoint filter (so e.g. official SAM or OpenAI CLIP layouts convert) and strictly.
        pretrained: download timm's pretrained weights (needs a network); ignored when `checkpoint` is set.
        image_size: input side; timm resamples position embeddings when it differs from the default.
        select_layer: block whose output is returned (-2 = second-to-last, LLaVA's choice).
        model_kwargs: extra keyword arguments for `timm.create_model` (e.g. patch_size, depth for a
            from-scratch model).
        data_config: overrides for the preprocessing timm resolves from the model's pretrained config:
            crop_pct, crop_mode ("center" | "squash" | "border"), interpolation, mean, std.
        grad_checkpointing: recompute block activations in backward.
    """
    unknown = set(data_config or {}) - {"crop_pct", "crop_mode", "interpolation", "mean", "std"}
    if unknown:
        raise ValueError(f"data_config keys {sorted(unknown)} are not crop_pct, crop_mode, interpolation, mean, std")
    kwargs = dict(model_kwargs or {})
    if image_size is not None:
        kwargs["img_size"] = image_size
    kwargs["num_classes"] = 0
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r} (see timm.list_models('vit*'))")
    # The architecture and the preprocessing (pretrained_cfg) come from the name; weights only fill it in.
    load_weights = not on_meta_device()
    model = timm.create_model(model_name, pretrained=pretrained and checkpoint is None and load_weights, **kwargs)
    if checkpoint is not None and load_weights:
        _load_checkpoint(model, require_file(checkpoint, f"timm checkpoint for {model_name}"))
    encoder = TimmViTEncoder(model, select_layer=select_layer, data_config=data_config)
    if grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    return encoder


def _load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load a weights file strictly, through the model family's own timm `checkpoint_filter_fn`.

    timm keeps that filter (official SAM / OpenAI / BEiT layouts -> timm keys) next to each model
    class; timm's own pretrained loading is not strict, so we check the keys ourselves.
    """
    state = load_state_dict(path)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    # Weights files keep the classifier (`head.*`, or e.g. `head_dist.*`, from the pretrained config), but the
    # encoder is built with num_classes=0, so those keys would be "unexpected"; timm's own loader drops them too.
    heads = model.pretrained_cfg.get("classifier") or "head"
    prefixes = tuple(h + "." for h in ((heads,) if isinstance(heads, str) else heads))
    state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise key_mismatch_error(path, missing, unexpected)
