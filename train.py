"""Train a VLM from one experiment YAML.

    python train.py                                   # experiments/quickstart.yaml
    python train.py experiments/X.yaml key=value ...  # any experiment, with overrides
    python train.py experiments/X.yaml --describe     # parts, parameters and token budget; no weights read
    python train.py X.yaml --describe --image-size 768x1024   # + the image tokens of a 768 x 1024 image (AnyRes)

The command line only: the work is done by experiment.runner.run (config -> seed -> datamodule -> module ->
logger/callbacks -> trainer -> fit). A config, data or checkpoint error that the user can fix prints
one line and exits with status 2 (foundation.errors, shared with the tools).
"""

from __future__ import annotations

import argparse
import sys

from experiment.config import DEFAULT_EXPERIMENT, load_config
from foundation.errors import run_command


def _height_by_width(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    if not (h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH in pixels, e.g. 768x1024")
    return int(h), int(w)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0], epilog="Overrides: `key=value`, e.g. optim.lr=3e-4"
    )
    parser.add_argument("experiment", nargs="?", help=f"experiment YAML (default: {DEFAULT_EXPERIMENT})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
    parser.add_argument("--describe", action="store_true", help="print parts, parameters and token budget; no training")
    parser.add_argument(
        "--image-size",
        action="append",
        type=_height_by_width,
        metavar="HxW",
        help="with --describe: an image size (height x width px) whose image-token count to show; repeatable",
    )
    args = parser.parse_intermixed_args(argv)  # `--describe` may come anywhere among the overrides
    if args.experiment is not None and "=" in args.experiment:  # overrides without an experiment file
        args.overrides.insert(0, args.experiment)
        args.experiment = None
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    cfg = load_config(args.experiment, args.overrides)
    if args.describe:
        from experiment.describe import describe

        print(describe(cfg, image_sizes=args.image_size))
        return
    from experiment.runner import run

    run(cfg)


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))  # a user-fixable error: one line `error: ...`, status 2
