"""Attention for packed rows without a block-diagonal mask: PyTorch's varlen kernel or a FlexAttention document mask.

A packed row (datamodules/packing.py) holds several samples, each restarting its `position_ids` at 0. How the
samples are kept apart is `model.llm.packed_attention`:

    mask    transformers builds a block-diagonal causal mask [R, 1, T, T] from the position resets and SDPA
            applies it: correct everywhere, but a dense mask keeps SDPA off its flash kernel (the default)
    varlen  `torch.nn.attention.varlen.varlen_attn` on the rows flattened to [R * T, H, d], one segment per
            sample (cumulative lengths `cu_seq_lens`): flash / cuDNN, no mask at all; CUDA, fp16 / bf16 only
    flex    `torch.nn.attention.flex_attention` with a document BlockMask (a token sees the earlier tokens of its
            own sample): blocks wholly outside a sample are skipped; any float dtype, compiled on first use; trains
            on CUDA only (torch 2.15's FlexAttention has no backward on a CPU; its forward runs there)

Both kernels are functions of transformers' attention interface (`AttentionInterface.register`), selected by the
LLM config's `attn_implementation` (`IMPLEMENTATIONS`), each with a mask function (`AttentionMaskInterface`).
They take the packed path only for the inputs `packed_inputs` makes from the position ids, once per forward
(`VisionLanguageModel.forward`); every other call (validation batches with padding, generation with its KV cache)
gets transformers' SDPA mask and SDPA itself, as with `attn_implementation: sdpa`.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from foundation.schema import ConfigError

PACKED_ATTENTION = ("mask", "varlen", "flex")
# `packed_attention` -> the attn_implementation name registered below (mask: the LLM's own, sdpa by default)
IMPLEMENTATIONS = {"varlen": "packed_varlen", "flex": "packed_flex"}
# Why a kind cannot train without CUDA (torch 2.15; `mask` can): what validate and preflight say
NEEDS_CUDA = {
    "varlen": "'model.llm.packed_attention' = 'varlen' needs a CUDA GPU (PyTorch's varlen kernel has no CPU version)",
    "flex": "'model.llm.packed_attention' = 'flex' trains on CUDA only (FlexAttention has no backward on a CPU)",
}


def sample_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[R, T] position ids -> [R, T] bool, True where a sample starts: the first column and every position that
    does not follow its left neighbour by 1 (transformers' `find_packed_sequence_indices` rule, so the end padding,
    which restarts at 0, is a sample of its own)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def varlen_inputs(position_ids: torch.Tensor) -> dict:
    """The varlen kernel's segments of the rows flattened to [R * T]: `cu_seq_lens_q/k` [S + 1] int32 (sample
    start offsets and the total) and `max_length_q/k` (one host sync, once per forward). The names are
    transformers' own flash-attention kwargs, which its decoders pass on to the attention function."""
    R, T = position_ids.shape
    starts = sample_starts(position_ids).flatten().nonzero().flatten()  # [S]
    cu = torch.cat([starts, starts.new_tensor([R * T])]).to(torch.int32)  # [S + 1]
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def document_mask(position_ids: torch.Tensor) -> BlockMask:
    """[R, T] position ids -> a causal document BlockMask [R, 1, T, T]: query q sees key k of the same row when
    both belong to the same sample and k <= q."""
    R, T = position_ids.shape
    sample = sample_starts(position_ids).cumsum(-1)  # [R, T] sample index within its row

    def same_sample_causal(b, h, q, k):
        return (sample[b, q] == sample[b, k]) & (k <= q)

    # compiled on CUDA, so the mask is built block by block and never materialised as [R, T, T]
    device = position_ids.device
    return create_block_mask(same_sample_causal, R, None, T, T, device=device, _compile=device.type == "cuda")


def packed_inputs(kind: str, position_ids: torch.Tensor) -> dict:
    """What the decoder takes for packed rows besides `position_ids` [R, T]: nothing for `mask` (transformers
    finds the resets itself), the segments for `varlen`, the document mask as `attention_mask` for `flex`."""
    if kind == "varlen":
        return varlen_inputs(position_ids)
    if kind == "flex":
        return {"attention_mask": document_mask(position_ids)}
    return {}


def _check_supported(kind: str, dropout: float, kwargs: dict) -> None:
    """What neither kernel call here applies: attention dropout, sliding windows, logit soft-capping."""
    unsupported = {"attention dropout": dropout or None}
    unsupported.update({k: kwargs.get(k) for k in ("sliding_window", "softcap")})
    found = [f"{k} = {v}" for k, v in unsupported.items() if v is not None]
    if found:
        raise ConfigError(
            f"model.llm.packed_attention: {kind} does not apply this LLM's {', '.join(found)}; use "
            f"model.llm.packed_attention: mask (or set the LLM's attention_dropout to 0)"
        )


def _packed_mask(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """[B, 1, T, T] block-diagonal causal mask when `position_ids` [B or 1, T] hold packed samples, else None."""
    if position_ids is None or query.shape[2] != key.shape[2]:
        return None
    sample = sample_starts(position_ids.expand(query.shape[0], -1)).cumsum(-1)  # [B, T]
    if bool((sample[:, -1] == 1).all()):  # one sample per row: plain causal
        return None
    causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    return ((sample[:, :, None] == sample[:, None, :]) & causal)[:, None]


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, T, d], key / value [B, Hkv, T, d] -> [B, T, H, d].
    Packed rows with their segments (`varlen_inputs`) take the varlen kernel; anything else SDPA."""
    _check_supported("varlen", dropout, kwargs)  # the mask function left sliding windows out too
    if attention_mask is None and "cu_seq_lens_q" not in kwargs:
        # `_no_mask_when_plain` left the mask out; without segments (a caller other than VisionLanguageModel, a
        # generation prefill) packed position ids still need one
        attention_mask = _packed_mask(kwargs.get("position_ids"), query, key)
    if attention_mask is not None or "cu_seq_lens_q" not in kwargs:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    B, H, T, d = query.shape
    q = query.transpose(1, 2).reshape(B * T, H, d)  # [B*T, H, d]
    k = key.transpose(1, 2).reshape(B * T, key.shape[1], d)  # [B*T, Hkv, d]
    v = value.transpose(1, 2).reshape(B * T, value.shape[1], value.shape[-1])
    segments = [kwargs[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    try:
        # window (-1, 0): causal within each segment
        out = varlen_attn(q, k, v, *segments, scale=scaling, window_size=(-1, 0), enable_gqa=key.shape[1] != H)
    except (NotImplementedError, RuntimeError) as err:  # validate / preflight refuse such runs; direct callers
        raise ConfigError(
            f"model.llm.packed_attention: varlen could not run on {query.device.type} in {query.dtype} (PyTorch's "
            f"varlen kernel needs CUDA and float16 / bfloat16): {str(err).splitlines()[0]}; use packed_attention: "
            f"flex or mask"
        ) from err
    return out.view(B, T, H, -1), None  # [B, T, H, d]


@functools.cache
def _compiled_flex():
    # FlexAttention is a template for torch.compile: run eagerly it materialises every score (and warns)
    return torch.compile(flex_attention)


def flex_document_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | BlockMask | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, T, d], key / value [B, Hkv, T, d] -> [B, T, H, d].
    Packed rows (a BlockMask from `document_mask`) take FlexAttention; anything else SDPA."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    _check_supported("flex", dropout, kwargs)
    # inside a compiled decoder layer (model.compile) dynamo traces flex_attention itself
    kernel = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    out = kernel(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None  # [B, H, T, d] -> [B, T, H, d]


def _no_mask_when_plain(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The mask function of `packed_varlen`: none for a forward without padding or cache (the varlen kernel needs
    no mask, and `varlen_attention` builds one where it must), else transformers' SDPA mask."""
    if attention_mask is None and isinstance(q_offset, int) and q_offset == kv_offset == 0 and q_length == kv_length:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(IMPLEMENTATIONS["varlen"], varlen_attention)
AttentionMaskInterface.register(IMPLEMENTATIONS["varlen"], _no_mask_when_plain)
AttentionInterface.register(IMPLEMENTATIONS["flex"], flex_document_attention)
AttentionMaskInterface.register(IMPLEMENTATIONS["flex"], sdpa_mask)  # the document mask comes whole, as 4D
