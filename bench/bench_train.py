"""Training throughput of experiments: N real training steps each, medians over the steps after warm-up.

    python bench/bench_train.py                                              # experiments/quickstart.yaml
    python bench/bench_train.py experiments/X.yaml key=value ... --steps 30 --warmup 5
    python bench/bench_train.py experiments/a.yaml experiments/b.yaml         # several experiments
    python bench/bench_train.py experiments/X.yaml --compare "data.batch_size=8" "data.batch_size=16 optim.lr=1e-4"
    python bench/bench_train.py experiments/X.yaml trainer.precision=bf16-mixed --peak-tflops 989

Every experiment x every `--compare` override set (space-separated key=value) is one run; the
`key=value` arguments apply to all. Each run is a fresh subprocess (so peak memory is its own) that
builds the model and data as train.py does and fits `--warmup + --steps` steps with no validation,
no checkpoints and no logger. Per step (lit_modules/callbacks/throughput.py's StepThroughput): the time from the
previous step's end, the part of it spent waiting for data, samples, image / text tokens, and the
step's FLOPs from model/flops.py. Printed: medians over the steps after warm-up of step time,
samples/s, text and image tokens/s, data-wait fraction, TFLOP/s; peak memory (CUDA: max allocated;
CPU: the process's peak RSS); MFU = TFLOP/s / peak TFLOP/s where the peak is known: `--peak-tflops`,
or an H100 / H200 at bf16 / fp16 precision, whose dense peak is 989 TFLOP/s (SXM datasheet; sparsity
doubles it, which MFU does not use).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "BENCH_RESULT "
DENSE_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0}  # NVIDIA H100 / H200 SXM, dense bf16 / fp16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", help="experiment YAMLs and key=value overrides for all runs")
    parser.add_argument("--compare", nargs="+", default=[""], help='override sets, e.g. "data.batch_size=8"')
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps run before timing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: detected)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one run, JSON spec
    return parser.parse_args(argv)


def run_one(spec: dict) -> dict:
    """Fit warmup + steps steps of one experiment in this process; per-step records of the timed steps."""
    sys.path.insert(0, ROOT)
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    from experiment.assemble import build_datamodule, build_module, build_tokenizer
    from experiment.config import load_config
    from experiment.strategy import build_strategy
    from lit_modules.callbacks import StepThroughput

    total = spec["warmup"] + spec["steps"]
    cfg = load_config(spec["experiment"], spec["overrides"])
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = build_tokenizer(cfg)
    datamodule = build_datamodule(cfg, tokenizer)
    module = build_module(cfg, tokenizer)
    args = OmegaConf.to_container(cfg.trainer)
    args["strategy"] = build_strategy(args.get("strategy"), module)
    for key in ("val_check_interval", "check_val_every_n_epoch", "max_time"):
        args.pop(key, None)
    args.update(
        max_steps=total, max_epochs=-1, limit_val_batches=0, enable_checkpointing=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    history = StepThroughput(every_n_steps=10**9, keep_history=True)
    trainer = L.Trainer(**args, callbacks=[history], use_distributed_sampler=False)
    trainer.fit(module, datamodule=datamodule)
    steps = history.history[spec["warmup"] :]
    device = trainer.strategy.root_device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"steps": steps, "device": name, "precision": str(cfg.trainer.get("precision"))}


def peak_tflops(device: str, precision: str, given: float | None) -> float | None:
    if given is not None:
        return given
    if precision.startswith(("bf16", "16")):
        for chip, tflops in DENSE_BF16_TFLOPS.items():
            if chip in device.lower():
                return tflops
    return None


def summarise(result: dict, peak: float | None) -> dict:
    steps = result["steps"]
    med = lambda key: statistics.median(s[key] / s["step_time"] for s in steps)  # noqa: E731  per-step rate
    flops = [s["flops"] for s in steps if s["flops"]]
    tflops = statistics.median(s["flops"] / s["step_time"] for s in steps) / 1e12 if len(flops) == len(steps) else None
    return {
        "step s": statistics.median(s["step_time"] for s in steps),
        "samples/s": med("samples"),
        "text tok/s": med("text_tokens"),
        "image tok/s": med("image_tokens"),
        "data wait": med("data_wait"),
        "peak GiB": max(s["peak_memory_gib"] for s in steps),
        "TFLOP/s": tflops,
        "MFU": tflops / peak if tflops is not None and peak else None,
    }


def table(rows: list[tuple[str, dict]]) -> str:
    cols = list(rows[0][1])
    fmt = {"data wait": "{:.1%}", "MFU": "{:.1%}", "TFLOP/s": "{:.4g}", "step s": "{:.3f}", "peak GiB": "{:.2f}"}
    width = max(len(r) for r, _ in rows)
    lines = [f"{'run':<{width}}" + "".join(f"{c:>13}" for c in cols)]
    for run, values in rows:
        cells = ["-" if values[c] is None else fmt.get(c, "{:,.0f}").format(values[c]) for c in cols]
        lines.append(f"{run:<{width}}" + "".join(f"{v:>13}" for v in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.worker:
        print(MARK + json.dumps(run_one(json.loads(a.worker))), flush=True)
        return
    experiments = [x for x in a.args if "=" not in x] or [os.path.join(ROOT, "experiments", "quickstart.yaml")]
    common = [x for x in a.args if "=" in x]
    rows, device = [], None
    for experiment in experiments:
        for extra in a.compare:
            overrides = common + extra.split()
            with tempfile.TemporaryDirectory() as runs:  # nothing the run writes outlives it
                spec = {
                    "experiment": experiment,
                    "overrides": [f"logging.root={runs}", *overrides],
                    "steps": a.steps,
                    "warmup": a.warmup,
                }
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            # a row names its experiment and its --compare set; the overrides every run shares are printed once
            label = " ".join([os.path.relpath(experiment, ROOT), *extra.split()])
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
            if proc.returncode or not lines:
                print(f"{label}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(lines[-1][len(MARK) :])
            device = result["device"]
            peak = peak_tflops(device, result["precision"], a.peak_tflops)
            rows.append((label, summarise(result, peak)))
            print(f"done: {label}", file=sys.stderr, flush=True)
    if rows:
        print(f"device: {device}; medians over {a.steps} steps after {a.warmup} warm-up steps")
        if common:
            print("every run with: " + " ".join(common))
        print(table(rows))


if __name__ == "__main__":
    main()
