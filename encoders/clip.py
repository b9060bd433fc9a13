"""CLIP vision towers from transformers (`CLIPVisionModel`) as `VisionEncoder`s.

LLaVA takes the penultimate layer's hidden states (`hidden_states[-2]`, before the last block and
without the post-layernorm) and drops the CLS token; that is the default here. Layers after the
selected one are pruned, so they cost nothing and leave no unused parameters for DDP.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from encoders.base import VisionEncoder
from encoders.checkpoint import key_mismatch_error, require_file
from encoders.registry import register_encoder

# OpenAI CLIP's normalisation (0-1 scale), used when a checkpoint has no preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ViT-L/14 as released by OpenAI (openai/clip-vit-large-patch14[-336]).
CLIP_VIT_L = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


class CLIPEncoder(VisionEncoder):
    """A `CLIPVisionModel` returning one layer's patch tokens.

    Args:
        model: the transformers vision model, weights already loaded.
        select_layer: index into `hidden_states` (-2 = penultimate layer, LLaVA's default).
        select_feature: "patch" drops the CLS token; "cls_patch" keeps it (then N = grid + 1).
        pixel_mean: normalisation mean (0-1 scale).
        pixel_std: normalisation std (0-1 scale).
    """

    def __init__(
        self,
        model: CLIPVisionModel,
        select_layer: int = -2,
        select_feature: str = "patch",
        pixel_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        pixel_std: tuple[float, float, float] = OPENAI_CLIP_STD,
    ) -> None:
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        cfg = model.config
        num_states = cfg.num_hidden_layers + 1  # embeddings output + one per layer
        if not -num_states <= select_layer < num_states:
            raise ValueError(f"select_layer={select_layer} is out of range for hidden_states of length {num_states}")
        keep = select_layer % num_states  # hidden_states[k] is the output of the first k layers
        model.encoder.layers = torch.nn.ModuleList(list(model.encoder.layers)[:keep])
        # post_layernorm only feeds the pooled output, which we never use.
        model.post_layernorm = torch.nn.Identity()
        self.model = model
        self.select_feature = select_feature
        side = cfg.image_size // cfg.patch_size
        self.image_size = cfg.image_size
        self.grid_size = (side, side)
        self.embed_dim = cfg.hidden_size
        self.pixel_mean = tuple(pixel_mean)
        self.pixel_std = tuple(pixel_std)

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1] + (self.select_feature == "cls_patch")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.model.activation_checkpointing_disable()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        # [B, 3, S, S] -> [B, 1 + grid_h * grid_w, C]; the pruned encoder's last state is the selected layer
        tokens = self.model(pixel_values=pixels).last_hidden_state
        return tokens[:, 1:] if self.select_feature == "patch" else tokens


def _load_clip(checkpoint: str) -> tuple[CLIPVisionModel, tuple, tuple]:
    """Load a CLIP (full or vision-only) HF directory strictly, with its own normalisation if given."""
    path = require_file(checkpoint, "CLIP checkpoint directory")
    # float32 like a random init and the other encoders: transformers 5 otherwise keeps the stored dtype
    # (a bf16 directory would give a bf16 tower); mixed precision is the trainer's job.
    model, info = CLIPVisionModel.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:
        raise key_mismatch_error(path, list(info["missing_keys"]), list(info["unexpected_keys"]))
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    proc = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(proc):
        with open(proc) as f:
            spec = json.load(f)
        mean = tuple(spec.get("image_mean", mean))
        std = tuple(spec.get("image_std", std))
    return model, mean, std


@register_encoder("clip")
def build_clip(
    checkpoint: str | None = None,
    config: dict[str, Any] | None = None,
    select_layer: int = -2,
    select_feature: str = "patch",
    grad_checkpointing: bool = False,
) -> CLIPEncoder:
    """Any CLIP vision tower: its architecture comes from the checkpoint directory, or from `config`.

    Args:
        checkpoint: a transformers CLIP or CLIPVision model directory (config.json + weights).
        config: `CLIPVisionConfig` keyword arguments for a randomly initialised tower (no checkpoint).
        select_layer: index into `hidden_states` (-2 = penultimate).
        select_feature: "patch" (drop CLS) or "cls_patch".
        grad_checkpointing: recompute layer activations in backward.
    """
    if checkpoint is not None:
        model, mean, std = _load_clip(checkpoint)
    elif config is not None:
        model, mean, std = CLIPVisionModel(CLIPVisionConfig(**config)), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    else:
        raise ValueError("encoder 'clip' needs checkpoint=<HF CLIP directory> or config={...} for random init")
    encoder = CLIPEncoder(model, select_layer, select_feature, mean, std)
    if grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    return encoder


def _clip_vit_l(
    image_size: int, checkpoint: str | None, select_layer: int, select_feature: str, grad_checkpointing: bool
) -> CLIPEncoder:
    if checkpoint is None:
        return build_clip(
            None, dict(CLIP_VIT_L, image_size=image_size), select_layer, select_feature, grad_checkpointing
        )
    encoder = build_clip(checkpoint, None, select_layer, select_feature, grad_checkpointing)
    cfg = encoder.model.config
    if cfg.image_size != image_size or cfg.hidden_size != CLIP_VIT_L["hidden_size"]:
        raise ValueError(
            f"{checkpoint} holds a CLIP with image_size={cfg.image_size}, hidden_size={cfg.hidden_size}, "
            f"not ViT-L/14 at {image_size} px; use encoder 'clip' for other towers"
        )
    return encoder


@register_encoder("clip_vit_l_336")
def clip_vit_l_336(
    checkpoint: str | None = None,
    select_layer: int = -2,
    select_feature: str = "patch",
    grad_checkpointing: bool = False,
) -> CLIPEncoder:
    """OpenAI CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower): 24 x 24 = 576 tokens of width 1024."""
    return _clip_vit_l(336, checkpoint, select_layer, select_feature, grad_checkpointing)


@register_encoder("clip_vit_l_224")
def clip_vit_l_224(
    checkpoint: str | None = None,
    select_layer: int = -2,
    select_feature: str = "patch",
    grad_checkpointing: bool = False,
) -> CLIPEncoder:
    """OpenAI CLIP ViT-L/14 at 224 px: 16 x 16 = 256 tokens of width 1024."""
    return _clip_vit_l(224, checkpoint, select_layer, select_feature, grad_checkpointing)
