"""`load_image`: files written from real photos (scikit-image's) come back as a person sees them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from datamodules.images import BACKGROUND, load_image
from datamodules.llava_data import LLaVADataset, Sample
from datamodules.templates import Encoded

ORIENTATION = 0x0112  # EXIF tag


def rgb(name: str) -> np.ndarray:
    return getattr(photos, name)()  # [H, W, 3] uint8


def mean_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


# EXIF orientation -> how the pixels are stored so that the displayed image is the photo
STORED = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,  # stored turned left; the viewer turns it 90 degrees clockwise
    8: Image.Transpose.ROTATE_270,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


@pytest.mark.parametrize("orientation", sorted(STORED))
@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_exif_orientation_is_applied(tmp_path, name, orientation):
    upright = Image.fromarray(rgb(name))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = tmp_path / "phone.jpg"
    upright.transpose(STORED[orientation]).save(path, quality=95, exif=exif)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == upright.size
    assert mean_abs(loaded, upright) < 3  # JPEG noise only
    if upright.size[0] == upright.size[1]:  # a square photo read sideways would have the same size
        assert mean_abs(loaded, upright.transpose(STORED[orientation])) > 20


@pytest.mark.parametrize("name", ["page", "camera"])
def test_16_bit_grayscale_png_is_scaled_not_saturated(tmp_path, name):
    gray = getattr(photos, name)()  # [H, W] uint8
    path = tmp_path / "scan16.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(path)  # 0..255 -> 0..65535
    assert Image.open(path).mode.startswith("I")
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (*gray.shape, 3)
    np.testing.assert_array_equal(loaded, np.repeat(gray[..., None], 3, axis=2))


def test_16_bit_values_between_8_bit_steps_round(tmp_path):
    values = np.array([[0, 128, 129, 32767, 65534, 65535]], dtype=np.uint16)
    path = tmp_path / "ramp.png"
    Image.fromarray(values).save(path)
    got = np.asarray(load_image(path))[0, :, 0]
    np.testing.assert_array_equal(got, np.rint(values[0].astype(np.float64) * 255 / 65535).astype(np.uint8))


def test_rgba_is_composited_on_white(tmp_path):
    photo = rgb("coffee")  # 400 x 600
    h, w, _ = photo.shape
    alpha = np.full((h, w), 255, np.uint8)
    alpha[:, : w // 3] = 0  # transparent: the stored RGB there is garbage
    alpha[:, w // 3 : w // 2] = 128  # half transparent
    stored = photo.copy()
    stored[:, : w // 3] = 0  # typical: black under the transparent area
    path = tmp_path / "cutout.png"
    Image.fromarray(np.dstack([stored, alpha]), "RGBA").save(path)
    loaded = np.asarray(load_image(path), dtype=np.float64)
    a = alpha[..., None] / 255.0
    expected = stored * a + np.array(BACKGROUND) * (1 - a)  # straight alpha over white
    assert np.abs(loaded - expected).max() <= 1
    assert (loaded[:, : w // 3] == 255).all()


def test_grayscale_with_alpha_is_composited_on_white(tmp_path):
    gray = getattr(photos, "camera")()
    alpha = np.where(np.arange(gray.shape[1]) < 100, 0, 255).astype(np.uint8)[None].repeat(gray.shape[0], 0)
    path = tmp_path / "la.png"
    Image.fromarray(np.dstack([gray, alpha]), "LA").save(path)
    loaded = np.asarray(load_image(path))
    assert (loaded[:, :100] == 255).all()
    np.testing.assert_array_equal(loaded[:, 100:, 0], gray[:, 100:])


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_transparency_is_composited_on_white(tmp_path, fmt):
    pal_img = Image.fromarray(rgb("chelsea")).quantize(colors=64)
    index = np.asarray(pal_img)
    clear = int(np.bincount(index.ravel()).argmax())  # the most common colour becomes transparent
    path = tmp_path / f"sticker.{fmt}"
    pal_img.save(path, transparency=clear)
    palette = np.array(pal_img.getpalette()[: 3 * 64], dtype=np.uint8).reshape(-1, 3)
    expected = palette[index]
    expected[index == clear] = BACKGROUND
    loaded = np.asarray(load_image(path))
    assert (index == clear).mean() > 0.02  # a real test: a visible share of the image is transparent
    np.testing.assert_array_equal(loaded, expected)


def test_animated_gif_gives_the_first_frame(tmp_path):
    size = (300, 200)
    frames = [Image.fromarray(rgb(n)).resize(size) for n in ("rocket", "coffee", "chelsea")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as gif:
        assert gif.n_frames == 3
        gif.seek(2)  # an open file left at another frame does not matter: load_image opens its own
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == size
    first, second = mean_abs(loaded, frames[0]), mean_abs(loaded, frames[1])
    assert first < 10 < second  # GIF's 256-colour palette only


def test_plain_rgb_jpeg_is_unchanged(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(rgb("rocket")).save(path)
    np.testing.assert_array_equal(np.asarray(load_image(path)), rgb("rocket"))


def test_unreadable_file_raises_oserror(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image")
    with pytest.raises(OSError):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_file_raises_even_where_pil_is_told_to_load_truncated_images(tmp_path, monkeypatch, fmt):
    """lmms-eval sets PIL's LOAD_TRUNCATED_IMAGES when imported; a cut file must still fail, not load half grey."""
    from PIL import ImageFile

    path = tmp_path / f"cut.{fmt.lower()}"
    Image.fromarray(photos.astronaut()).save(path, format=fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(OSError):
        load_image(str(path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES  # the caller's setting is left as it was


def test_dataset_opens_images_with_load_image(tmp_path):
    # a sideways-stored phone photo reaches the transform upright
    upright = Image.fromarray(rgb("chelsea"))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    record = {"id": "r0", "image": "phone.jpg", "conversations": [{"from": "human", "value": "<image>"}] * 2}
    seen = []

    def transform(img: Image.Image) -> torch.Tensor:
        seen.append(img)
        return torch.zeros(3, 4, 4)

    def encode(rec: dict) -> Encoded:
        return Encoded(input_ids=[7, 1], labels=[-100, 1], prompt_ids=[7], answer="")

    dataset = LLaVADataset([Sample(record, 0, 2, True)], "x.json", str(tmp_path), encode, transform, 7, 1)
    assert dataset[0]["pixel_values"].shape == (1, 3, 4, 4)  # [views, 3, S, S]
    assert seen[0].mode == "RGB" and seen[0].size == upright.size and mean_abs(seen[0], upright) < 3
