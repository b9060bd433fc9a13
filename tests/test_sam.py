"""SAM ViT-B encoder: parity with the official segment-anything `ImageEncoderViT`, loading, resizing."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from encoders import build_encoder
from encoders.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD, SamImageEncoder, sam_vit_b
from tests.support.tiny_models import TINY_SAM

SAM_VIT_B_PARAMS = 89_670_912  # official ImageEncoderViT, ViT-B settings, 1024 px
GLOBAL_BLOCKS = (2, 5, 8, 11)


def official_vit_b_architecture(img_size: int) -> ImageEncoderViT:
    """The official encoder with segment_anything/build_sam.py's ViT-B arguments (PyTorch's default init)."""
    return ImageEncoderViT(
        depth=12,
        embed_dim=768,
        img_size=img_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=12,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=list(GLOBAL_BLOCKS),
        window_size=14,
        out_chans=256,
    )


def official_vit_b(img_size: int, seed: int = 0) -> ImageEncoderViT:
    """The official ViT-B encoder with random weights.

    SAM zero-initialises pos_embed, the rel-pos tables and the LayerNorm biases; those are filled with
    noise so that parity also covers them.
    """
    torch.manual_seed(seed)
    model = official_vit_b_architecture(img_size)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return model.eval()


def save_official_layout(model: ImageEncoderViT, path) -> str:
    """Save like sam_vit_b_01ec64.pth: the whole SAM, encoder under `image_encoder.`."""
    state = {"image_encoder." + k: v for k, v in model.state_dict().items()}
    state["mask_decoder.iou_prediction_head.layers.0.weight"] = torch.zeros(256, 256)
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.zeros(2, 128)
    torch.save(state, path)
    return str(path)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_parameter_count_matches_official():
    with torch.device("meta"):
        ours = build_encoder("sam_vit_b")
        reference = ImageEncoderViT(
            depth=12,
            embed_dim=768,
            num_heads=12,
            use_rel_pos=True,
            window_size=14,
            global_attn_indexes=list(GLOBAL_BLOCKS),
        )
    assert sum(p.numel() for p in ours.parameters()) == SAM_VIT_B_PARAMS
    assert sum(p.numel() for p in reference.parameters()) == SAM_VIT_B_PARAMS


def test_contract_attributes():
    with torch.device("meta"):
        encoder = build_encoder("sam_vit_b")
        small = build_encoder("sam_vit_b", image_size=512)
    assert isinstance(encoder, SamImageEncoder)
    assert (encoder.image_size, encoder.grid_size, encoder.num_tokens) == (1024, (64, 64), 4096)
    assert encoder.embed_dim == 256  # the neck's width, not the transformer's 768
    assert (small.image_size, small.grid_size, small.num_tokens) == (512, (32, 32), 1024)
    assert encoder.pixel_mean == pytest.approx((0.485, 0.456, 0.406))  # 123.675 / 255, ...
    assert encoder.pixel_std == pytest.approx((0.229, 0.224, 0.225))
    assert (SAM_PIXEL_MEAN, SAM_PIXEL_STD) == (encoder.pixel_mean, encoder.pixel_std)
    assert encoder.part == "encoder"


def test_state_dict_uses_timm_samvit_keys():
    # so timm's own samvit_base_patch16 weights load as they are
    with torch.device("meta"):
        ours = sam_vit_b()
        theirs = timm.create_model("samvit_base_patch16", num_classes=0)
    assert set(ours.state_dict()) == set(theirs.state_dict())


@pytest.fixture(scope="module")
def official_256(tmp_path_factory) -> tuple[ImageEncoderViT, str]:
    """The official class built at img_size=256 (grid 16: windows padded 16 -> 28, global rel-pos
    tables of 31 rows), saved in the official layout; shared to keep the suite fast."""
    official = official_vit_b(img_size=256, seed=1)
    return official, save_official_layout(official, tmp_path_factory.mktemp("sam") / "sam_256.pth")


@pytest.mark.slow  # 5 s on 2 cores (two ViT-B forwards at batch 2); the 128 px parity below stays in the fast suite
def test_parity_with_official_at_256(official_256):
    official, path = official_256
    ours = build_encoder("sam_vit_b", checkpoint=path, image_size=256).eval()
    pixels = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = official(pixels).flatten(2).transpose(1, 2)  # [2, 256, 256]
        got = ours(pixels)
    assert got.shape == (2, 256, 256)
    assert max_diff(got, expected) <= 1e-4


@pytest.mark.slow
def test_parity_with_official_at_1024(tmp_path, all_threads):
    official = official_vit_b(img_size=1024, seed=2)
    path = save_official_layout(official, tmp_path / "sam_vit_b_01ec64.pth")
    ours = build_encoder("sam_vit_b", checkpoint=path).eval()
    pixels = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = official(pixels).flatten(2).transpose(1, 2)  # [1, 4096, 256]
        got = ours(pixels)
    assert got.shape == (1, 4096, 256)
    assert max_diff(got, expected) <= 1e-4


def official_resized_reference(state: dict[str, torch.Tensor], img_size: int) -> ImageEncoderViT:
    """What the official code computes at `img_size` with weights saved for a larger size.

    Global blocks keep the checkpoint's rel-pos tables: the official get_rel_pos resizes them
    linearly on the fly. Windowed blocks' tables fit as they are (the window stays 14x14).
    pos_embed is resampled bicubically with antialiasing, as timm's resample_abs_pos_embed_nhwc does.
    """
    with torch.device("meta"):  # every weight comes from `state`: no random init to throw away
        reference = official_vit_b_architecture(img_size)
    grid = img_size // 16
    state = dict(state)
    pos = state["pos_embed"].permute(0, 3, 1, 2)  # [1, C, H, W]
    pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", antialias=True)
    state["pos_embed"] = pos.permute(0, 2, 3, 1)  # [1, grid, grid, C]
    for i in GLOBAL_BLOCKS:
        attn = reference.blocks[i].attn
        attn.rel_pos_h = nn.Parameter(torch.empty_like(state[f"blocks.{i}.attn.rel_pos_h"]))
        attn.rel_pos_w = nn.Parameter(torch.empty_like(state[f"blocks.{i}.attn.rel_pos_w"]))
    reference.load_state_dict(state, assign=True)
    return reference.eval()


def test_smaller_image_size_matches_official_interpolation(official_256):
    # 256 px checkpoint run at 128 px: the same resizing as 1024 -> 512, at a fraction of the cost
    official, path = official_256
    reference = official_resized_reference(official.state_dict(), img_size=128)
    ours = sam_vit_b(checkpoint=path, image_size=128).eval()
    assert ours.blocks[2].attn.rel_pos_h.shape == (15, 64)  # global: 2 * 8 - 1
    assert ours.blocks[0].attn.rel_pos_h.shape == (27, 64)  # windowed: 2 * 14 - 1, unchanged
    pixels = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixels).flatten(2).transpose(1, 2)
        got = ours(pixels)
    assert got.shape == (2, 64, 256)
    assert max_diff(got, expected) <= 1e-4


def test_512_shapes():
    # shapes only (meta tensors, no compute); the numbers are checked by the slow test below
    with torch.device("meta"):
        encoder = build_encoder("sam_vit_b", image_size=512)
        tokens = encoder(torch.zeros(2, 3, 512, 512))
    assert tokens.shape == (2, 1024, 256)
    assert encoder.blocks[2].attn.rel_pos_h.shape == (63, 64)
    assert encoder.pos_embed.shape == (1, 32, 32, 768)


@pytest.mark.slow
def test_512_from_1024_checkpoint_matches_official_interpolation(tmp_path, all_threads):
    state = official_vit_b(img_size=1024, seed=3).state_dict()
    path = tmp_path / "sam.pth"
    torch.save({"image_encoder." + k: v for k, v in state.items()}, path)
    reference = official_resized_reference(state, img_size=512)
    ours = sam_vit_b(checkpoint=str(path), image_size=512).eval()
    pixels = torch.randn(2, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixels).flatten(2).transpose(1, 2)
        got = ours(pixels)
    assert got.shape == (2, 1024, 256)
    assert max_diff(got, expected) <= 1e-4


def one_value_per_tensor(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state`'s keys and shapes, each tensor holding one value of its own (its first), stored once as a
    stride-0 view: a few bytes on disk instead of 350 MB, and a key loaded into the wrong parameter still
    shows as a wrong value."""
    return {k: v.flatten()[0].clone().expand(v.shape) for k, v in state.items()}


def test_accepts_stripped_and_timm_layouts(tmp_path):
    with torch.device("meta"):
        shapes = official_vit_b_architecture(256).state_dict()
    # official keys without `image_encoder.` (mlp.lin1 ...), value i in the i-th tensor
    official = {k: torch.tensor(float(i)).expand(v.shape) for i, (k, v) in enumerate(shapes.items())}
    stripped = tmp_path / "stripped.pth"
    torch.save(official, stripped)
    from_stripped = sam_vit_b(checkpoint=str(stripped), image_size=256)
    timm_layout = tmp_path / "timm.pth"
    torch.save(one_value_per_tensor(from_stripped.state_dict()), timm_layout)  # timm samvit keys (mlp.fc1 ...)
    from_timm = sam_vit_b(checkpoint=str(timm_layout), image_size=256)

    assert torch.equal(from_stripped.blocks[3].mlp.fc1.weight, official["blocks.3.mlp.lin1.weight"])
    assert torch.equal(from_stripped.neck[3].weight, official["neck.3.weight"])
    values = {v.flatten()[0].item() for v in from_stripped.state_dict().values()}
    assert values == set(map(float, range(len(official))))  # every tensor of the file, each in one parameter
    for key, value in from_stripped.state_dict().items():
        assert torch.equal(from_timm.state_dict()[key], value), key


def test_bad_image_size():
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        sam_vit_b(image_size=500)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        build_encoder("sam_vit_b", image_size=0)


def test_missing_checkpoint(tmp_path):
    path = str(tmp_path / "nowhere" / "sam_vit_b_01ec64.pth")
    with pytest.raises(FileNotFoundError, match="nowhere/sam_vit_b_01ec64.pth"):
        build_encoder("sam_vit_b", checkpoint=path)


def placeholder_state(image_size: int) -> dict[str, torch.Tensor]:
    """sam_vit_b's keys with right-shaped stride-0 tensors: a few bytes on disk instead of 350 MB."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in sam_vit_b(image_size=image_size).state_dict().items()}
    return {k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}


def test_mismatched_keys_are_listed(tmp_path):
    state = placeholder_state(64)
    del state["neck.0.weight"]
    state["decoder.extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        sam_vit_b(checkpoint=str(path), image_size=64)
    message = str(info.value)
    assert "missing keys (1): neck.0.weight" in message
    assert "unexpected keys (1): decoder.extra.weight" in message


def test_wrong_shape_is_an_error(tmp_path):
    # windowed blocks' tables are not resized (they depend on the window only): a wrong one is an error
    state = placeholder_state(64)
    state["blocks.0.attn.rel_pos_h"] = torch.zeros(31, 64)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.rel_pos_h: checkpoint \(31, 64\) vs model \(27, 64\)"):
        sam_vit_b(checkpoint=str(path), image_size=64)


def test_wrong_input_size():
    with torch.device("meta"):
        encoder = sam_vit_b(image_size=256)
        with pytest.raises(ValueError, match="takes 256x256 images, got 512x512"):
            encoder(torch.zeros(1, 3, 512, 512))
        with pytest.raises(ValueError, match=r"expects pixels \[B, 3, H, W\]"):
            encoder(torch.zeros(1, 256, 256))


def tiny_sam() -> SamImageEncoder:
    """A small SAM-shaped encoder: 128 px, 8x8 grid, 4x4 windows (padded 8 -> 8), block 1 global."""
    return SamImageEncoder(**TINY_SAM)


def test_grad_checkpointing_recomputes_blocks_and_keeps_gradients(monkeypatch):
    torch.manual_seed(0)
    encoder = tiny_sam()
    pixels = torch.randn(2, 3, 128, 128)
    calls = []
    for block in encoder.blocks:
        # wrap forward itself: module forward hooks do not fire during checkpoint recomputation
        monkeypatch.setattr(block, "forward", lambda x, f=block.forward: calls.append(1) or f(x))

    def grads() -> list[torch.Tensor]:
        encoder.zero_grad()
        encoder(pixels).square().mean().backward()
        return [p.grad.clone() for p in encoder.parameters()]

    plain = grads()
    assert len(calls) == 2
    calls.clear()
    encoder.set_grad_checkpointing(True)
    checkpointed = grads()
    assert len(calls) == 4  # each block ran again in backward
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)
    with torch.device("meta"):
        assert sam_vit_b(grad_checkpointing=True).grad_checkpointing
