"""CLIP vision towers from transformers (`CLIPVisionModel`) as `VisionEncoder`s.

LLaVA takes the penultimate layer's hidden states (`hidden_states[-2]`, before the last block and
without the post-layernorm) and drops the CLS token; that is the default here. Layers after the
selected one are pruned, so they cost nothing and leave no unused parameters for DDP.

Preprocessing is the checkpoint directory's own image processor (preprocessor_config.json: a
CLIPImageProcessor, or a SiglipImageProcessor's square resize), else OpenAI CLIP's (shortest edge to S,
centre crop, bicubic, OpenAI mean/std): `encoders.preprocess.ResizeCrop`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel

from encoders.base import VisionEncoder
from encoders.preprocess import ResizeCrop
from encoders.registry import ENCODERS
from encoders.weights import key_mismatch_error, on_meta_device, require_file

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
        preprocess: the image processor's recipe (its mean/std are the encoder's); None = OpenAI CLIP's
            at the tower's image_size.
    """

    def __init__(
        self,
        model: CLIPVisionModel,
        select_layer: int = -2,
        select_feature: str = "patch",
        preprocess: ResizeCrop | None = None,
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
        self.preprocess = preprocess or ResizeCrop.clip(cfg.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        if self.preprocess.image_size != cfg.image_size:
            raise ValueError(
                f"preprocessing gives {self.preprocess.image_size} px images, the tower takes {cfg.image_size}"
            )
        self.pixel_mean = self.preprocess.pixel_mean
        self.pixel_std = self.preprocess.pixel_std

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


def _preprocessing(path: str, image_size: int) -> ResizeCrop:
    """The checkpoint directory's own image processor (preprocessor_config.json; keys it lacks take
    CLIPImageProcessor's values at `image_size`), else OpenAI CLIP's recipe at `image_size`."""
    spec = {}
    proc = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(proc):
        with open(proc) as f:
            spec = json.load(f)
    mean, std = tuple(spec.get("image_mean", OPENAI_CLIP_MEAN)), tuple(spec.get("image_std", OPENAI_CLIP_STD))
    try:
        return ResizeCrop.from_hf(spec, image_size, mean, std)
    except ValueError as err:
        raise ValueError(f"{proc}: {err}") from None


def has_architecture(checkpoint: str) -> bool:
    """Whether a checkpoint directory holds the config.json that defines its architecture."""
    return os.path.exists(os.path.join(os.path.expanduser(checkpoint), "config.json"))


def architecture_from(checkpoint: str, name: str = "clip") -> CLIPVisionConfig:
    """The vision tower's config from a CLIP (full or vision-only) directory's config.json, no weights read.

    Raises:
        ValueError: the directory has no config.json (naming it and what to do instead).
    """
    if not has_architecture(checkpoint):
        raise ValueError(
            f"encoder {name!r} takes its architecture from {checkpoint}/config.json, which is not here; "
            f"on the meta device (shapes only, no weights read) name a variant (e.g. clip_vit_l_336), pass "
            f"config={{...}}, or copy the checkpoint's config.json (not its weights) there"
        )
    conf = AutoConfig.from_pretrained(os.path.expanduser(checkpoint))
    # a whole CLIP directory (openai/clip-vit-large-patch14-336) holds the text tower too
    return getattr(conf, "vision_config", None) or conf


def _load_clip(checkpoint: str) -> tuple[CLIPVisionModel, ResizeCrop]:
    """Load a CLIP (full or vision-only) HF directory strictly, with its own preprocessing if given."""
    path = require_file(checkpoint, "CLIP checkpoint directory")
    # float32 like a random init and the other encoders: transformers 5 otherwise keeps the stored dtype
    # (a bf16 directory would give a bf16 tower); mixed precision is the trainer's job.
    model, info = CLIPVisionModel.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:
        raise key_mismatch_error(path, list(info["missing_keys"]), list(info["unexpected_keys"]))
    return model, _preprocessing(path, model.config.image_size)


def _meta_clip(checkpoint: str) -> tuple[CLIPVisionModel, ResizeCrop]:
    """The tower `_load_clip` would give, as shapes only: architecture and preprocessing, no weights."""
    model = CLIPVisionModel(architecture_from(checkpoint))
    return model, _preprocessing(os.path.expanduser(checkpoint), model.config.image_size)


@ENCODERS.register("clip")
def build_clip(
    checkpoint: str | None = None,
    config: dict[str, Any] | None = None,
    select_layer: int = -2,
    select_feature: str = "patch",
    grad_checkpointing: bool = False,
    preprocess: dict[str, Any] | None = None,
) -> CLIPEncoder:
    """Any CLIP vision tower: its architecture comes from the checkpoint directory, or from `config`.

    Args:
        checkpoint: a transformers CLIP or CLIPVision model directory (config.json + weights; its
            preprocessor_config.json, when there, sets the preprocessing). On the meta device only its
            config.json and preprocessor_config.json are read.
        config: `CLIPVisionConfig` keyword arguments for a randomly initialised tower (no checkpoint).
        select_layer: index into `hidden_states` (-2 = penultimate).
        select_feature: "patch" (drop CLS) or "cls_patch".
        grad_checkpointing: recompute layer activations in backward.
        preprocess: CLIPImageProcessor settings (preprocessor_config.json keys: size, crop_size, image_mean,
            image_std, resample, ...) in place of the checkpoint's own or OpenAI CLIP's; what a LLaVA directory's
            processor gives its tower (model/llava_hf.py).
    """
    if checkpoint is not None:
        model, recipe = _meta_clip(checkpoint) if on_meta_device() else _load_clip(checkpoint)
    elif config is not None:
        model, recipe = CLIPVisionModel(CLIPVisionConfig(**config)), None  # OpenAI CLIP's recipe
    else:
        raise ValueError("encoder 'clip' needs checkpoint=<HF CLIP directory> or config={...} for random init")
    if preprocess is not None:
        mean = tuple(preprocess.get("image_mean", OPENAI_CLIP_MEAN))
        std = tuple(preprocess.get("image_std", OPENAI_CLIP_STD))
        recipe = ResizeCrop.from_hf(preprocess, model.config.image_size, mean, std)
    encoder = CLIPEncoder(model, select_layer, select_feature, recipe)
    if grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    return encoder


def _clip_vit_l(
    image_size: int, checkpoint: str | None, select_layer: int, select_feature: str, grad_checkpointing: bool
) -> CLIPEncoder:
    if checkpoint is None or (on_meta_device() and not has_architecture(checkpoint)):
        # the name fixes the shape; on meta a checkpoint without config.json may still set the preprocessing
        encoder = build_clip(
            None, dict(CLIP_VIT_L, image_size=image_size), select_layer, select_feature, grad_checkpointing
        )
        if checkpoint is not None:
            encoder.preprocess = _preprocessing(os.path.expanduser(checkpoint), image_size)
            encoder.pixel_mean, encoder.pixel_std = encoder.preprocess.pixel_mean, encoder.preprocess.pixel_std
        return encoder
    encoder = build_clip(checkpoint, None, select_layer, select_feature, grad_checkpointing)
    cfg = encoder.model.config
    if cfg.image_size != image_size or cfg.hidden_size != CLIP_VIT_L["hidden_size"]:
        raise ValueError(
            f"{checkpoint} holds a CLIP with image_size={cfg.image_size}, hidden_size={cfg.hidden_size}, "
            f"not ViT-L/14 at {image_size} px; use encoder 'clip' for other towers"
        )
    return encoder


@ENCODERS.register("clip_vit_l_336")
def clip_vit_l_336(
    checkpoint: str | None = None,
    select_layer: int = -2,
    select_feature: str = "patch",
    grad_checkpointing: bool = False,
) -> CLIPEncoder:
    """OpenAI CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower): 24 x 24 = 576 tokens of width 1024."""
    return _clip_vit_l(336, checkpoint, select_layer, select_feature, grad_checkpointing)


@ENCODERS.register("clip_vit_l_224")
def clip_vit_l_224(
    checkpoint: str | None = None,
    select_layer: int = -2,
    select_feature: str = "patch",
    grad_checkpointing: bool = False,
) -> CLIPEncoder:
    """OpenAI CLIP ViT-L/14 at 224 px: 16 x 16 = 256 tokens of width 1024."""
    return _clip_vit_l(224, checkpoint, select_layer, select_feature, grad_checkpointing)
