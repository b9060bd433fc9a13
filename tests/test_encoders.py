"""Every registered encoder against the `VisionEncoder` contract; CLIP and timm parity; loading errors.

The contract tests are parametrised over `ENCODERS.names()`, so a newly registered encoder is tested (and
fails until it gets an entry in TINY and FULL_SIZE below; the timm family is the name "timm:"). SAM's
parity with the official code and its checkpoint handling live in tests/test_sam.py.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import re

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from encoders import ENCODERS, EncoderWrapper, VisionEncoder, build_encoder, encoder_chain, split_parts
from encoders.weights import on_meta_device
from tests.support.encoder_sizes import FULL_SIZE
from tests.support.tiny_models import TINY_CLIP, TINY_VIT, TINY_VIT_IMAGE_SIZE

REGISTERED = ENCODERS.names()


# registry name -> (name to build, keyword arguments): small enough for a CPU forward + backward in about
# a second. The CLIP-L variants keep their real embeddings and width but only the first of their 24 layers
# (select_layer=1); see `_build_once` for how they skip initialising the other 23. SAM ViT-B has no size
# option but the image size: at 64 px (4x4 grid) each windowed block still attends over one zero-padded
# 14x14 window, so `_build_once` keeps only its first SAM_BLOCKS blocks, as CLIP-L keeps its first layer.
TINY = {
    "clip": ("clip", {"config": TINY_CLIP}),
    "clip_vit_l_224": ("clip_vit_l_224", {"select_layer": 1}),
    "clip_vit_l_336": ("clip_vit_l_336", {"select_layer": 1}),
    "sam_vit_b": ("sam_vit_b", {"image_size": 64}),
    "timm:": ("timm:vit_tiny_patch16_224", {"image_size": TINY_VIT_IMAGE_SIZE, "model_kwargs": TINY_VIT}),
}
# built on the meta device, then materialised: a random 300M-parameter init takes ~5 s, the pruned tower 0.2 s
FROM_META = {"clip_vit_l_224", "clip_vit_l_336"}
# SAM ViT-B's blocks 0-2: two windowed, then the first global one (global_attn_indexes 2, 5, 8, 11), so every
# kind of block and the neck still run; the 12 blocks took ~3 s of a forward + backward test's CPU time.
SAM_BLOCKS = 3


def test_every_registered_encoder_has_test_settings():
    for name in REGISTERED:
        assert name in TINY, f"add tiny build settings for the new encoder {name!r} to TINY in {__file__}"
        assert name in FULL_SIZE, f"add the full-size numbers of the new encoder {name!r} to FULL_SIZE"


@functools.cache
def _build_once(name: str) -> VisionEncoder:
    torch.manual_seed(0)
    build_name, kwargs = TINY[name]
    if name == "sam_vit_b":
        encoder = build_encoder(build_name, **kwargs)
        assert [b.window_size for b in encoder.blocks[:SAM_BLOCKS]] == [14, 14, 0]  # 0: global attention
        encoder.blocks = encoder.blocks[:SAM_BLOCKS]
        return encoder
    if name not in FROM_META:
        return build_encoder(build_name, **kwargs)
    with torch.device("meta"):
        encoder = build_encoder(build_name, **kwargs)
    encoder.to_empty(device="cpu")
    encoder.model.initialize_weights()  # transformers' own init, buffers (position_ids) included
    return encoder


def tiny(name: str) -> VisionEncoder:
    """A fresh copy of the tiny encoder (built once per session: SAM and CLIP-L take seconds to initialise)."""
    if name not in TINY:
        pytest.fail(f"no tiny settings for encoder {name!r}; add them to TINY")
    return copy.deepcopy(_build_once(name))


def pixels(encoder: VisionEncoder, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, encoder.image_size, encoder.image_size, generator=g)


@pytest.mark.parametrize("name", REGISTERED)
def test_full_size_attributes_on_meta(name):
    build_name, kwargs, (size, grid, width, params) = FULL_SIZE[name]
    with torch.device("meta"):
        encoder = build_encoder(build_name, **kwargs)
    assert (encoder.image_size, encoder.grid_size, encoder.embed_dim) == (size, grid, width)
    assert encoder.num_tokens == grid[0] * grid[1]
    assert sum(p.numel() for p in encoder.parameters()) == params


def contract(encoder: VisionEncoder) -> tuple:
    """What the rest of the code reads from an encoder, and its parameters' names, shapes and dtypes."""
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in encoder.named_parameters())
    return (
        encoder.image_size,
        encoder.grid_size,
        encoder.embed_dim,
        encoder.num_tokens,
        encoder.pixel_mean,
        encoder.pixel_std,
        params,
    )


def test_on_meta_device():
    assert not on_meta_device()
    with torch.device("meta"):
        assert on_meta_device()
    assert not on_meta_device()


# Families that take their architecture from the checkpoint directory: without its config.json a meta
# build cannot know the shapes, and says so. Every other family's architecture is fixed by its options.
ARCHITECTURE_FROM_CHECKPOINT = {"clip"}


@pytest.mark.parametrize("name", REGISTERED)
def test_meta_build_reads_no_weights(name, tmp_path):
    build_name, kwargs = TINY[name]
    missing = str(tmp_path / "nowhere" / "weights.pth")
    with torch.device("meta"):
        if name in ARCHITECTURE_FROM_CHECKPOINT:
            with pytest.raises(ValueError, match=re.escape(f"takes its architecture from {missing}/config.json")):
                build_encoder(build_name, **kwargs, checkpoint=missing)
            return
        with_checkpoint = build_encoder(build_name, **kwargs, checkpoint=missing)  # no file: nothing read
        random_init = build_encoder(build_name, **kwargs)
    assert all(p.is_meta for p in with_checkpoint.parameters())
    assert contract(with_checkpoint) == contract(random_init)


def test_timm_pretrained_on_meta_downloads_nothing():
    # the tests run with HF_HUB_OFFLINE=1: a download attempt would raise
    _, kwargs = TINY["timm:"]
    with torch.device("meta"):
        pretrained = build_encoder("timm:vit_tiny_patch16_224", pretrained=True, **kwargs)
        random_init = build_encoder("timm:vit_tiny_patch16_224", **kwargs)
    assert contract(pretrained) == contract(random_init)


@pytest.mark.parametrize("name", REGISTERED)
def test_contract(name):
    encoder = tiny(name).eval()
    assert isinstance(encoder, VisionEncoder) and encoder.part == "encoder"
    grid_h, grid_w = encoder.grid_size
    assert grid_h == grid_w and encoder.image_size % grid_h == 0  # square input, whole patches
    assert encoder.num_tokens == grid_h * grid_w
    for stats in (encoder.pixel_mean, encoder.pixel_std):
        assert len(stats) == 3 and all(isinstance(v, float) and 0.0 < v < 1.0 for v in stats)  # 0-1 scale
    x = pixels(encoder)
    with torch.no_grad():
        tokens = encoder(x)
        single = encoder(x[1:])
    assert tokens.shape == (2, grid_h * grid_w, encoder.embed_dim)
    assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
    assert tokens.std() > 0
    torch.testing.assert_close(single[0], tokens[1], rtol=1e-4, atol=1e-5)  # images do not mix in a batch


@pytest.mark.parametrize("name", REGISTERED)
def test_wrong_image_size_is_an_error(name):
    encoder = tiny(name)
    side = encoder.image_size + 16
    with pytest.raises(ValueError, match=f"takes {encoder.image_size}x{encoder.image_size} images, got {side}x{side}"):
        encoder(torch.zeros(1, 3, side, side))


@pytest.mark.parametrize("name", REGISTERED)
def test_frozen_encoder_gets_no_gradient(name):
    encoder = tiny(name).train()
    head = nn.Linear(encoder.embed_dim, 4)
    encoder.requires_grad_(False)
    head(encoder(pixels(encoder, batch=1))).square().mean().backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", REGISTERED)
def test_bf16_autocast(name):
    encoder = tiny(name).eval()
    x = pixels(encoder, batch=1)
    with torch.no_grad():
        reference = encoder(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = encoder(x)
    assert tokens.shape == reference.shape and torch.isfinite(tokens).all()
    # bf16 keeps 8 bits of mantissa: a few percent of the output's scale
    assert (tokens.float() - reference).abs().max() < 0.1 * reference.abs().max()


def _forward_backward(encoder: VisionEncoder, x: torch.Tensor, upstream: torch.Tensor):
    encoder.zero_grad(set_to_none=True)
    linear_calls = []
    hooks = [
        m.register_forward_hook(lambda *_: linear_calls.append(1))
        for m in encoder.modules()
        if isinstance(m, nn.Linear)
    ]
    tokens = encoder(x)
    (tokens * upstream).sum().backward()
    for h in hooks:
        h.remove()
    # Every parameter gets a gradient: pruned layers leave nothing unused (DDP would stop on it).
    unused = [n for n, p in encoder.named_parameters() if p.grad is None]
    assert not unused, f"parameters without a gradient: {unused}"
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    return tokens.detach(), grads, len(linear_calls)


@pytest.mark.parametrize("name", REGISTERED)
def test_grad_checkpointing_keeps_outputs_and_gradients(name):
    """Also: trained, every parameter of the encoder gets a gradient."""
    encoder = tiny(name).train()  # transformers checkpoints only in training mode; no encoder here has dropout
    x = pixels(encoder, batch=1)
    upstream = torch.randn(1, encoder.num_tokens, encoder.embed_dim, generator=torch.Generator().manual_seed(2))
    tokens, grads, calls = _forward_backward(encoder, x, upstream)
    encoder.set_grad_checkpointing(True)
    tokens_ckpt, grads_ckpt, calls_ckpt = _forward_backward(encoder, x, upstream)
    assert calls_ckpt > calls  # the blocks really ran again in backward
    torch.testing.assert_close(tokens_ckpt, tokens, rtol=0, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-5, msg=n)


# ---- CLIP: parity with transformers' CLIPVisionModel ---------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPVisionModel saved with save_pretrained, and the unpruned reference model."""
    torch.manual_seed(0)
    reference = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).eval()
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    reference.save_pretrained(path)
    return str(path), reference


@pytest.mark.parametrize(
    "select_layer, select_feature", [(-2, "patch"), (-1, "patch"), (-2, "cls_patch"), (0, "patch"), (1, "cls_patch")]
)
def test_clip_matches_transformers_hidden_states(clip_dir, select_layer, select_feature):
    path, reference = clip_dir
    encoder = build_encoder("clip", checkpoint=path, select_layer=select_layer, select_feature=select_feature).eval()
    assert len(encoder.model.encoder.layers) == select_layer % (TINY_CLIP["num_hidden_layers"] + 1)  # pruned
    x = pixels(encoder)
    with torch.no_grad():
        expected = reference(pixel_values=x, output_hidden_states=True).hidden_states[select_layer]  # [B, 1+N, C]
        tokens = encoder(x)
    if select_feature == "patch":
        expected = expected[:, 1:]
    assert tokens.shape == (2, encoder.num_tokens, TINY_CLIP["hidden_size"])
    assert encoder.num_tokens == 16 + (select_feature == "cls_patch")
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-6)


def test_clip_loads_vision_tower_of_full_clip_and_its_normalisation(tmp_path):
    # openai/clip-vit-large-patch14-336 is a whole CLIPModel (text tower too) with a preprocessor_config.json
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    full = save_full_clip(tmp_path, mean, std)
    encoder = build_encoder("clip", checkpoint=str(tmp_path)).eval()
    assert (encoder.pixel_mean, encoder.pixel_std) == (tuple(mean), tuple(std))
    x = pixels(encoder)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(encoder(x), expected, rtol=1e-5, atol=1e-6)


def save_full_clip(path, mean: list[float], std: list[float]) -> CLIPModel:
    """A tiny whole CLIPModel (text tower too, like openai/clip-vit-large-patch14-336) with its own
    preprocessor_config.json."""
    torch.manual_seed(0)
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=99,
        bos_token_id=0,
        eos_token_id=1,
    )
    full = CLIPModel(CLIPConfig(vision_config=TINY_CLIP, text_config=text, projection_dim=16)).eval()
    full.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    return full


@pytest.mark.parametrize("layout", ["vision_only", "full_clip"])
@pytest.mark.parametrize("select_layer, select_feature", [(-2, "patch"), (1, "cls_patch")])
def test_clip_meta_build_equals_loaded_build(clip_dir, tmp_path, layout, select_layer, select_feature):
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]  # not OpenAI's: the meta build must read them too
    if layout == "full_clip":
        save_full_clip(tmp_path, mean, std)
    else:
        clip_dir[1].save_pretrained(tmp_path)
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    options = dict(checkpoint=str(tmp_path), select_layer=select_layer, select_feature=select_feature)
    loaded = build_encoder("clip", **options)
    with torch.device("meta"):
        meta = build_encoder("clip", **options)
    assert all(p.is_meta for p in meta.parameters())
    assert (meta.pixel_mean, meta.pixel_std) == (tuple(mean), tuple(std))
    assert contract(meta) == contract(loaded)
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in loaded.parameters())


def test_clip_vit_l_on_meta_checks_the_directory_like_a_real_build(clip_dir):
    # a directory with config.json defines the tower, on meta too: a tiny CLIP is no ViT-L/14
    with torch.device("meta"), pytest.raises(ValueError, match="not ViT-L/14 at 336 px; use encoder 'clip'"):
        build_encoder("clip_vit_l_336", checkpoint=clip_dir[0])


def test_clip_bf16_directory_loads_as_float32(tmp_path):
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).to(torch.bfloat16).save_pretrained(tmp_path)
    encoder = build_encoder("clip", checkpoint=str(tmp_path))
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
    assert encoder(pixels(encoder)).dtype == torch.float32
    with torch.device("meta"):
        assert {p.dtype for p in build_encoder("clip", checkpoint=str(tmp_path)).parameters()} == {torch.float32}


def test_clip_needs_checkpoint_or_config():
    with pytest.raises(ValueError, match="needs checkpoint=<HF CLIP directory> or config="):
        build_encoder("clip")


def test_clip_vit_l_rejects_another_tower(clip_dir):
    with pytest.raises(ValueError, match="not ViT-L/14 at 336 px; use encoder 'clip'"):
        build_encoder("clip_vit_l_336", checkpoint=clip_dir[0])


def test_clip_mismatched_keys_are_listed(clip_dir, tmp_path):
    path, reference = clip_dir
    reference.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layers.0.mlp.fc1.weight"]
    state["encoder.layers.0.mlp.fc3.weight"] = torch.zeros(2, 2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        build_encoder("clip", checkpoint=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg
    assert "missing keys (1): encoder.layers.0.mlp.fc1.weight" in msg
    assert "unexpected keys (1): encoder.layers.0.mlp.fc3.weight" in msg


# ---- timm: the selected block of the unpruned model ------------------------------------------------------


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    """A tiny timm ViT's weights as timm saves them (classifier head included) and the unpruned model."""
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", img_size=TINY_VIT_IMAGE_SIZE, **TINY_VIT).eval()
    assert reference.num_classes == 1000
    path = tmp_path_factory.mktemp("timm") / "vit_tiny.pth"
    torch.save(reference.state_dict(), path)
    return str(path), reference


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1])
def test_timm_select_layer_picks_that_block(timm_file, select_layer):
    path, reference = timm_file
    encoder = build_encoder(
        "timm:vit_tiny_patch16_224",
        checkpoint=path,
        image_size=TINY_VIT_IMAGE_SIZE,
        select_layer=select_layer,
        model_kwargs=TINY_VIT,
    ).eval()
    block = select_layer % TINY_VIT["depth"]
    assert len(encoder.model.blocks) == block + 1  # later blocks pruned
    x = pixels(encoder)
    with torch.no_grad():
        (expected,) = reference.forward_intermediates(x, indices=[block], output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(encoder(x), expected, rtol=1e-5, atol=1e-6)
        # by hand: patch embedding + CLS + position, then blocks 0..block, CLS dropped
        h = reference.norm_pre(reference._pos_embed(reference.patch_embed(x)))
        for blk in reference.blocks[: block + 1]:
            h = blk(h)
        torch.testing.assert_close(encoder(x), h[:, reference.num_prefix_tokens :], rtol=1e-5, atol=1e-6)


def test_timm_mismatched_keys_are_listed(timm_file, tmp_path):
    state = torch.load(timm_file[0], weights_only=True)
    del state["blocks.0.mlp.fc1.weight"]
    state["blocks.0.mlp.fc3.weight"] = torch.zeros(2, 2)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError) as err:
        build_encoder(
            "timm:vit_tiny_patch16_224", checkpoint=str(bad), image_size=TINY_VIT_IMAGE_SIZE, model_kwargs=TINY_VIT
        )
    msg = str(err.value)
    assert str(bad) in msg
    assert "missing keys (1): blocks.0.mlp.fc1.weight" in msg
    assert "unexpected keys (1): blocks.0.mlp.fc3.weight" in msg


def test_timm_unknown_model_name():
    with pytest.raises(ValueError, match="unknown timm model 'vit_nonexistent'"):
        build_encoder("timm:vit_nonexistent")


# ---- registry errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REGISTERED)
def test_missing_checkpoint_names_the_path(name, tmp_path):
    # a real build (CPU); on the meta device no weights file is needed, see the meta tests above
    build_name, kwargs = TINY[name]
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_encoder(build_name, **{**kwargs, "checkpoint": str(missing)})


def test_unknown_encoder_lists_registered_names():
    with pytest.raises(ValueError, match="unknown encoder 'resnet50'; choose one of: ") as err:
        build_encoder("resnet50")
    for name in REGISTERED:
        assert name in str(err.value)


@pytest.mark.parametrize("name", REGISTERED)
def test_unknown_option_lists_valid_options(name):
    build_name = TINY[name][0]
    # every builder takes `checkpoint`, None = random init (the design's contract); a prefix family's
    # entry comes back with its model name bound, the builder itself as `.fn`
    builder = ENCODERS.get(build_name)
    assert inspect.signature(builder).parameters["checkpoint"].default is None
    assert "checkpoint" in ENCODERS.options(build_name)
    with pytest.raises(
        ValueError, match=rf"encoder '{build_name}' got unknown option\(s\) \['depthh'\]; valid options: \["
    ) as err:
        build_encoder(build_name, depthh=3)
    for option in ENCODERS.options(build_name):
        assert repr(option) in str(err.value)


# ---- wrappers ------------------------------------------------------------------------------------------


class Doubler(EncoderWrapper):
    """A wrapper that changes only the width: tokens [B, N, C] -> [B, N, 2C]."""

    part = "adapter"

    def __init__(self, encoder: VisionEncoder) -> None:
        super().__init__(encoder)
        self.proj = nn.Linear(encoder.embed_dim, 2 * encoder.embed_dim)
        self.embed_dim = 2 * encoder.embed_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(self.inner(pixels))


def test_wrapper_forwards_the_contract_it_does_not_change():
    encoder = tiny("timm:")
    outer = Doubler(Doubler(encoder))
    assert encoder_chain(outer) == [outer, outer.inner, encoder] and encoder_chain(encoder) == [encoder]
    assert (outer.image_size, outer.grid_size, outer.pixel_mean, outer.pixel_std) == (
        encoder.image_size,
        encoder.grid_size,
        encoder.pixel_mean,
        encoder.pixel_std,
    )
    assert (outer.embed_dim, outer.inner.embed_dim) == (4 * encoder.embed_dim, 2 * encoder.embed_dim)
    assert outer(pixels(encoder)).shape == (2, encoder.num_tokens, outer.embed_dim)
    outer.set_grad_checkpointing(True)
    assert encoder.model.grad_checkpointing  # passed down the chain
    parts = split_parts(outer)
    assert [n for n, _ in parts["adapter"]] == ["proj.weight", "proj.bias", "inner.proj.weight", "inner.proj.bias"]
    assert [n for n, _ in parts["encoder"]] == ["inner.inner." + n for n, _ in encoder.named_parameters()]


def test_wrapper_must_name_its_part():
    class Unnamed(EncoderWrapper):
        pass

    with pytest.raises(TypeError, match="Unnamed must name its own trainable part"):
        Unnamed(tiny("timm:"))
