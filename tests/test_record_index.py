"""The record index (datamodules/record_index.py): offsets and verdicts equal a plain parse and check of the file,
token counts equal full encoding on real tokenizers, a second start maps what the first built, and each fault
(file changed, missing, two builds at once, SIGKILL and a full disk during the build, no writable folder)
ends in a rebuilt index or a clear error, never in a wrong record."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import sys
import time

import numpy as np
import pytest

from datamodules import index_build, json_scan, record_index
from datamodules.llava_data import DataError, ImagePaths, check_record
from datamodules.record_index import CheckSettings, open_index
from datamodules.templates import TemplateError, encode
from datamodules.token_count import TokenCounter
from tests.support import zygote
from tests.support.paths import REPO

N = 9  # image tokens per image
SETTINGS = dict(
    template="chatml", system_prompt=None, image_first=True, image_token="<image>", num_image_tokens=N,
    max_length=64, images_outside_folder=False,
)  # fmt: skip


def settings(shapes_root: str, **change) -> CheckSettings:
    return CheckSettings(**{**SETTINGS, "image_folder": shapes_root, **change})


def records(n: int, seed: int = 0) -> list[dict]:
    """Records with what trips a byte scanner (quotes, backslashes, brackets and commas in strings, non-ASCII),
    some of them bad (a missing image, a broken turn order, too long)."""
    rng = random.Random(seed)
    words = ['a "quoted" word', "back\\slash", "{brace}", "[list, of]", "caf\u00e9", "\u65e5\u672c", "x\\", "ok"]
    out = []
    for k in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        rec = {"id": f"r{k}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": f"a{k}"}]}
        if k % 3:
            rec["image"] = f"images/{k % 8:06d}.png"
            rec["conversations"][0]["value"] = "<image>\n" + q
        if k % 17 == 5:
            rec["image"], rec["conversations"][0]["value"] = "images/nope.png", "<image>\n" + q
        if k % 19 == 7:
            rec["conversations"].reverse()
        if k % 23 == 11:
            rec["conversations"][1]["value"] = "long " * 80
        out.append(rec)
    return out


def write(path, recs: list[dict], jsonl: bool = False, indent: int | None = None) -> str:
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            f.write("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n")
        else:
            json.dump(recs, f, indent=indent, ensure_ascii=False)
    return str(path)


def verdict(tokenizer, rec: dict, shapes_root: str):
    """The check of one record the plain way (no scanner, no index, tokens by full encoding): (tokens after
    expansion, images, image tokens) or the check's message."""

    def count(record):
        enc = encode(tokenizer, record["conversations"], "chatml")
        return len(enc.input_ids), any(label != -100 for label in enc.labels)

    try:
        return check_record(rec, ImagePaths(shapes_root), count, N, 64, "<image>")
    except (DataError, TemplateError) as err:
        return str(err)


@pytest.mark.parametrize("layout", ["list", "indented", "jsonl"])
def test_index_equals_a_plain_parse_and_check(tokenizer, shapes_root, tmp_path, layout, monkeypatch):
    recs = records(120)
    path = write(tmp_path / f"d.{'jsonl' if layout == 'jsonl' else 'json'}", recs, layout == "jsonl",
                 2 if layout == "indented" else None)  # fmt: skip
    monkeypatch.setattr(json_scan, "BLOCK", 97)  # records cross the scanner's blocks
    index = open_index(path, settings(shapes_root), tokenizer)
    assert len(index) == len(recs) and index.meta["kind"] == ("jsonl" if layout == "jsonl" else "list")
    bad = index.bad()
    for k, rec in enumerate(recs):
        assert index.record(k) == rec
        want = verdict(tokenizer, rec, shapes_root)
        if isinstance(want, tuple):
            assert (int(index.tokens[k]), index.images[k], index.image_tokens[k]) == want and index.status[k] == 0
        else:
            assert index.status[k] == 1 and bad[k]["message"] == want
    assert "fast" in index.meta["counting"]


def test_pool_build_equals_one_process(tokenizer, shapes_root, tmp_path, monkeypatch):
    path = write(tmp_path / "d.json", records(90))
    one = open_index(path, settings(shapes_root), tokenizer, index_dir=str(tmp_path / "one"), workers=1)
    monkeypatch.setattr(index_build, "CHUNK", 8)  # 12 chunks over 2 forked processes
    two = open_index(path, settings(shapes_root), tokenizer, index_dir=str(tmp_path / "two"), workers=2)
    for name in index_build.ARRAYS:
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    assert one.meta["bad"] == two.meta["bad"]


def test_a_differing_fast_count_falls_back_to_full_encoding(tokenizer, shapes_root, tmp_path, monkeypatch):
    path = write(tmp_path / "d.json", records(30))
    right = open_index(path, settings(shapes_root), tokenizer, index_dir=str(tmp_path / "right"))
    monkeypatch.setattr(TokenCounter, "count", lambda self, conversations: 3)
    index = open_index(path, settings(shapes_root), tokenizer, index_dir=str(tmp_path / "wrong"))
    assert "a fast count differed" in index.meta["counting"]
    assert np.array_equal(index.tokens, right.tokens) and np.array_equal(index.status, right.status)


TRICKY = [
    "<image>\nWhat is it?", "What is it? <image>", "<image>  two  spaces", "\nstarts with a newline", "</s> in text",
    "caf\u00e9 \u65e5\u672c \U0001f600", "tabs\tand\r\nreturns", "ASSISTANT: inside", "trailing spaces   ", "a\u2581b",
]  # fmt: skip


@pytest.mark.parametrize(
    "name, template", [("vicuna", "vicuna_v1"), ("vicuna", "plain"), ("llama3", "llama3"), ("qwen2", "chatml")]
)
def test_token_counts_equal_full_encoding_on_real_tokenizers(real_tokenizer, name, template):
    tok = real_tokenizer(name)
    rng = random.Random(1)
    counted = 0
    for image_first in (True, False):
        counter = TokenCounter(tok, template, None, image_first, "<image>")
        assert counter.why_not is None
        for k in range(60):
            turns = []
            for t in range(1 if template == "plain" else rng.randint(1, 3)):
                q, a = rng.choice(TRICKY), rng.choice(TRICKY).replace("<image>", "x")
                turns += [{"from": "human", "value": q if t == 0 else q.replace("<image>", "")},
                          {"from": "gpt", "value": a}]  # fmt: skip
            n = counter.count(turns)
            if n is not None:
                assert n == len(encode(tok, turns, template, None, image_first).input_ids), turns
                counted += 1
    assert counted > 80  # the fast path takes most records (None: a cut inside a word, encoded in full)


def test_second_start_maps_the_index_and_the_key_covers_what_decides(tokenizer, shapes_root, tmp_path, monkeypatch):
    path = write(tmp_path / "d.json", records(20))
    first = open_index(path, settings(shapes_root), tokenizer)
    built = []
    real_build = record_index._build
    monkeypatch.setattr(record_index, "_build", lambda *a: (built.append(a[0]), real_build(*a)))
    again = open_index(path, settings(shapes_root), tokenizer)
    assert again.root == first.root and not built  # mapped, not built
    open_index(path, settings(shapes_root, max_length=128), tokenizer)
    open_index(path, settings(shapes_root, template="plain"), tokenizer)
    assert len(built) == 2
    write(tmp_path / "d.json", records(21))  # new content
    assert len(open_index(path, settings(shapes_root), tokenizer)) == 21 and len(built) == 3


# ---- faults -------------------------------------------------------------------------------------------
def test_file_changed_during_a_run_is_an_error_then_indexed_again(tokenizer, shapes_root, tmp_path):
    from datamodules import ImageSpec, LLaVADataModule
    from encoders.preprocess import ResizeCrop
    from foundation.schema import DataConfig

    def setup(path):
        image = ImageSpec(32, (0.5,) * 3, (0.5,) * 3, N, ResizeCrop.clip(32, (0.5,) * 3, (0.5,) * 3))
        config = DataConfig(
            train_json=path, image_folder=shapes_root, template="chatml", max_length=64, on_error="skip"
        )
        dm = LLaVADataModule(tokenizer, config, image, stage="sft")
        dm.setup()
        return dm

    recs = records(30)
    path = write(tmp_path / "d.json", recs)
    dm = setup(path)
    assert dm.train_set[0]["id"] == "r0"
    write(tmp_path / "d.json", recs[::-1])  # every record moved
    with pytest.raises(DataError, match=r"d.json: record #\d+ is not the one indexed \(the file changed during"):
        dm.train_set[0]
    again = setup(path)
    assert again.train_set[0]["id"] == "r29"  # a new start indexes the new content


def test_a_resume_onto_other_data_says_so(tokenizer, shapes_root, tmp_path, capsys):
    from datamodules import ImageSpec, LLaVADataModule
    from encoders.preprocess import ResizeCrop
    from foundation.schema import DataConfig

    image = ImageSpec(32, (0.5,) * 3, (0.5,) * 3, N, ResizeCrop.clip(32, (0.5,) * 3, (0.5,) * 3))
    config = DataConfig(train_json=write(tmp_path / "d.json", records(30)), image_folder=shapes_root,
                        template="chatml", max_length=64, on_error="skip", batch_size=4)  # fmt: skip
    dm = LLaVADataModule(tokenizer, config, image, stage="sft")
    dm.setup()
    usable = len(dm.train_set)
    assert dm.state_dict()["epoch_samples"] == usable
    dm.load_state_dict({"epoch": 0, "position": 8, "global_batch": 4, "epoch_samples": usable})
    assert "changed" not in capsys.readouterr().err
    dm.load_state_dict({"epoch": 0, "position": 8, "global_batch": 4, "epoch_samples": usable + 5})
    assert f"the training data changed since the checkpoint ({usable + 5} samples an epoch then, {usable} now)" in (
        capsys.readouterr().err
    )


def test_missing_unreadable_and_deleted_files(tokenizer, shapes_root, tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nowhere.json"):
        open_index(str(tmp_path / "nowhere.json"), settings(shapes_root), tokenizer)
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(DataError, match="folder.json: not a file"):
        open_index(str(tmp_path / "folder.json"), settings(shapes_root), tokenizer)
    path = write(tmp_path / "d.json", records(6))
    index = open_index(path, settings(shapes_root), tokenizer)
    os.remove(path)
    with pytest.raises(DataError, match="d.json: cannot read the data file during the run"):
        index.record(0)


def test_disk_full_while_writing_leaves_nothing_trusted(tokenizer, shapes_root, tmp_path, monkeypatch):
    path = write(tmp_path / "d.json", records(10))
    saves = []

    def full(f, array):
        saves.append(1)
        if len(saves) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        np.lib.format.write_array(f, np.asanyarray(array))

    monkeypatch.setattr(record_index.np, "save", full)
    with pytest.raises(
        DataError, match="writing its record index to .* failed \\(No space left on device\\); the disk"
    ):
        open_index(path, settings(shapes_root), tokenizer)
    folder = tmp_path / ".vlm_index"
    assert [p for p in os.listdir(folder) if not p.endswith(".lock")] == []  # no index, no temporary
    monkeypatch.undo()
    assert len(open_index(path, settings(shapes_root), tokenizer)) == 10


def test_no_writable_folder_uses_the_cache_or_says_so(tokenizer, shapes_root, tmp_path, monkeypatch):
    path = write(tmp_path / "d.json", records(5))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = record_index._writable
    monkeypatch.setattr(record_index, "_writable", lambda f: ".vlm_index" not in f and real(f))
    index = open_index(path, settings(shapes_root), tokenizer)
    assert index.root.startswith(str(tmp_path / "cache" / "vlm-lab" / "index"))
    monkeypatch.setattr(record_index, "_writable", lambda f: False)
    other = settings(shapes_root, max_length=100)
    with pytest.raises(DataError, match="cannot write its record index: .*set data.index_dir to a writable folder"):
        open_index(path, other, tokenizer)


def test_damaged_index_and_an_image_that_appeared_are_indexed_again(tokenizer, shapes_root, tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(os.path.join(shapes_root, "images"), folder / "images")
    recs = records(20)
    path = write(tmp_path / "d.json", recs)
    index = open_index(path, settings(str(folder)), tokenizer)
    missing = [k for k, e in index.bad().items() if "image" in e]
    assert missing and all(recs[k]["image"] == "images/nope.png" for k in missing)
    shutil.copy(folder / "images" / "000000.png", folder / "images" / "nope.png")
    index = open_index(path, settings(str(folder)), tokenizer)
    assert all(index.status[k] == 0 for k in missing)
    tokens = np.array(index.tokens)
    with open(os.path.join(index.root, "tokens.npy"), "r+b") as f:
        f.truncate(40)
    assert np.array_equal(open_index(path, settings(str(folder)), tokenizer).tokens, tokens)


BUILD = """
import os, sys, time
sys.path.insert(0, {repo!r})
from datamodules import load_tokenizer, record_index
from datamodules.record_index import CheckSettings, open_index
real = {{"build": record_index.build_arrays, "rename": os.rename}}
def slow(*args):
    open({marker!r}, "w").close()
    while {hold!r} and not os.path.exists({hold!r}):
        time.sleep(0.05)
    time.sleep({sleep})
    return real[{where!r}](*args)
if {where!r} == "build":
    record_index.build_arrays = slow
else:
    record_index.os.rename = slow  # the index written whole to its temporary folder, not yet renamed
tokenizer = load_tokenizer({tokenizer!r})
open({ready!r}, "w").close()
index = open_index({path!r}, CheckSettings(**{settings!r}), tokenizer)
print("RECORDS", len(index), index.root)
"""


def _build_process(tmp_path, path, shapes_root, name, sleep, where="build", hold="") -> zygote.ForkedProcess:
    """A process that indexes `path`; its build writes <name>.building, then waits for `hold` and `sleep` s."""
    code = BUILD.format(
        repo=REPO, marker=str(tmp_path / f"{name}.building"), hold=hold, sleep=sleep, where=where, path=path,
        ready=str(tmp_path / f"{name}.ready"), tokenizer=os.path.join(shapes_root, "tokenizer"),
        settings={**SETTINGS, "image_folder": shapes_root},
    )  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return zygote.start([sys.executable, "-c", code], os.getcwd(), env, merge_stderr=False)


def _wait_for(marker, proc) -> None:
    deadline = time.time() + 120
    while not os.path.exists(marker):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


@pytest.mark.slow  # two processes, forked from the test process server (tests/support/zygote.py)
def test_two_runs_building_the_same_index_at_once(tokenizer, shapes_root, tmp_path):
    path = write(tmp_path / "d.json", records(40))
    # The first builds and holds the lock until the second is about to open the index (and then 1 s more).
    first = _build_process(tmp_path, path, shapes_root, "first", 1, hold=str(tmp_path / "second.ready"))
    _wait_for(tmp_path / "first.building", first)
    second = _build_process(tmp_path, path, shapes_root, "second", 0)
    outs = [p.communicate(timeout=120) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    assert "waiting for another process to finish indexing" in outs[1][1]
    assert not os.path.exists(tmp_path / "second.building")  # the second never built: it mapped the first's index
    roots = {line.split()[2] for out, _ in outs for line in out.splitlines() if line.startswith("RECORDS")}
    assert len(roots) == 1 and len(open_index(path, settings(shapes_root), tokenizer)) == 40


@pytest.mark.slow  # a process forked from the test process server (about 7 s to start it, once)
def test_sigkill_during_the_build_leaves_no_index_anyone_trusts(tokenizer, shapes_root, tmp_path):
    path = write(tmp_path / "d.json", records(40))
    proc = _build_process(tmp_path, path, shapes_root, "killed", 60, where="rename")
    _wait_for(tmp_path / "killed.building", proc)  # killed with every file written to the temporary folder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    folder = tmp_path / ".vlm_index"
    left = [p for p in os.listdir(folder) if not p.endswith(".lock")]
    assert len(left) == 1 and ".idx.tmp-" in left[0]  # the temporary, which no reader looks at
    index = open_index(path, settings(shapes_root), tokenizer)  # the lock died with the process
    assert len(index) == 40 and index.status.sum() > 0
    assert [p for p in os.listdir(folder) if not p.endswith(".lock")] == [os.path.basename(index.root)]


def test_a_pickled_index_maps_its_arrays_again(tokenizer, shapes_root, tmp_path):
    import pickle

    path = write(tmp_path / "d.json", records(12))
    index = open_index(path, settings(shapes_root), tokenizer)
    index.record(0)  # opens this process's descriptor
    blob = pickle.dumps(index)
    assert len(blob) < 4096  # the arrays are not in it (a spawned DataLoader worker maps them)
    copy = pickle.loads(blob)
    assert isinstance(copy.tokens, np.memmap) and np.array_equal(copy.tokens, index.tokens)
    assert [copy.record(k) for k in range(12)] == records(12)
