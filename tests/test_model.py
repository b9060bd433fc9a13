"""The VLM against transformers' own LLaVA, plus generation and stage invariants."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from encoders import build_encoder
from lit_modules.vlm_module import VLMModule
from model.projector import PROJECTORS
from model.vlm import VisionLanguageModel
from tests.support.tiny_models import TINY_CLIP, TINY_LLAMA

VISION = TINY_CLIP
# The tiny Llama, wider than the vision tower (a transposed projector fails) and with grouped-query attention
TEXT = dict(
    TINY_LLAMA, hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=100
)
IMAGE_ID = 99
SIDE = VISION["image_size"]
N = (SIDE // VISION["patch_size"]) ** 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random transformers LLaVA and our module holding the same weights."""
    torch.manual_seed(0)
    ref = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=CLIPVisionConfig(**VISION),
            text_config=LlamaConfig(**TEXT),
            image_token_index=IMAGE_ID,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
    ).eval()
    clip_dir = tmp_path_factory.mktemp("clip")
    ref.model.vision_tower.save_pretrained(clip_dir)  # our encoder loads it the way a user would
    vision = build_encoder("clip", checkpoint=str(clip_dir))
    projector = PROJECTORS.build("mlp2x_gelu", 32, 48)
    p = ref.model.multi_modal_projector
    projector.load_state_dict(
        {
            "0.weight": p.linear_1.weight,
            "0.bias": p.linear_1.bias,
            "2.weight": p.linear_2.weight,
            "2.bias": p.linear_2.bias,
        }
    )
    llm = LlamaForCausalLM(LlamaConfig(**TEXT))
    llm.model.load_state_dict(ref.model.language_model.state_dict())
    llm.lm_head.load_state_dict(ref.lm_head.state_dict())
    return ref, VisionLanguageModel(vision, projector, llm, IMAGE_ID).eval()


def test_logits_match_transformers_llava(pair):
    ref, ours = pair
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, SIDE, SIDE)
    ids = torch.randint(0, 90, (2, 30))
    ids[0, 3 : 3 + N] = IMAGE_ID
    ids[1, 10 : 10 + N] = IMAGE_ID
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        got = ours(ids, mask, pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_image_embeddings_are_the_projected_penultimate_layer(pair):
    ref, ours = pair
    pixels = torch.randn(3, 3, SIDE, SIDE)
    with torch.no_grad():
        expected = ref.model.get_image_features(pixel_values=pixels)
        expected = torch.cat(list(expected.pooler_output if hasattr(expected, "pooler_output") else expected))
        got = ours.encode_images(pixels)
    assert got.shape == (3, N, 48)
    torch.testing.assert_close(got.reshape(-1, 48), expected.reshape(-1, 48), atol=1e-5, rtol=1e-5)


def test_placeholder_count_mismatch_is_an_error(pair):
    _, ours = pair
    ids = torch.randint(0, 90, (1, 30))
    ids[0, : N - 1] = IMAGE_ID
    with pytest.raises(ValueError, match=f"{N - 1} image tokens but 1 image"):
        ours(ids, pixel_values=torch.randn(1, 3, SIDE, SIDE))
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(ids)


def test_batched_left_padded_generation_equals_one_by_one(pair):
    _, ours = pair
    torch.manual_seed(2)
    prompts = [torch.cat([torch.full((N,), IMAGE_ID), torch.randint(0, 90, (k,))]) for k in (3, 7)]
    pixels = torch.randn(2, 3, SIDE, SIDE)
    single = [
        ours.generate(p[None], torch.ones(1, len(p), dtype=torch.long), pixels[i : i + 1], 6, [0], 0)[0]
        for i, p in enumerate(prompts)
    ]
    P = max(len(p) for p in prompts)
    ids = torch.zeros(2, P, dtype=torch.long)
    mask = torch.zeros(2, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = p
        mask[i, P - len(p) :] = 1
    batched = ours.generate(ids, mask, pixels, 6, [0], 0)
    assert batched == single and all(len(s) > 0 for s in single)


class _Tok:
    eos_token_id, pad_token_id = 0, 0


def test_stage_freezes_parts_and_checkpoint_keeps_only_trained_weights(pair):
    _, ours = pair
    module = VLMModule(ours, _Tok(), stage="align")
    parts = ours.parts()
    assert all(p.requires_grad for _, p in parts["projector"])
    assert not any(p.requires_grad for _, p in parts["llm"] + parts["encoder"])
    assert "projector" in module.parameter_table and "20,979,712" not in module.parameter_table
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    params = dict(module.named_parameters())
    kept = [k for k in ckpt["state_dict"] if k in params]
    assert kept and all(k.startswith("model.projector.") for k in kept)  # frozen weights are left out
    module.on_load_checkpoint(ckpt)  # frozen keys may be absent
    ckpt["state_dict"].pop("model.projector.0.weight")
    with pytest.raises(ValueError, match="missing .*projector.0.weight"):
        module.on_load_checkpoint(ckpt)
    VLMModule(ours, _Tok(), stage="sft")
    assert all(p.requires_grad for _, p in ours.parts()["llm"])
    with pytest.raises(ValueError, match="unknown stage"):
        VLMModule(ours, _Tok(), stage="pretrain")
