"""Forward time and memory of vision encoders at their native size, random init.

    python bench/bench_encoders.py                                   # the default set, CPU
    python bench/bench_encoders.py sam_vit_b,image_size=512 clip_vit_l_224 --repeats 5
    python bench/bench_encoders.py --device cuda --dtype bfloat16 --batch-size 8

An encoder is a registry name (`sam_vit_b`, `clip_vit_l_336`, `timm:<model>`, ...) optionally followed
by `,key=value` builder options (values parsed as YAML: `clip,config={hidden_size: 64, ...}`).

Each encoder runs in a fresh subprocess, so memory measured for one is not hidden by another's
allocator caches. Under torch.no_grad(), after `--warmup` calls, the median of `--repeats` timed
calls is reported per image. Memory:
    weights   parameters x bytes per element of --dtype.
    forward   peak memory the forward calls add on top of the built model: on CUDA
              torch.cuda.max_memory_allocated() minus what was allocated before them; on CPU the
              peak resident set size (VmHWM, reset through /proc/self/clear_refs after building;
              the getrusage ru_maxrss delta where that reset is not allowed, a lower bound then)
              minus the resident size before them. tracemalloc would miss torch's allocations.
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

DEFAULT_ENCODERS = ["sam_vit_b", "clip_vit_l_336", "timm:vit_base_patch16_224", "timm:vit_large_patch14_clip_336"]
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "encoders",
        nargs="*",
        default=DEFAULT_ENCODERS,
        help="registry names, each optionally with ,key=value builder options",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one encoder, JSON result
    return parser.parse_args(argv)


def parse_spec(spec: str) -> tuple[str, dict]:
    """`name,key=value,...` -> (name, builder kwargs); commas inside {...} / [...] belong to the value."""
    import yaml

    parts, depth, current = [], 0, ""
    for ch in spec:
        depth += (ch in "{[") - (ch in "}]")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    kwargs = {}
    for item in parts[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"option {item!r} of {spec!r} is not key=value")
        kwargs[key.strip()] = yaml.safe_load(value)
    return parts[0], kwargs


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM and ru_maxrss; Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def measure(spec: str, args: argparse.Namespace) -> dict:
    """Build one encoder and time its forward; runs inside the worker subprocess."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
    from encoders import build_encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    name, kwargs = parse_spec(spec)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: no CPU copy of a large model
        encoder = build_encoder(name, **kwargs)
    encoder = encoder.to(dtype).eval()
    params = sum(p.numel() for p in encoder.parameters())
    pixels = torch.randn(args.batch_size, 3, encoder.image_size, encoder.image_size, device=device, dtype=dtype)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        exact = _reset_peak_rss()
        before = _rss_bytes() if exact else _peak_rss_bytes()
    times = []
    with torch.no_grad():
        for step in range(args.warmup + args.repeats):
            sync()
            start = time.perf_counter()
            tokens = encoder(pixels)
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
            del tokens
    peak = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes()
    return {
        "encoder": spec,
        "image_size": encoder.image_size,
        "tokens": encoder.num_tokens,
        "width": encoder.embed_dim,
        "params": params,
        "weights_bytes": params * torch.finfo(dtype).bits // 8,
        "forward_bytes": max(0, peak - before),
        "seconds_per_image": statistics.median(times) / args.batch_size,
        "threads": torch.get_num_threads(),
        "exact_memory": cuda or exact,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
    }


def run_worker(spec: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        spec,
        "--worker",
        "--batch-size",
        str(args.batch_size),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"encoder": spec, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    w = max([len("encoder")] + [len(r["encoder"]) for r in rows])
    header = (
        f"{'encoder':<{w}} {'px':>5} {'tokens':>6} {'width':>5} {'params':>7} {'weights':>7} {'s/img':>8} "
        f"{'forward':>7}"
    )
    lines = [
        header,
        f"{'':<{w}} {'':>5} {'':>6} {'':>5} {'(M)':>7} {'(MiB)':>7} {'(median)':>8} {'(MiB)':>7}",
        "-" * len(header),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['encoder']:<{w}} failed: {r['error']}")
            continue
        mem = f"{r['forward_bytes'] / MiB:,.0f}" + ("" if r["exact_memory"] else "*")
        lines.append(
            f"{r['encoder']:<{w}} {r['image_size']:>5} {r['tokens']:>6} {r['width']:>5} "
            f"{r['params'] / 1e6:>7.1f} {r['weights_bytes'] / MiB:>7,.0f} {r['seconds_per_image']:>8.3f} "
            f"{mem:>7}"
        )
    if any("error" not in r and not r["exact_memory"] for r in rows):
        lines.append("* peak RSS could not be reset; ru_maxrss delta, a lower bound")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.encoders[0], args)))
        return
    rows = []
    for spec in args.encoders:
        rows.append(run_worker(spec, args))
        print(f"  done: {spec}", file=sys.stderr, flush=True)
    done = [r for r in rows if "error" not in r]
    where = done[0]["device_name"] if done else args.device
    threads = f", {done[0]['threads']} threads" if done and args.device == "cpu" else ""
    print(
        f"random init, {where}{threads}, {args.dtype}, batch {args.batch_size}, torch.no_grad(), "
        f"median of {args.repeats} after {args.warmup} warmup; forward = peak memory added by the forward"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
