"""lmms-eval: local tasks over the built-in shapes data (tests/test_lmms_eval.py, test_export_lmms_eval.py)."""

from __future__ import annotations

import json
import os
import shutil

from tests.support.paths import FIXTURES

LMMS_TASK_FILES = os.path.join(FIXTURES, "lmms_task")


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
    """The local tasks, reading `rows` as their JSONL data, written to `folder` (for lmms-eval's --include_path)."""
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
