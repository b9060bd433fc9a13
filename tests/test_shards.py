"""Streaming shards (`data.sources[].shards`, datamodules/shards.py; python -m tools.write_shards): the shards hold
the file's records and image bytes as stored; a shards source gives the same tokens, labels and pixels as the JSON
file it was written from, in the same batches; it joins a weighted mixture and a run resumes from a checkpoint
exactly; bad records are skipped, counted and capped; a truncated or corrupt shard is a clear error or a counted
skip; a mixture with a shards source killed (SIGKILL, 2 workers) and stopped (SIGTERM) resumes exactly."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil

import pytest
import torch

from datamodules import ImageSpec, LLaVADataModule
from datamodules.bad_records import BadRecordCap
from datamodules.llava_data import DataError
from encoders.preprocess import ResizeCrop
from experiment.config import ConfigError
from foundation.errors import run_command
from foundation.schema import DataConfig, SourceConfig
from tests.support.events import scalars
from tests.support.processes import interrupted_twice
from tests.support.runs import LossRecorder, fit
from tools.write_shards import main as write_shards_main
from tools.write_shards import write_shards

litdata = pytest.importorskip("litdata")  # the `stream` extra (in `dev`)

N = 9
IMAGE = ImageSpec(32, (0.5,) * 3, (0.5,) * 3, num_tokens=N, preprocess=ResizeCrop.clip(32, (0.5,) * 3, (0.5,) * 3))


@pytest.fixture(scope="module")
def shards(shapes_root, tmp_path_factory) -> str:
    """The built-in SFT file (51 records, 3 text-only) as shards of about 8 KB (4 chunks), in the file's order."""
    out = str(tmp_path_factory.mktemp("shards") / "sft")
    write_shards(os.path.join(shapes_root, "sft_train.json"), out, shapes_root, chunk_bytes="8KB", workers=1)
    return out


def data_config(source: SourceConfig, shapes_root: str, **extra) -> DataConfig:
    return DataConfig(
        sources=[source], image_folder=shapes_root, template="chatml", max_length=96, batch_size=4, **extra
    )


def test_the_shards_hold_the_records_and_the_image_files_bytes(shapes_root, shards):
    records = json.load(open(os.path.join(shapes_root, "sft_train.json")))
    stream = litdata.StreamingDataset(shards)
    assert len(stream) == len(records) == 51
    for k in (0, 7, 20, 50):
        text, data = stream[k]
        assert json.loads(bytes(text)) == records[k]
        image = records[k].get("image")
        expected = open(os.path.join(shapes_root, image), "rb").read() if image else b""
        assert data == expected  # encoded bytes as stored (PNG here), not decoded pixels


def test_a_shards_source_gives_the_json_sources_samples_and_batches(tokenizer, shapes_root, shards):
    file = os.path.join(shapes_root, "sft_train.json")
    modules = {}
    for kind, source in (
        ("json", SourceConfig(file=file, name="sft")),
        ("shards", SourceConfig(shards=shards, name="sft")),
    ):
        dm = LLaVADataModule(tokenizer, data_config(source, shapes_root), IMAGE, stage="sft", seed=5)
        dm.setup()
        modules[kind] = dm
    a, b = modules["json"], modules["shards"]
    assert len(a.train_set) == len(b.train_set) == 51
    for i in range(len(a.train_set)):
        x, y = a.train_set[i], b.train_set[i]
        for key in ("id", "input_ids", "labels", "prompt_ids", "answer", "question", "source", "skipped"):
            assert x[key] == y[key], (i, key)
        assert (x["pixel_values"] is None) == (y["pixel_values"] is None)
        if x["pixel_values"] is not None:
            assert torch.equal(x["pixel_values"], y["pixel_values"])
    batches = [list(dm.train_dataloader()) for dm in (a, b)]
    assert len(batches[0]) == len(batches[1]) == 13
    for x, y in zip(*batches):
        assert x["ids"] == y["ids"] and y["bad"] == []
        for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
            assert torch.equal(x[key], y[key]), key


def write_bad_file(shapes_root: str, folder) -> str:
    """Eight good records and three bad ones: an image that is not an image, no placeholder for the image, too long;
    their images in `folder`."""
    records = json.load(open(os.path.join(shapes_root, "sft_train.json")))[:8]
    (folder / "images").mkdir()
    for r in records:
        if r.get("image"):
            shutil.copy(os.path.join(shapes_root, r["image"]), folder / r["image"])
    (folder / "broken.png").write_bytes(b"not a png at all")
    first, second = records[2]["conversations"][:2], records[2]["conversations"][:2]  # records[1] is text-only
    bad = [
        dict(records[0], id="bad-image", image="broken.png"),
        dict(records[2], id="no-placeholder", conversations=[{"from": "human", "value": "hi"}, first[1]]),
        dict(records[2], id="too-long", conversations=[second[0], {"from": "gpt", "value": "word " * 200}]),
    ]
    path = str(folder / "bad.json")
    json.dump(records[:3] + bad[:1] + records[3:6] + bad[1:] + records[6:], open(path, "w"))
    return path


def test_bad_records_are_skipped_counted_and_capped(tokenizer, shapes_root, tmp_path):
    path = write_bad_file(shapes_root, tmp_path)
    out = str(tmp_path / "bad_shards")
    write_shards(path, out, str(tmp_path), workers=1)
    source = SourceConfig(shards=out, name="web")
    dm = LLaVADataModule(tokenizer, data_config(source, shapes_root, max_bad_fraction=0.3), IMAGE, stage="sft")
    dm.setup()
    assert dm.bad_cap.allowed == {"web": 3}  # 0.3 of 11 samples an epoch, one rank
    batches = list(dm.train_dataloader())
    bad = [b for batch in batches for b in batch["bad"]]
    assert sorted(b["reason"] for b in bad) == ["placeholder count mismatch", "too long", "unreadable image broken.png"]
    assert {"'bad-image'", "'no-placeholder'", "'too-long'"} == {
        b["message"].split("record ")[1].split(" ")[0] for b in bad
    }
    # the stand-ins score nothing: each batch's labels are those of its good records only
    good = sum(int((batch["labels"] != -100).any(dim=1).sum()) for batch in batches)
    assert good == 8 and sum(batch["num_skipped"] for batch in batches) == 3
    cap = BadRecordCap({"web": 11}, 0.2, world=1)  # 2 allowed: the third stops the run, naming it
    cap.observe(bad[:2], epoch=0)
    with pytest.raises(DataError, match=r"source 'web' .*record '.*' .*3 bad records of source 'web' this epoch"):
        cap.observe(bad[2:], epoch=0)
    cap.observe(bad[:2], epoch=1)  # a new epoch counts anew
    restored = BadRecordCap({"web": 11}, 0.2, world=1)
    restored.load_state_dict(cap.state_dict())
    assert restored.total == cap.total and restored.this_epoch == cap.this_epoch


def test_a_truncated_or_corrupt_shard_is_an_error_or_a_counted_skip(tokenizer, shapes_root, shards, tmp_path):
    truncated, corrupt = str(tmp_path / "truncated"), str(tmp_path / "corrupt")
    shutil.copytree(shards, truncated)
    shutil.copytree(shards, corrupt)
    chunk = json.load(open(os.path.join(shards, "index.json")))["chunks"][1]
    with open(os.path.join(truncated, chunk["filename"]), "r+b") as f:
        f.truncate(chunk["chunk_bytes"] // 2)
    dm = LLaVADataModule(tokenizer, data_config(SourceConfig(shards=truncated), shapes_root), IMAGE, stage="sft")
    with pytest.raises(DataError, match=rf"shard chunk {chunk['filename']} is truncated: \d+ bytes of"):
        dm.setup()
    os.remove(os.path.join(truncated, "index.json"))
    with pytest.raises(DataError, match="no litdata shards here"):
        LLaVADataModule(tokenizer, data_config(SourceConfig(shards=truncated), shapes_root), IMAGE, stage="sft").setup()
    with open(os.path.join(corrupt, chunk["filename"]), "r+b") as f:
        f.write(b"\xff" * 16)  # the chunk's header: its item count and first offsets
    config = data_config(SourceConfig(shards=corrupt, name="c"), shapes_root, max_bad_fraction=1.0)
    dm = LLaVADataModule(tokenizer, config, IMAGE, stage="sft")
    dm.setup()
    items = [dm.train_set[i] for i in range(len(dm.train_set))]
    bad = [x["bad"] for x in items if x.get("bad")]
    assert bad and all(b["source"] == "c" for b in bad)
    assert any(b["reason"] == "unreadable shard item" for b in bad)


@pytest.mark.parametrize(
    "sources, needle",
    [
        ("[{file: A, shards: S}]", r"give one of 'data.sources\[0\].file' .* and 'data.sources\[0\].shards'"),
        ("[{shards: S}]", "cannot be grouped by length"),
    ],
)
def test_invalid_shards_sources_name_the_source(tiny_cfg, shapes_root, shards, sources, needle):
    spec = sources.replace("A", os.path.join(shapes_root, "sft_train.json")).replace("S", shards)
    extra = ["data.group_by_length=true"] if "grouped" in needle else []
    with pytest.raises(ConfigError, match=needle):
        tiny_cfg("data.builtin=null", f"model.tokenizer={shapes_root}/tokenizer", f"data.sources={spec}", *extra)


def test_max_bad_fraction_is_a_fraction(tiny_cfg):
    with pytest.raises(ConfigError, match=r"'data.max_bad_fraction' must be in \[0, 1\], got 2.0"):
        tiny_cfg("data.max_bad_fraction=2")


@pytest.mark.slow  # litdata's optimize starts its worker processes (10-40 s on 2 shared cores)
def test_several_writers_hold_every_record_once(shapes_root, tmp_path):
    records = json.load(open(os.path.join(shapes_root, "sft_train.json")))
    out = str(tmp_path / "shards")
    method = multiprocessing.get_start_method(allow_none=True)
    write_shards(os.path.join(shapes_root, "sft_train.json"), out, shapes_root, chunk_bytes="8KB", workers=2)
    assert multiprocessing.get_start_method(allow_none=True) == method  # litdata forces spawn; put back
    stream = litdata.StreamingDataset(out)
    items = [stream[k] for k in range(len(stream))]
    written = sorted(json.loads(bytes(text))["id"] for text, _ in items)
    assert written == sorted(r["id"] for r in records)  # each once, in the workers' order
    by_id = {r["id"]: r for r in records}
    for text, data in items[:5]:
        image = by_id[json.loads(bytes(text))["id"]].get("image")
        assert bytes(data) == (open(os.path.join(shapes_root, image), "rb").read() if image else b"")


def test_write_shards_names_a_missing_image(shapes_root, tmp_path, capsys):
    records = json.load(open(os.path.join(shapes_root, "sft_train.json")))[:3]
    records[2]["image"] = "images/nowhere.png"
    path = str(tmp_path / "x.json")
    json.dump(records, open(path, "w"))
    argv = ["--data", path, "--image-folder", shapes_root, "--out", str(tmp_path / "out"), "--workers", "1"]
    assert run_command(write_shards_main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: record 'sft-1': missing image file") and err.count("\n") == 1


class StopAt(LossRecorder):
    """Records each step's loss, batch ids and sources; stops the run after step `at` (a checkpoint is saved there)."""

    def __init__(self, at: int | None = None) -> None:
        super().__init__()
        self.at, self.ids = at, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.ids[trainer.global_step] = list(zip(batch["sources"], batch["ids"]))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        if self.at is not None and trainer.global_step == self.at:
            trainer.should_stop = True


def shards_beside_a_file(shapes_root: str, tmp_path, *extra: str) -> tuple[str, ...]:
    """Overrides for a 1:1 mixture of shards of 11 records, 3 of them bad (source `web`), and a JSON file of 10
    (`local`), in batches of 4 without validation, bad records capped at half."""
    bad_shards = str(tmp_path / "bad_shards")
    write_shards(write_bad_file(shapes_root, tmp_path), bad_shards, str(tmp_path), workers=1)
    part = str(tmp_path / "part.json")
    json.dump(json.load(open(os.path.join(shapes_root, "sft_train.json")))[:10], open(part, "w"))
    spec = f"[{{shards: {bad_shards}, name: web, weight: 1}}, {{file: {part}, name: local, weight: 1}}]"
    return ("data.builtin=null", f"model.tokenizer={shapes_root}/tokenizer", f"data.image_folder={shapes_root}",
            f"data.sources={spec}", "data.batch_size=4", "data.max_bad_fraction=0.5", "trainer.max_epochs=3",
            "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "optim.lr=0.01", *extra)  # fmt: skip


def test_a_mixture_with_shards_resumes_from_a_checkpoint_exactly(tiny_cfg, shapes_root, tmp_path):
    # shards with 3 bad records of 11 (skipped, counted: the counts go on from the checkpoint's) and a JSON file
    common = shards_beside_a_file(shapes_root, tmp_path, "trainer.max_steps=8")
    full = StopAt()
    fit(tiny_cfg(*common, "logging.run_name=full"), full)
    cut = StopAt(at=3)
    fit(tiny_cfg(*common, "logging.run_name=cut", "checkpoint.every_n_train_steps=3"), cut)
    resumed = StopAt()
    fit(tiny_cfg(*common, "logging.run_name=cut", "resume=auto"), resumed)
    assert sorted(full.losses) == list(range(1, 9)) and sorted(resumed.losses) == list(range(4, 9))
    assert {s: full.ids[s] for s in range(3, 8)} == resumed.ids  # 21 samples an epoch: 6 steps, then epoch 1
    assert {"web", "local"} == {source for step in range(3, 8) for source, _ in resumed.ids[step]}
    for step in range(4, 9):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5, abs=1e-6)
    runs = tmp_path / "runs" / "quickstart"
    full_bad, resumed_bad = (scalars(str(runs / name), "data/bad_records/web") for name in ("full", "cut"))
    web_ids = [rid for step in range(8) for source, rid in full.ids[step] if source == "web"]
    met = sum(rid.startswith("web#") for rid in web_ids)  # the stand-ins' ids: source#item
    assert met >= 3 and max(full_bad.values()) == met  # every epoch meets all three bad records
    assert max(resumed_bad.values()) == met  # counted on from the checkpoint's count, not from 0
    seen = scalars(str(runs / "full"), "data/samples/web")
    assert seen and max(seen.values()) > 0


def test_a_run_above_the_cap_stops_naming_the_source_and_the_record(tiny_cfg, shapes_root, tmp_path):
    bad_shards = str(tmp_path / "bad_shards")
    write_shards(write_bad_file(shapes_root, tmp_path), bad_shards, str(tmp_path), workers=1)
    spec = f"[{{shards: {bad_shards}, name: web}}]"
    cfg = tiny_cfg("data.builtin=null", f"model.tokenizer={shapes_root}/tokenizer", f"data.image_folder={shapes_root}",
                   f"data.sources={spec}", "data.batch_size=4", "data.max_bad_fraction=0.05",
                   "trainer.limit_val_batches=0", "logging.run_name=capped")  # fmt: skip
    # 0.05 of 11 samples: none allowed, so the first bad record the run meets stops it
    with pytest.raises(DataError, match=r"source 'web' \(.*bad_shards\): record '[a-z-]+' \(shard item \d+\): .*1 bad"):
        fit(cfg)


@pytest.mark.slow  # three train.py processes beside a reference run (20-40 s on 2 shared cores)
def test_a_mixture_with_shards_resumes_exactly_after_sigkill_and_sigterm(shapes_root, tmp_path):
    # As test_mixtures.py's three-source test, with a shards source (11 records, 3 bad) beside a JSON file: the
    # shards are read by DataLoader worker processes, each with its own litdata stream, and the bad records' counts
    # go on from the checkpoint's.
    mixture = shards_beside_a_file(shapes_root, tmp_path, "trainer.max_steps=12")
    # 11 + 10 = 21 samples an epoch in batches of 4: 6 steps. SIGKILL after step 3, SIGTERM in epoch 1.
    ref_dir, run_dir, _ = interrupted_twice(shapes_root, tmp_path, mixture, steps_per_epoch=6)
    full, resumed = scalars(ref_dir, "train/loss"), scalars(run_dir, "train/loss")
    assert sorted(full) == list(range(12)) and set(range(3, 12)) <= set(resumed)
    for step in range(3, 12):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), (step, full, resumed)
    # Samples per source before each step's batch: 1:1 of 21 samples is 11 (ties to the first source) and 10;
    # step 6 starts epoch 1, so step 11 has epoch 0 whole and 5 batches of 4 of epoch 1 behind it.
    seen = {name: scalars(run_dir, f"data/samples/{name}") for name in ("web", "local")}
    assert {s: seen["web"][s] + seen["local"][s] for s in (6, 11)} == {6: 21, 11: 21 + 20}
    assert [seen[n][6] for n in ("web", "local")] == [11, 10]
    ref_seen = {name: scalars(ref_dir, f"data/samples/{name}") for name in ("web", "local")}
    assert all(seen[n][s] == ref_seen[n][s] for n in seen for s in range(3, 12))
    # every epoch meets the three bad records: the resumed run's count goes on from its checkpoints' to the same end
    full_bad, resumed_bad = (scalars(d, "data/bad_records/web") for d in (ref_dir, run_dir))
    assert max(full_bad.values()) >= 3 and max(resumed_bad.values()) == max(full_bad.values())
