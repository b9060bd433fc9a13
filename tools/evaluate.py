"""Score a trained run on benchmark files with the official metrics.

    python -m tools.evaluate runs/quickstart/defaults                       # the sets in the run's config
    python -m tools.evaluate runs/X/defaults 'eval.sets=[{name: textvqa, file: data/textvqa_val.json,
        image_folder: data/textvqa/images, metric: vqa_accuracy, options: {protocol: textvqa},
        prompt_suffix: "\\nAnswer the question using a single word or phrase."}]'

    python -m tools.evaluate experiments/X.yaml model.from_hf=/models/llava-1.5-7b-hf 'eval.sets=[...]'
                                             # a released model (or any recipe) before training, as a baseline

The sets come from the run's stored config, changed by `key=value` overrides (the file format is in
foundation/schema.py `EvalSetConfig`; metrics in metrics/). Prints one line per set and metric key
and writes every score and answer to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys

from omegaconf import OmegaConf

from experiment.config import config_from_dict
from foundation.errors import run_command
from foundation.schema import ConfigError
from inference.load import load_predictor
from lit_modules.benchmarks import evaluate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="run directory, checkpoint file, or an experiment YAML (its untrained model)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.sets=[...]")
    parser.add_argument("--checkpoint", default="last", choices=["last", "best"])
    parser.add_argument("--out", default="scores.json", help="JSON with every score and answer")
    args = parser.parse_args(argv)
    predictor = load_predictor(args.run, args.checkpoint, args.overrides)
    cfg = config_from_dict(predictor.module.hparams["config"], args.overrides)
    sets = OmegaConf.to_object(cfg.eval).sets
    if not sets:
        raise ConfigError("the run's config has no eval.sets; give them as an override: eval.sets=[{name: ..., ...}]")
    results = evaluate(predictor, sets, predictor.datamodule.image_token)
    for name, scores in results.items():
        for key, value in scores.items():
            if key != "predictions":
                print(f"{name:<20}{key:<24}{value:.4f}")
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(run_command(main))  # a user-fixable error: one line `error: ...`, status 2
