"""bench/gpu_round_trips.py (README: "On a GPU: strategy round trips") kept working between GPU sessions:
its hidden CPU mode runs the same train / stop / resume / compare path on the cases that need no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO


@pytest.mark.slow  # six train.py runs
def test_round_trips_resume_exactly_on_cpu(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "bench/gpu_round_trips.py", "single", "lora_bf16", "--steps", "2"]
    cmd += ["--accelerator", "cpu", "--precision", "32-true", "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = {r["case"]: r for r in json.loads(out.read_text())}
    for case in ("single", "lora_bf16"):
        assert results[case]["steps_compared"] == 4 and results[case]["resumed_exact"], results[case]
        assert results[case]["checkpoint"]["kind"] == "file"
    # the LoRA checkpoint holds the adapters and the projector, not the frozen base
    assert results["lora_bf16"]["checkpoint"]["MB"] < results["single"]["checkpoint"]["MB"] / 3
    assert "lora_bf16" in proc.stdout and "resume max|d|" in proc.stdout


def test_gpu_session_script_parses_and_names_its_parts(tmp_path):
    """bench/gpu_session.sh (README: "On a GPU"): valid bash, and a part it does not know is refused with the list
    of parts before anything runs (its SMOKE=1 run at toy sizes takes about 2 minutes: run by hand)."""
    script = os.path.join(REPO, "bench", "gpu_session.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    proc = subprocess.run(
        ["bash", script, "nope"], capture_output=True, text=True, env=dict(os.environ, OUT=str(tmp_path))
    )
    assert proc.returncode == 2 and "choose from round_trips packing steps" in proc.stderr
