"""DataModules: placeholder expansion, batches that mix text-only and image samples, the built-in
dataset, and every bad-input case (clear error naming file and record, or a counted skip)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from datamodules import ImageSpec, LLaVADataModule, generate_shapes
from datamodules.llava_data import DataError
from datamodules.sampler import GroupedSampler
from datamodules.shapes import QUESTIONS, answers, render
from datamodules.templates import IGNORE_INDEX
from encoders.preprocess import ResizeCrop
from foundation.schema import DataConfig

N = 9  # image tokens per image in these tests


IMAGE = ImageSpec(32, (0.5,) * 3, (0.5,) * 3, num_tokens=N, preprocess=ResizeCrop.clip(32, (0.5,) * 3, (0.5,) * 3))


def make_dm(tokenizer, train_json, image_folder, **kw) -> LLaVADataModule:
    """An SFT DataModule on `train_json`: the `data` group's defaults with `kw` on top."""
    args = dict(train_json=train_json, image_folder=image_folder, template="chatml", max_length=64, batch_size=4)
    return LLaVADataModule(tokenizer, DataConfig(**{**args, **kw}), IMAGE, stage="sft")


def write_records(tmp_path, records, name="data.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def test_placeholder_expansion_and_mixed_batch(tokenizer, shapes_root, tmp_path):
    records = [
        {
            "id": "img",
            "image": "images/000000.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat shape are they?"},
                {"from": "gpt", "value": "cross"},
            ],
        },
        {
            "id": "txt",
            "conversations": [{"from": "human", "value": "What color is grass?"}, {"from": "gpt", "value": "green"}],
        },
    ]
    dm = make_dm(tokenizer, write_records(tmp_path, records), shapes_root)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    img_id = tokenizer.convert_tokens_to_ids("<image>")
    row = {i: b for b, i in enumerate(batch["ids"])}
    ids, labels = batch["input_ids"], batch["labels"]
    assert batch["pixel_values"].shape == (1, 3, 32, 32)  # only the image sample contributes pixels
    image_row = ids[row["img"]]
    pos = (image_row == img_id).nonzero().flatten().tolist()
    assert pos == list(range(2, 2 + N))  # one placeholder -> N consecutive image tokens after "<|im_start|> user"
    assert (labels[row["img"], pos] == IGNORE_INDEX).all()
    assert (ids[row["txt"]] == img_id).sum() == 0
    # right padding: the text-only row is shorter and padded with pad id / -100 / mask 0
    n_txt = int(batch["attention_mask"][row["txt"]].sum())
    assert (ids[row["txt"], n_txt:] == tokenizer.pad_token_id).all()
    assert (labels[row["txt"], n_txt:] == IGNORE_INDEX).all()
    # prompts are left-padded for generation and end with the assistant header
    prompt = batch["prompt_ids"][row["txt"]]
    assert tokenizer.convert_ids_to_tokens(prompt[-2:].tolist()) == ["<|im_start|>", "assistant"]
    assert batch["answers"][row["img"]] == "cross"


def test_builtin_dataset_is_deterministic_and_answerable(tmp_path):
    a = generate_shapes(str(tmp_path / "a"), seed=3, image_size=32, num_train=20, num_val=5)
    b = generate_shapes(str(tmp_path / "b"), seed=3, image_size=32, num_train=20, num_val=5)
    for name in ("align.json", "sft_train.json", "sft_val.json"):
        assert open(os.path.join(a, name)).read() == open(os.path.join(b, name)).read()
    assert (
        open(os.path.join(a, "images/000007.png"), "rb").read()
        == open(os.path.join(b, "images/000007.png"), "rb").read()
    )
    val = json.load(open(os.path.join(a, "sft_val.json")))
    assert len(val) == 5 and all(r["conversations"][0]["value"].startswith("<image>") for r in val)
    # Each question kind has >= 4 possible answers (chance <= 25%), and answers follow from the render.
    import random

    rng = random.Random(0)
    seen = {k: set() for k in QUESTIONS}
    for _ in range(300):
        _, facts = render(rng, 32)
        for k, v in answers(facts).items():
            seen[k].add(v)
    assert all(len(v) >= 4 for v in seen.values()), seen


def test_length_grouped_sampler_groups_modality_and_is_resumable():
    lengths = [(i * 37) % 100 for i in range(200)]
    has_image = [i % 3 != 0 for i in range(200)]
    s = GroupedSampler(lengths, has_image, batch_size=4, group_by_length=True, seed=1)
    order = list(s)
    assert sorted(order) == list(range(200))
    full = [order[k : k + 4] for k in range(0, len(order), 4)]
    mixed = [b for b in full if len({has_image[i] for i in b}) > 1]
    assert len(mixed) <= 1  # only the ragged tail may mix
    s.resume_at(0, 12)
    assert list(s) == order[12:]  # resume mid-epoch
    assert list(s) == order  # one-shot
    s.resume_at(0, 12)
    s.set_epoch(1)
    epoch_1 = list(s)  # a position in epoch 0 never cuts epoch 1
    assert sorted(epoch_1) == list(range(200)) and epoch_1 != order
    ranks = [list(GroupedSampler(lengths, has_image, 4, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(200))


# ---- bad input --------------------------------------------------------------------------------

GOOD = {
    "id": "ok",
    "image": "images/000000.png",
    "conversations": [{"from": "human", "value": "<image>\nWhat shape are they?"}, {"from": "gpt", "value": "x"}],
}


def bad(**change):
    rec = json.loads(json.dumps(GOOD))
    rec.update(change)
    rec["id"] = "bad"
    return rec


BAD_RECORDS = {
    "missing image": (bad(image="images/nope.png"), "missing image file: .*nope.png"),
    "no conversations": (bad(conversations=[]), "no conversations"),
    "broken order": (
        bad(conversations=[{"from": "gpt", "value": "<image> a"}, {"from": "human", "value": "b"}]),
        "turn 0 is from 'gpt', expected 'human'",
    ),
    "placeholder without image": (
        {"id": "bad", "conversations": GOOD["conversations"]},
        "placeholder count mismatch: 1 <image> in the text, 0 image",
    ),
    "image without placeholder": (
        bad(conversations=[{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}]),
        "placeholder count mismatch: 0 <image> in the text, 1 image",
    ),
    "two placeholders": (
        bad(conversations=[{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}]),
        "placeholder count mismatch: 2",
    ),
    "too long": (
        bad(
            conversations=[
                {"from": "human", "value": "<image>\n" + "What shape are they? " * 10},
                {"from": "gpt", "value": "x"},
            ]
        ),
        "too long: .* > max_length 64",
    ),
    "two images, one placeholder": (
        bad(image=["images/000000.png", "images/000001.png"]),
        "placeholder count mismatch: 1 <image> in the text, 2 image",
    ),
    "a list item that is not a path": (bad(image=["images/000000.png", 3]), r"'image'\[1\] is int 3, not a path"),
    "an empty image list": (bad(image=[]), "'image' is an empty list"),
    "image and video": (bad(video="clip.mp4"), "both 'image' and 'video'"),
    "image is a number": (bad(image=5), "'image' is int 5, not a path"),
    "image is empty": (bad(image=" "), "'image' is str ' ', not a path"),
    "null answer": (
        bad(conversations=[{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": None}]),
        "turn 1: 'value' is NoneType",
    ),
    "whitespace answer": (
        bad(conversations=[{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "  "}]),
        "turn 1: empty answer",
    ),
    "conversations not a list": (bad(conversations={"from": "human"}), "'conversations' is not a list"),
    "path outside the folder": (bad(image="../../../../etc/hostname"), "image path '.*etc/hostname' resolves outside"),
    "absolute path": (bad(image="/etc/hostname"), "image path '/etc/hostname' resolves outside"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_raises_with_file_and_id(tokenizer, shapes_root, tmp_path, case):
    record, needle = BAD_RECORDS[case]
    path = write_records(tmp_path, [GOOD, record])
    dm = make_dm(tokenizer, path, shapes_root)
    with pytest.raises(DataError, match=f"data.json: record 'bad': {needle}"):
        dm.setup()


def test_bad_records_skipped_and_counted(tokenizer, shapes_root, tmp_path):
    records = [GOOD] + [r for r, _ in BAD_RECORDS.values()]
    dm = make_dm(tokenizer, write_records(tmp_path, records), shapes_root, on_error="skip")
    dm.setup()
    assert len(dm.train_set) == 1
    assert sum(dm.skipped.values()) == len(BAD_RECORDS)


def test_unreadable_and_truncated_images(tokenizer, shapes_root, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(os.path.join(shapes_root, "images"), folder / "images")
    (folder / "images" / "garbage.png").write_bytes(b"not a png")
    data = (folder / "images" / "000001.png").read_bytes()
    (folder / "images" / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("garbage.png", "cut.png"):
        path = write_records(tmp_path, [bad(image=f"images/{name}")], f"{name}.json")
        dm = make_dm(tokenizer, path, str(folder))
        dm.setup()
        with pytest.raises(DataError, match=f"{name}.json: record 'bad': unreadable image .*{name}"):
            dm.train_set[0]
        dm = make_dm(tokenizer, path, str(folder), on_error="skip")
        dm.setup()
        batch = next(iter(dm.train_dataloader()))  # a stand-in keeps the batch whole and scores nothing
        assert batch["num_skipped"] == 1 and batch["skipped"].tolist() == [True]
        assert (batch["labels"] == IGNORE_INDEX).all() and (batch["pixel_values"] == 0).all()


def test_file_level_errors(tokenizer, shapes_root, tmp_path):
    with pytest.raises(DataError, match="data file not found: .*missing.json"):
        make_dm(tokenizer, str(tmp_path / "missing.json"), shapes_root).setup()
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        make_dm(tokenizer, str(broken), shapes_root).setup()
    with pytest.raises(DataError, match="record 'ok': record has an image but data.image_folder is not set"):
        make_dm(tokenizer, write_records(tmp_path, [GOOD]), None).setup()


def test_symlink_out_of_the_folder_is_refused_unless_allowed(tokenizer, shapes_root, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    outside = tmp_path / "secret.png"
    shutil.copy(os.path.join(shapes_root, "images", "000000.png"), outside)
    (folder / "link.png").symlink_to(outside)
    path = write_records(tmp_path, [bad(image="link.png")])
    with pytest.raises(DataError, match="record 'bad': image path 'link.png' resolves outside"):
        make_dm(tokenizer, path, str(folder)).setup()
    dm = make_dm(tokenizer, path, str(folder), images_outside_folder=True)  # the YAML opts out
    dm.setup()
    assert dm.train_set[0]["pixel_values"].shape == (1, 3, 32, 32)  # [views, 3, S, S]


def test_latin1_json_names_the_file(tokenizer, shapes_root, tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([GOOD], ensure_ascii=False).replace("ok", "caf\u00e9").encode("latin-1"))
    with pytest.raises(DataError, match="latin1.json: not UTF-8 text .*re-encode it"):
        make_dm(tokenizer, str(path), shapes_root).setup()


def test_duplicate_ids_are_kept_and_counted(tokenizer, shapes_root, tmp_path, caplog):
    dm = make_dm(tokenizer, write_records(tmp_path, [GOOD, GOOD, GOOD]), shapes_root)
    dm.setup()
    assert len(dm.train_set) == 3 and dm.duplicate_ids == 2
    assert "2 duplicate record ids (kept): 'ok', 'ok'" in caplog.text


def test_decompression_bomb_is_an_unreadable_image(tokenizer, shapes_root, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 32 x 32 image is then over twice the limit
    path = write_records(tmp_path, [GOOD])
    dm = make_dm(tokenizer, path, shapes_root)
    dm.setup()
    with pytest.raises(DataError, match="record 'ok': unreadable image .*decompression bomb"):
        dm.train_set[0]
    dm = make_dm(tokenizer, path, shapes_root, on_error="skip")
    dm.setup()
    assert dm.train_set[0]["skipped"]  # a stand-in counted by the batch as skipped; the run goes on


def test_datasets_pickle_without_the_trainer_for_spawned_workers(tiny_cfg):
    """DataLoader workers started by spawn or forkserver (macOS, Python 3.14) pickle the dataset, which encodes
    through its DataModule: the DataModule goes without its Trainer (whose callbacks hold lambdas), and the
    unpickled dataset gives the same sample."""
    import pickle
    from types import SimpleNamespace

    import torch

    from experiment.assemble import build_datamodule

    dm = build_datamodule(tiny_cfg())
    dm.setup("fit")
    dm.trainer = SimpleNamespace(callbacks=[lambda batch: batch])  # a lambda, as ThroughputRates holds
    copy = pickle.loads(pickle.dumps(dm.train_set))
    assert dm.trainer is not None  # the DataModule itself keeps its Trainer
    ours, theirs = dm.train_set[0], copy[0]
    assert ours["input_ids"] == theirs["input_ids"] and ours["labels"] == theirs["labels"]
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
