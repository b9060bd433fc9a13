"""`optim.states: 8bit`: bitsandbytes' AdamW8bit, with a CPU step about 2.5x as fast as its own and without its
whole-parameter temporaries.

bitsandbytes 0.50.2 steps a parameter with 8-bit states on CPU in plain PyTorch: it dequantizes the whole
parameter's two states to fp32, updates them and the parameter in about ten elementwise passes, and quantizes the
states back with a scalar C loop, holding about 4.5 times the parameter in fp32 temporaries (1.1 GiB for a
128,256 x 512 embedding; measured). Here a CPU step takes, a chunk of whole 256-value blocks at a time (the
quantization's blocks are independent):

    m, v = dequantize(codes1, absmax1), dequantize(codes2, absmax2)     bitsandbytes' C kernel
    AdamW step of (p, g, m, v)                                          torch's fused AdamW kernel, one pass
    codes, absmax = quantize(m), quantize(v)                            bitsandbytes' quantizer, restated in torch
                                                                        ops (the same bits, twice as fast)

The update is bitsandbytes' formula (p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
p -= lr / c1 * m / (sqrt(v) / c2 + eps)), rounded by another kernel: tests/test_optim_states.py compares the two.
Measured on 2 cores, a dense 128,256 x 512 parameter: 0.36 s a step, bitsandbytes' 0.90 s.

A block whose gradient is all zero (the rows of an embedding no token of the batch used: over 99% of a 128,256-token
vocabulary's at LLaVA's batch sizes) only decays: m becomes b1 m and v becomes b2 v, which the same codes hold with
their scale times b1 and b2. Such a block keeps its codes and only its scale is multiplied; quantizing, the larger
part of a step, is skipped for it (0.14 s a step for that embedding when 99% of its rows got no gradient). The
parameter itself still steps everywhere, as AdamW's. bitsandbytes re-quantizes those blocks, and since -1 is not on
its signed map, a block whose largest first moment is negative shrinks by the map's end (0.993) each time.

On CUDA, for small tensors (fp32 states), and with bitsandbytes' options this step does not implement (max_unorm,
skip_zeros), bitsandbytes' own step runs, unchanged.
"""

from __future__ import annotations

import functools

import bitsandbytes
import torch
from torch.optim.adamw import adamw

BLOCK = 256  # values per quantization block of bitsandbytes' 8-bit blockwise states
CHUNK = 1024 * BLOCK  # values per CPU call: 1 MiB of fp32 (fastest of 64K, 256K and 1M values measured)
BINS = 65536  # bitsandbytes' CPU quantizer reads a value scaled to [-1, 1] through a table of this many bins


@functools.lru_cache(maxsize=8)
def _table(qmap: bytes) -> torch.Tensor:
    """bitsandbytes' CPU quantization table of a 256-code map (csrc/cpu_ops.cpp, build_quantize_lut): bin i, the
    value -1 + 2i / 65535 in fp32, holds the index of the nearest code, the number of midpoints between neighbouring
    codes that lie below it."""
    codes = torch.frombuffer(bytearray(qmap), dtype=torch.float32)
    midpoints = 0.5 * (codes[:-1] + codes[1:])
    bins = -1.0 + (2.0 * torch.arange(BINS, dtype=torch.float32)) / (BINS - 1)
    return torch.searchsorted(midpoints, bins, side="left").to(torch.uint8)


def _quantize(state: torch.Tensor, table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Blocks [n, 256] of fp32 -> their codes into `codes` [n, 256] uint8; returns the scales [n]. bitsandbytes'
    CPU quantization, the same bits (tests/test_optim_states.py), in torch's vectorized kernels: about twice as fast
    as bitsandbytes' scalar loop on 2 cores (0.41 vs 0.83 ms per 1,024 blocks, measured)."""
    absmax = state.abs().amax(1)  # [n]
    scaled = state * (1.0 / absmax)[:, None]
    scaled.clamp_(-1.0, 1.0).add_(1.0).mul_(0.5 * (BINS - 1)).add_(0.5)  # (v + 1) / 2 * 65535, rounded: the bin
    bins = scaled.to(torch.int64).clamp_(0, BINS - 1)  # a non-finite state's NaN lands in bin 0
    torch.take(table, bins, out=codes)
    empty = absmax == 0
    if empty.any():
        codes[empty] = 0  # an all-zero block: code 0, as bitsandbytes writes it
    return absmax


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    return torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, qmap, BLOCK, torch.float32)


def _quantize_into(
    state: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, beta: float, active
) -> None:
    """Store `state` (fp32, a chunk of whole blocks) as `codes` and `absmax`. `active` marks the blocks with a
    gradient ([blocks] bool, or None for all); the others decayed by `beta` and keep their codes."""
    if active is None:
        absmax.copy_(_quantize(state.view(-1, BLOCK), table, codes.view(-1, BLOCK)))
        return
    absmax[~active] *= beta
    touched = active.nonzero().squeeze(1)
    if touched.numel():
        new_codes = torch.empty(touched.numel(), BLOCK, dtype=torch.uint8)
        absmax[touched] = _quantize(state.view(-1, BLOCK)[touched], table, new_codes)
        codes.view(-1, BLOCK)[touched] = new_codes


class _Rows:
    """A sparse [V, H] gradient (the rows a batch's tokens used, repeats summed) read as a flat dense one, a range
    of values at a time: chunk by chunk, no [V, H] tensor of zeros is ever made."""

    def __init__(self, grad: torch.Tensor) -> None:
        grad = grad.coalesce()  # sorted, unique rows
        self.rows, self.values = grad.indices()[0], grad.values().float()  # [k], [k, H]
        self.width = grad.shape[1]

    def __getitem__(self, span: slice) -> torch.Tensor:
        first, last = span.start // self.width, -(-span.stop // self.width)  # the rows that span overlaps
        lo, hi = torch.searchsorted(self.rows, torch.tensor([first, last])).tolist()
        dense = torch.zeros(last - first, self.width)
        dense[self.rows[lo:hi] - first] = self.values[lo:hi]
        offset = first * self.width
        return dense.view(-1)[span.start - offset : span.stop - offset]


class AdamW8bit(bitsandbytes.optim.AdamW8bit):
    """bitsandbytes' AdamW8bit (same arguments, states and `state_dict`) with the CPU step described above.

    It also takes a sparse gradient (`nn.Embedding(sparse=True)`): the rows a batch used. Every row still steps, as
    AdamW's (its moments decay and it moves by them), but no dense gradient as large as the embedding is made:
    `VLMModule` asks the LLM's input embedding for one where this optimizer steps inside backward
    (`optim.in_backward`), the only place its gradient is read.
    """

    takes_sparse_gradients = True

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
            if p.grad.is_sparse:
                p.grad = p.grad.to_dense()  # bitsandbytes' kernels read dense gradients
            return super().update_step(group, p, gindex, pindex)
        p.data = p.data.contiguous()  # as bitsandbytes' own step: the kernels read flat memory
        state["step"] += 1
        (beta1, beta2), lr, eps, decay = config["betas"][:2], config["lr"], config["eps"], config["weight_decay"]
        values = p.data.view(-1)
        grads = _Rows(p.grad) if p.grad.is_sparse else p.grad.contiguous().view(-1)
        first, second = state["state1"].view(-1), state["state2"].view(-1)
        tables = _table(state["qmap1"].numpy().tobytes()), _table(state["qmap2"].numpy().tobytes())
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
            if (end - start) % BLOCK:  # the parameter's last block is partial: bitsandbytes' own quantizer
                for new, codes, absmax, qmap in ((m, first, absmax1, "qmap1"), (v, second, absmax2, "qmap2")):
                    new_codes, new_absmax = torch.ops.bitsandbytes.quantize_blockwise(new, state[qmap], BLOCK)
                    codes[start:end], absmax[:] = new_codes, new_absmax
                continue
            active = grad32.view(-1, BLOCK).abs().amax(1).ne(0)  # a NaN gradient: active
            if bool(active.all()):
                active = None  # every block re-quantized in one call, without gathering them
            _quantize_into(m, first[start:end], absmax1, tables[0], beta1, active)
            _quantize_into(v, second[start:end], absmax2, tables[1], beta2, active)
