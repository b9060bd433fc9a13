"""Packed attention without a block-diagonal mask (model/attention.py): each sample of a packed row scores what it
scores alone, with `model.llm.packed_attention` mask, varlen and flex; runs whose kernel cannot run here fail at
validation / preflight, naming the option and the alternative.

On a CPU PyTorch's varlen kernel does not exist, so the varlen case runs the project's whole path (position ids ->
segments -> flattened heads -> kernel call -> [B, T, H, d]) with the kernel replaced by a loop of SDPA calls over
the segments, written here; the real kernel runs where CUDA is. FlexAttention runs its own (eager) reference here:
it has no backward on a CPU (torch 2.15), so a CPU run with `flex` is refused and its test here is forward only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask, flex_attention
from transformers import LlamaConfig, LlamaForCausalLM

import model.attention as attention
from datamodules.packing import pack
from encoders import build_encoder
from experiment.preflight import check_machine
from foundation.schema import ConfigError
from model.attention import IMPLEMENTATIONS, document_mask, varlen_inputs
from model.projector import PROJECTORS
from model.vlm import VisionLanguageModel
from tests.support.tiny_models import TINY_CLIP, TINY_LLAMA

IGNORE = -100
VOCAB, PAD, IMAGE_ID = TINY_LLAMA["vocab_size"], 0, TINY_LLAMA["vocab_size"] - 1
N = 16  # image tokens: 32 px / patch 8 -> 4 x 4


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """varlen_attn's contract from its docstring, one SDPA call per segment: q [T, H, d], k / v [T, Hkv, d]."""
    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    out = []
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        seg = [x[start:end].transpose(0, 1) for x in (q, k, v)]  # [H, t, d]
        out.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale, enable_gqa=enable_gqa))
    return torch.cat([o.transpose(0, 1) for o in out])  # [T, H, d]


@pytest.fixture
def kernels_here(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setattr(attention, "varlen_attn", reference_varlen)
    monkeypatch.setattr(attention, "_compiled_flex", lambda: flex_attention)  # eager: the reference path
    yield


def tiny_vlm(kind: str, kv_heads: int) -> VisionLanguageModel:
    torch.manual_seed(0)
    vision = build_encoder("clip", config=TINY_CLIP)
    text = LlamaConfig(**{**TINY_LLAMA, "num_key_value_heads": kv_heads})
    llm = LlamaForCausalLM._from_config(text, attn_implementation=IMPLEMENTATIONS.get(kind, "sdpa"))
    projector = PROJECTORS.build("mlp2x_gelu", TINY_CLIP["hidden_size"], TINY_LLAMA["hidden_size"])
    return VisionLanguageModel(vision, projector, llm, IMAGE_ID, packed_attention=kind)


def item(name: str, n: int, image: bool, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, IMAGE_ID, (n,), generator=g).tolist()
    if image:
        ids[1 : 1 + N] = [IMAGE_ID] * N
    answer = n - max(2, n // 4)
    return {
        "id": name,
        "input_ids": ids,
        "labels": [IGNORE] * answer + ids[answer:],
        "answer": "",
        "question": "",
        "pixel_values": torch.randn(3, 32, 32, generator=g) if image else None,
    }


# LLaVA-like: image samples and text-only ones of mixed lengths; rows of 48 hold two or three samples each
ITEMS = [item("a", 27, True, 1), item("b", 9, False, 2), item("c", 22, True, 3), item("d", 5, False, 4)]
ITEMS += [item("e", 30, True, 5), item("f", 13, False, 6)]


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[T, V], [T] -> the summed causal LM loss of one sample (logit t scores label t + 1)."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE, reduction="sum")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager: the reference path
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
@pytest.mark.parametrize("kind", ["mask", "varlen", "flex"])
def test_packed_rows_score_each_sample_as_alone(kernels_here, kind, kv_heads):
    """Per-sample losses of packed rows equal each sample run alone (same weights, sdpa); the batch loss and its
    gradient equal the unpacked ones (flex: forward only, FlexAttention has no backward on a CPU)."""
    vlm = tiny_vlm(kind, kv_heads)
    batch = pack(ITEMS, max_length=48, pad_id=PAD)
    assert batch["input_ids"].shape[0] < len(ITEMS)  # rows hold several samples
    backward = kind != "flex"
    with torch.set_grad_enabled(backward):
        out = vlm(batch["input_ids"], None, batch["pixel_values"], batch["labels"], position_ids=batch["position_ids"])
    if backward:
        out.loss.backward()
        packed_grad = vlm.llm.model.layers[0].self_attn.q_proj.weight.grad.clone()
        vlm.zero_grad()
    with torch.no_grad():
        full = vlm(batch["input_ids"], None, batch["pixel_values"], batch["labels"], None, batch["position_ids"], True)
    by_id = {x["id"]: x for x in ITEMS}
    total, count = 0.0, 0
    for name, (r, start, n) in zip(batch["ids"], batch["spans"]):
        x = by_id[name]
        ids, labels = torch.tensor([x["input_ids"]]), torch.tensor([x["labels"]])
        pixels = x["pixel_values"][None] if x["pixel_values"] is not None else None
        alone = vlm(ids, torch.ones_like(ids), pixels, labels, full_logits=True)
        alone_loss = sample_losses(alone.logits[0], labels[0])
        packed_loss = sample_losses(full.logits[r, start : start + n], labels[0])
        torch.testing.assert_close(packed_loss, alone_loss.detach(), rtol=1e-5, atol=1e-5)
        total, count = total + alone_loss, count + int((labels[0, 1:] != IGNORE).sum())
    torch.testing.assert_close(out.loss.detach(), (total / count).detach(), rtol=1e-5, atol=1e-6)
    if backward:
        (total / count).backward()
        alone_grad = vlm.llm.model.layers[0].self_attn.q_proj.weight.grad
        torch.testing.assert_close(packed_grad, alone_grad, rtol=1e-4, atol=1e-6)


def test_packed_kernels_see_segments_not_a_mask(monkeypatch):
    """varlen gets the samples as segments of the flattened rows and no [R, 1, T, T] mask; flex a document
    BlockMask. (Without them the test above would pass on the SDPA fallback.)"""
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1, 2]])  # [R, T]
    segments = varlen_inputs(positions)
    assert segments["cu_seq_lens_q"].tolist() == [0, 3, 5, 8, 13, 16]  # row 1 starts at 8
    assert segments["max_length_q"] == 5
    same = [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1]]  # the sample of each position, by hand
    expected = torch.tensor([[[s[q] == s[k] and k <= q for k in range(8)] for q in range(8)] for s in same])
    block_mask = document_mask(positions)
    assert torch.equal(create_mask(block_mask.mask_mod, 2, 1, 8, 8, device="cpu")[:, 0], expected)
    calls = []
    monkeypatch.setattr(attention, "varlen_attn", lambda *a, **k: calls.append(a) or reference_varlen(*a, **k))
    vlm = tiny_vlm("varlen", 2)
    ids = torch.randint(1, IMAGE_ID, positions.shape)
    vlm(ids, None, None, ids, position_ids=positions)
    assert len(calls) == TINY_LLAMA["num_hidden_layers"]  # every layer on the kernel, none on the SDPA fallback
    assert torch.equal(calls[0][3], segments["cu_seq_lens_q"])


def test_unpacked_calls_take_sdpa(monkeypatch):
    """Padded validation batches and generation go through SDPA with transformers' mask, not the packed kernels."""
    monkeypatch.setattr(attention, "varlen_attn", lambda *a, **k: pytest.fail("varlen kernel on an unpacked batch"))
    monkeypatch.setattr(attention, "_compiled_flex", lambda: pytest.fail("flex kernel on an unpacked batch"))
    ids = torch.randint(1, IMAGE_ID, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as generation prompts come
    results = {}
    for kind in ("mask", "varlen", "flex"):
        vlm = tiny_vlm(kind, 2)
        with torch.no_grad():
            logits = vlm(ids, mask, None, ids, full_logits=True).logits
        new = vlm.generate(ids, mask, None, max_new_tokens=3, stop_ids=[1], pad_id=PAD)
        results[kind] = (logits, new)
    for kind in ("varlen", "flex"):
        torch.testing.assert_close(results[kind][0], results["mask"][0])
        assert results[kind][1] == results["mask"][1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.llm.packed_attention=flex"], "'model.llm.packed_attention' = 'flex' is the attention of packed rows"),
        (
            ["data.packing=true", "model.llm.packed_attention=varlen", "trainer.precision=32-true"],
            "runs in bfloat16 / float16 only .* use model.llm.packed_attention: flex",
        ),
        (
            ["data.packing=true", "model.llm.packed_attention=varlen", "trainer.accelerator=cpu"],
            "needs a CUDA GPU .* use model.llm.packed_attention: mask on a CPU",
        ),
        (
            ["data.packing=true", "model.llm.packed_attention=flex", "trainer.accelerator=cpu"],
            "'flex' trains on CUDA only .* use model.llm.packed_attention: mask",
        ),
        (
            ["data.packing=true", "model.llm.packed_attention=flex", "model.llm.attn_implementation=eager"],
            "cannot go with 'model.llm.attn_implementation' = 'eager'",
        ),
        (["model.llm.packed_attention=dense"], "choose one of: mask, varlen, flex"),
    ],
)
def test_config_errors_name_the_option_and_the_alternative(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(*overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_preflight_refuses_varlen_without_cuda(tiny_cfg):
    cfg = tiny_cfg("data.packing=true", "model.llm.packed_attention=varlen", "trainer.precision=bf16-mixed")
    with pytest.raises(ConfigError, match="needs a CUDA GPU .* this machine has none: use .*packed_attention: mask"):
        check_machine(cfg)


def test_preflight_refuses_what_a_cpu_cannot_run(tiny_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'flex' trains on CUDA only .* use model.llm.packed_attention: mask"):
        check_machine(tiny_cfg("data.packing=true", "model.llm.packed_attention=flex"))
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(ConfigError, match="'model.compile' = true needs a C\\+\\+ compiler .* model.compile: false"):
        check_machine(tiny_cfg("model.compile=true"))
    check_machine(tiny_cfg("data.packing=true"))  # mask, no compile: nothing this machine lacks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's varlen kernel needs CUDA")
def test_varlen_kernel_on_cuda_matches_the_segment_loop():
    torch.manual_seed(0)
    q, k, v = (torch.randn(40, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 7, 19, 40], device="cuda", dtype=torch.int32)
    got = attention.varlen_attn(q, k, v, cu, cu, 21, 21, window_size=(-1, 0))
    torch.testing.assert_close(got, reference_varlen(q, k, v, cu, cu, 21, 21, window_size=(-1, 0)), atol=2e-2, rtol=0)
