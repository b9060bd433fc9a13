"""`optim.states: 8bit`: bitsandbytes' AdamW8bit, with its CPU step taken a chunk of a parameter at a time.

bitsandbytes 0.50.2 steps a parameter with 8-bit states on CPU in plain PyTorch: it dequantizes the whole
parameter's two states to fp32, updates, and quantizes them back, holding about 4.5 times the parameter in fp32
temporaries (1.1 GiB for a 128,256 x 512 embedding; measured) and streaming each pass through memory. The
quantization works on independent blocks of 256 values, so the same call on consecutive chunks of whole blocks
gives the same bits (tests/test_optim_states.py checks it), in temporaries the size of a chunk and about 1.5x faster
out of cache. On CUDA bitsandbytes' own fused kernel steps, unchanged.
"""

from __future__ import annotations

import bitsandbytes
import bitsandbytes.functional as F
import torch

BLOCK = 256  # values per quantization block of bitsandbytes' 8-bit blockwise states
CHUNK = 1024 * BLOCK  # values per CPU call: 1 MiB of fp32 (fastest of 64K, 256K and 1M values measured)


class AdamW8bit(bitsandbytes.optim.AdamW8bit):
    """bitsandbytes' AdamW8bit (same arguments, states and `state_dict`) with the chunked CPU step."""

    @torch.no_grad()
    def update_step(self, group: dict, p: torch.Tensor, gindex: int, pindex: int) -> None:
        state = self.state[p]
        if p.device.type != "cpu" or state["state1"].dtype != torch.uint8:  # CUDA, or a small tensor's fp32 states
            return super().update_step(group, p, gindex, pindex)
        p.data = p.data.contiguous()  # as bitsandbytes' own step: the kernels read flat memory
        config = self.get_config(gindex, pindex, group)
        state["step"] += 1
        values, grads = p.data.view(-1), p.grad.contiguous().view(-1)
        first, second = state["state1"].view(-1), state["state2"].view(-1)
        for start in range(0, values.numel(), CHUNK):
            end = min(start + CHUNK, values.numel())
            blocks = slice(start // BLOCK, -(-end // BLOCK))
            F.optimizer_update_8bit_blockwise(
                self.optimizer_name,
                grads[start:end],
                values[start:end],
                first[start:end],
                second[start:end],
                config["betas"][0],
                config["betas"][1],
                0.0,  # beta3 and alpha: AdEMAMix's, unused by Adam
                0.0,
                config["eps"],
                state["step"],
                config["lr"],
                state["qmap1"],
                state["qmap2"],
                state["absmax1"][blocks],
                state["absmax2"][blocks],
                config["weight_decay"],
                gnorm_scale=1.0,
                skip_zeros=config["skip_zeros"],
            )
