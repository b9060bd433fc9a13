"""Benchmark evaluation wired into training and the `evaluate` command, on a tiny run and a set built from
the built-in data; the metrics themselves are checked against the official code in test_metrics.py."""

from __future__ import annotations

import json
import os

import pytest

from experiment.config import ConfigError
from experiment.runner import run
from tests.support.events import scalars
from tools.evaluate import main as evaluate_main


@pytest.fixture
def eval_set(shapes_root, tmp_path) -> str:
    """The held-out questions as a VQA-style set: each reference is its answer said by 10 people."""
    records = json.load(open(os.path.join(shapes_root, "sft_val.json")))
    rows = [
        {
            "id": r["id"],
            "image": r["image"],
            "question": r["conversations"][0]["value"].replace("<image>", "").strip(),
            "reference": [r["conversations"][1]["value"]] * 10,
        }
        for r in records
    ]
    path = tmp_path / "shapes_vqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def sets_override(path: str, folder: str) -> str:
    return (
        f"eval.sets=[{{name: shapes, file: {path}, image_folder: {folder}, metric: vqa_accuracy, max_new_tokens: 4}}]"
    )


def test_scores_during_training_and_from_the_command_line(tiny_cfg, shapes_root, eval_set, tmp_path):
    cfg = tiny_cfg(sets_override(eval_set, shapes_root), "eval.every_n_steps=2", "trainer.max_steps=4",
                   "trainer.limit_val_batches=0")  # fmt: skip
    trainer = run(cfg)
    run_dir = trainer.logger.log_dir
    accuracy = scalars(run_dir, "eval/shapes/accuracy")
    assert sorted(accuracy) == [2, 4]  # every 2 steps; the end of training (step 4) is not scored twice
    assert scalars(run_dir, "hparams/eval/shapes") == accuracy
    answers = json.load(open(os.path.join(run_dir, "eval", "shapes-step4.json")))["predictions"]
    references = {json.loads(line)["id"]: json.loads(line)["reference"][0] for line in open(eval_set)}
    # ten identical one-word references: VQA accuracy is 1 for the same word, else 0
    by_hand = sum(answers[i].strip().lower() == references[i] for i in references) / len(references)
    assert accuracy[4] == pytest.approx(by_hand)

    out = tmp_path / "scores.json"
    results = evaluate_main([run_dir, "--out", str(out)])  # the sets stored in the run's config
    assert results["shapes"]["accuracy"] == pytest.approx(accuracy[4])
    assert json.load(open(out))["shapes"]["predictions"] == answers


A_SET = "eval.sets=[{name: a, file: x.json, "  # the start of one set; each case ends it


@pytest.mark.parametrize(
    "override, needle",
    [
        (A_SET + "metric: bleu}]", "'eval.sets[0].metric' = 'bleu' is not valid; choose one of"),
        (A_SET + "metric: pope, options: {thresh: 1}}]", "unknown key 'eval.sets[0].options.thresh'"),
        (A_SET + "metric: anls, options: {threshold: high}}]", "'eval.sets[0].options.threshold' = 'high'"),
        ("eval.sets=[{name: a, metric: pope}]", "'eval.sets[0].file' is required"),
        (A_SET + "}, {name: a, file: y.json}]", "'eval.sets[0].name' = 'a' is used by two sets"),
    ],
)
def test_bad_sets_fail_when_the_config_loads(tiny_cfg, override, needle):
    with pytest.raises(ConfigError) as err:
        tiny_cfg(override)
    assert needle in str(err.value)


def test_a_missing_set_file_fails_before_building(tiny_cfg, tmp_path):
    cfg = tiny_cfg(sets_override(str(tmp_path / "nowhere.json"), str(tmp_path)))
    with pytest.raises(ConfigError, match=r"'eval.sets\[0\].file' = .*nowhere.json': evaluation set file not found"):
        run(cfg)
