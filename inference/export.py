"""Export a trained run to transformers' LLaVA format: `LlavaForConditionalGeneration` + `LlavaProcessor`, or
with AnyRes tiling (`model.tiling: {name: anyres}`) `LlavaNextForConditionalGeneration` + `LlavaNextProcessor`.

    python -m tools.export runs/X/defaults exported/X
    AutoModelForImageTextToText.from_pretrained("exported/X"); AutoProcessor.from_pretrained("exported/X")

Possible when the architecture is one transformers' LLaVA (LLaVA-NeXT) has: a `clip*` tower (CLIP / SigLIP-style
`CLIPVisionModel`), no token reducer or enhancer, the `mlp2x_gelu` projector (LLaVA-1.5's), and a plain
transformers causal LM (merge LoRA adapters first with tools/merge_lora); with AnyRes, `fit: pad`, no `max_tiles`
(LLaVA-OneVision's, which LLaVA-NeXT lacks) and a tower whose resize equals its crop (LLaVA-NeXT resizes the
base view to the resize side). Anything else fails with a message naming what prevents export.

What maps to what: our pruned tower (layers after `select_layer` removed) becomes a tower of that many
layers with `vision_feature_layer=-1` (the same hidden state); `select_feature: patch` is transformers'
`vision_feature_select_strategy: default` (CLS dropped); projector `0.*` / `2.*` -> `linear_1` / `linear_2`;
the LM's `model.*` -> `model.language_model.*`, `lm_head` stays; AnyRes's canvases become `image_grid_pinpoints`
([height, width]) and the VLM's `image_newline` LLaVA-NeXT's `model.image_newline`.

The processor's chat template renders messages as the run's training template did, so the standard call
`processor(images=..., text=processor.apply_chat_template(messages, add_generation_prompt=True))` (what
lmms-eval's `llava_hf` does; special tokens added) gives training's `prompt_ids`:

- plain, vicuna_v1, llama3, chatml: their Jinja forms (`Template.jinja` in `TEMPLATES`), with the run's `system_prompt`
  (or the template's default) unless a `system` message replaces it. Content is a string or a list of `image`
  / `text` parts (an image part followed by text opens the turn as `<image>\n`, LLaVA's record form); a turn
  with an image is placed by the template's rule (`Template.placement`: `<image>\n` + its text stripped, or
  under chatml as written when it starts with the image; kept in place with `image_first: false`). plain,
  LLaVA's pretraining format, is BOS + `<image>` + answer + "\n": its generation prompt is BOS + `<image>`,
  whatever the user wrote.
- chat_template: the tokenizer's own template, given strings as training gave it (`<image>\n` + text).

Measured on the run's tokenizer: where training's ids start with a BOS that the tokenizer adds by itself
(LLaMA, Llama-3), the template writes none (the call would double it), else it writes it; where LLaMA's
SentencePiece would miss the "▁" that training's separate tokenisation of the text after an image gives, the
template writes a space after the image (`_after_image`). Each export then renders and tokenises a few
conversations and compares them with training's ids (`encode`): a difference is an ExportError that shows it
(e.g. chatml on a tokenizer that adds a BOS; Llama-3-Instruct's own template, which writes the BOS the
tokenizer adds). Not caught: an earlier answer that starts with "\n" merges with the "\n\n" before it under
Llama-3 / Qwen2 (training splits them; LLaVA's code merges them too). vLLM's OpenAI chat endpoint adds no
special tokens unless a request sets `add_special_tokens: true`; without it the BOS a tokenizer adds is missing.
"""

from __future__ import annotations

import copy
import json

import torch
from torch import nn
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
)

from datamodules.templates import IMAGE_TOKEN, LLAMA3_SYSTEM, TEMPLATES, VICUNA_SYSTEM, encode
from encoders import encoder_chain
from encoders.anyres import AnyRes
from encoders.clip import CLIPEncoder
from foundation.errors import UserError
from model.lora import is_lora

# `after(t)`: `t` with `after_image` written after each placeholder followed by text that does not start with a
# space (see `_after_image`). `text(m)`: a message's text as training sees it: string content as it is, list
# content as its parts in order (an image part is the placeholder, + "\n" under `image_first` when it opens the
# message and text follows); with `image_first` a turn with one image is the placeholder + "\n" + the rest
# stripped, unless `placement` is llava_next and the turn starts with it (`move_image_first`, `PLACEMENTS`).
# `s.system`: the run's system text, or the text of a `system` message, which replaces it. `Template.jinja` is
# written in terms of these.
_MACROS = (
    "{% macro after(t) %}{% set pieces = t.split(image) %}{{ pieces[0] }}{% for p in pieces[1:] %}{{ image }}"
    "{% if p and p[0] != ' ' %}{{ after_image }}{% endif %}{{ p }}{% endfor %}{% endmacro %}"
    "{% macro text(m) %}{% if m['content'] is string %}{% set t = m['content'] %}{% else %}"
    "{% set parts = namespace(t='') %}{% for c in m['content'] %}"
    "{% set opens = image_first and loop.first and not loop.last and m['content'][1]['type'] == 'text' %}"
    "{% set parts.t = parts.t + (image + ('\\n' if opens else '') if c['type'] == 'image' else c['text']) %}"
    "{% endfor %}{% set t = parts.t %}{% endif %}"
    "{% if image_first and t.count(image) == 1 and not (placement == 'llava_next' and t.startswith(image)) %}"
    "{% set rest = t.replace(image, '') | trim %}"
    "{% set t = image + ('\\n' + rest if rest else '') %}{% endif %}{{ after(t) }}{% endmacro %}"
    "{% set s = namespace(system=system) %}{% for m in messages if m['role'] == 'system' %}"
    "{% set s.system = text(m) %}{% endfor %}"
)

DEFAULT_SYSTEM = {"vicuna_v1": VICUNA_SYSTEM, "llama3": LLAMA3_SYSTEM}  # what `encode` uses when system is None
BOS_TEXT = {"llama3": "<|begin_of_text|>"}  # llama3 writes its BOS as text; `Template.bos` ones take the tokenizer's


class ExportError(UserError):
    """The run's architecture or template has no transformers LLaVA equivalent, or the exported processor would
    not give training's token ids; the message says which part."""


def _check(module) -> AnyRes | None:
    """Raise ExportError naming what transformers' LLaVA / LLaVA-NeXT cannot hold; the AnyRes tiling, if any."""
    model = module.model
    chain = encoder_chain(model.vision)
    tiling = chain[0] if isinstance(chain[0], AnyRes) else None
    wrappers = chain[1:-1] if tiling is not None else chain[:-1]
    if wrappers:
        names = ", ".join(type(m).__name__ for m in wrappers)
        raise ExportError(
            f"the vision tower is wrapped ({names}): transformers' LLaVA and LLaVA-NeXT have no reducer or enhancer"
        )
    tower = chain[-1]
    if not isinstance(tower, CLIPEncoder):
        raise ExportError(f"encoder {type(tower).__name__} is not a transformers CLIP tower (clip*)")
    recipe = tower.preprocess
    if getattr(recipe, "shortest_edge", None) is None or getattr(recipe, "crop", None) is None:
        raise ExportError("the tower's preprocessing is not CLIP's shortest-edge resize + centre crop")
    if tiling is not None:
        if tiling.layout.fit != "pad":
            raise ExportError("model.tiling.fit is 'resize': transformers' LLaVA-NeXT pads each image to its canvas")
        if tiling.layout.max_tiles is not None:
            raise ExportError(
                "model.tiling.max_tiles is LLaVA-OneVision's anyres_max_N: LLaVA-NeXT never resizes the tiles' map"
            )
        if recipe.shortest_edge != recipe.crop:
            raise ExportError(
                f"the tower resizes to {recipe.shortest_edge} px and crops {recipe.crop}: LLaVA-NeXT's processor "
                "would give the base view another resize than training's"
            )
    proj = model.projector
    if not (isinstance(proj, nn.Sequential) and len(proj) == 3 and isinstance(proj[1], nn.GELU)):
        raise ExportError("the projector is not mlp2x_gelu (Linear, GELU, Linear), LLaVA-1.5's")
    if is_lora(model.llm):
        raise ExportError("the LLM carries LoRA adapters: merge them first (python -m tools.merge_lora)")
    return tiling


def chat_template(
    tokenizer, template: str, system: str | None = None, image_first: bool = True, image_token: str = IMAGE_TOKEN
) -> str:
    """The Jinja chat template that renders messages as `template` did in training with `tokenizer`, checked on
    a few conversations against training's ids (see the module docstring).

    Args:
        tokenizer: the run's tokenizer (with the image placeholder).
        template: a name in `TEMPLATES`.
        system, image_first, image_token: the run's `data.system_prompt`, `data.image_first` and
            `model.image_token`, as `encode` takes them.

    Raises:
        ExportError: the template has no Jinja form, or the processor's ids cannot equal training's (the
            message shows where they differ).
    """
    if template == "chat_template":
        chat = getattr(tokenizer, "chat_template", None)
        if not chat:
            raise ExportError(
                "template 'chat_template' renders with the tokenizer's chat template; this tokenizer has none"
            )
    elif template in TEMPLATES and TEMPLATES.get(template).jinja is not None:
        settings = {
            "bos": _bos(tokenizer, template),
            "system": DEFAULT_SYSTEM.get(template, "") if system is None else system,
            "image": image_token,
            "image_first": image_first,
            "placement": TEMPLATES.get(template).placement,
            "after_image": _after_image(tokenizer, image_token),
        }
        # JSON literals are Jinja literals (strings, true / false); the saved template shows its settings
        head = "".join(f"{{% set {k} = {json.dumps(v, ensure_ascii=False)} %}}" for k, v in settings.items())
        chat = head + _MACROS + TEMPLATES.get(template).jinja
    else:
        forms = [name for name in TEMPLATES.names() if TEMPLATES.get(name).jinja is not None]
        raise ExportError(f"template {template!r} has no Jinja chat template here ({', '.join(forms)})")
    _check_ids(tokenizer, chat, template, system, image_first, image_token)
    return chat


def _bos(tokenizer, template: str) -> str:
    """The BOS text the template writes: training's first token (the tokenizer's BOS under `Template.bos`,
    llama3's `<|begin_of_text|>`), or nothing where the tokenizer adds it to every text itself (LLaMA's,
    Llama-3's), as `processor(text=...)` then does: writing it too would double it."""
    lead = BOS_TEXT.get(template) or (tokenizer.bos_token if TEMPLATES.get(template).bos else None) or ""
    text, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    added = full[: len(full) - len(text)]
    if not added:
        return lead
    if added == tokenizer(lead, add_special_tokens=False)["input_ids"]:
        return ""
    raise ExportError(
        f"the tokenizer adds {tokenizer.convert_ids_to_tokens(added)} in front of every text, so processor(text=...) "
        f"does, but training's ids under {template!r} start with {lead or 'no BOS'!r}"
    )


def _after_image(tokenizer, image_token: str) -> str:
    """What the template writes after an image followed by text not starting with a space, so that
    `processor(text=...)`, which tokenises the prompt whole, gives that text the ids training gave it tokenised
    on its own (LLaVA's `tokenizer_image_token`): nothing for byte-level BPE (Llama-3, Qwen2); a space for
    LLaMA's SentencePiece (`legacy=False`), whose Metaspace puts a "▁" in front of a string that does not start
    with one, but not after a special token."""

    def alone(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if alone(image_token + " x")[1:] == alone(" x"):  # text starting with a space needs nothing
        for after in ("", " "):
            if alone(image_token + after + "\nx")[1:] == alone("\nx"):
                return after
    raise ExportError(f"the tokenizer cannot tokenise the text after {image_token} in a whole prompt as on its own")


# Conversations (user turns and answers, the first turn with the image) that every export renders with its chat
# template and tokenises as the processor does, to compare with training's prompt ids.
PROBES = (["What is in this picture?"], ["  Describe it.\nBriefly. "], ["What color?", "red", "And the shape?\n\n"])


def _probe(turns: list[str], image_token: str, parts: bool, image_first: bool) -> tuple[list[dict], list[dict]]:
    """(chat messages, LLaVA turns) of one conversation: the image as a part before the text (`parts`), or in
    the text as LLaVA's records have it, `<image>\n` + text (lmms-eval's `llava_hf` sends such strings). The
    turns are what the parts render as: `<image>\n` + text under `image_first`, else `<image>` + text."""
    messages, conversations = [], []
    for k, text in enumerate(turns):
        value = (image_token + ("" if parts and not image_first else "\n") if k == 0 else "") + text
        content = [{"type": "image"}, {"type": "text", "text": text}] if k == 0 and parts else value
        messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": content})
        conversations.append({"from": "human" if k % 2 == 0 else "gpt", "value": value})
    return messages, conversations + [{"from": "gpt", "value": "x"}]


def _check_ids(tokenizer, chat: str, template: str, system: str | None, image_first: bool, image_token: str):
    """Raise ExportError where `chat` + `tokenizer` (as the processor calls it) give a probe other ids than training."""
    for turns in PROBES:
        if template == "plain" and len(turns) > 1:
            continue  # plain trains on one human / gpt pair
        if template == "chat_template":  # the tokenizer's template renders strings as they are: training's
            forms = [([t.strip() for t in turns], False)]
        else:
            forms = [(turns, True), (turns, False)]
        for probe, parts in forms:
            messages, conversations = _probe(probe, image_token, parts, image_first)
            text = tokenizer.apply_chat_template(
                messages, chat_template=chat, tokenize=False, add_generation_prompt=True
            )
            theirs = tokenizer(text)["input_ids"]  # as processor(text=...) does, before expanding the image
            ours = encode(tokenizer, conversations, template, system, image_first, image_token).prompt_ids
            if theirs != ours:
                k = next(i for i, (a, b) in enumerate(zip(theirs + [None], ours + [None])) if a != b)
                raise ExportError(
                    f"under {template!r} the exported processor's ids differ from training's for {probe!r} from "
                    f"token {k}: {tokenizer.convert_ids_to_tokens(theirs[k : k + 3])} instead of "
                    f"{tokenizer.convert_ids_to_tokens(ours[k : k + 3])}"
                )


def with_end_of_turn_as_eos(tokenizer, template: str):
    """A copy of `tokenizer` whose EOS is the template's end of turn (chatml's `<|im_end|>`, llama3's
    `<|eot_id|>`), as instruct models ship theirs: lmms-eval's llava_hf (and other callers) pass
    `eos_token_id=tokenizer.eos_token_id` to generate(), which replaces generation_config's stop ids."""
    end = TEMPLATES.get(template).stop if template != "plain" else None
    if end is None or end == tokenizer.eos_token or len(tokenizer.encode(end, add_special_tokens=False)) != 1:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.eos_token = end
    return tokenizer


def export_llava(module, template: str, out_dir: str) -> str:
    """Write `out_dir` (safetensors weights, config, processor, tokenizer); returns it. A run with AnyRes tiling
    becomes LLaVA-NeXT (`LlavaNextForConditionalGeneration` + `LlavaNextProcessor`), any other LLaVA."""
    tiling = _check(module)
    llm, tokenizer = module.model.llm, module.tokenizer
    encoder = encoder_chain(module.model.vision)[-1]
    run = module.hparams["config"]
    image_token = run["model"]["image_token"]
    chat = chat_template(tokenizer, template, run["data"]["system_prompt"], run["data"]["image_first"], image_token)
    tokenizer = with_end_of_turn_as_eos(tokenizer, template)
    tower = encoder.model
    vision_config = tower.config.to_dict()
    vision_config["num_hidden_layers"] = len(tower.encoder.layers)  # the layers kept up to select_layer
    common = dict(
        vision_config=vision_config,
        text_config=llm.config.to_dict(),
        image_token_id=module.model.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default" if encoder.select_feature == "patch" else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    if tiling is None:
        config, model_class = LlavaConfig(**common, image_seq_length=encoder.num_tokens), LlavaForConditionalGeneration
    else:
        pinpoints = [list(canvas) for canvas in tiling.layout.resolutions]  # [height, width], as AnyRes lists them
        config, model_class = (
            LlavaNextConfig(**common, image_grid_pinpoints=pinpoints),
            LlavaNextForConditionalGeneration,
        )
    with torch.device("meta"):
        hf = model_class(config)
    state = {}
    for k, v in tower.state_dict().items():
        state["model.vision_tower." + k.removeprefix("vision_model.")] = v
    for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
        for p in ("weight", "bias"):
            state[f"model.multi_modal_projector.{theirs}.{p}"] = module.model.projector.state_dict()[f"{ours}.{p}"]
    for k, v in llm.state_dict().items():
        state[k if k.startswith("lm_head.") else "model.language_model." + k.removeprefix("model.")] = v
    if tiling is not None:
        state["model.image_newline"] = module.model.image_newline
    expected = hf.state_dict()
    # post_layernorm only feeds CLIP's pooled output, which LLaVA never reads; ours is an Identity
    for k in expected:
        if k not in state and ".post_layernorm." in k:
            state[k] = torch.ones(expected[k].shape) if k.endswith("weight") else torch.zeros(expected[k].shape)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(f"weights do not map: missing {missing[:8]}, unexpected {unexpected[:8]}")
    hf.load_state_dict({k: v.detach().clone().contiguous() for k, v in state.items()}, strict=True, assign=True)
    if getattr(config.text_config, "tie_word_embeddings", False):
        hf.tie_weights()
    # generate() stops where the project's generation does (the template's end of turn, EOS), not only at the
    # LLM config's EOS (Qwen2's <|endoftext|> is not chatml's <|im_end|>)
    hf.generation_config.eos_token_id = list(module.stop_ids)
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    hf.generation_config.max_new_tokens = run["eval"]["max_new_tokens"]  # the run's answer budget
    hf.save_pretrained(out_dir)
    recipe = encoder.preprocess
    images = dict(
        size={"shortest_edge": recipe.shortest_edge},
        crop_size={"height": recipe.crop, "width": recipe.crop},
        image_mean=list(recipe.pixel_mean),
        image_std=list(recipe.pixel_std),
        resample=int(recipe.resample),
    )
    if tiling is None:
        image_processor, processor_class = CLIPImageProcessor(**images), LlavaProcessor
    else:
        image_processor = LlavaNextImageProcessor(**images, image_grid_pinpoints=config.image_grid_pinpoints)
        processor_class = LlavaNextProcessor
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=chat,
        image_token=image_token,
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
    )
    processor.save_pretrained(out_dir)
    return out_dir
