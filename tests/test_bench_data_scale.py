"""bench/bench_data_scale.py at a tiny size: the file it generates is LLaVA-665K-shaped, and its cold start builds
the index that its warm start maps (same records, same verdicts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO


@pytest.mark.slow  # three processes that import torch and transformers: about 40 s on 2 loaded cores
def test_bench_data_scale_at_a_tiny_size(tokenizer_dir, tmp_path):
    out, root = tmp_path / "results.json", tmp_path / "data"
    cmd = [
        sys.executable, "bench/bench_data_scale.py", "--records", "300", "--root", str(root), "--tokenizer",
        os.path.join(tokenizer_dir, "vicuna"), "--workers", "1", "--batches", "2", "--batch-size", "2",
        "--json", str(out),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cold index build" in run.stdout and "records per CPU-second" in run.stdout

    records = json.load(open(root / "sft_300_0.json"))
    assert len(records) == 300
    text_only = [r for r in records if "image" not in r]
    assert 10 <= len(text_only) <= 60  # about 10%, as LLaVA-665K
    for r in records:
        roles = [t["from"] for t in r["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        assert sum(t["value"].count("<image>") for t in r["conversations"]) == int("image" in r)
        assert "image" not in r or os.path.isfile(root / "images" / r["image"])
    multi_turn = sum(len(r["conversations"]) > 2 for r in records)
    assert multi_turn > 150

    results = json.load(open(out))
    cold, warm = results["cold"], results["warm"]
    assert cold["records"] == warm["records"] == 300 and cold["usable"] == warm["usable"] == 300
    assert cold["counting"] == warm["counting"] and "fast" in cold["counting"]  # warm read what cold wrote
    assert len(os.listdir(root / "index")) == 2  # one index (and its lock): the warm start built nothing
