"""Load the reference INF-LLaVA's stage-1 `mm_projector.bin` into a `DualPerspective` and a projector.

The file holds `model.spatial_embed.*` (the DEM, 4,400,256 parameters for C = 1024) and
`model.mm_projector.*` (LLaVA's `mlp2x_gelu`, Linear(C, D) -> GELU -> Linear(D, D), D the LLM width:
20,979,712 parameters for Llama-3-8B). The DEM keys already follow `DualPerspectiveEnhancement`'s names.
"""

from __future__ import annotations

import torch

from encoders.inf_llava.dual_perspective import DualPerspective


def load_inf_llava(module: DualPerspective, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load INF-LLaVA's stage-1 `mm_projector.bin` into the DEM; return the projector's part.

    The file holds `model.spatial_embed.*` (the DEM) and `model.mm_projector.*` (LLaVA's
    `mlp2x_gelu`, an nn.Sequential Linear-GELU-Linear); the `model.` prefix may be absent.

    Args:
        module: the DualPerspective whose `dem` receives `spatial_embed.*` (strict).
        state_dict: the loaded file, e.g. `torch.load("mm_projector.bin", map_location="cpu")`.

    Returns:
        The `mm_projector.*` tensors with that prefix stripped ({"0.weight", "0.bias", "2.weight",
        "2.bias"}), for the projector's own `load_state_dict`.

    Raises:
        ValueError: keys that are neither DEM nor projector keys, DEM keys missing or unexpected (all
        listed), or DEM tensors of the wrong shape.
    """
    dem_state: dict[str, torch.Tensor] = {}
    projector_state: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        name = key[len("model.") :] if key.startswith("model.") else key
        if name.startswith("spatial_embed."):
            dem_state[name[len("spatial_embed.") :]] = value
        elif name.startswith("mm_projector."):
            projector_state[name[len("mm_projector.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"load_inf_llava: keys that are neither spatial_embed.* nor mm_projector.*: {sorted(unknown)}")
    expected = module.dem.state_dict()
    missing = sorted(set(expected) - set(dem_state))
    unexpected = sorted(set(dem_state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"load_inf_llava: DEM keys do not match (perspectives={module.perspectives!r}, "
            f"fusion={module.dem.fusion!r}); missing: {missing}; unexpected: {unexpected}"
        )
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs module {tuple(expected[k].shape)}"
        for k, v in dem_state.items()
        if v.shape != expected[k].shape
    ]
    if wrong_shape:
        raise ValueError(f"load_inf_llava: DEM tensor shapes differ: {wrong_shape}")
    module.dem.load_state_dict(dem_state, strict=True)
    return projector_state
