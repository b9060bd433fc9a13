"""tools/lmms_eval: lmms-eval runs a checkpoint of this repo through `lit_modules.predictor.Predictor`. On local tasks
written here (the built-in shapes images, no hub), the answers lmms-eval logs are the Predictor's, its scores
are what those answers give, and a loglikelihood is the LLM's own loss on the answer turn; for every kind of
vision tower (timm, CLIP, INF-LLaVA's dual perspective, SAM)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from lmms_eval.api.instance import Instance
from PIL import Image

from datamodules.llava_data import LLaVADataset, Sample
from experiment.assemble import build_datamodule, build_module
from experiment.config import EXPERIMENTS_DIR
from foundation.errors import run_command
from inference.load import load_predictor
from lit_modules.predictor import Predictor
from tests.support.lmms_tasks import record, shapes_docs, write_tasks
from tests.support.paths import REPO
from tests.support.tiny_models import TINY_CLIP_ENCODER
from tools.lmms_eval import VLMLightning, cut_at, main

# name -> (overrides of the shrunk quickstart, experiment file): one of each kind of vision tower
ENCODERS = {
    "timm": ((), None),  # the quickstart's ViT
    "clip": ((TINY_CLIP_ENCODER,), None),
    "inf_llava": ((), os.path.join(EXPERIMENTS_DIR, "inf_llava", "quickstart.yaml")),  # 3 x 3 crops, DEM
    # SAM's preprocessing (longest side, padded) and encoder; `untrained` keeps its first SAM_BLOCKS blocks
    "sam_vit_b": (("model.encoder={name: sam_vit_b, image_size: 32}",), None),
}
# SAM ViT-B's windowed blocks pad even 2 x 2 tokens to a 14 x 14 window (~20 GFLOP an image for all 12 blocks,
# ~3 s of this test): blocks 0-2 (two windowed, the first global one) take the same path through the adapter.
SAM_BLOCKS = 3
GREEDY = {"max_new_tokens": 4, "until": ["\n\n"], "do_sample": False}  # what a task YAML typically sets


def doc_to_visual(doc: dict) -> list:
    return [Image.open(doc["image"])] if doc["image"] else []


def request(kind: str, docs: list[dict], doc_id: int, second) -> Instance:
    """A request as an lmms-eval task builds it: (context, gen_kwargs or continuation, doc_to_visual, doc_id,
    task, split); the model finds the doc in its `task_dict`, which lmms-eval's evaluator fills."""
    args = (docs[doc_id]["question"], second, doc_to_visual, doc_id, "shapes", "test")
    return Instance(kind, args, 0, {"task": "shapes", "doc_id": doc_id, "repeats": 1})


def untrained(tiny_cfg, encoder: str, docs: list[dict], **kwargs) -> VLMLightning:
    """The adapter over a freshly built (seeded) module of the shrunk quickstart with `encoder`."""
    overrides, path = ENCODERS[encoder]
    cfg = tiny_cfg(*overrides, path=path)
    torch.manual_seed(0)
    module = build_module(cfg).eval()
    if encoder == "sam_vit_b":
        module.model.vision.blocks = module.model.vision.blocks[:SAM_BLOCKS]
    predictor = Predictor(module, build_datamodule(cfg, module.tokenizer))
    model = VLMLightning(predictor, batch_size=4, device="cpu", **kwargs)  # cpu: as the references here
    model.task_dict = {"shapes": {"test": docs}}
    return model


@torch.no_grad()
def answer_nll(predictor: Predictor, rec: dict, image_folder: str) -> tuple[float, int]:
    """transformers' own cross-entropy on the answer turn of `rec` (its end-of-turn token left out) times its
    token count: the negative log-likelihood of the answer; and that count."""
    module, dm = predictor.module, predictor.datamodule
    dataset = LLaVADataset(
        [Sample(rec, 0, 0, "image" in rec)], "test", image_folder, dm.encode, dm.transform, dm.image_token_id,
        dm.image.num_tokens,
    )  # fmt: skip
    item = dataset[0]
    labels = torch.tensor(item["labels"])
    labels[labels.ne(-100).nonzero().max()] = -100  # the template's end-of-turn token (<|im_end|>)
    pixels = item["pixel_values"]  # [views, 3, S, S] or None
    loss = module.model(torch.tensor([item["input_ids"]]), None, pixels, labels[None]).loss
    count = int(labels.ne(-100).sum())
    return loss.item() * count, count


@pytest.mark.parametrize("encoder", ENCODERS)
def test_answers_and_loglikelihoods_are_the_projects(tiny_cfg, shapes_root, encoder):
    docs = shapes_docs(shapes_root)
    model = untrained(tiny_cfg, encoder, docs)
    predictor = model.predictor
    expected = predictor.answer_records([record(d, shapes_root) for d in docs], shapes_root, 4, max_new_tokens=4)
    assert any(expected)  # an untrained model still says something: equal answers are not equal silence
    assert model.generate_until([request("generate_until", docs, i, dict(GREEDY)) for i in range(6)]) == expected

    # Continuations for two image questions and the text-only one: the model's own answers (greedy decoding
    # gives those back) and the references.
    some = (0, 1, 5)
    pairs = [(i, expected[i]) for i in some if expected[i]] + [(i, docs[i]["answer"]) for i in some]
    results = model.loglikelihood([request("loglikelihood", docs, i, " " + text) for i, text in pairs])
    greedy = []
    for (i, text), result in zip(pairs, results):
        nll, is_greedy = result.text  # lmms-eval unwraps the GenerationResult to this pair
        rec = record(docs[i], shapes_root, text)
        reference, count = answer_nll(predictor, rec, shapes_root)
        assert nll == pytest.approx(reference, rel=1e-4, abs=1e-4)
        # Greedy iff greedy decoding of as many tokens gives the continuation.
        assert is_greedy == (predictor.answer_records([rec], shapes_root, max_new_tokens=count)[0] == text)
        greedy.append(is_greedy)
    assert any(greedy) and not all(greedy)


def test_generation_settings_reach_the_predictor(tiny_cfg, shapes_root):
    docs = shapes_docs(shapes_root)
    model = untrained(tiny_cfg, "timm", docs, max_new_tokens=2)
    predictor, records = model.predictor, [record(d, shapes_root) for d in docs]
    greedy = predictor.answer_records(records, shapes_root, 4, max_new_tokens=4)
    assert any(" " in a for a in greedy)  # so that cutting at " " cuts something
    # Two settings interleaved: each group is batched on its own and the answers come back in request order.
    cut = {"max_new_tokens": 4, "until": " "}  # a single string, as some task YAMLs write it
    answers = model.generate_until([request("generate_until", docs, i, dict(cut) if i % 2 else {}) for i in range(6)])
    short = predictor.answer_records(records, shapes_root, 4, max_new_tokens=2)  # the model arg: no task budget
    assert answers == [cut_at(greedy[i], [" "]) if i % 2 else short[i] for i in range(6)]
    assert cut_at(greedy[0], [" "]) == greedy[0].split(" ")[0] and cut_at("a\n\nb.c", ["xx", ".", "\n\n"]) == "a"

    sampling = {"max_new_tokens": 4, "do_sample": True, "temperature": 5.0, "top_p": 0.9}
    torch.manual_seed(1)
    sampled = model.generate_until([request("generate_until", docs, i, dict(sampling)) for i in range(6)])
    torch.manual_seed(1)
    assert sampled == predictor.answer_records(records, shapes_root, 4, max_new_tokens=4, temperature=5.0, top_p=0.9)
    assert sampled != greedy
    not_sampling = dict(sampling, do_sample=False)  # do_sample=False wins over a temperature
    assert model.generate_until([request("generate_until", docs, i, dict(not_sampling)) for i in range(6)]) == greedy


def test_refuses_what_the_model_cannot_take(tiny_cfg, shapes_root):
    docs = shapes_docs(shapes_root)
    model = untrained(tiny_cfg, "timm", docs)
    two = Instance("generate_until", ("q", {}, lambda d: [Image.new("RGB", (8, 8))] * 2, 0, "shapes", "test"), 0, {
        "task": "shapes", "doc_id": 0, "repeats": 1})  # fmt: skip
    with pytest.raises(ValueError, match="shapes doc 0: 2 images; this model takes one image per question"):
        model.generate_until([two])
    video = Instance("generate_until", ("q", {}, lambda d: ["clip.mp4"], 0, "shapes", "test"), 0, two.metadata)
    with pytest.raises(TypeError, match="a str visual; only images are supported"):
        model.generate_until([video])
    with pytest.raises(ValueError, match="num_beams=3: beam search is not supported"):
        model.generate_until([request("generate_until", docs, 0, {"num_beams": 3})])
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        model.generate_until_multi_round([])


def test_a_bad_run_or_model_arg_is_one_line_naming_it(tmp_path, capsys):
    missing = str(tmp_path / "no-such-run")
    with pytest.raises(FileNotFoundError, match="no-such-run: neither a checkpoint file nor a run directory"):
        VLMLightning(missing)
    for model_args, message in [
        (f"run={missing}", f"error: {missing}: neither a checkpoint file nor a run directory"),
        (f"run={missing},temprature=0", "error: unknown model args ['temprature']"),
        ("checkpoint=best", "error: model args need run=<run directory or checkpoint file>"),
    ]:
        assert run_command(main, ["--model_args", model_args, "--tasks", "anything"]) == 2  # as the command runs
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.strip().splitlines()) == 1


def test_simple_evaluate_takes_the_model_object(tiny_cfg, shapes_root, tmp_path, monkeypatch):
    import datasets
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    # The JSONL's datasets cache in tmp_path, not ~/.cache: lmms-eval 0.7.0 leaves it to `datasets` (its
    # setting, read when imported), later versions read the variable themselves.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    docs = shapes_docs(shapes_root)
    model = untrained(tiny_cfg, "timm", docs)
    answers = model.predictor.answer_records([record(d, shapes_root) for d in docs], shapes_root, 4, max_new_tokens=4)
    rows = [dict(d, answer=answers[i] if i < 3 else d["answer"], choices=[], choice=None) for i, d in enumerate(docs)]
    tasks = TaskManager(include_path=write_tasks(tmp_path / "tasks", rows), include_defaults=False)
    results = simple_evaluate(model=model, tasks=["shapes_vqa"], task_manager=tasks, log_samples=True)
    samples = sorted(results["samples"]["shapes_vqa"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in samples] == answers
    hits = [a.lower() == r["answer"].lower() for a, r in zip(answers, rows)]
    assert results["results"]["shapes_vqa"]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))


def save_run(module, run_dir) -> str:
    """`module` saved as the checkpoint a training run leaves: weights and the resolved config."""
    state = {"state_dict": module.state_dict(), "hyper_parameters": {"config": module.hparams["config"]}}
    module.on_save_checkpoint(state)  # as Lightning does: frozen weights left out
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    torch.save(state, os.path.join(run_dir, "checkpoints", "last.ckpt"))
    return str(run_dir)


@pytest.mark.slow  # a process importing torch, transformers, lightning and lmms-eval, then two tasks
def test_command_line_logs_the_predictors_answers_and_scores_them(tiny_cfg, shapes_root, tmp_path):
    torch.manual_seed(0)
    # A run directory named as train.py names runs by their overrides: with a comma, so quoted in model args.
    run = save_run(build_module(tiny_cfg()), tmp_path / "runs" / "quickstart" / "encoder=timm,lr=1e-3")
    predictor = load_predictor(run)
    docs = shapes_docs(shapes_root)
    answers = predictor.answer_records([record(d, shapes_root) for d in docs], shapes_root, 4, max_new_tokens=4)
    rows, nlls, hits, right = [], [], [], []
    for i, doc in enumerate(docs):
        # Generation task: the model's own answer as the reference of every other doc, so that some hit.
        reference = answers[i] if i % 2 == 0 and answers[i] else doc["answer"]
        hits.append(answers[i].lower() == reference.lower())
        # Multiple choice: the right one is the model's likeliest for every other doc, else the true answer.
        choices = sorted({doc["answer"], "red", "three", "circle"})
        nlls.append([answer_nll(predictor, record(doc, shapes_root, c), shapes_root)[0] for c in choices])
        likeliest = choices[min(range(len(choices)), key=nlls[-1].__getitem__)]
        choice = likeliest if i % 2 == 0 else doc["answer"]
        right.append(likeliest == choice)
        rows.append(dict(doc, answer=reference, choices=choices, choice=choice))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tools.lmms_eval", "--model_args", f'run="{run}"', "--tasks", "shapes_vqa,shapes_mc",
           "--include_path", write_tasks(tmp_path / "tasks", rows), "--batch_size", "4", "--device", "cpu",
           "--log_samples", "--output_path", str(out), "--verbosity", "WARNING"]  # fmt: skip
    # Offline: the tasks' data are local files; lmms-eval's datasets cache goes to tmp_path.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(env, PYTHONPATH=REPO))
    found = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert proc.returncode == 0 and found, (proc.stdout + proc.stderr)[-3000:]  # lmms-eval exits 0 on errors

    def logged(task: str) -> list:
        [path] = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
        samples = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
        return [s["filtered_resps"] for s in samples]

    assert [r if isinstance(r, str) else r[0] for r in logged("shapes_vqa")] == answers
    for responses, expected in zip(logged("shapes_mc"), nlls):  # the values the adapter gave lmms-eval
        assert [float(r[0]) for r in responses] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    results = json.load(open(found[0]))["results"]
    assert results["shapes_vqa"]["exact_match,none"] == pytest.approx(sum(hits) / len(hits)) and any(hits)
    assert results["shapes_mc"]["acc,none"] == pytest.approx(sum(right) / len(right)) and any(right)
