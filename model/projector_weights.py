"""Loading LLaVA's / INF-LLaVA's stage-1 `mm_projector.bin` into a built VLM's projector (and DEM).

LLaVA's file holds `[model.]mm_projector.*`; INF-LLaVA's adds `[model.]spatial_embed.*`, its DEM,
which `encoders.inf_llava.load_inf_llava` converts into the dual-perspective module.
"""

from __future__ import annotations

import torch

from encoders import VisionEncoder, encoder_chain
from encoders.inf_llava import DualPerspective, load_inf_llava
from encoders.weights import key_mismatch_error, require_file


def load_mm_projector(path: str, vision: VisionEncoder, projector: torch.nn.Module) -> None:
    """Load `path` into `projector` (and into the vision tower's DualPerspective, if there is one); strict."""
    state = torch.load(require_file(path, "mm_projector weights"), map_location="cpu", weights_only=True)
    dual = next((m for m in encoder_chain(vision) if isinstance(m, DualPerspective)), None)
    if dual is not None:
        rest = load_inf_llava(dual, state)
    else:
        rest = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
        others = [k for k in state if "mm_projector." not in k]
        if others:
            raise key_mismatch_error(path, [], others)
    missing, unexpected = projector.load_state_dict(rest, strict=False)
    if missing or unexpected:
        raise key_mismatch_error(
            path, [f"mm_projector.{k}" for k in missing], [f"mm_projector.{k}" for k in unexpected]
        )
