"""tools/predict on a tiny trained run: answers equal what validation generates, from records, one question,
a file through the command line, and a chat."""

from __future__ import annotations

import json
import os
import sys

import pytest

from experiment.assemble import build_datamodule
from experiment.config import config_from_dict, load_config
from inference.load import find_checkpoint, load_predictor
from lit_modules.predictor import Predictor
from tests.support.paths import REPO
from tests.support.processes import run_training
from tests.support.quickstart import tiny_overrides
from tests.support.runs import fit
from tools.predict import chat


@pytest.fixture(scope="module")
def trained(shapes_root, tmp_path_factory) -> str:
    runs = str(tmp_path_factory.mktemp("runs"))
    cfg = load_config(None, tiny_overrides(shapes_root, runs) + ["trainer.max_steps=3", "trainer.limit_val_batches=0"])
    return fit(cfg).logger.log_dir


def validation_answers(predictor: Predictor) -> list[str]:
    """What the run's validation generates for its first validation batch (4 new tokens)."""
    module = predictor.module
    dm = build_datamodule(config_from_dict(module.hparams["config"]), module.tokenizer)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    pad = module.tokenizer.pad_token_id
    tokens = module.model.generate(
        batch["prompt_ids"], batch["prompt_mask"], batch["pixel_values"], 4, module.stop_ids, pad
    )
    return [module.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def test_answers_equal_what_validation_generates(trained, shapes_root):
    predictor = load_predictor(trained)
    expected = validation_answers(predictor)
    assert any(expected)  # an untrained model still says something: equal answers are not equal silence
    records = json.load(open(os.path.join(shapes_root, "sft_val.json")))[: len(expected)]
    assert predictor.answer_records(records, shapes_root, max_new_tokens=4) == expected
    assert predictor.answer_records(records, shapes_root, batch_size=3, max_new_tokens=4) == expected  # batching
    first = records[0]  # one question about one image file: the same answer as its record
    question = first["conversations"][0]["value"].replace("<image>", "").strip()
    assert predictor.ask(question, os.path.join(shapes_root, first["image"]), max_new_tokens=4) == expected[0]


def test_chat_keeps_the_conversation(trained, shapes_root):
    predictor = load_predictor(trained)
    image = os.path.join(shapes_root, "images", "000000.png")
    said = []
    history = chat(
        predictor, image, iter(["What color are the shapes?", "", "How many?", "exit", "never"]), said.append
    )
    assert [q for q, _ in history] == ["What color are the shapes?", "How many?"] and said == [a for _, a in history]
    assert said[1] == predictor.ask("How many?", image, history[:1])  # the second turn sees the first


@pytest.mark.slow  # the command line's process (forked from the test's process server: about 7 s to start it)
def test_command_line_writes_jsonl(trained, shapes_root, tmp_path):
    out = tmp_path / "answers.jsonl"
    data = os.path.join(shapes_root, "sft_val.json")
    cmd = [sys.executable, "-m", "tools.predict", trained, "--data", data, "--image-folder", shapes_root,
           "--out", str(out), "--max-new-tokens", "4", "--batch-size", "3"]  # fmt: skip
    proc = run_training(cmd, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    records = json.load(open(data))
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert [r["reference"] for r in rows] == [r["conversations"][-1]["value"] for r in records]
    expected = load_predictor(trained).answer_records(records, shapes_root, max_new_tokens=4)
    assert [r["answer"] for r in rows] == expected


def test_checkpoint_lookup(trained, tmp_path):
    assert find_checkpoint(trained).endswith("last.ckpt")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a run directory"):
        find_checkpoint(str(tmp_path))
