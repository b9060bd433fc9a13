"""Every command line reports an error the user can fix as train.py does: one line `error: ...` on stderr, exit
status 2, no traceback (foundation/errors.py `run_command`). Each tool runs as the user runs it, a subprocess."""

from __future__ import annotations

import os
import pickle
import runpy
import sys

import pytest

from foundation.errors import USER_ERRORS, MissingExtra, UserError, run_command
from tests.support.processes import run_commands


def _cases(tmp: str) -> dict[str, tuple[list[str], str]]:
    """{case: (arguments after `python`, what the error line says)}: a missing run directory for every tool, and
    a refused checkpoint, a bad override and a missing image (each before any model is built)."""
    missing = os.path.join(tmp, "no-such-run")
    not_a_run = "neither a checkpoint file nor a run directory"
    return {
        "predict": (["-m", "tools.predict", missing, "--question", "What color?"], not_a_run),
        "evaluate": (["-m", "tools.evaluate", missing], not_a_run),
        "export": (["-m", "tools.export", missing, os.path.join(tmp, "out")], not_a_run),
        "merge_lora": (["-m", "tools.merge_lora", os.path.join(missing, "last.ckpt"), tmp], "checkpoint not found"),
        "compare": (["-m", "tools.compare", missing], "not a run directory"),
        "lmms_eval": (["-m", "tools.lmms_eval", "--model_args", f"run={missing}", "--tasks", "mme"], not_a_run),
        "train": (["train.py", "optim.lrr=1"], "unknown key 'optim.lrr'"),
        "write_shards": (
            ["-m", "tools.write_shards", "--data", os.path.join(tmp, "none.json"), "--out", os.path.join(tmp, "s")],
            "data file not found",
        ),
        "predict refused checkpoint": (
            ["-m", "tools.predict", os.path.join(tmp, "pickled.ckpt"), "--question", "What color?"],
            "refused: it holds objects other than tensors",
        ),
        "evaluate bad override": (["-m", "tools.evaluate", os.path.join(tmp, "empty.ckpt"), "optim.lrr=1"], "lrr"),
        "predict missing image": (
            ["-m", "tools.predict", missing, "--image", os.path.join(tmp, "nowhere.png"), "--question", "What?"],
            "nowhere.png: no such file",
        ),
    }


@pytest.mark.slow  # ten command-line processes, forked from the test process server (about 7 s to start it)
def test_a_user_error_is_one_line_and_status_2(tmp_path):
    import torch

    with open(tmp_path / "pickled.ckpt", "wb") as f:  # code a checkpoint could run: torch.load must refuse it
        pickle.dump({"state_dict": {}, "on_load": print}, f, protocol=2)  # torch.save's protocol
    torch.save({"hyper_parameters": {"config": {}}, "state_dict": {}}, tmp_path / "empty.ckpt")  # defaults config
    cases = _cases(str(tmp_path))
    results = run_commands([args for args, _ in cases.values()])
    for (case, (_, needle)), proc in zip(cases.items(), results):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (case, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, (case, proc.stderr[-3000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (case, proc.stderr[-3000:])


def test_run_command_reports_user_errors_and_keeps_bugs(capsys):
    def failing(err):
        raise err

    assert run_command(failing, FileNotFoundError("x.png: no such file")) == 2
    assert capsys.readouterr().err == "error: x.png: no such file\n"
    assert run_command(failing, UserError("first line\nsecond line")) == 2
    assert capsys.readouterr().err == "error: first line second line\n"  # one line, whatever the message
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_command(failing, KeyError("bug"))
    assert run_command(lambda: {"a result": 1}) == 0 and run_command(lambda: 3) == 3


def test_the_library_errors_are_user_errors():
    from datamodules.llava_data import DataError
    from datamodules.templates import TemplateError
    from foundation.schema import ConfigError
    from inference.export import ExportError
    from lit_modules.checkpoint_io import CheckpointError

    for error in (ConfigError, DataError, TemplateError, CheckpointError, ExportError, MissingExtra):
        assert issubclass(error, USER_ERRORS) and issubclass(error, ValueError), error


def test_lmms_eval_without_its_extra_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # as if lmms-eval were not installed
    for name in [m for m in sys.modules if m.startswith("lmms_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "argv", ["tools.lmms_eval", "--tasks", "mme"])
    with pytest.raises(SystemExit) as exit_:  # as `python -m tools.lmms_eval` runs it
        runpy.run_module("tools.lmms_eval", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tools.lmms_eval needs the eval extra: pip install -e '.[eval]'"), err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.delitem(sys.modules, "tools.lmms_eval", raising=False)
    with pytest.raises(MissingExtra, match=r"needs the eval extra"):  # imported as a library: an exception
        runpy.run_module("tools.lmms_eval", run_name="tools.lmms_eval")
