"""The optimizer VLMModule steps: AdamW over the parts' parameter groups, with the `optim` options that choose its
kernel, the precision of its moment states and when it steps.

    optim.fused        torch's fused AdamW kernel, where the parameters' device has one
    optim.states       fp32: torch's AdamW. 8bit: bitsandbytes' AdamW8bit, its two moment states block-quantized
    optim.in_backward  each parameter steps inside backward (lit_modules/optim_in_backward.py)

8-bit states. AdamW keeps two moment states per trained weight: in fp32, 8 bytes per parameter, twice the fp32
weights (64 GB at Llama-3-8B). bitsandbytes' AdamW8bit (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", 2022) keeps each in blocks of 256 one-byte codes of a dynamic-tree map with one fp32 scale per block:
about 2 bytes per parameter. A step dequantizes a parameter's states, updates in fp32 and quantizes back; tensors
under 4,096 values keep fp32 states. The trajectory is AdamW's up to the rounding of the states, not equal to it
(tests/test_optim_states.py bounds the gap, on gradients whose magnitudes span orders too). On CUDA the step is one
fused kernel; on CPU this project's (lit_modules/adamw8bit.py: a chunk at a time, torch's fused AdamW kernel between
dequantizing and quantizing, blocks without gradient kept as they are) is about 2.5x as fast as bitsandbytes' own,
still slower than torch's fused AdamW in fp32 (bench/bench_step_cost.py). Stepped inside backward, it takes the input
embedding's gradient sparse: the rows the batch used. bitsandbytes is the `lowmem` extra. Tested on one device and
under DDP (each rank steps its full copy); FSDP and DeepSpeed shard the optimizer states themselves and are
refused (experiment/validate.py).

torchao's low-bit AdamW (AdamW8bit, AdamWFp8; 0.18) was measured and left out: on gradients whose magnitudes span a
few orders within a block (log-normal, sigma 2), after 10 steps its codes held a zero second moment for 0.6% (8bit)
and 4.5% (fp8) of the values whose fp32 one was not, with their first moments kept, so those values stepped by
m / eps: the parameters' difference from torch's AdamW was 12-15x (8bit) and 87x (fp8) the norm of AdamW's own
change; bitsandbytes' was 0.21-0.23x.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info

from foundation.errors import needs_extra
from foundation.schema import ConfigError, OptimConfig
from lit_modules.optim_in_backward import in_backward

STATES = ("fp32", "8bit")  # optim.states


def build_optimizer(groups: list[dict], optim: OptimConfig, strategy: Strategy) -> torch.optim.Optimizer:
    """AdamW over `groups` (their lr and weight decay set) as `optim` says; with `optim.in_backward`, stepped
    inside backward, on one device only: DDP, FSDP and DeepSpeed reduce gradients after backward, when every
    parameter would have stepped on its own rank's."""
    optimizer_class, kwargs = _adamw(groups, optim)
    if not optim.in_backward:
        return optimizer_class(groups, **kwargs)
    if not isinstance(strategy, SingleDeviceStrategy):
        raise ConfigError(
            f"'optim.in_backward' runs on one device only, but the run got {type(strategy).__name__} "
            f"(trainer.devices / num_nodes / strategy): DDP, FSDP and DeepSpeed reduce gradients after the "
            f"in-backward steps; set trainer.devices: 1 or optim.in_backward: false"
        )
    return in_backward(optimizer_class)(groups, **kwargs)


def _adamw(groups: list[dict], optim: OptimConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    """The AdamW class for `optim.states` and its keyword arguments."""
    kwargs = {"betas": tuple(optim.betas)}
    if optim.states == "fp32":
        return torch.optim.AdamW, {**kwargs, **_kernel(groups, optim.fused)}
    # bitsandbytes warns at import, on a CPU with AVX512-BF16, that its 4-bit matmul kernel package is not
    # installed: nothing an optimizer uses
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        with needs_extra("lowmem", "optim.states: 8bit"):
            from lit_modules.adamw8bit import AdamW8bit
    finally:
        cpu_ops.setLevel(level)
    return AdamW8bit, kwargs


def _kernel(groups: list[dict], fused: bool) -> dict:
    """`optim.fused`: AdamW's fused kernel where every trainable parameter's device has one (torch 2.15: CUDA, CPU,
    MPS, XPU, ...), else the foreach one, said once; {} leaves the choice to torch."""
    if not fused:
        return {}
    devices = {p.device.type for g in groups for p in g["params"]}
    supported = _fused_devices()
    if devices <= supported:
        return {"fused": True}
    rank_zero_info(f"optim.fused: no fused AdamW on {', '.join(sorted(devices - supported))}; using foreach")
    return {"foreach": True}


def _fused_devices() -> set[str]:
    # torch's own list of the devices with fused optimizer kernels (a private helper; AdamW checks against it)
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return set(_get_fused_kernels_supported_devices())
