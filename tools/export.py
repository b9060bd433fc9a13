"""Export a trained run to transformers' LLaVA format (model + processor), for transformers, vLLM, lmms-eval.

    python -m tools.export runs/X/defaults exported/X [--checkpoint best]

See inference/export.py for what can be exported and how the parts map.
"""

from __future__ import annotations

import argparse
import sys

from foundation.errors import run_command
from inference.export import export_llava
from inference.load import load_predictor


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory or checkpoint file")
    parser.add_argument("out_dir", help="directory for the transformers model and processor")
    parser.add_argument("--checkpoint", default="last", choices=["last", "best"])
    args = parser.parse_args(argv)
    predictor = load_predictor(args.run, args.checkpoint)
    out = export_llava(predictor.module, predictor.datamodule.template, args.out_dir)
    print(f"exported: {out}  (AutoModelForImageTextToText / AutoProcessor .from_pretrained)")
    return out


if __name__ == "__main__":
    sys.exit(run_command(main))  # a user-fixable error: one line `error: ...`, status 2
