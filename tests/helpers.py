"""Helpers shared by the tests: the shrunk quickstart, the list of experiments, fitting and recording runs."""

from __future__ import annotations

import glob
import json
import os
import shutil

import lightning as L
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiment.config import EXPERIMENTS_DIR
from experiment.runner import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 3-layer CLIP tower from config (32 px, 4 x 4 patches): the tower the export tests need
TINY_CLIP = (
    "model.encoder={name: clip, config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 3,"
    " num_attention_heads: 2, image_size: 32, patch_size: 8}}"
)
TINY_LLAMA = (
    "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,"
    " num_attention_heads: 2, num_key_value_heads: 2, vocab_size: 64, max_position_embeddings: 128}"
)


def tiny_overrides(shapes_root: str, run_root: str) -> list[str]:
    """The quickstart shrunk to seconds: 32 px images, 3-block ViT, 2-layer Llama, 48 samples."""
    return [
        "model.encoder.image_size=32",
        "model.encoder.model_kwargs={patch_size: 8, depth: 3, embed_dim: 32, num_heads: 2}",
        f"model.llm.config={TINY_LLAMA}",
        f"data.builtin.root={shapes_root}",
        "data.builtin.image_size=32",
        "data.builtin.num_train=48",
        "data.builtin.num_val=8",
        "data.batch_size=8",
        "data.max_length=96",
        f"logging.root={run_root}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "eval.max_new_tokens=4",
    ]


def experiment_files() -> list[str]:
    """Every experiment YAML (bases and per-encoder fragments are not experiments on their own)."""
    files = glob.glob(os.path.join(EXPERIMENTS_DIR, "**", "*.yaml"), recursive=True)
    return sorted(f for f in files if os.path.basename(f) != "base.yaml" and "/encoders/" not in f)


class LossRecorder(L.Callback):
    """train/loss of every step, as the module computed it."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def fit(cfg, *callbacks: L.Callback) -> L.Trainer:
    """`experiment.runner.run` (what train.py does) with extra callbacks."""
    return run(cfg, *callbacks)


def scalars(run_dir: str, tag: str) -> dict[int, float]:
    """{step: value} of one TensorBoard scalar of a run directory."""
    ea = EventAccumulator(run_dir)
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(tag)}


def vit_params(width: int, mlp: int, blocks: int, patch: int, side: int, patch_bias: bool) -> int:
    """Pre-norm ViT with a CLS token and learned position embeddings, no final norm, no head."""
    tokens = (side // patch) ** 2 + 1
    embed = 3 * patch * patch * width + (width if patch_bias else 0) + width + tokens * width  # patch, cls, pos
    block = 4 * (width * width + width) + 2 * 2 * width + (width * mlp + mlp) + (mlp * width + width)
    return embed + blocks * block


# registry name -> (name, kwargs, (image_size, grid, embed_dim, parameters)) at full size, built on the meta
# device (no memory, no init). Parameter counts are written out by hand: layers after the selected one are
# pruned (CLIP-L keeps 23 of 24 layers, 290.9M of its 303.5M; ViT-B keeps 11 of 12 blocks).
CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
FULL_SIZE = {
    # pre_layrnorm (2 * 1024) on top of the ViT; the patch conv has no bias
    "clip": (
        "clip",
        {"config": dict(CLIP_L, image_size=336)},
        (336, (24, 24), 1024, vit_params(1024, 4096, 23, 14, 336, False) + 2048),
    ),
    "clip_vit_l_336": ("clip_vit_l_336", {}, (336, (24, 24), 1024, 290_909_184)),
    "clip_vit_l_224": ("clip_vit_l_224", {}, (224, (16, 16), 1024, 290_581_504)),
    "sam_vit_b": ("sam_vit_b", {}, (1024, (64, 64), 256, 89_670_912)),  # official ImageEncoderViT count
    "timm:": ("timm:vit_base_patch16_224", {}, (224, (14, 14), 768, vit_params(768, 3072, 11, 16, 224, True))),
}


def train_cli_args(shapes_root: str, run_root: str, *extra: str) -> list[str]:
    """`python train.py ...` argv for the shrunk quickstart (one thread, CPU), as a user launches it."""
    import sys

    return [sys.executable, os.path.join(REPO, "train.py"), *tiny_overrides(shapes_root, run_root), *extra]


def start_training(argv: list[str], cwd: str):
    """train.py in a process group of its own (so it and its DataLoader workers can be killed together)."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def kill_after_checkpoint(proc, checkpoint: str, timeout: float = 300, sig: int | None = None) -> int:
    """Signal `proc`'s process group (SIGKILL unless `sig`) as soon as a new `checkpoint` lands, wait for it
    to end; returns the global step of `checkpoint` then."""
    import signal
    import time

    import torch

    def stamp():
        return (os.stat(checkpoint).st_ino, os.stat(checkpoint).st_mtime_ns) if os.path.exists(checkpoint) else None

    before, deadline = stamp(), time.monotonic() + timeout
    while stamp() in (None, before):  # a new file (saves replace it atomically: a new inode)
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended ({proc.returncode}) before {checkpoint}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no {checkpoint} after {timeout} s")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL if sig is None else sig)
    proc.output = proc.communicate(timeout=timeout)[0]  # for the caller's failure messages
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]


# ---- lmms-eval: local tasks over the built-in shapes data (tests/test_lmms_eval.py, test_export_lmms_eval.py)
LMMS_TASK_FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "lmms_task")


def shapes_docs(shapes_root: str) -> list[dict]:
    """lmms-eval docs: five held-out shapes questions about an image, and one text-only question."""
    val = json.load(open(os.path.join(shapes_root, "sft_val.json")))[:5]
    docs = [
        {
            "image": os.path.join(shapes_root, r["image"]),
            "question": r["conversations"][0]["value"].replace("<image>", "").strip(),
            "answer": r["conversations"][1]["value"],
        }
        for r in val
    ]
    return docs + [{"image": None, "question": "What color is the sky?", "answer": "blue"}]


def record(doc: dict, shapes_root: str, answer: str | None = None) -> dict:
    """The doc as a LLaVA-format record for the project's own tools (with `answer` as its gpt turn)."""
    question = doc["question"] if doc["image"] is None else "<image>\n" + doc["question"]
    turns = [{"from": "human", "value": question}] + ([{"from": "gpt", "value": answer}] if answer else [])
    rec = {"id": doc["question"], "conversations": turns}
    if doc["image"]:
        rec["image"] = os.path.relpath(doc["image"], shapes_root)
    return rec


# The local tasks: the JSONL written by the test, the functions in tests/fixtures/lmms_task/utils.py.
TASKS = {
    "shapes_vqa": """
output_type: generate_until
doc_to_target: answer
generation_kwargs: {max_new_tokens: 4, until: ["\\n\\n"], do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}
""",
    "shapes_mc": """
output_type: multiple_choice
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_choice_index
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
}


def write_tasks(folder, rows: list[dict]) -> str:
    os.makedirs(folder)
    shutil.copy(os.path.join(LMMS_TASK_FILES, "utils.py"), folder)
    data = os.path.join(folder, "shapes.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    for name, body in TASKS.items():
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\n")
            f.write("test_split: test\ndoc_to_visual: !function utils.doc_to_visual\n")
            f.write("doc_to_text: !function utils.doc_to_text\n" + body)
    return str(folder)
