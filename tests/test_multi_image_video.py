"""Several images in a record and video records, with an AnyRes tower: the data's ids, views and image_sizes give
the logits of transformers' `LlavaOnevisionForConditionalGeneration` (its several-image rule: base views and one
newline each; its video path: frames pooled 2x2, one newline after the video), the record index counts what the
data expands, and bad images or videos are errors naming the record, or counted skips."""

from __future__ import annotations

import json
import math

import av
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos
from transformers import (
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionVideoProcessor,
)

from datamodules import ImageSpec, LLaVADataModule
from datamodules.image_tokens import header_size
from datamodules.images import load_image
from datamodules.json_scan import DataError
from datamodules.llava_data import LLaVADataset, Sample, collate
from datamodules.packing import pack
from datamodules.templates import encode
from experiment.assemble import build_module
from experiment.config import load_config
from foundation.schema import ConfigError, DataConfig
from foundation.views import VIEW_BASE_ONLY, VIEW_NEWLINE, VIEW_POOL
from inference.export import export_llava
from lit_modules.callbacks.validation_samples import ValidationSamples
from tests.support.quickstart import tiny_overrides
from tests.support.tiny_models import TINY_CLIP_ENCODER

TILING = "model.tiling={name: anyres, grid_pinpoints: '(1x1),...,(3x3)'}"
PHOTOS = {
    "coffee.png": lambda: photos.coffee(),  # 400 x 600
    "wide.png": lambda: photos.coffee()[150:190],  # 40 x 600
    "cat.png": lambda: photos.chelsea(),  # 300 x 451
}
FRAMES = [photos.coffee(), photos.astronaut(), photos.chelsea(), photos.rocket(), photos.camera(), photos.coins()]
QUESTION = "What is shown?"


def write_video(path, frames, fps: int = 2, size=(64, 48)) -> None:
    """An MPEG-4 video of `frames` (photos resized to `size`, width x height), written with PyAV."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for photo in frames:
            rgb = np.asarray(Image.fromarray(photo).convert("RGB").resize(size))
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    for name, photo in PHOTOS.items():
        Image.fromarray(photo()).save(folder / name)
    write_video(folder / "clip.mp4", FRAMES)
    (folder / "corrupt.mp4").write_bytes(b"\x00" * 200)
    (folder / "empty.mp4").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def tiny(shapes_root, tmp_path_factory):
    """The project's AnyRes model and transformers' OneVision with the same weights (through the LLaVA-NeXT export,
    whose layout OneVision shares)."""
    runs = str(tmp_path_factory.mktemp("runs"))
    cfg = load_config(None, tiny_overrides(shapes_root, runs) + [TINY_CLIP_ENCODER, TILING, "data.template=chatml"])
    torch.manual_seed(0)
    module = build_module(cfg).eval()
    nxt = LlavaNextForConditionalGeneration.from_pretrained(export_llava(module, "chatml", runs + "/export"))
    config = LlavaOnevisionConfig(**{k: v for k, v in nxt.config.to_dict().items() if k not in ("architectures",)})
    config.video_token_id = module.model.image_token_id  # the project's placeholder stands for a video's frames
    config.image_token_id = module.model.image_token_id
    config.vision_aspect_ratio = "anyres_max_9"
    hf = LlavaOnevisionForConditionalGeneration(config).eval()
    missing, unexpected = hf.load_state_dict(nxt.state_dict(), strict=False)
    assert not missing and not unexpected
    return module, hf


def _dataset(module, folder, records, **data) -> LLaVADataset:
    dm = LLaVADataModule(module.tokenizer, DataConfig(train_json="-", template="chatml", **data),
                         ImageSpec.of(module.model.vision), stage="sft")  # fmt: skip
    samples = [Sample(r, k, 0, True) for k, r in enumerate(records)]
    video = {"video_frames": data.get("video_frames", 32), "video_time_prompt": data.get("video_time_prompt")}
    return LLaVADataset(samples, "-", str(folder), dm.encode, dm.transform, dm.image_token_id, dm.image_tokens, **video)


def _record(value: str, **media) -> dict:
    return {"id": "r", **media, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "ok"}]}


def test_several_images_are_onevision_base_views_in_order(tiny, media):
    """Two images of other sizes in one record: each placeholder takes the next image at its base view and one
    newline (gh*gw + 1 tokens, OneVision's processor count), and the logits are OneVision's with batch_num_images."""
    module, hf = tiny
    model = module.model
    record = _record(f"<image>\nFirst. <image>\n{QUESTION}", image=["coffee.png", "wide.png"])
    item = _dataset(module, media, [record])[0]
    gh, gw = model.vision.grid_size
    flags = VIEW_BASE_ONLY | VIEW_NEWLINE
    assert item["image_sizes"] == [(400, 600, flags), (40, 600, flags)]
    assert item["pixel_values"].shape[0] == 2  # one view each, no tiles
    for k, name in enumerate(["coffee.png", "wide.png"]):  # in placeholder order: the base view of each image
        torch.testing.assert_close(item["pixel_values"][k], model.vision.preprocess(load_image(media / name))[0])
    ids = torch.tensor([item["input_ids"]])
    runs = [
        len(list(g)) for key, g in __import__("itertools").groupby(item["input_ids"]) if key == model.image_token_id
    ]
    assert runs == [gh * gw + 1, gh * gw + 1]
    sizes = torch.tensor(item["image_sizes"])
    with torch.no_grad():
        mine = model(ids, torch.ones_like(ids), item["pixel_values"], image_sizes=sizes, full_logits=True).logits
        theirs = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=item["pixel_values"],
                    image_sizes=sizes[:, :2], batch_num_images=torch.tensor([2])).logits  # fmt: skip
    print(f"several images: max |logits - OneVision's| = {(mine - theirs).abs().max():.2e}")
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_video_frames_equal_onevision_video_path(tiny, media):
    """A 6-frame video, 4 sampled (frames 0, 1, 3, 5, as LLaVA-NeXT's linspace): base views equal to OneVision's
    video processor within 2 8-bit steps, ceil(g/2)^2 tokens a frame and one newline, OneVision's logits."""
    module, hf = tiny
    model = module.model
    prompt = " The video lasts {duration:.1f} s; frames at {times}."
    record = _record(f"<image>\n{QUESTION}", video="clip.mp4")
    item = _dataset(module, media, [record], video_frames=4, video_time_prompt=prompt)[0]
    gh, gw = model.vision.grid_size
    pooled = math.ceil(gh / 2) * math.ceil(gw / 2)
    last = VIEW_BASE_ONLY | VIEW_POOL | VIEW_NEWLINE
    assert [s[2] for s in item["image_sizes"]] == [VIEW_BASE_ONLY | VIEW_POOL] * 3 + [last]
    assert item["input_ids"].count(model.image_token_id) == 4 * pooled + 1
    # the frames' times follow the placeholder, as if the record had them written (2 fps: frame k at k / 2 s)
    written = _record(f"<image> The video lasts 3.0 s; frames at 0.00s,0.50s,1.50s,2.50s.\n{QUESTION}")
    once = [t for k, t in enumerate(item["input_ids"]) if t != model.image_token_id or item["input_ids"][k - 1] != t]
    assert once == encode(module.tokenizer, written["conversations"], "chatml", None, True, "<image>").input_ids

    with av.open(str(media / "clip.mp4")) as container:
        decoded = [f.to_image() for f in container.decode(video=0)]
    vision = model.vision
    side = {"height": vision.image_size, "width": vision.image_size}
    processor = LlavaOnevisionVideoProcessor(
        size=side, image_mean=list(vision.pixel_mean), image_std=list(vision.pixel_std)
    )
    theirs_pixels = processor([np.stack([np.asarray(decoded[k]) for k in (0, 1, 3, 5)])], return_tensors="pt")
    theirs_pixels = theirs_pixels["pixel_values_videos"][0]
    step = 1 / 255 / min(vision.pixel_std)
    pixel_gap = (theirs_pixels - item["pixel_values"]).abs().max()
    assert pixel_gap <= 2 * step  # their torch resize, the project's PIL one (as its base views)

    ids = torch.tensor([item["input_ids"]])
    with torch.no_grad():
        mine = model(ids, torch.ones_like(ids), item["pixel_values"], image_sizes=torch.tensor(item["image_sizes"]),
                     full_logits=True).logits  # fmt: skip
        theirs = hf(input_ids=ids, attention_mask=torch.ones_like(ids),
                    pixel_values_videos=item["pixel_values"][None]).logits  # fmt: skip
    print(f"video: max |pixels - OneVision's| = {pixel_gap:.2e}, max |logits - OneVision's| = "
          f"{(mine - theirs).abs().max():.2e}")  # fmt: skip
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def _datamodule(module, folder, records, tmp_path, **data) -> LLaVADataModule:
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    config = DataConfig(train_json=str(path), image_folder=str(folder), template="chatml", max_length=2048,
                        index_dir=str(tmp_path / "index"), index_workers=1, **data)  # fmt: skip
    return LLaVADataModule(module.tokenizer, config, ImageSpec.of(module.model.vision), stage="sft")


def test_the_index_counts_each_image_from_its_header(tiny, media, tmp_path):
    """Record lengths in the index (read from image headers and the video's header) equal the data's expansion:
    a tiled single image, two base views, a video with its time prompt; a size in the header is the loaded one."""
    module, _ = tiny
    records = [
        _record(f"<image>\n{QUESTION}", image="cat.png"),
        _record(f"<image><image>\n{QUESTION}", image=["wide.png", "coffee.png"]),
        _record(f"<image>\n{QUESTION}", video="clip.mp4"),
        _record(QUESTION),
    ]
    for k, r in enumerate(records):
        r["id"] = str(k)
    dm = _datamodule(module, media, records, tmp_path, video_frames=3, video_time_prompt=" ({frames} at {times})")
    dm.setup()
    samples = dm.train_set.samples
    lengths = [len(dm.train_set[k]["input_ids"]) for k in range(len(records))]
    assert samples.lengths.tolist() == lengths
    assert samples.has_image.tolist() == [True, True, True, False]
    vision = module.model.vision
    assert lengths[0] - lengths[3] > vision.num_tokens  # the tiled image takes more than one view's tokens
    views = dm.train_set[0]["pixel_values"].shape[0]
    assert views == vision.num_views((300, 451)) > 1

    exif = Image.Exif()
    exif[0x0112] = 6
    for name in ("turned.jpg", "turned.png"):  # stored 40 x 60, EXIF orientation 6: shown (and loaded) 60 x 40
        Image.fromarray(photos.coffee()[:40, :60]).save(tmp_path / name, exif=exif)
        loaded = load_image(tmp_path / name)
        assert header_size(str(tmp_path / name)) == (loaded.height, loaded.width) == (60, 40)


@pytest.mark.parametrize(
    "record, needle",
    [
        (_record("<image><image>hi", image=["cat.png", "nope.png"]), "missing image file: .*nope.png"),
        (_record("<image><image>hi", image=["cat.png", "../x.png"]), "image path '../x.png' resolves outside"),
        (_record("<image><image>hi", video="clip.mp4"), "placeholder count mismatch: 2 <image> in the text, 1 video"),
        (_record("<image>hi", video="corrupt.mp4"), "unreadable video .*corrupt.mp4"),
        (_record("<image>hi", video="empty.mp4"), "unreadable video .*empty.mp4"),
    ],
    ids=["missing second image", "escaping path", "video with two placeholders", "corrupt video", "empty video"],
)
def test_bad_media_names_the_record_or_is_a_counted_skip(tiny, media, tmp_path, record, needle):
    module, _ = tiny
    good = _record(f"<image>\n{QUESTION}", image="cat.png")
    records = [dict(good, id="ok"), dict(record, id="bad")]
    with pytest.raises(DataError, match=f"data.json: record 'bad': {needle}"):
        _datamodule(module, media, records, tmp_path).setup()
    dm = _datamodule(module, media, records, tmp_path / "skip", on_error="skip")
    dm.setup()
    assert len(dm.train_set) == 1 and sum(dm.skipped.values()) == 1


def test_an_unreadable_image_stands_in_with_matching_views_and_tokens(tiny, media, tmp_path):
    """An image whose header reads but whose pixels do not (truncated), with on_error=skip: a blank S x S stand-in
    whose views, image_sizes and expanded tokens agree, so the batch still runs through the model."""
    module, _ = tiny
    data = (media / "cat.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    for name in ("cat.png", "wide.png"):
        (tmp_path / name).write_bytes((media / name).read_bytes())
    records = [_record("<image><image>hi", image=["wide.png", "cut.png"]), _record("<image>hi", image="cut.png")]
    dataset = _dataset(module, tmp_path, records, on_error="skip")
    dataset.on_error = "skip"
    model = module.model
    for item in (dataset[0], dataset[1]):
        assert item["skipped"]
        sizes = torch.tensor(item["image_sizes"])
        assert item["pixel_values"].shape[0] == sum(model.vision.num_views(tuple(s)) for s in sizes.tolist())
        ids = torch.tensor([item["input_ids"]])
        with torch.no_grad():  # embed checks that the image tokens and the packed embeddings agree
            model.embed(ids, item["pixel_values"], sizes)


def test_a_time_prompt_with_other_fields_is_a_config_error(shapes_root, tmp_path):
    with pytest.raises(
        ConfigError, match=r"'data.video_time_prompt' = .*\{fps\}.*\{duration\}, \{frames\} and \{times\}"
    ):
        load_config(None, tiny_overrides(shapes_root, str(tmp_path)) + ["data.video_time_prompt='at {fps} fps'"])


def test_validation_samples_show_each_samples_first_image(tiny, media):
    """A batch of a two-image sample (base views) and a tiled one: each sample's picture is the one it shows alone."""
    module, _ = tiny
    records = [_record("<image><image>hi", image=["wide.png", "coffee.png"]), _record("<image>hi", image="cat.png")]
    dataset = _dataset(module, media, records)
    pad = module.tokenizer.pad_token_id
    batch = collate([dataset[0], dataset[1]], pad)
    assert batch["num_images"].tolist() == [2, 1] and batch["image_sizes"].shape == (3, 3)
    holder = type("M", (), {"model": module.model})()
    shown = ValidationSamples._images(holder, batch)
    for k in (0, 1):
        assert np.array_equal(shown[k], ValidationSamples._images(holder, collate([dataset[k]], pad))[0])
    assert shown[0].shape == shown[1].shape and not np.array_equal(shown[0], shown[1])


def test_packing_keeps_image_sizes_with_their_views(tiny, media):
    """Packed rows reorder samples (longest first): image_sizes rows and views follow the packed order, so the
    packed batch embeds each sample's images in its own slots, as each sample alone does."""
    module, _ = tiny
    model = module.model
    records = [_record("<image>hi", image="wide.png"), _record("<image><image>hi", image=["cat.png", "coffee.png"]),
               _record("hi"), _record("<image>hi", image="cat.png")]  # fmt: skip
    dataset = _dataset(module, media, records)
    items = [dataset[k] for k in range(len(records))]
    for k, item in enumerate(items):
        item["id"] = str(k)
    batch = pack(items, 4096, module.tokenizer.pad_token_id)
    order = [items[int(i)] for i in batch["ids"]]
    assert batch["image_sizes"].tolist() == [list(s) for x in order for s in x["image_sizes"]]
    with torch.no_grad():
        packed = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_sizes"])
        for name, (r, start, n) in zip(batch["ids"], batch["spans"]):
            x = items[int(name)]
            sizes = torch.tensor(x["image_sizes"]) if x["image_sizes"] else None
            alone = model.embed(torch.tensor([x["input_ids"]]), x["pixel_values"], sizes)[0]
            torch.testing.assert_close(packed[r, start : start + n], alone)
