"""Each encoder's `preprocess` against its official processor, on real photos (scikit-image's).

References, restated here from their own code: transformers' `CLIPImageProcessorPil` /
`SiglipImageProcessorPil` (the PIL arithmetic of the processor LLaVA trained with), segment-anything's
`ResizeLongestSide.apply_image` + `Sam.preprocess` (as `SamPredictor.set_image` chains them), timm's
`resolve_data_config` + `create_transform`, INF-LLaVA's processor with size and crop_size times 3, and
LLaVA-1.5's `expand2square` with `int(mean * 255)`. Tolerance: one 8-bit step after normalisation,
1 / 255 / std.
"""

from __future__ import annotations

import functools
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data as photos
from timm.data import create_transform, resolve_data_config
from torchvision.transforms import v2
from transformers import CLIPImageProcessor, CLIPImageProcessorPil, SiglipImageProcessorPil

from datamodules import ImageSpec
from encoders import REDUCERS, build_encoder
from encoders.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from encoders.enhancers import ENHANCERS
from encoders.preprocess import LongestSidePad, ResizeCrop, default_preprocess
from encoders.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from tests.support.tiny_models import TINY_CLIP

# rocket is 640 x 427: shortest edge to 336 gives 503 x 336, an odd crop margin (167); page is a document.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "page")


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(photos, name)()).convert("RGB")


def steps(ours: torch.Tensor, reference, std) -> float:
    """Largest difference in 8-bit steps (difference * std * 255) between two normalised [3, S, S]."""
    reference = torch.as_tensor(np.asarray(reference), dtype=torch.float32)
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    return float(((ours - reference).abs() * torch.tensor(std).view(3, 1, 1) * 255).max())


def clip_directory(path, processor, image_size: int):
    """A tiny CLIP tower directory (config.json only: the meta build reads no weights) + the processor's config."""
    from transformers import CLIPVisionConfig

    CLIPVisionConfig(**dict(TINY_CLIP, image_size=image_size)).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


# --- CLIP / SigLIP: transformers' image processors -------------------------------------------------


@pytest.fixture(scope="module")
def clip_l_336():
    with torch.device("meta"):
        return build_encoder("clip_vit_l_336")


@pytest.mark.parametrize("name", PHOTOS)
def test_clip_openai_defaults_match_clip_image_processor(clip_l_336, name):
    reference = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    img = photo(name)
    ours = clip_l_336.preprocess(img)
    assert ours.device.type == "cpu"  # built on the meta device, runs on the CPU
    assert steps(ours, reference(img)["pixel_values"][0], OPENAI_CLIP_STD) <= 1.001


@pytest.mark.parametrize("name", PHOTOS)
def test_clip_torchvision_backend_within_two_steps(clip_l_336, name):
    # transformers 5's default CLIPImageProcessor resizes with torch's antialiased bicubic instead of PIL's;
    # the two official backends differ from each other by up to 2 steps (chelsea), so ours (PIL) does too.
    reference = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    img = photo(name)
    assert steps(clip_l_336.preprocess(img), reference(img)["pixel_values"][0], OPENAI_CLIP_STD) <= 2.001


def test_clip_crop_is_floor_centred_on_an_odd_margin(clip_l_336):
    # rocket -> 503 x 336: transformers crops columns 83..419 ((503 - 336) // 2), torchvision's CenterCrop 84..420
    img = photo("rocket")
    resized = img.resize((503, 336), Image.Resampling.BICUBIC)
    floor = np.asarray(resized.crop((83, 0, 419, 336)), dtype=np.float32) / 255
    ours = clip_l_336.preprocess(img) * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    ours = ours + torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    torch.testing.assert_close(ours, torch.from_numpy(floor).permute(2, 0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", PHOTOS)
def test_clip_reads_the_checkpoint_preprocessor_config_on_meta(tmp_path, name):
    # not OpenAI's numbers, so the build must read them: shortest edge 40, crop 32, bilinear, own mean/std
    reference = CLIPImageProcessorPil(
        size={"shortest_edge": 40},
        crop_size={"height": 32, "width": 32},
        resample=Image.Resampling.BILINEAR,
        image_mean=[0.1, 0.2, 0.3],
        image_std=[0.4, 0.5, 0.6],
    )
    path = clip_directory(tmp_path, reference, image_size=32)
    with torch.device("meta"):
        encoder = build_encoder("clip", checkpoint=path)
    assert (encoder.pixel_mean, encoder.pixel_std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    img = photo(name)
    assert steps(encoder.preprocess(img), reference(img)["pixel_values"][0], encoder.pixel_std) <= 1.001


@pytest.mark.parametrize("name", PHOTOS)
def test_siglip_processor_config_resizes_without_cropping(tmp_path, name):
    reference = SiglipImageProcessorPil(size={"height": 384, "width": 384})  # SigLIP: squash, no crop
    path = clip_directory(tmp_path, reference, image_size=384)
    with torch.device("meta"):
        encoder = build_encoder("clip", checkpoint=path)
    img = photo(name)
    assert steps(encoder.preprocess(img), reference(img)["pixel_values"][0], (0.5, 0.5, 0.5)) <= 1.001


def test_clip_processor_config_for_another_size_is_an_error(tmp_path):
    path = clip_directory(tmp_path, CLIPImageProcessorPil(crop_size={"height": 224, "width": 224}), image_size=32)
    with torch.device("meta"), pytest.raises(ValueError, match="gives 224 px images, the tower takes 32"):
        build_encoder("clip", checkpoint=path)


# --- SAM: segment-anything's ResizeLongestSide + Sam.preprocess -------------------------------------


def sam_reference(img: Image.Image, size: int) -> torch.Tensor:
    from segment_anything.modeling.sam import Sam
    from segment_anything.utils.transforms import ResizeLongestSide

    # SamPredictor.set_image: apply_image on uint8 HWC, to [1, 3, h, w], then Sam.preprocess (normalise on
    # the 0-255 scale, pad bottom-right); Sam.preprocess only reads these three attributes.
    resized = ResizeLongestSide(size).apply_image(np.asarray(img))
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None].float()
    sam = SimpleNamespace(
        pixel_mean=torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1),
        pixel_std=torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1),
        image_encoder=SimpleNamespace(img_size=size),
    )
    return Sam.preprocess(sam, x)[0]


@pytest.fixture(scope="module")
def sam_meta():
    with torch.device("meta"):
        return build_encoder("sam_vit_b")


@pytest.mark.parametrize("name", PHOTOS)
def test_sam_matches_segment_anything(sam_meta, name):
    img = photo(name)
    assert steps(sam_meta.preprocess(img), sam_reference(img, 1024), SAM_PIXEL_STD) <= 1.001


def test_sam_keeps_the_whole_document_page(sam_meta):
    page = photo("page")  # 384 x 191: longest side to 1024 -> 1024 x 509, then padding (the mean colour)
    x = sam_meta.preprocess(page)
    assert x.shape == (3, 1024, 1024)
    assert x[:, 509:].abs().max() == 0 and x[:, :509].abs().amax(dim=(0, 2)).min() > 0
    # every column of the page is there: its left and right margins are the page's own
    ref = np.asarray(page.resize((1024, 509), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(
        SAM_PIXEL_STD
    ).view(3, 1, 1)
    torch.testing.assert_close(x[:, :509], ref, atol=1e-5, rtol=0)


def test_sam_at_512_scales_the_longest_side():
    with torch.device("meta"):
        encoder = build_encoder("sam_vit_b", image_size=512)
    img = photo("rocket")
    assert steps(encoder.preprocess(img), sam_reference(img, 512), SAM_PIXEL_STD) <= 1.001


@pytest.mark.parametrize("name", ["rocket", "page"])
def test_sam_square_resize_option(name):
    # Vary's SAM input: Resize((1024, 1024), bicubic), ToTensor, Normalize (SAM's statistics kept here)
    with torch.device("meta"):
        encoder = build_encoder("sam_vit_b", resize="square")
    reference = v2.Compose(
        [
            v2.Resize((1024, 1024), v2.InterpolationMode.BICUBIC),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(SAM_PIXEL_MEAN), list(SAM_PIXEL_STD)),
        ]
    )
    img = photo(name)
    assert steps(encoder.preprocess(img), reference(img), SAM_PIXEL_STD) <= 1.001


def test_sam_unknown_resize_is_an_error():
    with pytest.raises(ValueError, match="resize='crop' is not one of"):
        build_encoder("sam_vit_b", resize="crop")


# --- timm: resolve_data_config + create_transform ---------------------------------------------------


@functools.cache
def timm_on_meta(model_name: str, image_size: int | None = None, squash: bool = False):
    """The timm encoder on the meta device (its preprocessing only), built once per photo-parametrised group."""
    options = {} if image_size is None else {"image_size": image_size}
    if squash:
        options["data_config"] = {"crop_pct": 1.0, "crop_mode": "squash"}
    with torch.device("meta"):
        return build_encoder("timm:" + model_name, **options)


@pytest.mark.parametrize(
    "model_name, image_size",
    [
        ("deit_tiny_patch16_224", None),  # crop_pct 0.9, ImageNet statistics
        ("vit_base_patch16_siglip_384", None),  # timm's SigLIP config (0.5 statistics)
        ("deit_tiny_patch16_224", 256),  # built for another size: the recipe at 256
    ],
)
@pytest.mark.parametrize("name", ["coffee", "rocket", "page"])
def test_timm_matches_its_eval_transform(model_name, image_size, name):
    encoder = timm_on_meta(model_name, image_size)
    # the pretrained config timm gives the model it creates under that name (read from there, no model built)
    config = resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(model_name).to_dict())
    config["input_size"] = (3, encoder.image_size, encoder.image_size)
    reference = create_transform(**config, is_training=False)
    img = photo(name)
    assert encoder.pixel_mean == tuple(config["mean"])
    assert steps(encoder.preprocess(img), reference(img), config["std"]) <= 1.001


@pytest.mark.parametrize("name", PHOTOS)
def test_timm_siglip_with_squash_matches_siglip_image_processor(name):
    # timm's SigLIP config centre-crops (crop_pct 0.9); SigLIP as released squashes, which data_config restores
    encoder = timm_on_meta("vit_base_patch16_siglip_384", squash=True)
    reference = SiglipImageProcessorPil(size={"height": 384, "width": 384})
    img = photo(name)
    assert steps(encoder.preprocess(img), reference(img)["pixel_values"][0], (0.5, 0.5, 0.5)) <= 1.001


def test_timm_unknown_data_config_key_is_an_error():
    with pytest.raises(ValueError, match=r"data_config keys \['size'\]"):
        build_encoder("timm:deit_tiny_patch16_224", data_config={"size": 3})


# --- wrappers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reducer", REDUCERS.names())
def test_token_reducer_preprocesses_as_its_encoder(sam_meta, reducer):
    with torch.device("meta"):
        wrapped = REDUCERS.build(reducer, sam_meta)
    assert wrapped.preprocess is sam_meta.preprocess


@pytest.mark.parametrize("name", PHOTOS)
def test_inf_llava_takes_the_clip_processor_at_three_times_the_size(clip_l_336, name):
    # INF-LLaVA's train.py: image_processor.size and crop_size times 3 -> shortest edge 1008, crop 1008
    with torch.device("meta"):
        module = ENHANCERS.build("dual_perspective", clip_l_336, n=3)
    reference = CLIPImageProcessorPil(size={"shortest_edge": 1008}, crop_size={"height": 1008, "width": 1008})
    img = photo(name)
    ours = module.preprocess(img)
    assert ours.shape == (3, 1008, 1008) == (3, module.image_size, module.image_size)
    assert steps(ours, reference(img)["pixel_values"][0], OPENAI_CLIP_STD) <= 1.001


def test_inf_llava_around_sam_pads_the_longest_side_at_n_times():
    with torch.device("meta"):
        module = ENHANCERS.build("dual_perspective", build_encoder("sam_vit_b", image_size=256), n=2)
    img = photo("page")
    assert steps(module.preprocess(img), sam_reference(img, 512), SAM_PIXEL_STD) <= 1.001


# --- the DataModule's transform ---------------------------------------------------------------------


def expand2square(img: Image.Image, background) -> Image.Image:
    """LLaVA-1.5's train.py `expand2square`, restated."""
    w, h = img.size
    if w == h:
        return img
    out = Image.new(img.mode, (max(w, h),) * 2, background)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


@pytest.mark.parametrize("name", PHOTOS)
def test_pad_to_square_then_processor_matches_llava(clip_l_336, name):
    transform = ImageSpec.of(clip_l_336).transform(pad_to_square=True)
    reference = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    padded = expand2square(photo(name), tuple(int(x * 255) for x in reference.image_mean))  # (122, 116, 104)
    assert steps(transform(photo(name)), reference(padded)["pixel_values"][0], OPENAI_CLIP_STD) <= 1.001


def test_spec_of_an_encoder_carries_its_preprocessing(sam_meta, clip_l_336):
    for vision in (sam_meta, clip_l_336):
        spec = ImageSpec.of(vision)
        assert spec.preprocess is vision.preprocess
        assert spec.transform(pad_to_square=False)(photo("page")).shape == (3, vision.image_size, vision.image_size)


@pytest.mark.parametrize("encoder", ["clip_vit_l_224", "sam_vit_b", "timm:deit_tiny_patch16_224"])
def test_transform_pickles_for_dataloader_workers(encoder):
    with torch.device("meta"):
        vision = build_encoder(encoder)
    transform = ImageSpec.of(vision).transform(pad_to_square=True)
    copy = pickle.loads(pickle.dumps(transform))
    torch.testing.assert_close(copy(photo("chelsea")), transform(photo("chelsea")))


def test_the_default_recipe_is_clips_resize_crop_the_one_implementation():
    # an encoder without a recipe of its own gets CLIP's (`ResizeCrop`, checked against CLIPImageProcessor
    # above); the data has no copy of it: a spec takes its encoder's recipe
    assert default_preprocess(32, (0.5,) * 3, (0.5,) * 3) == ResizeCrop.clip(32, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(TypeError, match="preprocess"):
        ImageSpec(image_size=32, pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3, num_tokens=9)


def test_preprocess_config_errors():
    with pytest.raises(ValueError, match="not a shortest edge or a square|does not give a square"):
        ResizeCrop.from_hf({"size": {"height": 32, "width": 48}, "do_center_crop": False}, 32, (0,) * 3, (1,) * 3)
    with pytest.raises(ValueError, match="resize="):
        LongestSidePad(32, (0,) * 3, (1,) * 3, resize="nope")
    with pytest.raises(ValueError, match="'ConvNextImageProcessor' is not CLIPImageProcessor"):
        ResizeCrop.from_hf(
            {"image_processor_type": "ConvNextImageProcessor", "crop_pct": 0.875}, 32, (0,) * 3, (1,) * 3
        )
