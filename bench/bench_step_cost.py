"""Step cost of the loss on labelled positions only (model/loss.py) against transformers' causal-LM loss path.

    python bench/bench_step_cost.py                       # Llama-3's 128,256-token vocabulary, CPU, 2 threads
    python bench/bench_step_cost.py --vocab 32002 --hidden 1024 --layers 8 --steps 8

One training step = forward, backward and an AdamW step of a VisionLanguageModel: a CLIP tower from config
(64 px, patch 8: 64 image tokens, frozen as in SFT), the mlp2x_gelu projector, and a Llama LM from config with
the given vocabulary. Two ways, on the same weights and the same batches:

    transformers  the LM's own forward with labels: the head on every position, all logits upcast to fp32, then
                  the loss (what LlavaForConditionalGeneration and a plain LLaVA loop compute)
    labelled      the head and the cross-entropy on the labelled positions only (the project's default)

Batches are LLaVA-shaped: each sample holds 64 image tokens, a --prompt-token question and a --answer-token
answer, labels on the answer only (about 10% of positions at the defaults). Each way runs in a fresh process,
so its peak RSS (ru_maxrss) is its own. Printed: median step time after --warmup steps, peak RSS, and the
losses of the first step (equal: the same computation, up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(args):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from encoders import build_encoder
    from model.projector import PROJECTORS
    from model.vlm import VisionLanguageModel

    torch.manual_seed(0)
    clip = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    vision = build_encoder("clip", config=dict(clip, image_size=64, patch_size=8))
    text = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )
    llm = AutoModelForCausalLM.from_config(text, attn_implementation="sdpa")
    image_token = args.vocab - 1
    model = VisionLanguageModel(vision, PROJECTORS.build("mlp2x_gelu", 128, args.hidden), llm, image_token)
    model.vision.requires_grad_(False)
    return model, image_token


def batches(args, image_token: int, n: int):
    import torch

    gen = torch.Generator().manual_seed(1)
    length = 64 + args.prompt + args.answer
    for _ in range(n):
        ids = torch.randint(0, args.vocab - 1, (args.batch, length), generator=gen)
        ids[:, :64] = image_token
        labels = torch.full_like(ids, -100)
        labels[:, -args.answer :] = ids[:, -args.answer :]
        pixels = torch.randn(args.batch, 3, 64, 64, generator=gen)
        yield ids, torch.ones_like(ids), pixels, labels


def measure(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, image_token = build(args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, losses = [], []
    for ids, mask, pixels, labels in batches(args, image_token, args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(ids, mask, pixels, labels, full_logits=args.way == "transformers").loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    scored = args.answer - 1  # labels are shifted by one: the first answer token is predicted by the prompt
    return {
        "way": args.way,
        "step_s": statistics.median(times[args.warmup :]),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "first_loss": losses[0],
        "scored_share": (scored + 1) / (64 + args.prompt + args.answer),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--answer", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--way", choices=["transformers", "labelled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:  # one measurement, in this process
        print(json.dumps(measure(args)))
        return
    results = []
    for way in ("transformers", "labelled"):
        argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--way", way]
        out = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base, ours = results
    print(
        f"vocab {args.vocab}, Llama {args.layers} x {args.hidden}, batch {args.batch} x "
        f"{64 + args.prompt + args.answer} tokens ({base['scored_share']:.0%} labelled), {args.threads} threads"
    )
    print(f"{'way':<14}{'step (s)':>10}{'peak RSS (GiB)':>16}{'first loss':>12}")
    for r in results:
        print(f"{r['way']:<14}{r['step_s']:>10.3f}{r['peak_rss_gib']:>16.2f}{r['first_loss']:>12.5f}")
    print(
        f"labelled / transformers: step time {ours['step_s'] / base['step_s']:.2f}x, "
        f"peak RSS {ours['peak_rss_gib'] / base['peak_rss_gib']:.2f}x"
    )


if __name__ == "__main__":
    main()
