"""A plain transformers LLaVA training loop, timed: the baseline for bench_train.py's numbers on a GPU.

    python bench/bench_llava_baseline.py                        # CLIP-L/336 + a 1.1B Llama, batch 16
    python bench/bench_llava_baseline.py --batch 16 --text 64 --steps 20 --warmup 5
    python bench/bench_llava_baseline.py --llm '{"hidden_size": 2048, ...}' --grad-checkpointing

transformers' own `LlavaForConditionalGeneration`, built from configs (random weights): OpenAI CLIP
ViT-L/14 at 336 px (frozen; features from hidden_states[-2] without CLS, LLaVA-1.5's recipe), the
mlp2x_gelu projector, and a Llama LLM (default: TinyLlama-1.1B's shape). The loop is what a LLaVA
training script does by hand: bf16 autocast over fp32 weights, AdamW on the projector and the LLM
(the SFT stage), gradient clipping at 1.0, one optimizer step per batch. Every sample holds 576 image
tokens and `--text` text tokens (no padding), with labels on the text.

Printed, as bench_train.py prints them: median step time over --steps after --warmup, samples/s,
text and image tokens/s, peak GiB (max allocated), TFLOP/s and MFU. The FLOPs are counted by PyTorch's
own `torch.utils.flop_counter.FlopCounterMode` over one forward + backward (independent of the
project's FLOP model), and MFU is against 989 TFLOP/s (H100 / H200 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import json
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
IMAGE_TOKENS = (336 // 14) ** 2
DENSE_BF16_TFLOPS = 989.0


def build(llm: dict, attn: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    sys.path.insert(0, ROOT)
    from encoders.clip import CLIP_VIT_L  # OpenAI's ViT-L/14 shape, as the project's encoder builds it

    text = LlamaConfig(**llm)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_VIT_L, image_size=336),
        text_config=text,
        image_token_id=text.vocab_size - 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(False)
    return model


def batch(model, size: int, text: int, device: torch.device) -> dict:
    vocab, image_id = model.config.text_config.vocab_size, model.config.image_token_id
    ids = torch.randint(3, vocab - 2, (size, 1 + IMAGE_TOKENS + text), device=device)
    ids[:, 0] = 1  # BOS
    ids[:, 1 : 1 + IMAGE_TOKENS] = image_id
    labels = ids.clone()
    labels[:, : 1 + IMAGE_TOKENS] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(size, 3, 336, 336, device=device),
    }


def step(model, inputs: dict, optimizer) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_flops(model, inputs: dict, attn: str) -> int:
    """FLOPs of one forward + backward. Counted with eager attention: FlopCounterMode's SDPA formula
    rejects grouped-query shapes (fewer key/value heads), and eager attention does the same matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    model.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.set_attn_implementation(attn)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="samples per step")
    parser.add_argument("--text", type=int, default=64, help="text tokens per sample (besides 1 BOS + 576 image)")
    parser.add_argument("--llm", type=json.loads, default=TINYLLAMA, help="LlamaConfig keyword arguments (JSON)")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="checkpoint the LLM's layers")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps run before timing")
    a = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build(a.llm, a.attn).to(device).train()
    if a.grad_checkpointing:
        model.model.language_model.gradient_checkpointing_enable({"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-5, weight_decay=0.0)
    inputs = batch(model, a.batch, a.text, device)
    flops = count_flops(model, inputs, a.attn)
    times = []
    for i in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, inputs, optimizer)
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
    t = statistics.median(times)
    tflops = flops / t / 1e12
    rows = {
        "step s": f"{t:.3f}",
        "samples/s": f"{a.batch / t:,.1f}",
        "text tok/s": f"{a.batch * (1 + a.text) / t:,.0f}",
        "image tok/s": f"{a.batch * IMAGE_TOKENS / t:,.0f}",
        "peak GiB": f"{torch.cuda.max_memory_allocated() / 2**30:.2f}",
        "TFLOP/s": f"{tflops:.4g}",
        "MFU": f"{tflops / DENSE_BF16_TFLOPS:.1%}",
    }
    print(
        f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; medians over {a.steps} steps "
        f"after {a.warmup} warm-up steps; {sum(p.numel() for p in trainable):,} trainable of "
        f"{sum(p.numel() for p in model.parameters()):,}; FlopCounterMode: {flops / 1e12:.2f} TFLOP per step"
    )
    print("".join(f"{k:>13}" for k in rows))
    print("".join(f"{v:>13}" for v in rows.values()))


if __name__ == "__main__":
    main()
