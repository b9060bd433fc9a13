"""A plain transformers LLaVA training loop, timed: the baseline for bench_train.py's numbers on a GPU, and
the same loop on LLaVA-like mixed lengths, padded against packed.

    python bench/bench_llava_baseline.py                        # CLIP-L/336 + a 1.1B Llama, batch 16
    python bench/bench_llava_baseline.py --batch 16 --text 64 --steps 20 --warmup 5
    python bench/bench_llava_baseline.py --llm '{"hidden_size": 2048, ...}' --grad-checkpointing
    python bench/bench_llava_baseline.py --mixed                # padded vs packed: mask, varlen, flex
    python bench/bench_llava_baseline.py --mixed --device cpu --modes plain,mask --llm '{...}' --vision '{...}'

transformers' own `LlavaForConditionalGeneration`, built from configs (random weights): OpenAI CLIP
ViT-L/14 at 336 px (frozen; features from hidden_states[-2] without CLS, LLaVA-1.5's recipe; `--vision`
for another CLIPVisionConfig), the mlp2x_gelu projector, and a Llama LLM (default: TinyLlama-1.1B's shape).
The loop is what a LLaVA training script does by hand: bf16 autocast over fp32 weights (fp32 on a CPU),
AdamW on the projector and the LLM (the SFT stage), gradient clipping at 1.0, one optimizer step per batch.

Fixed lengths (the default): every sample holds the image tokens and `--text` text tokens (no padding), with
labels on the text. Printed, as bench_train.py prints them: median step time over --steps after --warmup,
samples/s, text and image tokens/s, peak GiB (max allocated), TFLOP/s and MFU. The FLOPs are counted by
PyTorch's own `torch.utils.flop_counter.FlopCounterMode` over one forward + backward (independent of the
project's FLOP model), and MFU is against 989 TFLOP/s (H100 / H200 SXM dense bf16).

Mixed lengths (`--mixed`): LLaVA-like samples (about 10% text-only; text log-normal around --mean-text
tokens, labels on its last 60%), --batch samples a step, one set of samples for every mode:
    plain   one row per sample, right-padded to the batch's longest (the plain loop)
    mask    the project's packing (datamodules/packing.py) into rows of --max-length, position ids restarting
            per sample, transformers' block-diagonal mask (`model.llm.packed_attention: mask`)
    varlen  the same rows on PyTorch's varlen kernel (`packed_attention: varlen`, model/attention.py; CUDA)
    flex    the same rows on a FlexAttention document mask (`packed_attention: flex`; CUDA for training)
Printed per mode: median step time, samples/s, real (non-padding) tokens/s over the timed steps, rows per
step, the padding share of the positions, peak GiB (CUDA), tokens/s against plain, and the first step's
loss, which is the same in every mode (same weights and samples: packing changes no sample's result).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINYLLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32002,  # Vicuna's 32000 + <image> + <pad>, as the project's run adds them
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
DENSE_BF16_TFLOPS = 989.0


def build(llm: dict, vision: dict, attn: str, packed_attention: str | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from model.attention import IMPLEMENTATIONS  # registers the packed kernels in transformers' interface

    text = LlamaConfig(**llm)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text,
        image_token_id=text.vocab_size - 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn
    if packed_attention in IMPLEMENTATIONS:  # the LLM on the registered kernel, the vision tower as it was
        config.text_config._attn_implementation = IMPLEMENTATIONS[packed_attention]
    torch.manual_seed(0)  # the same weights for every mode
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(False)
    return model


def batch(model, size: int, text: int, device: torch.device, image_size: int, image_tokens: int) -> dict:
    vocab, image_id = model.config.text_config.vocab_size, model.config.image_token_id
    ids = torch.randint(3, vocab - 2, (size, 1 + image_tokens + text), device=device)
    ids[:, 0] = 1  # BOS
    ids[:, 1 : 1 + image_tokens] = image_id
    labels = ids.clone()
    labels[:, : 1 + image_tokens] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(size, 3, image_size, image_size, device=device),
    }


def mixed_samples(vocab: int, count: int, image_size: int, image_tokens: int, mean_text: int, seed: int) -> list[dict]:
    """LLaVA-like samples of mixed lengths, as datamodules/packing.py's items: about 10% text-only (LLaVA-1.5's SFT
    mix), the rest BOS + the image tokens + text; text lengths log-normal around `mean_text` (median ~0.8x the
    mean, a long tail to 4x), labels on the last 60% of the text (the answers)."""
    image_id = vocab - 2  # as `build` sets it
    g = torch.Generator().manual_seed(seed)
    samples = []
    for k in range(count):
        image = bool(torch.rand((), generator=g) >= 0.1)
        text = int(torch.empty(()).log_normal_(math.log(mean_text) - 0.18, 0.6, generator=g).clamp(8, 4 * mean_text))
        ids = (
            [1]
            + [image_id] * (image_tokens if image else 0)
            + torch.randint(3, vocab - 2, (text,), generator=g).tolist()
        )
        answer = len(ids) - int(0.6 * text)
        samples.append(
            {
                "id": str(k),
                "input_ids": ids,
                "labels": [-100] * answer + ids[answer:],
                "pixel_values": torch.randn(3, image_size, image_size, generator=g) if image else None,
                "answer": "",
                "question": "",
            }
        )
    return samples


def padded(samples: list[dict]) -> dict:
    """One row per sample, right-padded to the longest (what a plain LLaVA loop does)."""
    T = max(len(x["input_ids"]) for x in samples)
    ids = torch.zeros(len(samples), T, dtype=torch.long)
    labels = torch.full((len(samples), T), -100)
    mask = torch.zeros(len(samples), T, dtype=torch.long)
    for r, x in enumerate(samples):
        n = len(x["input_ids"])
        ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
    images = [x["pixel_values"] for x in samples if x["pixel_values"] is not None]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.stack(images)}


def packed(samples: list[dict], max_length: int) -> dict:
    """The same samples packed by the project (datamodules/packing.py) into rows of `max_length`: no attention
    mask, position ids restarting per sample (`to_device` adds what the packed kernel takes)."""
    from datamodules.packing import pack

    b = pack(samples, max_length, pad_id=0)
    keys = ("input_ids", "labels", "position_ids", "pixel_values")
    # use_cache=False: with a KV cache (the config's default) transformers ignores the position resets
    return {**{k: b[k] for k in keys}, "attention_mask": None, "use_cache": False}


def to_device(inputs: dict, device: torch.device, kind: str | None) -> dict:
    """Tensors to `device`; packed rows get their attention inputs there (varlen's segments, flex's BlockMask)."""
    out = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    if kind is not None:
        from model.attention import packed_inputs

        out.update(packed_inputs(kind, out["position_ids"]))
    return out


def step(model, inputs: dict, optimizer) -> float:
    device = inputs["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):  # CPU: fp32
        loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def count_flops(model, inputs: dict, attn: str) -> int:
    """FLOPs of one forward + backward. Counted with eager attention: FlopCounterMode's SDPA formula
    rejects grouped-query shapes (fewer key/value heads), and eager attention does the same matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    model.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=inputs["input_ids"].is_cuda):
            loss = model(**inputs).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.set_attn_implementation(attn)
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(model, batches: list[dict], warmup: int, device: torch.device, kind: str | None):
    """(step times of `batches` after the first `warmup`, the first step's loss); each batch is moved to `device`
    before its clock starts."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0)
    times, losses = [], []
    for i, inputs in enumerate(batches):
        inputs = to_device(inputs, device, kind)
        sync(device)
        start = time.perf_counter()
        losses.append(step(model, inputs, optimizer))
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, losses[0]


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def describe(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return f"device: {name}; torch {torch.__version__}"


def fixed_lengths(a, device: torch.device) -> None:
    """Every sample BOS + the image tokens + --text tokens: the loop's step time, rates and MFU."""
    model = build(a.llm, a.vision, a.attn).to(device).train()
    if a.grad_checkpointing:
        model.model.language_model.gradient_checkpointing_enable({"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    image_tokens = (a.vision["image_size"] // a.vision["patch_size"]) ** 2
    inputs = batch(model, a.batch, a.text, device, a.vision["image_size"], image_tokens)
    flops = count_flops(model, inputs, a.attn)
    t = statistics.median(timed(model, [inputs] * (a.warmup + a.steps), a.warmup, device, None)[0])
    tflops = flops / t / 1e12
    rows = {
        "step s": f"{t:.3f}",
        "samples/s": f"{a.batch / t:,.1f}",
        "text tok/s": f"{a.batch * (1 + a.text) / t:,.0f}",
        "image tok/s": f"{a.batch * image_tokens / t:,.0f}",
        "peak GiB": f"{peak_gib(device):.2f}",
        "TFLOP/s": f"{tflops:.4g}",
        "MFU": f"{tflops / DENSE_BF16_TFLOPS:.1%}" if device.type == "cuda" else "-",
    }
    print(
        f"{describe(device)}; medians over {a.steps} steps after {a.warmup} warm-up steps; "
        f"{sum(p.numel() for p in trainable):,} trainable of {sum(p.numel() for p in model.parameters()):,}; "
        f"FlopCounterMode: {flops / 1e12:.2f} TFLOP per step"
    )
    print("".join(f"{k:>13}" for k in rows))
    print("".join(f"{v:>13}" for v in rows.values()))


def mixed_lengths(a, device: torch.device) -> None:
    """LLaVA-like mixed lengths, --batch samples a step: the plain loop pads each batch to its longest sample;
    the packed modes put the same samples in rows of --max-length (datamodules/packing.py), one mode per
    `model.llm.packed_attention` kind. The same weights and samples, in the same order, for every mode."""
    image_tokens = (a.vision["image_size"] // a.vision["patch_size"]) ** 2
    vocab = a.llm["vocab_size"]
    total = a.warmup + a.steps
    samples = mixed_samples(vocab, a.batch * total, a.vision["image_size"], image_tokens, a.mean_text, seed=0)
    groups = [samples[k * a.batch : (k + 1) * a.batch] for k in range(total)]
    real = sum(len(x["input_ids"]) for g in groups[a.warmup :] for x in g)  # non-padding tokens, timed steps
    print(
        f"{describe(device)}; {a.batch} samples a step, text log-normal around {a.mean_text} tokens, ~10% "
        f"text-only, {image_tokens} image tokens otherwise; rows of {a.max_length} when packed; {a.steps} steps "
        f"timed after {a.warmup}; tokens = real (non-padding) text + image tokens"
    )
    header = ("mode", "step s", "samples/s", "tokens/s", "rows/step", "padding", "peak GiB", "vs plain", "loss 1")
    print("".join(f"{h:>12}" for h in header))
    base = None
    for mode in a.modes:
        kind = None if mode == "plain" else mode
        if kind not in (None, "mask") and device.type != "cuda":
            print(f"{mode:>12}  skipped: model.llm.packed_attention {kind} trains on CUDA only")
            continue
        made = [padded(g) if kind is None else packed(g, a.max_length) for g in groups]
        positions = sum(m["input_ids"].numel() for m in made[a.warmup :])
        rows = statistics.mean(m["input_ids"].shape[0] for m in made[a.warmup :])
        model = build(a.llm, a.vision, a.attn, kind).to(device).train()
        if a.grad_checkpointing:
            model.model.language_model.gradient_checkpointing_enable({"use_reentrant": False})
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, first_loss = timed(model, made, a.warmup, device, kind)
        rate = real / sum(times)
        base = base or rate
        cells = (
            mode,
            f"{statistics.median(times):.3f}",
            f"{a.batch * len(times) / sum(times):,.1f}",
            f"{rate:,.0f}",
            f"{rows:.1f}",
            f"{1 - real / positions:.0%}",
            f"{peak_gib(device):.2f}" if device.type == "cuda" else "-",
            f"{rate / base:.2f}x",
            f"{first_loss:.5f}",  # the first step's: equal in every mode (same weights, same samples)
        )
        print("".join(f"{c:>12}" for c in cells))
        del model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="samples per step")
    parser.add_argument("--text", type=int, default=64, help="text tokens per sample (besides 1 BOS + 576 image)")
    parser.add_argument("--llm", type=json.loads, default=TINYLLAMA, help="LlamaConfig keyword arguments (JSON)")
    parser.add_argument("--vision", type=json.loads, help="CLIPVisionConfig keyword arguments (default: CLIP-L/336)")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="checkpoint the LLM's layers")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps run before timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--mixed", action="store_true", help="LLaVA-like mixed lengths: the plain loop and packing")
    parser.add_argument("--mean-text", type=int, default=160, help="--mixed: mean text tokens per sample")
    parser.add_argument("--max-length", type=int, default=2048, help="--mixed: tokens per packed row")
    parser.add_argument(
        "--modes",
        type=lambda v: v.split(","),
        default=["plain", "mask", "varlen", "flex"],
        help="--mixed: comma-separated: plain, and model.llm.packed_attention kinds (mask, varlen, flex)",
    )
    a = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    if a.vision is None:
        from encoders.clip import CLIP_VIT_L  # OpenAI's ViT-L/14 shape, as the project's encoder builds it

        a.vision = {**CLIP_VIT_L, "image_size": 336}
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA GPU is visible (--device cpu runs at a small size)")
    (mixed_lengths if a.mixed else fixed_lengths)(a, device)


if __name__ == "__main__":
    main()
