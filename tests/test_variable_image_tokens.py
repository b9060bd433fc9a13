"""Call sites outside the data layer with a token count that varies per image (AnyRes): the Predictor (predict,
evaluate, lmms-eval answer through it) hands the batch's `image_sizes` to generation, and the validation-samples
callback finds each image's base view among the views of a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from datamodules.templates import encode
from experiment.assemble import build_datamodule, build_module
from experiment.config import load_config
from lit_modules.callbacks.validation_samples import ValidationSamples
from lit_modules.predictor import Predictor
from tests.support.quickstart import tiny_overrides
from tests.support.tiny_models import TINY_CLIP_ENCODER

TILING = "model.tiling={name: anyres, grid_pinpoints: '(1x1),...,(3x3)'}"
PHOTOS = {"coffee": lambda: photos.coffee(), "very_wide": lambda: photos.coffee()[150:190]}  # 400 x 600, 40 x 600


@pytest.fixture(scope="module")
def anyres(shapes_root, tmp_path_factory):
    overrides = [TINY_CLIP_ENCODER, TILING, "data.template=chatml", "data.max_length=512"]
    cfg = load_config(None, tiny_overrides(shapes_root, str(tmp_path_factory.mktemp("runs"))) + overrides)
    torch.manual_seed(0)
    module = build_module(cfg).eval()
    return module, cfg


def _photo(tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.png"
    Image.fromarray(PHOTOS[name]()).save(path)
    return str(path)


def test_an_anyres_predictor_answers_as_the_model_generates(anyres, tmp_path):
    """Two photos of other sizes (so other token counts) answered in one left-padded batch give the model's own
    greedy generation of each prompt alone (ids expanded to that image's count, its views, its size)."""
    module, cfg = anyres
    predictor = Predictor(module, build_datamodule(cfg, module.tokenizer))
    question = "What color are the shapes?"
    records = [{"id": n, "image": f"{n}.png", "conversations": [{"from": "human", "value": f"<image>\n{question}"}]}
               for n in PHOTOS]  # fmt: skip
    for name in PHOTOS:
        _photo(tmp_path, name)
    answers = predictor.answer_records(records, str(tmp_path), batch_size=2, max_new_tokens=5)
    model, tokenizer = module.model, module.tokenizer
    for name, answer in zip(PHOTOS, answers):
        img = Image.open(tmp_path / f"{name}.png").convert("RGB")
        conversation = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "."}]
        prompt = encode(tokenizer, conversation, "chatml", None, True, "<image>").prompt_ids
        count = model.vision.num_image_tokens((img.height, img.width))
        ids = torch.tensor([[t for tok in prompt for t in ([tok] * count if tok == model.image_token_id else [tok])]])
        sizes = torch.tensor([[img.height, img.width]])
        new = model.generate(ids, torch.ones_like(ids), model.vision.preprocess(img), 5, module.stop_ids,
                             tokenizer.pad_token_id, image_sizes=sizes)[0]  # fmt: skip
        assert answer == tokenizer.decode(new, skip_special_tokens=True).strip()


def test_validation_samples_show_each_image_from_its_base_view(anyres, tmp_path):
    """A batch of AnyRes views [K, 3, S, S] with image_sizes: each sample's picture is its image resized to the
    tile (the base view, un-normalised), not a tile of another image."""
    module, _ = anyres
    vision = module.model.vision
    images = [Image.open(_photo(tmp_path, name)).convert("RGB") for name in PHOTOS]
    pixels = torch.cat([vision.preprocess(img) for img in images])  # [K, 3, S, S]: 1 + tiles per image
    assert pixels.shape[0] > len(images) + 1  # several views each
    batch = {
        "pixel_values": pixels,
        "image_sizes": torch.tensor([[img.height, img.width] for img in images]),
        "has_image": torch.tensor([True, False, True]),  # a text-only sample between the two
    }
    shown = ValidationSamples._images(type("M", (), {"model": module.model})(), batch)
    assert shown[1] is None
    S = vision.image_size
    for picture, img in zip((shown[0], shown[2]), images):
        # the base view: the whole image resized to S x S (bicubic, LLaVA-NeXT's); un-normalising rounds to 8 bits
        expected = np.asarray(img.resize((S, S), resample=Image.Resampling.BICUBIC), dtype=np.int16)
        assert np.abs(picture.astype(np.int16) - expected).max() <= 1
