"""The FLOP model (model/flops.py) against hand counts and against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from experiment.assemble import build_module
from model.flops import StepFlops, vision_flops_per_image

LENGTHS = [40, 29]  # real (unpadded) lengths of two samples, 16 image tokens each


@pytest.fixture
def tiny(tiny_cfg):
    """The shrunk quickstart: 32 px timm ViT (patch 8, width 32, 3 blocks of which 2 run), 2-layer Llama of width 32."""
    return build_module(tiny_cfg()).model


def _batch(model, lengths):
    """Two samples, each one image (16 image tokens first) + text; right padding to the longest."""
    T, N = max(lengths), model.vision.num_tokens
    text_ids = torch.tensor([i for i in range(4, 60) if i != model.image_token_id])
    ids = torch.full((len(lengths), T), 3)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, t in enumerate(lengths):
        ids[i, :N] = model.image_token_id
        ids[i, N:t] = text_ids[torch.randint(len(text_ids), (t - N,))]
        mask[i, :t] = 1
    pixels = torch.randn(len(lengths), 3, model.vision.image_size, model.vision.image_size)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "labels": ids.masked_fill(mask == 0, -100),
    }


def test_vit_hand_count(tiny):
    # patch embed: conv 3x8x8 -> 32 at 4x4 = 16 positions; 2 blocks on 17 tokens (16 + CLS) of width 32:
    # qkv 32x96 + proj 32x32 + fc1 32x128 + fc2 128x32 = 12288 weights, attention 2 * 2 * 17^2 * 32.
    patch = 2 * 3 * 8 * 8 * 32 * 16
    block_dense, block_attn = 2 * 12288 * 17, 2 * 2 * 17 * 17 * 32
    parts = vision_flops_per_image(tiny.vision)
    assert set(parts) == {"encoder"}
    assert sum(parts["encoder"].dense.values()) == patch + 2 * block_dense
    assert parts["encoder"].attention == 2 * block_attn


def test_llama_hand_count(tiny):
    # per layer q, k, v, o 32x32 + gate, up 32x64 + down 64x32 = 10240 weights; LM head 32 x vocab;
    # attention per layer and sample 2 * 2 * T^2 * 32 (the causal square is not halved).
    vocab = tiny.llm.config.vocab_size
    per_token = 2 * (2 * 10240 + 32 * vocab)
    parts = StepFlops(tiny).parts(num_images=2, lengths=LENGTHS)
    assert sum(parts["llm"].dense.values()) == per_token * sum(LENGTHS)
    assert parts["llm"].attention == 2 * sum(2 * 2 * t * t * 32 for t in LENGTHS)
    # mlp2x_gelu projector 32 -> 32 -> 32 on 2 x 16 image tokens
    assert parts["projector"].forward == 2 * (32 * 32 + 32 * 32) * 32


def test_backward_rule(tiny):
    """Trained parts cost 3x forward; a frozen part behind a trained one 1x dense + 2x attention; in front, 0."""
    flops = StepFlops(tiny)
    parts = flops.parts(2, LENGTHS)
    fwd = {p: (sum(pf.dense.values()), pf.attention) for p, pf in parts.items()}
    tiny.requires_grad_(True)
    assert flops.step_flops(2, LENGTHS)["backward"] == 2 * sum(d + a for d, a in fwd.values())
    tiny.requires_grad_(False)
    tiny.projector.requires_grad_(True)  # alignment: only the projector trains
    d, a = fwd["llm"]
    assert flops.step_flops(2, LENGTHS)["backward"] == 2 * fwd["projector"][0] + d + 2 * a


@pytest.mark.parametrize("trainable", ["all", "projector"])
def test_matches_flop_counter(tiny, trainable):
    """Against torch's FlopCounterMode: the forward exactly, forward + backward within 5%."""
    tiny.requires_grad_(trainable == "all")
    tiny.projector.requires_grad_(True)
    batch = _batch(tiny, [40, 40])  # no padding: FlopCounterMode counts padded positions
    expected = StepFlops(tiny).step_flops(2, [40, 40], scored=int((batch["labels"][:, 1:] != -100).sum()))
    with FlopCounterMode(display=False) as fc:
        out = tiny(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    assert expected["forward"] == pytest.approx(fc.get_total_flops(), rel=0.01)  # exact here
    with FlopCounterMode(display=False) as fc:
        tiny(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]).loss.backward()
    assert expected["total"] == pytest.approx(fc.get_total_flops(), rel=0.05)  # measured: 0.4% (all), 2.7% (projector)
    assert out.loss.isfinite()


def test_sam_windowed_attention_matches_flop_counter():
    """SAM ViT-B at 1024 px on the meta device: windowed blocks pad 64x64 to 70x70 and attend in 196-token windows."""
    from encoders import build_encoder

    with torch.device("meta"):
        sam = build_encoder("sam_vit_b")
    parts = vision_flops_per_image(sam)["encoder"]
    # 8 windowed blocks: 25 windows of 196 tokens; 4 global blocks: 4096 tokens; width 768
    assert parts.attention == 8 * 25 * 4 * 196**2 * 768 + 4 * 4 * 4096**2 * 768
    with FlopCounterMode(display=False) as fc:
        sam(torch.zeros(1, 3, 1024, 1024, device="meta"))
    assert parts.forward == pytest.approx(fc.get_total_flops(), rel=0.02)


def test_batch_flops_uses_real_lengths(tiny):
    flops = StepFlops(tiny)
    batch = _batch(tiny, LENGTHS)
    scored = int((batch["labels"][:, 1:] != -100).sum())
    assert flops.batch_flops(batch) == flops.step_flops(2, LENGTHS, scored)["total"]
    assert flops.batch_flops(batch) < flops.step_flops(2, [40, 40], scored)["total"]


def test_the_lm_head_counts_only_where_it_runs(tiny):
    """The loss runs the head on the labelled positions only (model/loss.py), and the count follows it."""
    flops, vocab = StepFlops(tiny), tiny.llm.config.vocab_size
    everywhere, answers = flops.parts(2, LENGTHS)["llm"], flops.parts(2, LENGTHS, scored=7)["llm"]
    assert flops.head == "lm_head" and answers.dense["lm_head"] == 2 * 32 * vocab * 7
    assert everywhere.dense["lm_head"] == 2 * 32 * vocab * sum(LENGTHS)
    assert {k: v for k, v in answers.dense.items() if k != "lm_head"} == {
        k: v for k, v in everywhere.dense.items() if k != "lm_head"
    }


def test_packed_rows_count_each_sample():
    """A row packing samples of 40 and 29 tokens (+ 3 padding) costs what the two rows unpacked cost."""
    from model.flops import sample_lengths

    positions = torch.cat([torch.arange(40), torch.arange(29), torch.arange(3)]).unsqueeze(0)
    mask = torch.cat([torch.ones(69, dtype=torch.long), torch.zeros(3, dtype=torch.long)]).unsqueeze(0)
    packed = {"input_ids": torch.zeros(1, 72, dtype=torch.long), "attention_mask": mask, "position_ids": positions}
    assert sample_lengths(packed) == LENGTHS
    unpacked = {
        "input_ids": torch.zeros(2, 40),
        "attention_mask": (torch.arange(40) < torch.tensor([[40], [29]])).long(),
    }
    assert sample_lengths(unpacked) == LENGTHS
