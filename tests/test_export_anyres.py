"""Export of an AnyRes run to transformers' LLaVA-NeXT: loaded with `from_pretrained`, the exported model and
processor give the project's token ids, pixel tiles (within the PIL / torch resize difference), logits and greedy
answers on real photos, including very wide and smaller than one tile; what LLaVA-NeXT cannot hold
(LLaVA-OneVision's `max_tiles`, a stretched fit) is refused by name."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from skimage import data as photos
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from datamodules.templates import encode
from experiment.assemble import build_module
from experiment.config import load_config
from inference.export import ExportError, export_llava
from inference.exported import ExportedPredictor
from tests.support.quickstart import tiny_overrides
from tests.support.tiny_models import TINY_CLIP_ENCODER

TILING = "model.tiling={name: anyres, grid_pinpoints: '(1x1),...,(3x3)'}"
PHOTOS = {
    "coffee": lambda: photos.coffee(),  # 400 x 600
    "very_wide": lambda: photos.coffee()[150:190],  # 40 x 600
    "below_one_tile": lambda: photos.chelsea()[100:120, 200:226],  # 20 x 26, the tile is 32 px
}


def _module(shapes_root, runs: str, *extra: str):
    cfg = load_config(None, tiny_overrides(shapes_root, runs) + [TINY_CLIP_ENCODER, "data.template=chatml", *extra])
    torch.manual_seed(0)
    return build_module(cfg).eval()


@pytest.fixture(scope="module")
def exported(shapes_root, tmp_path_factory):
    module = _module(shapes_root, str(tmp_path_factory.mktemp("runs")), TILING)
    out = export_llava(module, "chatml", str(tmp_path_factory.mktemp("export")))
    hf = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    return module, hf, AutoProcessor.from_pretrained(out), out


@pytest.mark.parametrize("name", PHOTOS)
def test_exported_llava_next_equals_the_project(exported, name):
    module, hf, processor, _ = exported
    model, tokenizer = module.model, module.tokenizer
    img = Image.fromarray(PHOTOS[name]()).convert("RGB")
    question = "What color are the shapes?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    theirs = processor(images=img, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")  # fmt: skip

    # training's prompt ids, the placeholder expanded to the image's count (what the data does)
    conversation = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "."}]
    prompt = encode(tokenizer, conversation, "chatml", None, True, "<image>").prompt_ids
    count = model.vision.num_image_tokens((img.height, img.width))
    ids = [t for tok in prompt for t in ([tok] * count if tok == model.image_token_id else [tok])]
    assert theirs["input_ids"][0].tolist() == ids
    pixels, sizes = model.vision.preprocess(img), torch.tensor([[img.height, img.width]])
    assert theirs["image_sizes"].tolist() == sizes.tolist()
    # the exported processor resizes with torch, the project as LLaVA-NeXT (PIL): within 2 8-bit steps
    step = 1 / 255 / min(model.vision.pixel_std)
    assert (theirs["pixel_values"][0] - pixels).abs().max() <= 2 * step

    prompt_ids, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    with torch.no_grad():
        mine = model(prompt_ids, mask, pixels, image_sizes=sizes).logits
        hf_logits = hf(input_ids=prompt_ids, attention_mask=mask, pixel_values=pixels[None], image_sizes=sizes).logits
        torch.testing.assert_close(hf_logits, mine, rtol=1e-5, atol=1e-5)
    generated = hf.generate(input_ids=prompt_ids, attention_mask=mask, pixel_values=pixels[None], image_sizes=sizes,
                            max_new_tokens=6, do_sample=False)  # fmt: skip
    ours = model.generate(prompt_ids, mask, pixels, 6, module.stop_ids, tokenizer.pad_token_id, image_sizes=sizes)[0]
    theirs_new = generated[0, len(ids) :].tolist()
    assert ours and theirs_new[: len(ours)] == ours  # (ours stops before the stop id, theirs writes it)


def test_the_export_answers_through_the_exported_predictor(exported):
    _, _, _, out = exported
    predictor = ExportedPredictor(out, device="cpu")
    assert isinstance(predictor.model, LlavaNextForConditionalGeneration)


@pytest.mark.parametrize(
    "tiling, match",
    [
        ("{name: anyres, max_tiles: 4}", "max_tiles is LLaVA-OneVision's anyres_max_N"),
        ("{name: anyres, fit: resize}", "fit is 'resize'"),
    ],
)
def test_what_llava_next_cannot_hold_is_refused(shapes_root, tmp_path, tiling, match):
    module = _module(shapes_root, str(tmp_path / "runs"), f"model.tiling={tiling}")
    with pytest.raises(ExportError, match=match):
        export_llava(module, "chatml", str(tmp_path / "export"))
