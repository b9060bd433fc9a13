"""`optim.states: 8bit`: bitsandbytes' AdamW8bit, with a faster CPU step that holds no whole-parameter temporaries.

bitsandbytes 0.50.2 steps a parameter with 8-bit states on CPU in plain PyTorch: it dequantizes the whole
parameter's two states to fp32, updates them and the parameter in about ten elementwise passes, and quantizes the
states back, holding about 4.5 times the parameter in fp32 temporaries (1.1 GiB for a 128,256 x 512 embedding;
measured) and streaming each pass through memory. Here a CPU step takes, a chunk of whole 256-value blocks at a time
(the quantization's blocks are independent):

    m, v = dequantize(codes1, absmax1), dequantize(codes2, absmax2)     bitsandbytes' C kernels
    AdamW step of (p, g, m, v)                                          torch's fused AdamW kernel, one pass
    codes, absmax = quantize(m), quantize(v)                            bitsandbytes' C kernel, blocks with a gradient

The update is the same formula as bitsandbytes' (p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
p -= lr / c1 * m / (sqrt(v) / c2 + eps)), rounded by another kernel: tests/test_optim_states.py compares both.

A block whose gradient is all zero (the rows of an embedding no token of the batch used: over 99% of a 128,256-token
vocabulary's at LLaVA's batch sizes) only decays: m becomes b1 m and v becomes b2 v, which the same codes hold with
their scale times b1 and b2 (re-quantizing would give those codes again). Such a block keeps its codes and only its
scale is multiplied; quantization, four fifths of the step's time, is skipped for it. The parameter's own update is
still computed for every value, as AdamW's.

On CUDA, for small tensors (fp32 states), and with bitsandbytes' options this step does not implement (max_unorm,
skip_zeros), bitsandbytes' own step runs, unchanged.
"""

from __future__ import annotations

import bitsandbytes
import torch
from torch.optim.adamw import adamw

BLOCK = 256  # values per quantization block of bitsandbytes' 8-bit blockwise states
CHUNK = 1024 * BLOCK  # values per CPU call: 1 MiB of fp32 (fastest of 64K, 256K and 1M values measured)


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    return torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, qmap, BLOCK, torch.float32)


def _quantize_into(
    state: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, beta: float, active
) -> None:
    """Store `state` (fp32, a chunk of whole blocks but maybe the last) as `codes` and `absmax`. `active` marks the
    blocks with a gradient ([blocks] bool, or None for all); the others decayed by `beta` and keep their codes."""
    if active is None:
        new_codes, new_absmax = torch.ops.bitsandbytes.quantize_blockwise(state, qmap, BLOCK)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)
        return
    absmax[~active] *= beta
    touched = active.nonzero().squeeze(1)
    if touched.numel():
        new_codes, new_absmax = torch.ops.bitsandbytes.quantize_blockwise(state.view(-1, BLOCK)[touched], qmap, BLOCK)
        codes.view(-1, BLOCK)[touched] = new_codes
        absmax[touched] = new_absmax


class AdamW8bit(bitsandbytes.optim.AdamW8bit):
    """bitsandbytes' AdamW8bit (same arguments, states and `state_dict`) with the CPU step described above."""

    @torch.no_grad()
    def update_step(self, group: dict, p: torch.Tensor, gindex: int, pindex: int) -> None:
        state = self.state[p]
        config = self.get_config(gindex, pindex, group)
        if (
            p.device.type != "cpu"
            or state["state1"].dtype != torch.uint8  # a small tensor's fp32 states
            or config["max_unorm"] > 0.0
            or config["skip_zeros"]
        ):
            return super().update_step(group, p, gindex, pindex)
        p.data = p.data.contiguous()  # as bitsandbytes' own step: the kernels read flat memory
        state["step"] += 1
        (beta1, beta2), lr, eps, decay = config["betas"][:2], config["lr"], config["eps"], config["weight_decay"]
        values, grads = p.data.view(-1), p.grad.contiguous().view(-1)
        first, second = state["state1"].view(-1), state["state2"].view(-1)
        for start in range(0, values.numel(), CHUNK):
            end = min(start + CHUNK, values.numel())
            blocks = slice(start // BLOCK, -(-end // BLOCK))
            absmax1, absmax2 = state["absmax1"][blocks], state["absmax2"][blocks]
            m = _dequantize(first[start:end], absmax1, state["qmap1"])
            v = _dequantize(second[start:end], absmax2, state["qmap2"])
            value, grad = values[start:end], grads[start:end]
            value32, grad32 = value.float(), grad.float()  # the parameter itself when it is fp32
            steps = [torch.tensor(float(state["step"] - 1))]  # the fused kernel counts this step itself
            adamw(
                [value32], [grad32], [m], [v], [], steps, fused=True, amsgrad=False, maximize=False,
                beta1=beta1, beta2=beta2, lr=lr, weight_decay=decay, eps=eps,
            )  # fmt: skip
            if value32.data_ptr() != value.data_ptr():
                value.copy_(value32)
            whole_blocks = (end - start) % BLOCK == 0
            active = grad32.view(-1, BLOCK).abs().amax(1).ne(0) if whole_blocks else None  # NaN: active
            if active is not None and bool(active.all()):
                active = None  # every block re-quantized in one call, without gathering them
            _quantize_into(m, first[start:end], absmax1, state["qmap1"], beta1, active)
            _quantize_into(v, second[start:end], absmax2, state["qmap2"], beta2, active)
