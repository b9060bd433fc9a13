"""Step cost of the project's training step (the loss on labelled positions only, model/loss.py, and its memory
options for the optimizer) against a plain transformers loop.

    python bench/bench_step_cost.py                       # Llama-3's 128,256-token vocabulary, CPU, 2 threads
    python bench/bench_step_cost.py --vocab 32002 --hidden 1024 --layers 8 --steps 8
    python bench/bench_step_cost.py --options fused,in_backward 8bit   # the project's way with these options only
    python bench/bench_step_cost.py --interleave --options fused,in_backward   # step times under the same load

One training step = forward, backward and an AdamW step of a VisionLanguageModel: a CLIP tower from config
(64 px, patch 8: 64 image tokens, frozen as in SFT), the mlp2x_gelu projector, and a Llama LM from config with
the given vocabulary. On the same weights and the same batches:

    transformers  the plain loop: the LM's own forward with labels (the head on every position, all logits upcast
                  to fp32, then the loss: what LlavaForConditionalGeneration computes), loss.backward(),
                  torch.optim.AdamW(lr=1e-4) with torch's defaults
    labelled      the project's way: the head and the cross-entropy on the labelled positions only (the project's
                  default), and the AdamW that VLMModule.configure_optimizers builds (lr 1e-4, weight decay 0.01 as
                  torch's default, flat schedule) with the `optim` options of each --options entry:
                      none         optim.fused: false, optim.in_backward: false (torch's default kernel: foreach)
                      fused        optim.fused: true  (AdamW's fused kernel)
                      in_backward  optim.in_backward: true (each parameter steps inside backward and its gradient
                                   is freed at once; lit_modules/optim_in_backward.py)
                      8bit         optim.states: 8bit (bitsandbytes' AdamW8bit: the two moment states block-quantized,
                                   about 2 bytes per parameter instead of 8; lit_modules/optimizer.py; the lowmem extra)

Batches are LLaVA-shaped: each sample holds 64 image tokens, a --prompt-token question and a --answer-token
answer, labels on the answer only (about 10% of positions at the defaults). Each way runs in a fresh process,
so its peak RSS (ru_maxrss) is its own. Printed per way: median step time after --warmup steps, wall and CPU
(the process's CPU time over all threads: on a shared machine, less sensitive to other jobs than wall time);
RSS before the first step (libraries + weights); RSS between steps (what a step leaves: + AdamW's states, + the
allocator's free memory); peak RSS and the phase of the step that first reached it (forward, backward,
optimizer.step); the loss of the first step (equal: the same computation, up to float rounding). With
--interleave, step times only, the ways' steps taken in turn in one process (on a shared machine the load then
falls on all of them alike).
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
from types import SimpleNamespace

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


OPTIONS = ("fused", "in_backward", "8bit")  # the `optim` options the project's way may take (see the docstring)


def project_optimizer(model, options: set[str], steps: int):
    """The optimizer VLMModule.configure_optimizers builds for `model` with these `optim` options, as one device's
    Trainer would have it build (what `optim.in_backward` steps in backward is this optimizer)."""
    import torch
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from foundation.schema import OptimConfig
    from lit_modules.vlm_module import VLMModule

    settings = {"states": "8bit" if "8bit" in options else "fp32", **{o: True for o in options - {"8bit"}}}
    optim = OptimConfig(lr=1e-4, weight_decay=0.01, warmup_ratio=0.0, min_lr_ratio=1.0, **settings)
    module = VLMModule(model, SimpleNamespace(eos_token_id=0), stage="sft", trainable=["projector", "llm"], optim=optim)
    module.trainer = SimpleNamespace(
        estimated_stepping_batches=steps, strategy=SingleDeviceStrategy(torch.device("cpu"))
    )
    return module.configure_optimizers()["optimizer"]


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, image_token = build(args)
    steps = args.warmup + args.steps
    if args.way == "transformers":
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    else:
        optimizer = project_optimizer(model, set(args.options_of_way), steps)
    before = _rss_gib()
    times, cpu, losses = [], [], []
    peak, phase = _peak_gib(), "build"

    def reached(where: str) -> None:  # the phase that first reached the peak
        nonlocal peak, phase
        if _peak_gib() > peak:
            peak, phase = _peak_gib(), where

    for ids, mask, pixels, labels in batches(args, image_token, steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = model(ids, mask, pixels, labels, full_logits=args.way == "transformers").loss
        reached("forward")
        loss.backward()  # with optim.in_backward, every parameter steps in here
        reached("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reached("optimizer.step")
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        losses.append(float(loss))
    scored = args.answer - 1  # labels are shifted by one: the first answer token is predicted by the prompt
    return {
        "way": args.way if args.way == "transformers" else "+".join(["labelled", *args.options_of_way]),
        "step_s": statistics.median(times[args.warmup :]),
        "cpu_s": statistics.median(cpu[args.warmup :]),
        "before_gib": before,
        "between_gib": _rss_gib(),
        "peak_rss_gib": peak,
        "peak_phase": phase,
        "first_loss": losses[0],
        "scored_share": (scored + 1) / (64 + args.prompt + args.answer),
    }


def interleaved(args) -> None:
    """Step times only: the loop and each --options way in this one process, their steps taken in turn, so that
    on a shared machine every way runs under the same load (the separate processes' times follow whatever else
    runs at the time). Peak memory is not measured here: the ways' weights and states are all in this process."""
    import torch

    torch.set_num_threads(args.threads)
    ways = {}
    for options in [None, *args.options]:
        model, image_token = build(args)  # the same weights for every way (the seed is fixed)
        if options is None:
            name, optimizer = (
                "transformers",
                torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4),
            )
        else:
            name = "+".join(["labelled", *options])
            optimizer = project_optimizer(model, set(options), args.warmup + args.steps)
        ways[name] = (model, optimizer, options is None, [], [])
    for ids, mask, pixels, labels in batches(args, image_token, args.warmup + args.steps):
        for model, optimizer, full, times, cpu in ways.values():
            start, start_cpu = time.perf_counter(), time.process_time()
            model(ids, mask, pixels, labels, full_logits=full).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    medians = {
        k: (statistics.median(w[3][args.warmup :]), statistics.median(w[4][args.warmup :])) for k, w in ways.items()
    }
    base = medians["transformers"]
    print(f"steps interleaved in one process, load average {os.getloadavg()[0]:.1f}")
    print(f"{'way':<27}{'step (s)':>9}{'x loop':>8}{'CPU (s)':>8}{'x loop':>8}")
    for name, (wall, cpu) in medians.items():
        print(f"{name:<27}{wall:>9.3f}{wall / base[0]:>8.2f}{cpu:>8.2f}{cpu / base[1]:>8.2f}")


def _options(text: str) -> list[str]:
    chosen = [] if text == "none" else text.split(",")
    unknown = [o for o in chosen if o not in OPTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown option {unknown[0]!r}; choose from none, {', '.join(OPTIONS)}")
    return chosen


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
    parser.add_argument(
        "--options",
        type=_options,
        nargs="+",
        default=[[], ["fused"], ["fused", "in_backward"], ["8bit", "in_backward"]],
        help="the project's way once per entry, with these optim options: none, or a comma-separated subset of "
        f"{', '.join(OPTIONS)} (default: none fused fused,in_backward 8bit,in_backward)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time the ways in one process, their steps in turn (a shared machine), without peak memory",
    )
    parser.add_argument("--way", choices=["transformers", "labelled"], help=argparse.SUPPRESS)
    parser.add_argument("--options-of-way", type=_options, default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:  # one measurement, in this process
        print(json.dumps(measure(args)))
        return
    if args.interleave:
        sys.path.insert(0, ROOT)  # this checkout, run from anywhere (the measurements' processes get PYTHONPATH)
        interleaved(args)
        return
    results = []
    runs = [("transformers", "none")] + [("labelled", ",".join(o) or "none") for o in args.options]
    for way, options in runs:
        argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--way", way, "--options-of-way", options]
        out = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[0]
    print(
        f"vocab {args.vocab}, Llama {args.layers} x {args.hidden}, batch {args.batch} x "
        f"{64 + args.prompt + args.answer} tokens ({base['scored_share']:.0%} labelled), {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'way':<27}{'step (s)':>9}{'x loop':>8}{'CPU (s)':>8}{'x loop':>8}"
        f"{'RSS before':>12}{'between':>9}{'peak RSS':>10}{'x loop':>8}"
        f"  {'peak in':<15}{'first loss':>10}"
    )
    for r in results:
        print(
            f"{r['way']:<27}{r['step_s']:>9.3f}{r['step_s'] / base['step_s']:>8.2f}{r['cpu_s']:>8.2f}"
            f"{r['cpu_s'] / base['cpu_s']:>8.2f}{r['before_gib']:>12.2f}"
            f"{r['between_gib']:>9.2f}{r['peak_rss_gib']:>10.2f}{r['peak_rss_gib'] / base['peak_rss_gib']:>8.2f}"
            f"  {r['peak_phase']:<15}{r['first_loss']:>10.5f}"
        )
    print("step: median wall time; CPU: median process CPU time of a step, all threads (steadier on a shared machine)")
    print("RSS in GiB: before the first step, between steps (after the last), peak (ru_maxrss)")


if __name__ == "__main__":
    main()
