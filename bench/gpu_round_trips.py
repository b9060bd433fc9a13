"""Strategies and QLoRA on a GPU: train, stop, resume from the strategy's own checkpoint, compare.

    python bench/gpu_round_trips.py                            # every case
    python bench/gpu_round_trips.py fsdp_sharded deepspeed_3   # some of them
    python bench/gpu_round_trips.py --steps 12 --out results.json

Each case trains the quickstart model through `train.py` (a subprocess, as a user runs it) on one GPU
in bf16-mixed at a constant learning rate, with the encoder frozen so that wrapped units mix frozen and
trainable weights, three times:

    full     max_steps=2N                       one uninterrupted run
    split    max_steps=N, then max_steps=2N resume=auto   stopped at N, resumed from its checkpoint

and compares `train/loss` of `split` with `full` at every step (the TensorBoard event files). It also
compares each case's uninterrupted curve with the plain single-device run's (`single`), and reports
what the checkpoint is on disk (one file, or a directory of shards) and its size. Cases run side by
side, each with its own rendezvous port. A case whose library is missing (DeepSpeed, bitsandbytes) is
reported as skipped with the reason. Results: a table on stdout and, with --out, JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LORA = "model.llm.lora={r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}"
CASES = {
    "single": [],
    "fsdp_sharded": ["trainer.strategy={name: fsdp, state_dict_type: sharded}"],
    "fsdp_full": ["trainer.strategy={name: fsdp, state_dict_type: full}"],
    "deepspeed_2": ["trainer.strategy={name: deepspeed, stage: 2}"],
    "deepspeed_3": ["trainer.strategy={name: deepspeed, stage: 3}"],
    "lora_bf16": ["model.llm.config=null", "model.llm.path={base}", LORA],
    "qlora_4bit": ["model.llm.config=null", "model.llm.path={base}", LORA, "model.llm.quantization=4bit"],
    "qlora_8bit": ["model.llm.config=null", "model.llm.path={base}", LORA, "model.llm.quantization=8bit"],
    # the optimizer's memory options (lit_modules/optimizer.py) on CUDA: stepped inside backward, then 8-bit states
    # on bitsandbytes' fused CUDA kernel (the CPU tests cover the project's CPU step, lit_modules/adamw8bit.py)
    "in_backward": ["optim.in_backward=true", "trainer.gradient_clip_val=null"],
    "adamw_8bit": ["optim.states=8bit", "optim.in_backward=true", "trainer.gradient_clip_val=null"],
}
NEEDS = {
    "deepspeed_2": "deepspeed",
    "deepspeed_3": "deepspeed",
    "qlora_4bit": "bitsandbytes",
    "qlora_8bit": "bitsandbytes",
    "adamw_8bit": "bitsandbytes",
}
# the uninterrupted curve each case is compared with (in_backward's differs from single's, which clips gradients;
# 8-bit states follow in_backward's fp32 AdamW up to their rounding)
REFERENCE = {"qlora_4bit": "lora_bf16", "qlora_8bit": "lora_bf16", "adamw_8bit": "in_backward"}


def common_overrides(work: str, steps: int, device: list[str]) -> list[str]:
    return [
        f"logging.root={work}/runs",
        f"data.builtin.root={work}/shapes",
        "data.builtin.num_train=1024",
        "data.builtin.num_val=16",
        "data.num_workers=2",
        "trainable=[projector,llm]",
        "trainer.devices=1",
        *device,
        "trainer.deterministic=warn",
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "optim.warmup_ratio=0",
        "optim.min_lr_ratio=1.0",
        f"checkpoint.every_n_train_steps={steps}",
    ]


def train(args: list[str], env: dict, log: str) -> tuple[int, float]:
    start = time.time()
    with open(log, "a") as out:
        out.write("$ train.py " + " ".join(args) + "\n")
        out.flush()
        rc = subprocess.call([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=out, stderr=out)
    return rc, time.time() - start


def losses(run_dir: str) -> dict[int, float]:
    from tools.compare import scalars

    return dict(scalars(run_dir).get("train/loss", []))


def checkpoint_on_disk(run_dir: str) -> dict:
    path = os.path.join(run_dir, "checkpoints", "last.ckpt")
    if not os.path.exists(path):
        return {"kind": "missing"}
    if os.path.isfile(path):
        return {"kind": "file", "MB": round(os.path.getsize(path) / 2**20, 2)}
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    return {"kind": f"directory, {len(files)} files", "MB": round(sum(map(os.path.getsize, files)) / 2**20, 2)}


def prepare(work: str, steps: int, device: list[str]) -> str:
    """The shapes data (written once, before the cases run side by side) and LoRA's frozen base: the
    quickstart's LLM (random init) and tokenizer saved as a pretrained directory."""
    from experiment.assemble import build_datamodule, build_module, build_tokenizer
    from experiment.config import load_config

    path = os.path.join(work, "base-llm")
    cfg = load_config(None, common_overrides(work, steps, device))
    tokenizer = build_tokenizer(cfg)
    build_datamodule(cfg, tokenizer)
    build_module(cfg, tokenizer).model.llm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_case(name: str, work: str, steps: int, device: list[str], port: int, base: str) -> dict:
    need = NEEDS.get(name)
    if need and importlib.util.find_spec(need) is None:
        return {"case": name, "skipped": f"{need} is not installed"}
    log = os.path.join(work, f"{name}.log")
    env = dict(os.environ, MASTER_PORT=str(port), CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONUNBUFFERED="1")
    args = ["experiments/quickstart.yaml", *common_overrides(work, steps, device)]
    args += [a.replace("{base}", base) for a in CASES[name]]
    args += [f"name=rt_{name}"]
    result: dict = {"case": name, "log": log}
    runs = [
        ("full", [f"trainer.max_steps={2 * steps}", "logging.run_name=full"]),
        ("split_first", [f"trainer.max_steps={steps}", "logging.run_name=split"]),
        ("split_resumed", [f"trainer.max_steps={2 * steps}", "logging.run_name=split", "resume=auto"]),
    ]
    for label, extra in runs:
        rc, seconds = train(args + extra, env, log)
        result[f"{label}_s"] = round(seconds, 1)
        if rc != 0:
            result["failed"] = f"{label} exited {rc}; see {log}"
            return result
    run_root = os.path.join(work, "runs", f"rt_{name}")
    full, split = losses(os.path.join(run_root, "full")), losses(os.path.join(run_root, "split"))
    result["full"], result["split"] = full, split
    result["checkpoint"] = checkpoint_on_disk(os.path.join(run_root, "split"))
    common = sorted(set(full) & set(split))
    result["steps_compared"] = len(common)
    result["resumed_max_abs_diff"] = max((abs(full[s] - split[s]) for s in common), default=None)
    result["resumed_exact"] = bool(common) and all(full[s] == split[s] for s in common)
    return result


def table(results: list[dict]) -> str:
    head = (
        f"{'case':<14}{'steps':>6}{'resume max|d|':>15}{'exact':>7}{'vs ref max|d|':>15}  {'checkpoint':<28}{'MB':>8}"
    )
    lines = [head]
    for r in results:
        if "skipped" in r or "failed" in r:
            lines.append(f"{r['case']:<14}  {r.get('skipped') or r.get('failed')}")
            continue
        ref = r.get("vs_reference_max_abs_diff")
        lines.append(
            f"{r['case']:<14}{r['steps_compared']:>6}{r['resumed_max_abs_diff']:>15.3g}{str(r['resumed_exact']):>7}"
            f"{'-' if ref is None else format(ref, '.3g'):>15}  "
            f"{r['checkpoint']['kind']:<28}{r['checkpoint'].get('MB', 0):>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help=f"cases to run (default: all): {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=10, help="N: the split run stops at N of 2N steps")
    parser.add_argument("--work", help="folder for data, runs and logs (default: a temporary one)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--accelerator", default="gpu", help=argparse.SUPPRESS)  # cpu: try the script itself
    parser.add_argument("--precision", default="bf16-mixed", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    import torch

    unknown = [n for n in a.cases if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from: {', '.join(CASES)}")
    if a.accelerator == "gpu" and not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    device = [f"trainer.accelerator={a.accelerator}", f"trainer.precision={a.precision}"]
    names = a.cases or list(CASES)
    work = a.work or tempfile.mkdtemp(prefix="round_trips_")
    os.makedirs(work, exist_ok=True)
    base = prepare(work, a.steps, device)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(names)) as pool:
        futures = [pool.submit(run_case, n, work, a.steps, device, 29500 + 7 * i, base) for i, n in enumerate(names)]
        results = [f.result() for f in futures]
    by_name = {r["case"]: r for r in results}
    for r in results:
        ref = by_name.get(REFERENCE.get(r["case"], "single"))
        if r["case"] != "single" and ref and "full" in r and "full" in ref:
            common = set(r["full"]) & set(ref["full"])
            r["reference"] = ref["case"]
            r["vs_reference_max_abs_diff"] = max(abs(r["full"][s] - ref["full"][s]) for s in common)
    name = torch.cuda.get_device_name(0) if a.accelerator == "gpu" else a.accelerator
    print(f"device: {name}; torch {torch.__version__}; work: {work}")
    print(table(results))
    for r in results:
        if "full" in r:
            steps = sorted(r["full"])
            first, last = steps[0], steps[-1]
            print(f"{r['case']}: train/loss step {first} {r['full'][first]:.4f} -> step {last} {r['full'][last]:.4f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all("failed" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
