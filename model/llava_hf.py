"""A released transformers LLaVA / LLaVA-NeXT directory (the llava-hf layout) as this project's model: the `model`
config section it matches (`llava_hf_config`) and its weights in the built VLM (`read_llava_weights`, `load_part`).

    python train.py experiments/X.yaml model.from_hf=/models/llava-v1.6-vicuna-7b-hf

The directory holds config.json (`LlavaConfig` / `LlavaNextConfig`: the CLIP tower's and the LLM's configs, the
feature layer and strategy, the projector's activation, LLaVA-NeXT's grid pinpoints), the weights, the processor
(preprocessor_config.json, or transformers 5's processor_config.json holding it) and the tokenizer. What maps to
what is inference/export.py's mapping read backwards:

- tower: its `CLIPVisionConfig` -> encoder `clip` with that inline `config`; `vision_feature_layer` k ->
  `select_layer: k` (hidden_states[k]: the layers after it are pruned, their weights unused);
  `vision_feature_select_strategy` default / full -> `select_feature` patch / cls_patch; the image processor's
  resize, crop, mean, std and filter -> the encoder's `preprocess`;
- LLaVA-NeXT: `image_grid_pinpoints` ([height, width] in pixels) -> `tiling: {name: anyres, grid_pinpoints}`
  (LLaVA-NeXT pads: `fit: pad`), `model.image_newline` -> the VLM's `image_newline`;
- projector `linear_1` / `linear_2` (GELU between, with biases) -> `mlp2x_gelu`'s `0.*` / `2.*`;
- LLM: `text_config` -> `llm.config` inline; `model.language_model.*` -> `model.*`, `lm_head.*` stays;
- tokenizer: the directory's (`model.tokenizer`); the processor's image token -> `model.image_token`.

The weights are read by transformers' own `from_pretrained` of the directory's class, so the older llava-hf key
layout (`language_model.model.*`, `vision_tower.vision_model.*`) loads too, and a tensor the config needs that the
files lack is caught. Whatever has no counterpart here is refused in one line naming the directory and the reason
(`LlavaImportError`). The chat template is not read: training renders with `data.template` (choose the one the
model was trained with, e.g. `vicuna_v1` for LLaVA-1.5 / 1.6-Vicuna).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    PretrainedConfig,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from encoders import VisionEncoder, encoder_chain
from encoders.clip import CLIPEncoder
from encoders.preprocess import ResizeCrop
from foundation.errors import UserError

# model_type -> the transformers class whose `from_pretrained` reads the weights
KINDS = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
STRATEGIES = {"default": "patch", "full": "cls_patch"}  # vision_feature_select_strategy -> select_feature
# image processors whose arithmetic the clip encoder's ResizeCrop (and AnyRes around it) reproduces
IMAGE_PROCESSORS = {"llava": ("CLIPImageProcessor", "LlavaImageProcessor"), "llava_next": ("LlavaNextImageProcessor",)}
PREPROCESS_KEYS = ("size", "crop_size", "do_center_crop", "do_resize", "do_rescale", "do_normalize", "rescale_factor",
                   "image_mean", "image_std", "resample")  # fmt: skip
# keys of a config's to_diff_dict() that are bookkeeping, not architecture
BOOKKEEPING = ("transformers_version", "architectures", "model_type", "_name_or_path", "dtype", "torch_dtype")


class LlavaImportError(UserError):
    """A directory given as `model.from_hf` that this project cannot hold; the message names it and the reason."""


def _refuse(path: str, reason: str) -> LlavaImportError:
    return LlavaImportError(f"model.from_hf={path}: {reason}")


def read_llava_config(path: str) -> PretrainedConfig:
    """The directory's `LlavaConfig` / `LlavaNextConfig` (config.json only).

    Raises:
        LlavaImportError: no such directory, no config.json, or a model type other than llava / llava_next.
    """
    if not os.path.isdir(os.path.expanduser(path)):
        raise _refuse(path, "not a directory")
    file = os.path.join(os.path.expanduser(path), "config.json")
    if not os.path.isfile(file):
        raise _refuse(path, "no config.json: not a transformers model directory")
    with open(file) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in KINDS:
        raise _refuse(path, f"model_type {model_type!r} is not LLaVA or LLaVA-NeXT ({', '.join(KINDS)})")
    return AutoConfig.from_pretrained(os.path.expanduser(path))


def _architecture(config: PretrainedConfig) -> dict[str, Any]:
    """A sub-config as the keyword arguments that rebuild it (what differs from its class's defaults)."""
    return {k: v for k, v in config.to_diff_dict().items() if k not in BOOKKEEPING}


def _image_processor(path: str, kind: str) -> dict[str, Any]:
    """The image processor's settings: preprocessor_config.json, or processor_config.json's `image_processor`."""
    root = os.path.expanduser(path)
    legacy, bundled = os.path.join(root, "preprocessor_config.json"), os.path.join(root, "processor_config.json")
    spec = None
    if os.path.isfile(legacy):
        with open(legacy) as f:
            spec = json.load(f)
    elif os.path.isfile(bundled):
        with open(bundled) as f:
            spec = json.load(f).get("image_processor")
    if not spec:
        raise _refuse(path, "no image processor (preprocessor_config.json, or processor_config.json's image_processor)")
    # CLIPImageProcessor, ...Fast, ...Pil: three backends of one arithmetic
    name = (spec.get("image_processor_type") or "").removesuffix("Fast").removesuffix("Pil")
    if name not in IMAGE_PROCESSORS[kind]:
        raise _refuse(path, f"image processor {name or 'unnamed'!r}; {kind} takes {', '.join(IMAGE_PROCESSORS[kind])}")
    if name == "LlavaImageProcessor" and spec.get("do_pad"):
        raise _refuse(path, "LlavaImageProcessor pads to a square before resizing (do_pad), which the tower's "
                            "preprocessing does not; set do_pad false or use data.pad_to_square")  # fmt: skip
    return spec


def llava_hf_config(path: str) -> dict[str, Any]:
    """The `model` config section (foundation.schema.ModelConfig keys) that `path` matches; reads config.json and
    the processor's files, no weights. `experiment.config` puts it in place of the recipe's model section.

    Raises:
        LlavaImportError: a part this project has no counterpart for (a non-CLIP tower, another projector, a
            list of feature layers, an image processor whose arithmetic differs, ...), naming it.
    """
    config = read_llava_config(path)
    kind, vision = config.model_type, config.vision_config
    if vision.model_type != "clip_vision_model":
        raise _refuse(path, f"vision tower {vision.model_type!r}: the project imports CLIP towers (clip_vision_model)")
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise _refuse(path, f"vision_feature_layer {list(layer)} concatenates layers; the project takes one layer")
    if not -vision.num_hidden_layers - 1 <= layer <= vision.num_hidden_layers:
        raise _refuse(path, f"vision_feature_layer {layer} is not a layer of a {vision.num_hidden_layers}-layer tower")
    if strategy not in STRATEGIES or (kind == "llava_next" and strategy != "default"):
        raise _refuse(path, f"vision_feature_select_strategy {strategy!r}: the project takes 'default' (CLS dropped)"
                            + (" or 'full'" if kind == "llava" else " with LLaVA-NeXT's tiles"))  # fmt: skip
    if config.projector_hidden_act != "gelu" or not getattr(config, "multimodal_projector_bias", True):
        raise _refuse(path, f"projector with {config.projector_hidden_act!r} activation, bias "
                            f"{getattr(config, 'multimodal_projector_bias', True)}: the project has mlp2x_gelu "
                            "(Linear, GELU, Linear, with biases)")  # fmt: skip
    text = config.text_config
    if text.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise _refuse(path, f"LLM {text.model_type!r} has no transformers causal LM class")
    spec = _image_processor(path, kind)
    preprocess = {k: spec[k] for k in PREPROCESS_KEYS if k in spec}
    try:
        recipe = ResizeCrop.from_hf(preprocess, vision.image_size, spec.get("image_mean"), spec.get("image_std"))
    except (ValueError, TypeError) as err:
        raise _refuse(path, f"image processor: {err}") from None
    encoder = {
        "name": "clip",
        "config": _architecture(vision),
        "select_layer": layer,
        "select_feature": STRATEGIES[strategy],
        "preprocess": preprocess,
    }
    section: dict[str, Any] = {
        "encoder": encoder,
        "reducer": None,  # other sources of weights, which a recipe this replaces may have set
        "enhancer": None,
        "tiling": None,
        "mm_projector": None,
        "projector": "mlp2x_gelu",
        "llm": {"path": None, "config": {"model_type": text.model_type, **_architecture(text)}},
        "tokenizer": path,
        "image_token": _processor_setting(path, "image_token") or "<image>",
    }
    if kind == "llava_next":
        pinpoints = [list(p) for p in config.image_grid_pinpoints]
        if spec.get("image_grid_pinpoints", pinpoints) != pinpoints:
            raise _refuse(path, f"the image processor's image_grid_pinpoints {spec['image_grid_pinpoints']} are not "
                                f"the model's {pinpoints}")  # fmt: skip
        if recipe.shortest_edge != recipe.crop:
            raise _refuse(path, f"the image processor resizes to {recipe.shortest_edge} px and crops {recipe.crop}: "
                                "LLaVA-NeXT's base view would differ from AnyRes's")  # fmt: skip
        section["tiling"] = {"name": "anyres", "grid_pinpoints": pinpoints}
    return section


def _processor_setting(path: str, key: str) -> Any:
    file = os.path.join(os.path.expanduser(path), "processor_config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f).get(key)


@dataclass
class LlavaWeights:
    """A directory's weights by the part they load into, in this project's key names.

    Attributes:
        path: the directory.
        vision: the CLIP tower's state dict (`CLIPVisionModel` keys, every layer).
        projector: `mlp2x_gelu` keys (`0.*`, `2.*`).
        llm: the causal LM's keys (`model.*`, `lm_head.*`).
        image_newline: LLaVA-NeXT's row end [D], or None.
        image_token_id: the image placeholder's id in the model's config.
    """

    path: str
    vision: dict[str, torch.Tensor]
    projector: dict[str, torch.Tensor]
    llm: dict[str, torch.Tensor]
    image_newline: torch.Tensor | None
    image_token_id: int


def read_llava_weights(path: str) -> LlavaWeights:
    """Read the directory's weights (float32, through transformers' `from_pretrained` of its class).

    Raises:
        LlavaImportError: no weights files, or files lacking tensors the config needs.
    """
    config = read_llava_config(path)
    try:
        hf, info = KINDS[config.model_type].from_pretrained(
            os.path.expanduser(path), dtype=torch.float32, output_loading_info=True
        )
    except OSError as err:
        raise _refuse(path, f"no weights could be read ({str(err).splitlines()[0]})") from None
    missing = sorted(info["missing_keys"])
    if missing:
        more = f" ... (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise _refuse(path, f"the weights lack {len(missing)} tensors the config needs: {', '.join(missing[:3])}{more}")
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "llm": {}}
    prefixes = (
        ("model.vision_tower.", "vision", ""),
        ("model.multi_modal_projector.linear_1.", "projector", "0."),
        ("model.multi_modal_projector.linear_2.", "projector", "2."),
        ("model.language_model.", "llm", "model."),
        ("lm_head.", "llm", "lm_head."),
    )
    newline = None
    for key, value in hf.state_dict().items():
        if key == "model.image_newline":
            newline = value
            continue
        part, ours = next(((p, new + key[len(old) :]) for old, p, new in prefixes if key.startswith(old)), (None, key))
        if part is None:
            raise _refuse(path, f"weight {key} belongs to no part the project has")
        parts[part][ours] = value
    return LlavaWeights(path, parts["vision"], parts["projector"], parts["llm"], newline, config.image_token_id)


def _show(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - 3} more)" if len(keys) > 3 else ""
    return ", ".join(sorted(keys)[:3]) + more


def load_part(path: str, what: str, module: nn.Module, state: dict[str, torch.Tensor], unused=lambda key: False):
    """Load `state` into `module`: every tensor the module saves comes from the directory, with its shape.

    Args:
        path, what: the directory and the part's name, for the message.
        unused: keys of `state` the module may leave out (the tower's layers after the selected one).

    Raises:
        LlavaImportError: a tensor of the module the directory lacks, one of another shape, or a directory
            tensor with no place in the module (the run's config changed the architecture).
    """
    ours = module.state_dict()
    missing = [k for k in ours if k not in state]
    extra = [k for k in state if k not in ours and not unused(k)]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items() if k in state
              and state[k].shape != v.shape]  # fmt: skip
    if missing:
        raise _refuse(path, f"the directory lacks the {what}'s {_show(missing)}")
    if extra:
        raise _refuse(path, f"the run's {what} has no place for the directory's {_show(extra)} (its config changes "
                            "the architecture)")  # fmt: skip
    if shapes:
        raise _refuse(path, f"the {what}'s shapes differ from the directory's (theirs vs the run's): {_show(shapes)}")
    module.load_state_dict({k: state[k] for k in ours}, strict=True)


def load_vision(weights: LlavaWeights, vision: VisionEncoder, projector: nn.Module) -> None:
    """The tower's and the projector's weights into a built vision tower (its innermost CLIP encoder) and
    projector; the tower's layers after `select_layer` and its post-layernorm are pruned here, so unused."""
    tower = encoder_chain(vision)[-1]
    if not isinstance(tower, CLIPEncoder):
        raise _refuse(weights.path, f"the run's encoder {type(tower).__name__} is not the directory's CLIP tower")
    kept = len(tower.model.encoder.layers)

    def pruned(key: str) -> bool:
        parts = key.split(".")
        return key.startswith("post_layernorm.") or (key.startswith("encoder.layers.") and int(parts[2]) >= kept)

    load_part(weights.path, "vision tower", tower.model, weights.vision, pruned)
    load_part(weights.path, "projector", projector, weights.projector)


def load_newline(weights: LlavaWeights, vlm: nn.Module) -> None:
    """LLaVA-NeXT's `image_newline` into the VLM's; the image placeholder's id checked against the config's."""
    ours, theirs = vlm.image_newline, weights.image_newline
    if (ours is None) != (theirs is None):
        held = "the run tiles (model.tiling) but the directory has no image_newline" if theirs is None else (
            "the directory is LLaVA-NeXT (image_newline) but the run has no model.tiling")  # fmt: skip
        raise _refuse(weights.path, held)
    if ours is not None:
        if ours.shape != theirs.shape:
            raise _refuse(weights.path, f"image_newline {tuple(theirs.shape)} vs the run's {tuple(ours.shape)}")
        with torch.no_grad():
            ours.copy_(theirs)
    if vlm.image_token_id != weights.image_token_id:
        raise _refuse(weights.path, f"the tokenizer gives the image placeholder id {vlm.image_token_id}, the model's "
                                    f"config image_token_id {weights.image_token_id}")  # fmt: skip
