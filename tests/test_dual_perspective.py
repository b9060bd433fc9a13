"""INF-LLaVA's dual-perspective module against an independent loop transcription of its maths.

`loop_reference` below follows what the reference INF-LLaVA code computes (the pipeline written out in
`encoders/inf_llava/__init__.py`) step by step with plain Python loops over crops, strided views and
blocks and its own multi-head attention (reading the module's weights), so it shares no layout code
with `encoders/inf_llava/`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from encoders import EncoderWrapper, encoder_chain
from encoders.base import VisionEncoder
from encoders.enhancers import ENHANCERS
from encoders.inf_llava import (
    DualPerspective,
    DualPerspectiveEnhancement,
    centre_offsets,
    load_inf_llava,
)
from encoders.wrapper import split_parts
from tests.support.tiny_models import TINY_VIT, TINY_VIT_IMAGE_SIZE

C = 32  # fake encoder width: divisible by 16 (DEM ffn) and by 8 heads


class FakeEncoder(VisionEncoder):
    """A tiny non-local encoder: conv patch embedding, then a token-mixing linear layer (so a token
    depends on the whole view, as in a ViT). S=28, patch 7 -> g=4."""

    def __init__(self, image_size: int = 28, patch: int = 7, dim: int = C, grid_w: int | None = None) -> None:
        super().__init__()
        g = image_size // patch
        self.image_size = image_size
        self.grid_size = (g, grid_w or g)
        self.embed_dim = dim
        self.pixel_mean = (0.5, 0.5, 0.5)
        self.pixel_std = (0.25, 0.25, 0.25)
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.mix = nn.Linear(g * g, g * g)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        x = self.patch_embed(pixels).flatten(2)  # [B, C, N]
        x = x + torch.tanh(self.mix(x))  # token mixing over N
        return x.transpose(1, 2)  # [B, N, C]


def make(n: int = 3, image_size: int = 28, dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    module = DualPerspective(FakeEncoder(image_size=image_size), n=n, **kwargs)
    # Non-trivial LayerNorm affine parameters, so a transposed weight or a skipped LN shows up.
    with torch.no_grad():
        for ln in (module.dem.attention.ln, module.dem.ln_fuse):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
    pixels = torch.randn(2, 3, module.image_size, module.image_size)
    return module.to(dtype), pixels.to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- the independent transcription of the reference's computation ---------------------------------


def loop_mha(attention: nn.Module, query: torch.Tensor, context: torch.Tensor, heads: int) -> torch.Tensor:
    """query [B, Nq, C], context [B, Nk, C]; linears = (q, k, v, out); LN(W_o(attn) + query)."""
    wq, wk, wv, wo = attention.linears
    d_k = query.shape[-1] // heads
    q = F.linear(query, wq.weight, wq.bias)
    k = F.linear(context, wk.weight, wk.bias)
    v = F.linear(context, wv.weight, wv.bias)
    outs = []
    for head in range(heads):
        sl = slice(head * d_k, (head + 1) * d_k)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d_k)
        outs.append(scores.softmax(-1) @ v[..., sl])
    attn = F.linear(torch.cat(outs, -1), wo.weight, wo.bias)
    return F.layer_norm(attn + query, query.shape[-1:], attention.ln.weight, attention.ln.bias, eps=1e-5)


def loop_ffn(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, seq[0].weight, seq[0].bias)), seq[2].weight, seq[2].bias)


def loop_reference(
    module: DualPerspective,
    x: torch.Tensor,
    perspectives: str = "both",
    fusion: str = "concat_ffn",
    combine_global: str = "mean",
    heads: int = 8,
) -> torch.Tensor:
    """The reference's computation with loops; the defaults are the paper, the other settings the documented
    ablations."""
    enc, dem, n = module.inner, module.dem, module.n
    S, (g, _), Cw, B = enc.image_size, enc.grid_size, enc.embed_dim, x.shape[0]
    G = n * g

    def encode(img: torch.Tensor) -> torch.Tensor:
        return enc(img.contiguous()).reshape(B, g, g, Cw)

    L = x.new_zeros(B, G, G, Cw)
    Gm = x.new_zeros(B, G, G, Cw)
    for i in range(n):
        for j in range(n):
            L[:, g * i : g * (i + 1), g * j : g * (j + 1)] = encode(x[:, :, S * i : S * (i + 1), S * j : S * (j + 1)])
    for h in range(n):
        for w in range(n):
            Gm[:, h::n, w::n] = encode(x[:, :, h::n, w::n])
    resized = encode(F.interpolate(x, (S, S), mode="bicubic", align_corners=False))

    Genh, Lenh = torch.zeros_like(L), torch.zeros_like(L)
    for i in range(n):
        for j in range(n):
            blk = (slice(None), slice(g * i, g * (i + 1)), slice(g * j, g * (j + 1)))
            a = loop_mha(dem.attention, Gm[blk].reshape(B, g * g, Cw), L[blk].reshape(B, g * g, Cw), heads)
            Genh[blk] = a.reshape(B, g, g, Cw)
    for h in range(n):
        for w in range(n):
            q, kv = L[:, h::n, w::n].reshape(B, g * g, Cw), Gm[:, h::n, w::n].reshape(B, g * g, Cw)
            Lenh[:, h::n, w::n] = loop_mha(dem.attention, q, kv, heads).reshape(B, g, g, Cw)
    if perspectives == "both":
        local, glob = Lenh, Genh
        residual = Genh + Lenh
    else:  # one perspective feeds both FFN halves (documented ablation)
        local = glob = residual = Lenh if perspectives == "local" else Genh
    if fusion == "concat_ffn":
        fused = torch.cat([loop_ffn(dem.ffn_crop, local), loop_ffn(dem.ffn_stride, glob)], -1) + residual
    else:
        fused = residual
    fused = F.layer_norm(fused, (Cw,), dem.ln_fuse.weight, dem.ln_fuse.bias, eps=1e-5)
    out = F.interpolate(fused.permute(0, 3, 1, 2), (g, g), mode="bilinear", align_corners=False)
    out = out.permute(0, 2, 3, 1).reshape(B, g * g, Cw)
    if combine_global == "none":
        return out
    return torch.stack([resized.reshape(B, g * g, Cw), out]).mean(0)


# (n, inner S): g=4 with n=3 (n does not divide g: uneven blocks), g=6 with n=3 (64-queries-like
# regular case), even n=2 and n=4 (bilinear averages two neighbours).
CONFIGS = [(3, 28), (3, 42), (2, 28), (4, 28)]


@pytest.mark.parametrize("n,size", CONFIGS)
@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_matches_loop_reference_fp64(n: int, size: int, mode: str) -> None:
    module, x = make(n, size, torch.float64, mode=mode)
    with torch.no_grad():
        assert rel_err(module(x), loop_reference(module, x)) < 1e-12


@pytest.mark.parametrize("n,size", CONFIGS)
@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_matches_loop_reference_fp32(n: int, size: int, mode: str) -> None:
    module, x = make(n, size, torch.float32, mode=mode)
    with torch.no_grad():
        assert rel_err(module(x), loop_reference(module, x)) < 1e-5


ABLATIONS = [
    dict(),
    dict(perspectives="local"),
    dict(perspectives="global"),
    dict(fusion="sum"),
    dict(perspectives="local", fusion="sum"),
    dict(perspectives="global", fusion="sum"),
    dict(combine_global="none"),
    dict(perspectives="global", combine_global="none"),
]


@pytest.mark.parametrize("n,size", CONFIGS)
@pytest.mark.parametrize("kwargs", ABLATIONS, ids=lambda k: "-".join(k.values()) or "paper")
def test_fast_equals_reference(n: int, size: int, kwargs: dict) -> None:
    module, x = make(n, size, **kwargs)
    with torch.no_grad():
        fast = module(x)
        module.mode = "reference"
        ref = module(x)
    assert rel_err(fast, ref) < 1e-5


@pytest.mark.parametrize("kwargs", ABLATIONS, ids=lambda k: "-".join(k.values()) or "paper")
@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_ablation_shapes_and_gradients(kwargs: dict, mode: str) -> None:
    module, x = make(3, 28, mode=mode, **kwargs)
    module.inner.requires_grad_(False)
    out = module(x)
    assert out.shape == (2, 16, C)
    out.square().sum().backward()
    for name, p in module.dem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for dem.{name}"
    assert all(p.grad is None for p in module.inner.parameters())


@pytest.mark.parametrize("kwargs", ABLATIONS, ids=lambda k: "-".join(k.values()) or "paper")
@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_ablations_match_loop_reference(kwargs: dict, mode: str) -> None:
    """Each documented ablation (module docstring of DualPerspectiveEnhancement) against the loops."""
    for n, size in [(3, 28), (2, 28)]:
        module, x = make(n, size, torch.float64, mode=mode, **kwargs)
        with torch.no_grad():
            assert rel_err(module(x), loop_reference(module, x, **kwargs)) < 1e-12


# --- the fast path's savings are real --------------------------------------------------------------


@pytest.mark.parametrize(
    "n,kwargs,fast_passes,ref_passes",
    [
        (3, {}, 10, 19),
        (3, dict(combine_global="none"), 10, 18),
        (2, {}, 9, 9),
        (4, {}, 21, 33),  # 2 x 2 centre strided views + a separate bicubic resized view
        (4, dict(combine_global="none"), 20, 32),
    ],
)
def test_encoder_passes_in_one_batched_call(n: int, kwargs: dict, fast_passes: int, ref_passes: int) -> None:
    module, x = make(n, 28, **kwargs)
    calls: list[int] = []
    module.inner.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        module(x)
        assert module.encoder_passes == fast_passes and calls == [2 * fast_passes]
        module.mode = "reference"
        calls.clear()
        module(x)
        assert module.encoder_passes == ref_passes and calls == [2 * ref_passes]


def test_fast_computes_only_needed_queries() -> None:
    """g=6, n=3: (g/n)^2 = 4 global-as-query queries per block (64 at g=24) and one local-as-query view."""
    module, x = make(3, 42)
    shapes: list[tuple] = []
    module.dem.attention.register_forward_hook(
        lambda mod, args, out: shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
    )
    with torch.no_grad():
        module(x)
    assert shapes == [((2 * 9, 4, C), (2 * 9, 36, C)), ((2 * 1, 36, C), (2 * 1, 36, C))]


@pytest.mark.parametrize("n", [3, 4])
def test_only_centre_strided_views_matter(n: int) -> None:
    """In reference mode, replace the encoder features of the strided views outside the centre ones
    (h, w not both in centre_offsets(n)) with noise: the output does not move and they get no gradient.
    Perturbing a centre view does move it."""
    module, x = make(n, 28, torch.float64, mode="reference")
    centre = set(centre_offsets(n))
    others = [n * n + h * n + w for h in range(n) for w in range(n) if not (h in centre and w in centre)]
    centre_k = n * n + min(centre) * n + min(centre)
    perturb: list[int] = []
    feats: list[torch.Tensor] = []

    def hook(mod, args, out):
        out = out.view(2, -1, *out.shape[1:]).clone()  # [B, K, N, C], K = 2*n*n + 1
        out[:, perturb] += torch.randn_like(out[:, perturb])
        if out.requires_grad:
            out.retain_grad()
        feats.append(out)
        return out.view(-1, *out.shape[2:])

    module.inner.register_forward_hook(hook)
    with torch.no_grad():
        base = module(x)
        perturb[:] = others
        assert torch.allclose(module(x), base, rtol=0, atol=1e-12)
        perturb[:] = [centre_k]
        assert not torch.allclose(module(x), base, atol=1e-3)
    perturb[:] = []
    feats.clear()
    module(x).sum().backward()
    grad = feats[0].grad  # [B, K, N, C]
    assert grad[:, others].abs().max() == 0
    assert grad[:, centre_k].abs().max() > 0


@pytest.mark.parametrize("n", [1, 3, 5])
def test_resized_view_is_centre_strided_view_for_odd_n(n: int) -> None:
    x = torch.randn(2, 3, 28 * n, 28 * n)
    c = (n - 1) // 2
    assert torch.equal(F.interpolate(x, (28, 28), mode="bicubic", align_corners=False), x[:, :, c::n, c::n])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_bilinear_resize_reads_centre_offsets(n: int) -> None:
    g = 4
    fmap = torch.randn(2, 5, n * g, n * g)
    out = F.interpolate(fmap, (g, g), mode="bilinear", align_corners=False)
    offs = centre_offsets(n)
    picked = torch.stack([fmap[:, :, a::n, b::n] for a in offs for b in offs]).mean(0)
    torch.testing.assert_close(out, picked, rtol=0, atol=1e-6)


# --- training plumbing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_gradients_reach_dem_and_trainable_encoder(mode: str) -> None:
    module, x = make(3, 28, mode=mode)
    module(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_grad_checkpointing_forwards_to_inner() -> None:
    module, _ = make()
    module.set_grad_checkpointing(True)
    assert module.inner.grad_checkpointing
    module.set_grad_checkpointing(False)
    assert not module.inner.grad_checkpointing


def test_contract_attributes_and_parts() -> None:
    module, _ = make(3, 28)
    assert isinstance(module, EncoderWrapper) and encoder_chain(module) == [module, module.inner]
    assert module.image_size == 84 and module.grid_size == (4, 4) and module.num_tokens == 16
    assert module.embed_dim == C and module.pixel_mean == (0.5,) * 3 and module.pixel_std == (0.25,) * 3
    parts = split_parts(module)
    assert {name for name, _ in parts["enhancer"]} == {"dem." + k for k, _ in module.dem.named_parameters()}
    assert {name for name, _ in parts["encoder"]} == {"inner." + k for k, _ in module.inner.named_parameters()}


def test_input_and_config_errors() -> None:
    with pytest.raises(ValueError, match="square token grid"):
        DualPerspective(FakeEncoder(grid_w=3))
    with pytest.raises(ValueError, match="mode"):
        DualPerspective(FakeEncoder(), mode="slow")
    with pytest.raises(ValueError, match="perspectives"):
        DualPerspective(FakeEncoder(), perspectives="both_ways")
    module, _ = make(3, 28)
    with pytest.raises(ValueError, match="84x84"):
        module(torch.randn(1, 3, 28, 28))


# --- INF-LLaVA weights ---------------------------------------------------------------------------------


def test_dem_parameter_count_matches_inf_llava() -> None:
    with torch.device("meta"):
        dem = DualPerspectiveEnhancement(1024)
    assert sum(p.numel() for p in dem.parameters()) == 4_400_256
    expected = {f"attention.linears.{i}.{t}" for i in range(4) for t in ("weight", "bias")}
    expected |= {f"{m}.{t}" for m in ("attention.ln", "ln_fuse") for t in ("weight", "bias")}
    expected |= {f"{f}.{i}.{t}" for f in ("ffn_crop", "ffn_stride") for i in (0, 2) for t in ("weight", "bias")}
    assert set(dem.state_dict()) == expected


def fake_mm_projector_bin(module: DualPerspective, prefix: str) -> dict[str, torch.Tensor]:
    state = {f"{prefix}spatial_embed.{k}": torch.randn_like(v) for k, v in module.dem.state_dict().items()}
    state |= {f"{prefix}mm_projector.0.weight": torch.randn(64, C), f"{prefix}mm_projector.0.bias": torch.randn(64)}
    state |= {f"{prefix}mm_projector.2.weight": torch.randn(64, 64), f"{prefix}mm_projector.2.bias": torch.randn(64)}
    return state


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_load_inf_llava(prefix: str) -> None:
    module, _ = make()
    state = fake_mm_projector_bin(module, prefix)
    projector_state = load_inf_llava(module, state)
    for k, v in module.dem.state_dict().items():
        assert torch.equal(v, state[f"{prefix}spatial_embed.{k}"])
    assert set(projector_state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    projector = nn.Sequential(nn.Linear(C, 64), nn.GELU(), nn.Linear(64, 64))
    projector.load_state_dict(projector_state)  # strict: the lead's projector layout


def test_load_inf_llava_mismatch_errors() -> None:
    module, _ = make()
    state = fake_mm_projector_bin(module, "model.")
    del state["model.spatial_embed.ffn_crop.0.bias"]
    state["model.spatial_embed.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing: \['ffn_crop.0.bias'\]; unexpected: \['extra.weight'\]"):
        load_inf_llava(module, state)
    # The paper's weights do not fit the fusion="sum" ablation (no FFNs): the error lists them.
    sum_module, _ = make(fusion="sum")
    with pytest.raises(ValueError, match="unexpected: .*ffn_crop.0.bias"):
        load_inf_llava(sum_module, fake_mm_projector_bin(module, "model."))
    bad = fake_mm_projector_bin(module, "model.")
    bad["model.spatial_embed.ln_fuse.weight"] = torch.zeros(C + 1)
    with pytest.raises(ValueError, match="ln_fuse.weight"):
        load_inf_llava(module, bad)
    with pytest.raises(ValueError, match="embed_tokens"):
        load_inf_llava(module, fake_mm_projector_bin(module, "model.") | {"model.embed_tokens.weight": torch.zeros(1)})


def test_single_perspective_concat_loads_paper_weights() -> None:
    paper, _ = make()
    local_only, _ = make(perspectives="local")
    state = fake_mm_projector_bin(paper, "model.")
    projector_state = load_inf_llava(local_only, state)
    # the DEM is the same module whichever perspectives feed it: every tensor of the paper's file lands in it
    for k, v in local_only.dem.state_dict().items():
        assert torch.equal(v, state[f"model.spatial_embed.{k}"]), k
    assert set(projector_state) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_wraps_a_timm_vit() -> None:
    """A real ViT from the registry: fast == reference with the same weights."""
    encoders = pytest.importorskip("encoders")
    torch.manual_seed(0)
    inner = encoders.build_encoder("timm:vit_tiny_patch16_224", image_size=TINY_VIT_IMAGE_SIZE, model_kwargs=TINY_VIT)
    module = DualPerspective(inner, n=3).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        fast = module(x)
        module.mode = "reference"
        ref = module(x)
    assert fast.shape == (1, inner.num_tokens, TINY_VIT["embed_dim"])
    assert rel_err(fast, ref) < 1e-5


def test_enhancer_registry_builds_dual_perspective() -> None:
    assert "dual_perspective" in ENHANCERS.names()
    # the wrapped encoder is the caller's input, every other constructor argument an option
    assert ENHANCERS.options("dual_perspective") == [
        "n",
        "mode",
        "perspectives",
        "fusion",
        "combine_global",
        "num_heads",
    ]
    torch.manual_seed(0)
    module = ENHANCERS.build("dual_perspective", FakeEncoder(), n=2, mode="reference")
    assert isinstance(module, DualPerspective) and (module.n, module.mode, module.image_size) == (2, "reference", 56)
    with pytest.raises(ValueError, match=r"enhancer 'dual_perspective' got unknown option\(s\) \['crops'\]"):
        ENHANCERS.build("dual_perspective", FakeEncoder(), crops=3)
