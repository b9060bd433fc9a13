"""Evaluate a trained run with lmms-eval (pip package `lmms-eval`): its benchmarks, or a task of your own.

    python -m tools.lmms_eval --model_args run=runs/quickstart/defaults --tasks mme --batch_size 8
    python -m tools.lmms_eval --model_args 'run="runs/quickstart/encoder=sam_vit_b,lr=3e-4",checkpoint=best' \\
        --tasks my_task --include_path my_tasks/ --log_samples --output_path results/

lmms-eval is the `eval` extra (`pip install -e '.[eval]'`; without it this says so and exits 2). The project
declares no lmms-eval entry point, so the launcher registers `VLMLightning` as lmms-eval model `vlm_lightning`,
adds `--model vlm_lightning` when no --model is given, and hands every argument to lmms-eval's own command line
(`python -m tools.lmms_eval --help` lists them).
Model args: `run` (run directory or checkpoint file; in quotes when its name has a comma, as lmms-eval
splits model args at commas), `checkpoint` (last | best), `max_new_tokens` (when a task sets none; default
the run's eval.max_new_tokens), and `key=value` with a dotted key is an override of the config stored in
the checkpoint (e.g. model.llm.path=...). Batch size and device: lmms-eval's --batch_size and --device.
lmms-eval prints an error during evaluation with its traceback and still exits 0 (--verbosity DEBUG
raises it instead). From Python:

    from lmms_eval.evaluator import simple_evaluate
    results = simple_evaluate(model=VLMLightning("runs/quickstart/defaults"), tasks=["my_task"], ...)

Each request runs through `lit_modules.predictor.Predictor` (the run's template, image preprocessing and stop
tokens), so an answer here is the answer `tools.predict` and validation give. One image per question
(or none); video and audio inputs are refused. `loglikelihood` follows lmms-eval's convention: the
continuation's negative log-likelihood (its multiple-choice tasks pick the lowest). Single process.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from datamodules.images import to_rgb
from datamodules.llava_data import LLaVADataset, Sample, collate
from foundation.errors import needs_extra, run_command
from foundation.schema import ConfigError
from inference.load import find_checkpoint, load_predictor
from lit_modules.predictor import PLACEHOLDER_ANSWER, Predictor

# lmms-eval is the `eval` extra (pyproject.toml): without it `python -m tools.lmms_eval` says so in one line.
with needs_extra("eval", "tools.lmms_eval", command=__name__ == "__main__"):
    from lmms_eval.api.instance import GenerationResult
    from lmms_eval.api.model import lmms

MODEL_NAME = "vlm_lightning"  # the name lmms-eval knows this adapter by (`--model vlm_lightning`)
MODEL_ARGS = ("run", "checkpoint", "max_new_tokens")  # plus config overrides: any key with a dot


def unquote(value):
    """lmms-eval splits model args at commas outside quotes and keeps the quotes: a run directory named
    by its overrides (`runs/quickstart/encoder=sam_vit_b,lr=3e-4`) is given as run="...", unquoted here."""
    if isinstance(value, str) and len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def check_model_args(args: dict) -> None:
    """Refuse unknown model args and a `run` that is not a checkpoint or run directory (FileNotFoundError
    names it), before lmms-eval loads any dataset."""
    unknown = [k for k in args if k not in MODEL_ARGS and "." not in k]
    if unknown:
        raise ConfigError(
            f"unknown model args {unknown}; valid: {', '.join(MODEL_ARGS)} and config overrides (dotted keys)"
        )
    if not args.get("run"):
        raise ConfigError("model args need run=<run directory or checkpoint file>")
    if not isinstance(args["run"], Predictor):
        find_checkpoint(unquote(str(args["run"])), args.get("checkpoint", "last"))


class VLMLightning(lmms):
    """A run of this repo as an lmms-eval model (a "simple" model: lmms-eval builds its prompts as text).

    Args:
        run: run directory or checkpoint file (inference.load.load_predictor), or a `Predictor` already loaded.
        checkpoint: "last" or "best" checkpoint of a run directory.
        max_new_tokens: answer budget when a task's generation_kwargs set none (None: the run's
            eval.max_new_tokens).
        batch_size: requests per forward pass (lmms-eval's --batch_size).
        device: where the model runs (lmms-eval's --device); None: cuda when available, else cpu.
        max_batch_size: lmms-eval passes it with --max_batch_size; unused (no automatic batch size).
        **overrides: dotted config keys, `key=value` overrides of the config stored in the checkpoint.
    """

    is_simple = True

    def __init__(
        self,
        run: str | Predictor,
        checkpoint: str = "last",
        max_new_tokens: int | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        max_batch_size: int | None = None,
        **overrides,
    ) -> None:
        super().__init__()
        check_model_args(dict(overrides, run=run, checkpoint=checkpoint))
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # lmms-eval would hand every process every request
            raise RuntimeError(f"{MODEL_NAME} runs in one process; launch without accelerate/torchrun")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(run, Predictor):
            self.predictor = run
        else:
            overrides = [f"{k}={unquote(v)}" for k, v in overrides.items()]
            self.predictor = load_predictor(unquote(str(run)), checkpoint, overrides)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else None
        self.predictor.module.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # ---- requests -> LLaVA-format records ---------------------------------------------------------
    def _visuals(self, args: tuple) -> list:
        """The request's images: args = (context, gen_kwargs | target, doc_to_visual, doc_id, task, split);
        the unconditional requests of acc_mutual_info are (context, continuation) alone."""
        if len(args) < 6:
            return []
        doc_to_visual, doc_id, task, split = args[2:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if callable(doc_to_visual) else doc_to_visual
        visuals = [visuals] if isinstance(visuals, Image.Image) else [v for v in visuals or [] if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"{task} doc {doc_id}: {len(visuals)} images; this model takes one image per question")
        if visuals and not isinstance(visuals[0], Image.Image):
            raise TypeError(f"{task} doc {doc_id}: a {type(visuals[0]).__name__} visual; only images are supported")
        return visuals

    def _record(self, index: int, args: tuple, folder: str, answer: str = PLACEHOLDER_ANSWER) -> dict:
        """A one-turn record of a request; its image is written to `folder` as PNG (lossless), because the
        Predictor's pipeline reads images from files (`LLaVADataset`): the file gives back these pixels."""
        context, visuals = args[0], self._visuals(args)
        record = {"id": str(index), "conversations": [{"from": "human", "value": context}]}
        if visuals:
            record["image"] = f"{index}.png"
            # What `load_image` makes of a file (EXIF orientation, RGB on white): a file route would see it.
            to_rgb(ImageOps.exif_transpose(visuals[0])).save(os.path.join(folder, record["image"]))
            token = self.predictor.datamodule.image_token
            if token not in context:  # as lmms-eval's llava: the image first, on a line of its own
                record["conversations"][0]["value"] = f"{token}\n{context}"
        record["conversations"].append({"from": "gpt", "value": answer})
        return record

    # ---- generation ---------------------------------------------------------------------------
    def _generation_options(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """lmms-eval's generation_kwargs -> the Predictor's options and the `until` strings."""
        gen = dict(gen_kwargs or {})
        until = gen.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen.get("temperature") or 0.0)
        if gen.get("do_sample") is False:
            temperature = 0.0
        elif gen.get("do_sample") and temperature == 0.0:
            temperature = 1.0  # transformers' default temperature when sampling
        if (gen.get("num_beams") or 1) > 1:
            raise ValueError(f"num_beams={gen['num_beams']}: beam search is not supported (greedy or sampling)")
        top_p = 1.0 if gen.get("top_p") is None else float(gen["top_p"])
        max_new_tokens = gen.get("max_new_tokens") or self.max_new_tokens
        return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}, until

    def generate_until(self, requests) -> list[str]:
        # Requests with the same generation settings are batched together, in their order.
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        answers: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for indices in groups.values():
            options, until = self._generation_options(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                with tempfile.TemporaryDirectory() as folder:
                    records = [self._record(k, requests[i].args, folder) for k, i in enumerate(chunk)]
                    outputs = self.predictor.answer_records(records, folder, self.batch_size, **options)
                for i, text in zip(chunk, outputs):
                    answers[i] = cut_at(text, until)
                bar.update(len(chunk))
        bar.close()
        return answers

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME}: generate_until_multi_round is not implemented")

    # ---- scoring ------------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[GenerationResult]:
        """`score`'s pairs, each in a `GenerationResult`: lmms-eval 0.7's evaluator passes every response
        through `unwrap_generation_output`, which turns a (float, bool) tuple into its str() (every
        multiple-choice task then fails to unpack it) but hands a GenerationResult's `text` on as is."""
        return [GenerationResult(pair) for pair in self.score(requests)]

    def score(self, requests) -> list[tuple[float, bool]]:
        """(negative log-likelihood of the continuation, summed over its tokens; whether greedy decoding
        gives it) for each loglikelihood request. The continuation is the answer turn of the run's
        template and the context its question turn (with the image), as in training; the template's
        end-of-turn token is not counted. The sign is lmms-eval's: its multiple-choice tasks pick the
        choice with the lowest value (its own models return a loss)."""
        results = []
        for start in tqdm(range(0, len(requests), self.batch_size), disable=self.rank != 0, desc="Scoring"):
            chunk = requests[start : start + self.batch_size]
            with tempfile.TemporaryDirectory() as folder:
                records = [self._scored_record(k, r.args, folder) for k, r in enumerate(chunk)]
                results += self._score_batch(records, folder)
        return results

    def _scored_record(self, index: int, args: tuple, folder: str) -> dict:
        target = args[1]
        if callable(target):  # output_type loglikelihood passes doc_to_target
            _, _, doc_id, task, split = args[1:6]
            target = target(self.task_dict[task][split][doc_id])
        # lm-eval's target_delimiter (" ") separates raw text; an answer turn has the template's separators.
        return self._record(index, args, folder, answer=str(target).strip())

    @torch.no_grad()
    def _score_batch(self, records: list[dict], folder: str) -> list[tuple[float, bool]]:
        module, dm = self.predictor.module, self.predictor.datamodule
        # The dataset `Predictor.answer_records` builds, with the continuation as the answer turn.
        samples = [Sample(r, k, 0, "image" in r) for k, r in enumerate(records)]
        dataset = LLaVADataset(
            samples, "(lmms-eval)", folder, dm.encode, dm.transform, dm.image_token_id, dm.image_tokens
        )
        batch = collate([dataset[k] for k in range(len(dataset))], dm.tokenizer.pad_token_id)
        pixels = batch["pixel_values"]
        training = module.training
        module.eval()
        try:
            logits = module.model(
                batch["input_ids"].to(module.device),
                batch["attention_mask"].to(module.device),
                None if pixels is None else pixels.to(module.device),
                image_sizes=batch.get("image_sizes"),  # [M, 2] with a tiling (AnyRes): the views' images
            ).logits  # [B, T, V]
        finally:
            module.train(training)
        results = []
        for b in range(len(records)):
            ids, labels = batch["input_ids"][b], batch["labels"][b]  # [T]
            positions = (labels != -100).nonzero().flatten().tolist()  # the answer turn's tokens
            if positions and int(ids[positions[-1]]) in module.stop_ids:
                positions = positions[:-1]  # the end-of-turn token is the template's, not the continuation's
            targets = ids[positions].to(module.device)
            # Token t is predicted from position t - 1.
            logprobs = logits[b, [p - 1 for p in positions]].float().log_softmax(-1)  # [n, V]
            nll = -logprobs.gather(1, targets[:, None]).sum().item()
            results.append((nll, bool((logprobs.argmax(-1) == targets).all())))
        return results


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any of the `until` strings (empty ones ignored)."""
    cuts = [text.find(s) for s in until if s and s in text]
    return text[: min(cuts)] if cuts else text


def register() -> None:
    """Make `--model vlm_lightning` known to lmms-eval's model registry (the project declares no
    lmms-eval entry point)."""
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest

    path = f"tools.lmms_eval.{VLMLightning.__name__}"  # importable as such, also when this runs as __main__
    MODEL_REGISTRY_V2.register_manifest(ModelManifest(MODEL_NAME, simple_class_path=path), overwrite=True)


def _option(argv: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` in `argv`, else None."""
    for k, arg in enumerate(argv):
        if arg == name and k + 1 < len(argv):
            return argv[k + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        argv = ["--help"]
    elif _option(argv, "--model") is None:
        argv = ["--model", MODEL_NAME, *argv]
    listing = (_option(argv, "--tasks") or "").startswith("list")  # `--tasks list`: no model is loaded
    if _option(argv, "--model") == MODEL_NAME and _option(argv, "--config") is None and not listing:
        from lmms_eval.utils import simple_parse_args_string

        # A user's mistake is one line (run_command) before lmms-eval loads its tasks, not a traceback after.
        check_model_args(simple_parse_args_string(_option(argv, "--model_args") or ""))
    register()
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    sys.argv = ["lmms-eval", "eval", *argv]  # `eval`: lmms-eval's evaluation command with all its options
    lmms_eval_main()
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))  # a user-fixable error: one line `error: ...`, status 2
