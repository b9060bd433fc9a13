"""Compare runs side by side: their key settings and final / best metrics, and a PNG of the main curves.

    python -m tools.compare runs/quickstart/defaults runs/compare_clip_tiny/defaults
    python -m tools.compare runs/compare_*  --png compare.png     # an experiment folder means all its runs

Each run directory is what train.py writes: `config.yaml` (the resolved config) and TensorBoard event
files. Settings shown: encoder, reducer, enhancer, tiling (with its options), projector, LLM, stage, trainable
parts, lr, batch size and the run's command-line overrides; metrics: the last and best value of every `val/*`
scalar (best = min for losses, max otherwise) and the last `train/loss`.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from foundation.errors import run_command

CURVES = ("train/loss", "val/loss", "val/exact_match")


def run_dirs(paths: list[str]) -> list[str]:
    """Run directories (holding config.yaml) from run or experiment directories."""
    found = []
    for path in paths:
        if os.path.exists(os.path.join(path, "config.yaml")):
            found.append(path)
            continue
        inner = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "*", "config.yaml")))
        if not inner:
            raise FileNotFoundError(f"{path}: no config.yaml here or in its subdirectories: not a run directory")
        found += inner
    return found


def scalars(run: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the run's event files."""
    ea = EventAccumulator(run, size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def settings(cfg: dict) -> dict[str, str]:
    model, llm = cfg.get("model", {}), cfg.get("model", {}).get("llm", {})
    inline = llm.get("config") or {}
    tiling = {k: v for k, v in (model.get("tiling") or {}).items() if v is not None}
    return {
        "encoder": str(model.get("encoder", {}).get("name")),
        "reducer": str((model.get("reducer") or {}).get("name", "-")),
        "enhancer": str((model.get("enhancer") or {}).get("name", "-")),
        # with its options: two AnyRes runs differ by their grid pinpoints or max_tiles, not by the name
        "tiling": " ".join([str(tiling.get("name", "-"))] + [f"{k}={v}" for k, v in tiling.items() if k != "name"]),
        "projector": str(model.get("projector")),
        "llm": str(llm.get("path") or f"{inline.get('model_type')} (inline config)"),
        "stage": str(cfg.get("stage")),
        "trainable": ",".join(cfg.get("trainable") or ["(stage default)"]),
        "lr": str(cfg.get("optim", {}).get("lr")),
        "batch_size": str(cfg.get("data", {}).get("batch_size")),
        "overrides": " ".join(cfg.get("overrides") or []) or "-",
    }


def metrics(curves: dict[str, list[tuple[int, float]]]) -> dict[str, str]:
    out = {}
    for tag in sorted(t for t in curves if t.startswith("val/") or t == "train/loss"):
        values = [v for _, v in curves[tag]]
        out[f"{tag} last"] = f"{values[-1]:.4g}"
        if tag.startswith("val/"):
            best = min(values) if "loss" in tag else max(values)
            out[f"{tag} best"] = f"{best:.4g}"
    steps = [s for points in curves.values() for s, _ in points]
    out["last logged step"] = str(max(steps) if steps else 0)  # TensorBoard's 0-based step
    return out


def table(columns: dict[str, dict[str, str]]) -> str:
    """Rows = settings and metrics, one column per run."""
    rows = list(dict.fromkeys(k for col in columns.values() for k in col))
    names = list(columns)
    width = [max(len(n), *(len(columns[n].get(r, "-")) for r in rows)) for n in names]
    first = max(len(r) for r in rows)
    lines = [" " * first + "  " + "  ".join(n.ljust(w) for n, w in zip(names, width))]
    for r in rows:
        lines.append(r.ljust(first) + "  " + "  ".join(columns[n].get(r, "-").ljust(w) for n, w in zip(names, width)))
    return "\n".join(lines)


def plot(curves_by_run: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    for ax, tag in zip(axes, CURVES):
        for run, curves in curves_by_run.items():
            if tag in curves:
                steps, values = zip(*curves[tag])
                ax.plot(steps, values, label=run, marker="." if len(steps) < 30 else None)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(paths: list[str], png: str | None = None) -> str:
    """The side-by-side table of the runs under `paths` (and the curves written to `png`)."""
    runs = run_dirs(paths)
    columns, curves_by_run = {}, {}
    for run in runs:
        name = os.path.relpath(run, os.path.commonpath(runs)) if len(runs) > 1 else os.path.basename(run)
        with open(os.path.join(run, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        curves = scalars(run)
        curves_by_run[name] = curves
        columns[name] = {**settings(cfg), **metrics(curves)}
    if png:
        plot(curves_by_run, png)
    return table(columns)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories, or experiment directories (all their runs)")
    parser.add_argument("--png", help="also write the main curves to this PNG file")
    args = parser.parse_args(argv)
    print(compare(args.runs, args.png))
    if args.png:
        print(f"curves: {args.png}")


if __name__ == "__main__":
    sys.exit(run_command(main))  # a user-fixable error: one line `error: ...`, status 2
