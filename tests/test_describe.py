"""`describe`: full-size recipes on the meta device, counts against hand formulas, and its parameter
table against the table of the module that training builds, for every experiment and for LoRA."""

from __future__ import annotations

import os
import re
import time

import pytest
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig

from encoders import build_encoder
from encoders.token_counts import EXAMPLE_SIZES
from experiment.assemble import build_module
from experiment.config import EXPERIMENTS_DIR, load_config
from experiment.describe import build_on_meta, describe
from tests.support.experiments import experiment_files
from tests.support.tiny_models import TINY_CLIP, TINY_LLAMA_YAML, llama_yaml

# Llama-2-7B / Vicuna-7B-v1.5 shape. Every key is given: an override merges into the quickstart's inline
# config, so e.g. its num_key_value_heads: 4 would otherwise stay.
LLAMA_7B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
LLAMA_7B_OVERRIDE = "model.llm.config={" + ", ".join(f"{k}: {v}" for k, v in LLAMA_7B.items()) + "}"


def llama_params(hidden: int, intermediate: int, layers: int, vocab: int) -> int:
    """Llama without bias, full multi-head attention, untied embeddings."""
    attention = 4 * hidden * hidden  # q, k, v, o
    mlp = 3 * hidden * intermediate  # gate, up, down
    norms = 2 * hidden
    return layers * (attention + mlp + norms) + hidden + 2 * vocab * hidden  # + final norm, embed, lm_head


def mlp2x_gelu_params(c: int, d: int) -> int:
    return c * d + d + d * d + d


LLAMA_7B_PARAMS = 6_738_415_616
CLIP_L_336_PRUNED = 290_909_184  # 23 of 24 layers, no post-layernorm (303,507,456 for the whole tower)
SAM_VIT_B = 89_670_912
CONV_REDUCER = 3 * 3 * 256 * 512 + 3 * 3 * 512 * 1024  # two stride-2 3x3 convs, no bias


def counts(model) -> dict[str, int]:
    return {part: sum(p.numel() for _, p in params) for part, params in model.parts().items()}


def test_hand_formulas():
    assert llama_params(4096, 11008, 32, 32000) == LLAMA_7B_PARAMS
    assert mlp2x_gelu_params(1024, 4096) == 20_979_712


def full_size(*overrides: str):
    """The quickstart turned into LLaVA-1.5-7B's shapes: CLIP-L/14-336, mlp2x_gelu, Llama-7B, 2048 tokens."""
    return load_config(
        None,
        ["model.encoder.name=clip_vit_l_336", LLAMA_7B_OVERRIDE, "data.max_length=2048", "trainable=null", *overrides],
    )


def test_llava15_shapes_in_seconds():
    cfg = full_size("stage=align")
    start = time.perf_counter()
    text = describe(cfg)
    assert time.perf_counter() - start < 10  # meta device: ~0.3 s here, no 7B of memory
    model, _ = build_on_meta(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert counts(model) == {"encoder": CLIP_L_336_PRUNED, "projector": 20_979_712, "llm": LLAMA_7B_PARAMS}
    total = CLIP_L_336_PRUNED + 20_979_712 + LLAMA_7B_PARAMS
    assert "projector       20,979,712      20,979,712" in text  # align trains the projector only
    assert "stage 'align': training projector (the stage's default)" in text
    assert "llm          6,738,415,616               0" in text
    assert f"total        {total:,}      20,979,712" in text
    assert "336 x 336 px images" in text
    assert "image tokens per image: 576 (24 x 24) of width 1024, projected to 4096" in text
    assert "data.max_length 2048 = 576 image tokens + 1472 text tokens" in text
    assert "vocabulary: 32,000" in text


def test_sft_trains_projector_and_llm():
    text = describe(full_size("stage=sft"))
    assert f"total        7,050,304,512   {20_979_712 + LLAMA_7B_PARAMS:,}" in text
    assert "stage 'sft': training projector, llm (the stage's default)" in text


def test_sam_with_conv_reducer():
    cfg = full_size(
        "stage=align",
        "model.encoder={name: sam_vit_b, checkpoint: nowhere/sam_vit_b_01ec64.pth}",
        "model.reducer={name: conv}",
    )
    assert counts(build_on_meta(cfg)[0]) == {
        "encoder": SAM_VIT_B,
        "reducer": CONV_REDUCER,
        "projector": mlp2x_gelu_params(1024, 4096),
        "llm": LLAMA_7B_PARAMS,
    }
    text = describe(cfg)
    assert "sam_vit_b: nowhere/sam_vit_b_01ec64.pth (not on this machine)" in text
    assert f"reducer          {CONV_REDUCER:,}       {CONV_REDUCER:,}" in text  # align trains the reducer
    assert "1024 x 1024 px images -> TokenReducer (1024 px in, 16 x 16 x 1024 out) wrapping SamImageEncoder" in text
    assert "data.max_length 2048 = 256 image tokens + 1792 text tokens" in text


def buildable(shapes_root: str) -> list[str]:
    """Overrides that make any experiment buildable here: no weights files, a tiny LLM, a local tokenizer."""
    return [
        "model.encoder.checkpoint=null",
        "model.mm_projector=null",
        "model.llm.path=null",
        "model.llm.quantization=null",
        f"model.llm.config={TINY_LLAMA_YAML}",
        f"model.tokenizer={shapes_root}/tokenizer",
    ]


def _quick(path: str) -> bool:
    """Experiments on the built-in data have small encoders; the real recipes build CLIP-L / SAM / SigLIP."""
    return load_config(path).data.builtin is not None


@pytest.mark.parametrize(
    "path",
    [p if _quick(p) else pytest.param(p, marks=pytest.mark.slow) for p in experiment_files()],
    ids=lambda p: os.path.relpath(p, EXPERIMENTS_DIR),
)
def test_describe_table_is_the_training_table(path, shapes_root):
    cfg = load_config(path, buildable(shapes_root))
    module = build_module(cfg)  # what training builds (random init: no weights files here)
    _, table = build_on_meta(cfg)
    assert table == module.parameter_table
    assert module.parameter_table in describe(cfg)
    trains = {part for part, ps in module.model.parts().items() if any(p.requires_grad for _, p in ps)}
    assert f"training {', '.join(p for p in module.model.parts() if p in trains)} (" in table


@pytest.mark.parametrize("lora", ["{r: 4}", "{r: 2, target_modules: [q_proj, v_proj], modules_to_save: [lm_head]}"])
def test_describe_counts_lora_as_training_does(tiny_cfg, shapes_root, lora):
    cfg = tiny_cfg(f"model.llm.lora={lora}", f"model.tokenizer={shapes_root}/tokenizer")
    module = build_module(cfg)
    _, table = build_on_meta(cfg)
    assert table == module.parameter_table
    adapters = sum(p.numel() for _, p in module.model.parts()["llm"])
    base = sum(p.numel() for _, p in module.model.parts()["llm_base"])
    assert f"llm       {adapters:>16,}{adapters:>16,}" in table and f"llm_base  {base:>16,}{0:>16,}" in table
    if lora == "{r: 4}":  # r=4 on all 7 linear layers of 2 decoder layers (widths 32 and 64)
        assert adapters == 2 * (4 * 4 * (32 + 32) + 2 * 4 * (32 + 64) + 4 * (64 + 32))


def test_describe_grows_the_vocabulary_like_training(tiny_cfg, shapes_root, tokenizer):
    small = llama_yaml(vocab_size=16)
    cfg = tiny_cfg(f"model.llm.config={small}")
    module = build_module(cfg)
    assert module.model.llm.get_input_embeddings().num_embeddings == len(tokenizer) > 16
    _, table = build_on_meta(cfg)
    assert table == module.parameter_table
    assert f"vocabulary: {len(tokenizer):,} embeddings" in describe(cfg)


def test_llm_config_from_a_local_directory(tmp_path):
    LlamaConfig(**{k: v for k, v in LLAMA_7B.items() if k != "model_type"}).save_pretrained(tmp_path)
    cfg = load_config(
        None, ["model.encoder.name=clip_vit_l_336", "model.llm.config=null", f"model.llm.path={tmp_path}"]
    )
    assert counts(build_on_meta(cfg)[0])["llm"] == LLAMA_7B_PARAMS
    assert f"llama: {tmp_path}" in describe(cfg)  # on this machine: no "(not on this machine)"


def test_missing_llm_config_says_how_to_pass_one(tmp_path):
    where = [f"model.llm.path={tmp_path}/vicuna-7b", "model.llm.config=null"]
    with pytest.raises(ValueError, match="has no config.json on this machine. Copy the model's config.json") as err:
        describe(load_config(None, where))
    # the overrides the message suggests work, and give Vicuna-7B's shape
    suggested = re.search(r"(model.llm.path=null) '(model.llm.config=\{.*\})'", str(err.value))
    cfg = load_config(None, where + list(suggested.groups()))
    assert counts(build_on_meta(cfg)[0])["llm"] == LLAMA_7B_PARAMS
    assert counts(build_on_meta(load_config(None, where), llm_config=LLAMA_7B)[0])["llm"] == LLAMA_7B_PARAMS


def test_clip_family_reads_its_architecture_from_the_checkpoint(tmp_path):
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(tmp_path)
    cfg = load_config(None, [f"model.encoder={{name: clip, checkpoint: {tmp_path}}}"])
    model, _ = build_on_meta(cfg)
    real = build_encoder("clip", checkpoint=str(tmp_path))
    assert counts(model)["encoder"] == sum(p.numel() for p in real.parameters())
    assert (model.vision.image_size, model.vision.num_tokens) == (32, 16)
    missing = load_config(None, [f"model.encoder={{name: clip, checkpoint: {tmp_path}/nowhere}}"])
    with pytest.raises(ValueError, match=r"takes its architecture from .*nowhere/config.json, which is not here"):
        describe(missing)


@pytest.mark.parametrize("path", experiment_files(), ids=lambda p: os.path.relpath(p, EXPERIMENTS_DIR))
def test_every_experiment_describes(path):
    cfg = load_config(path)
    local = cfg.model.llm.config is not None or os.path.exists(os.path.join(str(cfg.model.llm.path), "config.json"))
    model, _ = build_on_meta(cfg, None if local else LLAMA_7B)
    text = describe(cfg, None if local else LLAMA_7B)
    # a tiling's count depends on the size: the budget is the largest of the example sizes it lists
    tokens = max(model.vision.num_image_tokens(size) for size in EXAMPLE_SIZES)
    assert text.startswith(f"{cfg.name}: built on the meta device")
    assert f"stage {cfg.stage!r}: training" in text
    assert f"data.max_length {cfg.data.max_length} = {tokens} image tokens + {cfg.data.max_length - tokens}" in text
    side = model.vision.image_size
    assert f"{side} x {side} px images" in text or f"images of any size as {side} x {side} px views" in text
