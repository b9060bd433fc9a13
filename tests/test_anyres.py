"""AnyRes against transformers' LLaVA-NeXT and LLaVA-OneVision: with a tiny CLIP tower and the same weights,
the project's pixel tiles, packed image features, image-token counts (hence token ids) and logits equal
`LlavaNextImageProcessorPil` / `LlavaNextProcessor` / `LlavaNextForConditionalGeneration` on real photos of
several aspect ratios (square, landscape, very wide, very tall, smaller than one tile, grayscale), one by one
and batched; `max_tiles` equals LLaVA-OneVision's `anyres_max_N`; the geometry equals transformers' helpers
on many sizes; the wrapper takes SAM and timm towers; the config block is checked."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from PIL import Image
from skimage import data as photos
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import unpad_image

from encoders import REDUCERS, TILINGS, build_encoder
from encoders.anyres import AnyRes, parse_grid_pinpoints, select_best_resolution
from encoders.sam import SamImageEncoder
from experiment.assemble import build_module
from experiment.describe import describe
from foundation.schema import ConfigError
from model.build import build_vision
from model.projector import PROJECTORS
from model.vlm import VisionLanguageModel
from tests.support.tiny_models import (
    TINY_CLIP,
    TINY_CLIP_ENCODER,
    TINY_LLAMA,
    TINY_SAM,
    TINY_VIT,
    TINY_VIT_IMAGE_SIZE,
)

S = TINY_CLIP["image_size"]  # the tile side, 32 px: 4 x 4 tokens of the tiny CLIP per view
TEXT = TINY_LLAMA  # 64 ids, room for the built-in tokenizer's 59
IMAGE_ID = 4  # the built-in tokenizer's <image> (the `tokenizer` fixture), which the processor expands
RANGE = "(1x1),...,(3x3)"  # LLaVA-NeXT's range form: every grid up to 3 x 3 tiles
PINPOINTS = [[h * S, w * S] for w in (1, 2, 3) for h in (1, 2, 3)]  # the same, as transformers lists it

# Real photos (scikit-image) at several aspect ratios; crops make the extreme ones.
PHOTOS = {
    "astronaut": lambda: photos.astronaut(),  # 512 x 512
    "coffee": lambda: photos.coffee(),  # 400 x 600
    "chelsea": lambda: photos.chelsea(),  # 300 x 451
    "rocket": lambda: photos.rocket(),  # 427 x 640
    "page": lambda: photos.page(),  # 191 x 384, grayscale
    "camera": lambda: photos.camera(),  # 512 x 512, grayscale
    "very_wide": lambda: photos.coffee()[150:190],  # 40 x 600
    "very_tall": lambda: photos.rocket()[:, 300:330],  # 427 x 30
    "below_one_tile": lambda: photos.chelsea()[100:120, 200:226],  # 20 x 26, smaller than a 32 px tile
}


def photo(name: str) -> Image.Image:
    return Image.fromarray(PHOTOS[name]()).convert("RGB")


def _reference(max_tiles: int | None = None):
    """transformers' LLaVA-NeXT (or LLaVA-OneVision with `anyres_max_N`) with a tiny CLIP tower and Llama."""
    common = dict(
        vision_config=CLIPVisionConfig(**TINY_CLIP),
        text_config=LlamaConfig(**TEXT),
        image_token_index=IMAGE_ID,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    if max_tiles is None:
        return LlavaNextForConditionalGeneration(LlavaNextConfig(**common)).eval()
    config = LlavaOnevisionConfig(**common, vision_aspect_ratio=f"anyres_max_{max_tiles}")
    return LlavaOnevisionForConditionalGeneration(config).eval()


def _ours_from(ref, tmp_path, max_tiles: int | None = None) -> VisionLanguageModel:
    """The project's VLM with `ref`'s weights: the tower loaded from a saved directory, as a user would."""
    ref.model.vision_tower.save_pretrained(tmp_path)
    vision = TILINGS.build("anyres", build_encoder("clip", checkpoint=str(tmp_path)), grid_pinpoints=RANGE,
                           max_tiles=max_tiles)  # fmt: skip
    projector = PROJECTORS.build("mlp2x_gelu", TINY_CLIP["hidden_size"], TEXT["hidden_size"])
    p = ref.model.multi_modal_projector
    projector.load_state_dict({"0.weight": p.linear_1.weight, "0.bias": p.linear_1.bias,
                               "2.weight": p.linear_2.weight, "2.bias": p.linear_2.bias})  # fmt: skip
    llm = LlamaForCausalLM(LlamaConfig(**TEXT))
    llm.model.load_state_dict(ref.model.language_model.state_dict())
    llm.lm_head.load_state_dict(ref.lm_head.state_dict())
    ours = VisionLanguageModel(vision, projector, llm, IMAGE_ID).eval()
    with torch.no_grad():
        ours.image_newline.copy_(ref.model.image_newline)
    return ours


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    ref = _reference()
    return ref, _ours_from(ref, tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def processor(tokenizer):
    """LLaVA-NeXT's processor (PIL backend, the arithmetic LLaVA-NeXT trained with) for the tiny tower."""
    images = LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                        image_grid_pinpoints=PINPOINTS)  # fmt: skip
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=TINY_CLIP["patch_size"],
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip


def _our_ids(tokenizer, text: str, ours: VisionLanguageModel, sizes: list[tuple[int, int]]) -> list[int]:
    """The prompt's ids with each `<image>` expanded to the project's count for its image (what the data does)."""
    ids, sizes = [], iter(sizes)
    for tok in tokenizer(text)["input_ids"]:
        ids += [tok] * (ours.vision.num_image_tokens(next(sizes)) if tok == IMAGE_ID else 1)
    return ids


@pytest.mark.parametrize("name", PHOTOS)
def test_tiles_features_ids_and_logits_equal_llava_next(pair, processor, tokenizer, name):
    ref, ours = pair
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID
    img = photo(name)
    text = "<image>\nWhat is in the picture?"
    theirs = processor(images=img, text=text, return_tensors="pt")
    pixels = ours.vision.preprocess(img)  # [1 + rows*cols, 3, S, S]
    sizes = torch.tensor([[img.height, img.width]])
    # the views: their processor pads the view axis to the batch's most; this image's own come first
    assert theirs["image_sizes"].tolist() == sizes.tolist()
    assert theirs["pixel_values"].shape[1] == pixels.shape[0] == ours.vision.layout.num_tiles((img.height, img.width))
    assert (theirs["pixel_values"][0] - pixels).abs().max().item() == 0.0
    # the token ids: each image's count, as LlavaNextProcessor expands the placeholder
    ids = _our_ids(tokenizer, text, ours, [(img.height, img.width)])
    assert theirs["input_ids"][0].tolist() == ids
    with torch.no_grad():
        expected = ref.model.get_image_features(pixel_values=theirs["pixel_values"], image_sizes=sizes).pooler_output
        features = ours.image_embeddings(pixels, sizes)  # [L, D]
        assert features.shape[0] == expected[0].shape[0] == ours.vision.num_image_tokens((img.height, img.width))
        torch.testing.assert_close(features, expected[0], rtol=0, atol=1e-6)
        logits = ours(torch.tensor([ids]), pixel_values=pixels, image_sizes=sizes).logits
        torch.testing.assert_close(logits, ref(**theirs).logits, rtol=1e-5, atol=1e-5)


def test_a_batch_of_images_of_different_sizes_equals_llava_next(pair, processor, tokenizer):
    """Two prompts, three images of three sizes: the views concatenated image after image, `image_sizes` [3, 2]."""
    ref, ours = pair
    imgs = [photo("coffee"), photo("very_tall"), photo("below_one_tile")]
    texts = ["<image>\nCompare <image> with this.", "<image>\nAnd this one?"]
    theirs = processor(images=imgs, text=texts, padding=True, return_tensors="pt")
    pixels = torch.cat([ours.vision.preprocess(img) for img in imgs])  # [K, 3, S, S]
    sizes = torch.tensor([[img.height, img.width] for img in imgs])
    with torch.no_grad():
        logits = ours(theirs["input_ids"], theirs["attention_mask"], pixels, image_sizes=sizes).logits
        expected = ref(**theirs).logits
    mask = theirs["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], expected[mask], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="take .* views"):
        ours.image_embeddings(pixels[:-1], sizes)


def test_the_default_torch_processor_is_within_one_step_of_the_project():
    """transformers' default LlavaNextImageProcessor resizes with torch, LLaVA-NeXT and the project with PIL: the
    same views and layout, pixels within two 8-bit steps (one, measured here)."""
    vision = AnyRes(build_encoder("clip", config=TINY_CLIP), grid_pinpoints=RANGE)
    torch_proc = LlavaNextImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                         image_grid_pinpoints=PINPOINTS)  # fmt: skip
    step = 1 / 255 / min(vision.pixel_std)
    for name in PHOTOS:
        img = photo(name)
        theirs = torch_proc(img, return_tensors="pt")["pixel_values"][0]
        ours = vision.preprocess(img)
        assert theirs.shape == ours.shape
        assert (theirs - ours).abs().max() <= 2 * step


@pytest.mark.parametrize("max_tiles", [1, 4])
def test_max_tiles_equals_llava_onevision_anyres_max(tmp_path, max_tiles):
    """LLaVA-OneVision's `anyres_max_N`: an unpadded map above N tiles' worth is resized bilinearly; features and
    counts equal `LlavaOnevisionModel.get_image_features` (same tower, pinpoints and newline)."""
    torch.manual_seed(1)
    ref = _reference(max_tiles)
    ours = _ours_from(ref, tmp_path, max_tiles)
    resized = 0
    for name in ("astronaut", "coffee", "very_wide", "below_one_tile"):
        img = photo(name)
        pixels, sizes = ours.vision.preprocess(img), torch.tensor([[img.height, img.width]])
        with torch.no_grad():
            expected = ref.model.get_image_features(pixel_values=pixels[None], image_sizes=sizes).pooler_output[0]
            features = ours.image_embeddings(pixels, sizes)
        assert features.shape[0] == ours.vision.num_image_tokens((img.height, img.width))
        torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
        top, bottom, left, right = ours.vision.layout.feature_box((img.height, img.width))
        resized += ours.vision.layout.pooled_size(bottom - top, right - left) is not None
    assert resized >= 2  # the resize ran, not only the pass-through


def test_geometry_equals_transformers_on_many_sizes(processor):
    """Best resolution, unpadding and token counts against transformers' own functions, sizes from 1 px to 40x."""
    rng = random.Random(0)
    layout = AnyRes(build_encoder("clip", config=TINY_CLIP), grid_pinpoints=RANGE).layout
    sizes = [(rng.randint(1, 400), rng.randint(1, 400)) for _ in range(300)] + [(1, 1), (7, 300), (300, 7), (96, 96)]
    grid = layout.grid
    for h, w in sizes:
        assert select_best_resolution((h, w), layout.resolutions) == tuple(hf_select_best_resolution((h, w), PINPOINTS))
        rows, cols = layout.tile_grid((h, w))
        cells = torch.zeros(1, rows * grid[0], cols * grid[1])
        top, bottom, left, right = layout.feature_box((h, w))
        assert tuple(unpad_image(cells, (h, w)).shape[1:]) == (bottom - top, right - left)
        # LlavaNextProcessor's count includes the CLS its strategy drops again
        assert layout.num_image_tokens((h, w)) == processor._get_number_of_features(h, w, S, S) - 1


def test_grid_pinpoints_forms():
    assert parse_grid_pinpoints(None, 336) == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    # "(AxB)" is A tiles wide by B high, widths in the outer loop, as LLaVA-NeXT's range
    assert parse_grid_pinpoints("(1x1),...,(2x3)", 10) == ((10, 10), (20, 10), (30, 10), (10, 20), (20, 20), (30, 20))
    assert parse_grid_pinpoints([[32, 64]], 32) == ((32, 64),)
    for bad, match in (
        ("1x1 to 3x3", "is not a range"),
        ("(3x3),...,(1x1)", "from a smaller to a larger grid"),
        ([[32, 48]], r"\[32, 48\] is not \[height, width\] in whole 32 px tiles"),
        ([], "empty list"),
    ):
        with pytest.raises(ConfigError, match=r"'model\.tiling\.grid_pinpoints'.*" + match):
            parse_grid_pinpoints(bad, 32)


@pytest.mark.parametrize("tower", ["sam", "timm"])
def test_anyres_wraps_any_tower(tower):
    """SAM (with the conv reducer) and a timm ViT: each view goes through the tower's own recipe, the packed
    length is the count the data uses, and a CLS-carrying tower is refused."""
    if tower == "sam":  # SAM's 8 x 8 grid at 128 px, reduced to 4 x 4 by one stride-2 conv
        inner = REDUCERS.build("conv", SamImageEncoder(**TINY_SAM), channels=(32,))
    else:
        inner = build_encoder("timm:vit_tiny_patch16_224", image_size=TINY_VIT_IMAGE_SIZE, model_kwargs=TINY_VIT)
    vision = AnyRes(inner, grid_pinpoints="(1x1),...,(2x2)", max_tiles=2).eval()
    img = photo("rocket")
    pixels = vision.preprocess(img)
    views = vision.preprocess.views(img)
    assert pixels.shape == (len(views), 3, inner.image_size, inner.image_size)
    torch.testing.assert_close(pixels[1], inner.preprocess(views[1]), rtol=0, atol=0)
    # DataLoader workers get a copy: the recipe pickles and gives the same views and counts
    copy = pickle.loads(pickle.dumps(vision.preprocess))
    size = (img.height, img.width)
    assert torch.equal(copy(img), pixels)
    assert copy.num_image_tokens(size) == vision.num_image_tokens(size) and copy.num_tiles(size) == len(views)
    with torch.no_grad():
        tokens = vision(pixels)  # [K, N, C]
        packed = vision.pack(tokens, torch.tensor([[img.height, img.width]]), torch.zeros(inner.embed_dim))
    assert tokens.shape == (len(views), inner.num_tokens, inner.embed_dim)
    assert packed.shape == (vision.num_image_tokens((img.height, img.width)), inner.embed_dim)


def test_a_tower_with_cls_is_refused():
    with pytest.raises(ConfigError, match="a CLS token must be dropped"):
        AnyRes(build_encoder("clip", config=TINY_CLIP, select_feature="cls_patch"))


def test_the_tiling_block_is_configured_and_checked(tiny_cfg):
    cfg = tiny_cfg("model.tiling={name: anyres, grid_pinpoints: '(1x1),...,(2x2)', max_tiles: 4}")
    with torch.device("meta"):
        vision = build_vision(cfg.model)
    assert isinstance(vision, AnyRes) and vision.layout.max_tiles == 4 and len(vision.layout.resolutions) == 4
    with pytest.raises(ConfigError, match=r"'model\.tiling\.fit' = 'crop' is not valid"):
        tiny_cfg("model.tiling={name: anyres, fit: crop}")
    with pytest.raises(ConfigError, match=r"unknown key 'model\.tiling\.tiles'"):
        tiny_cfg("model.tiling={name: anyres, tiles: 4}")


def test_the_newline_trains_with_the_projector(pair):
    _, ours = pair
    assert ("image_newline", ours.image_newline) in ours.parts()["projector"]
    assert "tiling" not in ours.parts()  # the wrapper has no parameters of its own


def test_describe_reports_the_tokens_of_given_sizes_and_the_training_table(tiny_cfg, processor):
    """`train.py X.yaml --describe --image-size HxW`: LLaVA-NeXT's count for each size (LlavaNextProcessor's,
    less the CLS), the largest in the sequence budget, and the parameter table training logs (the newline in it)."""
    cfg = tiny_cfg(TINY_CLIP_ENCODER, f"model.tiling={{name: anyres, grid_pinpoints: '{RANGE}'}}")
    sizes = [(300, 451), (40, 600), (20, 26)]
    text = describe(cfg, image_sizes=sizes)
    counts = [processor._get_number_of_features(h, w, S, S) - 1 for h, w in sizes]
    for (h, w), n in zip(sizes, counts):
        assert f"  {h} x {w} px: {n} image tokens" in text
    assert f"= {max(counts)} image tokens + {cfg.data.max_length - max(counts)} text tokens" in text
    module = build_module(cfg)
    assert module.parameter_table in text
    projector = TINY_CLIP["hidden_size"] * TEXT["hidden_size"] + TEXT["hidden_size"] * (TEXT["hidden_size"] + 2)
    assert sum(p.numel() for _, p in module.model.parts()["projector"]) == projector + TEXT["hidden_size"]
