"""A run started from a released transformers LLaVA / LLaVA-NeXT directory (`model.from_hf`): tiny
`LlavaForConditionalGeneration` and `LlavaNextForConditionalGeneration` models with a CLIP tower and a Llama, saved
with their processor and a real Vicuna tokenizer as llava-hf's are, load through the project's config and builder;
token ids, pixels and logits equal transformers' on real photos (several aspect ratios for LLaVA-NeXT); `--describe`
prints the model section built from the directory; a directory that does not fit is refused in one line naming it
and the reason."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from skimage import data as photos
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
)

from experiment.assemble import build_module
from experiment.config import config_from_dict, load_config
from experiment.describe import describe
from foundation.errors import UserError
from tests.support.quickstart import tiny_overrides
from tests.support.tiny_models import TINY_CLIP, TINY_LLAMA

S, PATCH = TINY_CLIP["image_size"], TINY_CLIP["patch_size"]
VOCAB = 32064  # llava-hf's Vicuna models: 32000 + <image>, <pad>, padded to a multiple of 64
PINPOINTS = [[S * r, S * c] for r, c in ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))]  # LLaVA-1.6's, in tiles
PHOTOS = {
    "astronaut": lambda: photos.astronaut(),  # 512 x 512
    "coffee": lambda: photos.coffee(),  # 400 x 600
    "chelsea": lambda: photos.chelsea(),  # 300 x 451
    "very_wide": lambda: photos.coffee()[150:190],  # 40 x 600
    "very_tall": lambda: photos.astronaut()[:, 200:230],  # 512 x 30
    "below_one_tile": lambda: photos.chelsea()[100:120, 200:226],  # 20 x 26
}


def _save(tmp, name: str, kind: str, tokenizer, **config) -> str:
    """A tiny llava-hf directory: the model (random, seeded), its processor and tokenizer."""
    out = str(tmp / name)
    vision, text = CLIPVisionConfig(**TINY_CLIP).to_dict(), LlamaConfig(**{**TINY_LLAMA, "vocab_size": VOCAB}).to_dict()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    common = dict(vision_config=vision, text_config=text, image_token_id=image_id)
    images = dict(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    torch.manual_seed(0)
    if kind == "llava":
        model = LlavaForConditionalGeneration(LlavaConfig(**common, **config))
        processor = LlavaProcessor(CLIPImageProcessorPil(**images), tokenizer, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    else:
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common, image_grid_pinpoints=PINPOINTS, **config))
        processor = LlavaNextProcessor(LlavaNextImageProcessorPil(**images, image_grid_pinpoints=PINPOINTS),
                                       tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
                                       num_additional_image_tokens=1)  # fmt: skip
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vicuna(real_tokenizer):
    return real_tokenizer("vicuna")  # + <image> (32000) and <pad>, as llava-hf's


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, vicuna):
    tmp = tmp_path_factory.mktemp("llava_hf")
    return {
        "llava": _save(tmp, "llava", "llava", vicuna),
        "llava_next": _save(tmp, "llava_next", "llava_next", vicuna, vision_feature_layer=-1),
    }


def _config(shapes_root, tmp_path, path: str, *extra: str):
    """The quickstart on the tiny built-in data with the model from `path` (the tiny-model overrides left out)."""
    data = [o for o in tiny_overrides(shapes_root, str(tmp_path / "runs")) if not o.startswith("model.")]
    return load_config(None, [*data, f"model.from_hf={path}", "data.template=vicuna_v1", *extra])


@pytest.fixture(scope="module")
def loaded(dirs, shapes_root, tmp_path_factory):
    """Each directory through the project (config built from it, then build_module) and through transformers."""
    out = {}
    for kind, path in dirs.items():
        module = build_module(_config(shapes_root, tmp_path_factory.mktemp(kind), path)).eval()
        cls = LlavaForConditionalGeneration if kind == "llava" else LlavaNextForConditionalGeneration
        out[kind] = module, cls.from_pretrained(path).eval(), path
    return out


@pytest.fixture(scope="module")
def processors(dirs):
    """Each directory's own processor (the arithmetic LLaVA trained with), loaded once: the tests only call it."""
    from transformers import AutoProcessor

    return {kind: AutoProcessor.from_pretrained(path, backend="pil") for kind, path in dirs.items()}


def _compare(module, hf, processor, img: Image.Image) -> float:
    """Token ids and pixels against the directory's processor, logits against its model; the largest logit gap."""
    model, tokenizer = module.model, module.tokenizer
    text = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    theirs = processor(images=img, text=text, return_tensors="pt")
    count = model.vision.num_image_tokens((img.height, img.width))
    ids = [t for tok in tokenizer(text)["input_ids"] for t in ([tok] * count if tok == model.image_token_id else [tok])]
    assert theirs["input_ids"][0].tolist() == ids
    pixels = model.vision.preprocess(img)  # [K, 3, S, S] with tiles, else [3, S, S]
    tiled = pixels.ndim == 4
    batch = pixels if tiled else pixels[None]
    assert (theirs["pixel_values"][0] if tiled else theirs["pixel_values"]).shape == batch.shape
    torch.testing.assert_close(theirs["pixel_values"][0] if tiled else theirs["pixel_values"], batch, rtol=0, atol=0)
    sizes = torch.tensor([[img.height, img.width]]) if tiled else None
    prompt, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    with torch.no_grad():
        mine = model(prompt, mask, batch, image_sizes=sizes).logits
        extra = {"image_sizes": sizes} if tiled else {}
        # transformers' model on its own processor's ids and pixels: the whole path, theirs against ours
        ref = hf(
            input_ids=theirs["input_ids"], attention_mask=mask, pixel_values=theirs["pixel_values"], **extra
        ).logits
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    return (mine - ref).abs().max().item()


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_a_llava_directory_gives_transformers_logits(loaded, processors, name):
    module, hf, _ = loaded["llava"]
    _compare(module, hf, processors["llava"], Image.fromarray(PHOTOS[name]()).convert("RGB"))


@pytest.mark.parametrize("name", list(PHOTOS))
def test_a_llava_next_directory_gives_transformers_logits(loaded, processors, name):
    module, hf, _ = loaded["llava_next"]
    _compare(module, hf, processors["llava_next"], Image.fromarray(PHOTOS[name]()).convert("RGB"))


def test_the_config_built_from_the_directory(dirs, shapes_root, tmp_path):
    cfg = _config(shapes_root, tmp_path, dirs["llava_next"], "model.llm.dtype=float32", "model.tiling.max_tiles=4")
    model = cfg.model
    assert model.encoder.name == "clip" and model.encoder.config.hidden_size == TINY_CLIP["hidden_size"]
    assert model.encoder.select_layer == -1 and model.encoder.select_feature == "patch"
    assert [list(p) for p in model.tiling.grid_pinpoints] == PINPOINTS
    assert model.tiling.max_tiles == 4  # an override adjusts what the directory gives
    assert model.llm.path is None and model.llm.config.vocab_size == VOCAB and model.llm.dtype == "float32"
    assert model.tokenizer == dirs["llava_next"] and model.projector == "mlp2x_gelu"
    # the quickstart's own encoder (timm) and inline LLM are replaced, not merged into
    assert "model_kwargs" not in model.encoder and model.llm.config.model_type == "llama"
    # a saved (resolved) config is not rebuilt from the directory: the run's adjustments stay
    again = config_from_dict(OmegaConf.to_container(cfg, resolve=True))
    assert again.model.tiling.max_tiles == 4
    text = describe(cfg, image_sizes=[(400, 600)])
    assert f"model.from_hf: {dirs['llava_next']}" in text and "grid_pinpoints" in text
    assert f"projector mlp2x_gelu: {dirs['llava_next']}" in text


def _edit(src: str, dst, change) -> str:
    """A copy of a directory with its config.json changed by `change(dict)` (None: the file removed)."""
    out = str(dst)
    shutil.copytree(src, out)
    file = os.path.join(out, "config.json")
    config = json.load(open(file))
    change(config)
    json.dump(config, open(file, "w"))
    return out


@pytest.mark.parametrize(
    "kind, change, reason",
    [
        ("llava", lambda c: c["vision_config"].update(model_type="siglip_vision_model"),
         "vision tower 'siglip_vision_model': the project imports CLIP towers"),
        ("llava", lambda c: c.update(projector_hidden_act="relu"), "projector with 'relu' activation"),
        ("llava", lambda c: c.update(multimodal_projector_bias=False), "the project has mlp2x_gelu"),
        ("llava", lambda c: c.update(vision_feature_layer=[-2, -3]), "vision_feature_layer [-2, -3] concatenates"),
        ("llava_next", lambda c: c.update(vision_feature_select_strategy="full"),
         "vision_feature_select_strategy 'full'"),
        ("llava", lambda c: c.update(model_type="llava_onevision"), "model_type 'llava_onevision' is not LLaVA"),
    ],
)  # fmt: skip
def test_a_directory_that_does_not_fit_is_refused(dirs, shapes_root, tmp_path, kind, change, reason):
    path = _edit(dirs[kind], tmp_path / "edited", change)
    with pytest.raises(UserError) as err:
        _config(shapes_root, tmp_path, path)
    message = str(err.value)
    assert message.startswith(f"model.from_hf={path}: ") and reason in message and "\n" not in message


def test_missing_weights_are_refused(dirs, shapes_root, tmp_path):
    path = str(tmp_path / "no_weights")
    shutil.copytree(dirs["llava"], path)
    os.remove(os.path.join(path, "model.safetensors"))
    cfg = _config(shapes_root, tmp_path, path)  # the config needs no weights
    with pytest.raises(UserError, match=f"model.from_hf={path}: no weights could be read"):
        build_module(cfg)


def test_a_truncated_weights_file_is_refused(dirs, shapes_root, tmp_path):
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "truncated")
    shutil.copytree(dirs["llava"], path)
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    save_file({k: v for k, v in state.items() if "linear_2" not in k}, file, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"the weights lack 2 tensors the config needs: .*linear_2"):
        build_module(_config(shapes_root, tmp_path, path))


def test_weight_sources_beside_the_directory_are_refused(dirs, shapes_root, tmp_path):
    with pytest.raises(UserError, match="'model.llm.path' = .* is set, but 'model.from_hf'"):
        _config(shapes_root, tmp_path, dirs["llava"], f"model.llm.path={dirs['llava']}")


def test_a_released_model_is_evaluated_through_the_project(dirs, loaded, shapes_root, tmp_path):
    """`tools.evaluate <experiment YAML> model.from_hf=<dir>`: the project's answers are transformers' greedy
    continuation of the same prompt (the run's template, ids and pixels) with the directory's model."""
    from datamodules.templates import encode
    from tools.evaluate import main

    records = json.load(open(os.path.join(shapes_root, "sft_val.json")))[:3]
    rows = [{"id": r["id"], "image": r["image"], "question": r["conversations"][0]["value"].replace("<image>\n", ""),
             "reference": r["conversations"][1]["value"]} for r in records]  # fmt: skip
    (tmp_path / "set.json").write_text(json.dumps(rows))
    data = [o for o in tiny_overrides(shapes_root, str(tmp_path / "runs")) if not o.startswith("model.")]
    sets = (
        f"eval.sets=[{{name: shapes, file: {tmp_path / 'set.json'}, image_folder: {shapes_root}, max_new_tokens: 5}}]"
    )
    yaml = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "quickstart.yaml")
    results = main([yaml, *data, f"model.from_hf={dirs['llava']}", "data.template=vicuna_v1", sets,
                    "--out", str(tmp_path / "scores.json")])  # fmt: skip
    module, hf, _ = loaded["llava"]
    for row in rows:
        conversation = [{"from": "human", "value": f"<image>\n{row['question']}"}, {"from": "gpt", "value": "."}]
        prompt = encode(module.tokenizer, conversation, "vicuna_v1", None, True, "<image>").prompt_ids
        count = module.model.vision.num_tokens
        ids = torch.tensor(
            [[t for tok in prompt for t in ([tok] * count if tok == hf.config.image_token_id else [tok])]]
        )
        image = Image.open(os.path.join(shapes_root, row["image"])).convert("RGB")
        pixels = module.model.vision.preprocess(image)[None]
        out = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=5, do_sample=False,
                          eos_token_id=module.stop_ids, pad_token_id=module.tokenizer.pad_token_id)  # fmt: skip
        expected = module.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert results["shapes"]["predictions"][str(row["id"])] == expected
    assert any(results["shapes"]["predictions"].values())  # answers to compare, not only empty ones


def test_lora_wraps_the_directory_s_llm(loaded, dirs, shapes_root, tmp_path):
    """LoRA adapters go on the loaded weights and start as peft starts them (B = 0), not skipped by the
    directory's no-init build."""
    module = build_module(_config(shapes_root, tmp_path, dirs["llava"], "model.llm.lora={r: 4}"))
    _, hf, _ = loaded["llava"]
    q = module.model.llm.get_base_model().model.layers[0].self_attn.q_proj
    assert torch.equal(q.base_layer.weight, hf.model.language_model.layers[0].self_attn.q_proj.weight)
    assert not q.lora_B.default.weight.any() and q.lora_A.default.weight.std() > 0
