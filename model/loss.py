"""The causal LM loss computed only where it scores: the LM head on positions that carry a label.

A LLaVA batch labels its answers only: image positions (576 per image at LLaVA-1.5 scale, thousands with AnyRes)
and prompt positions are -100. transformers' `*ForCausalLM.forward` still runs the LM head on every position and
upcasts all of it to fp32 (16 x 2,048 positions x Llama-3's 128,256-token vocabulary: 17 GB) before its loss
drops most of it. Here the decoder runs as usual, and the head and the cross-entropy run on the M scored rows
only; beyond `chunk` rows they go in chunks under activation checkpointing (each chunk's head is recomputed in
backward), so a step keeps at most one chunk of logits:

    hidden [B, T, D] = decoder(inputs_embeds)
    rows [M, D] = hidden[:, :-1][labels[:, 1:] != -100]          (position t predicts token t + 1)
    loss = sum over rows of CE(lm_head(rows).float(), labels) / num_items_in_batch (or / M)

which is transformers' `ForCausalLMLoss` (fp32 logits, sum / num_items_in_batch, else the mean) on the same
rows. Models whose head is not a plain linear map (Gemma-2's logit soft-capping, Cohere's and Granite's logit
scaling) keep transformers' own path: `labelled_only` says which.

Each batch row's summed token loss comes with the loss (`sample_losses` [B], no gradient; `sample_losses()` gives
the same from transformers' full logits): validation reports a mixture's sources apart from it
(lit_modules/vlm_module.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE_INDEX = -100
# config attributes that change logits after the head's matmul: such models take transformers' full path
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
CHUNK = 4096  # scored rows per head + cross-entropy call: 4,096 x 128,256 fp32 logits = 2.1 GB at most


def labelled_only(llm: nn.Module) -> bool:
    """Whether the LM head of `llm` (a transformers causal LM, LoRA-wrapped or not) may run on the scored rows
    alone: a decoder to call and a head that is a plain linear map."""
    config = llm.config.get_text_config()
    plain_head = not any(getattr(config, name, None) not in (None, 1, 1.0) for name in HEAD_TRANSFORMS)
    return plain_head and hasattr(llm, "get_decoder") and isinstance(llm.get_output_embeddings(), nn.Module)


@dataclass
class LabelledLMOutput(CausalLMOutputWithPast):
    """transformers' causal LM output with `sample_losses` [B]: each row's summed token loss (fp32, no gradient)."""

    sample_losses: torch.Tensor | None = None


def _head_losses(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), targets, reduction="none")  # [m]


def labelled_lm_loss(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | None = None,
    chunk: int = CHUNK,
    **decoder_kwargs,
) -> LabelledLMOutput:
    """The loss of `llm` on `inputs_embeds` [B, T, D] with `labels` [B, T], its LM head run on the labelled
    positions only, and each row's summed token loss; `logits` is None (generation and log-likelihoods call the
    model without labels).

    Args:
        llm: a transformers causal LM with a plain head (`labelled_only(llm)`).
        inputs_embeds: [B, T, D] input embeddings.
        labels: [B, T] token ids, -100 where nothing is scored.
        attention_mask: [B, T], or None (packed rows: `position_ids` in `decoder_kwargs`).
        num_items_in_batch: divide the loss sum by this (transformers' argument), else by the scored count.
        chunk: scored rows per head call.
    """
    hidden = llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **decoder_kwargs)
    hidden = hidden.last_hidden_state  # [B, T, D]
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX  # [B, T-1]
    rows, targets = hidden[:, :-1][scored], targets[scored]  # [M, D], [M]
    row_of = scored.nonzero()[:, 0]  # [M] the batch row each scored position is in
    head = llm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    per_row = hidden.new_zeros(labels.shape[0], dtype=torch.float32)  # [B]
    recompute = rows.requires_grad and rows.shape[0] > chunk  # one chunk's logits kept at a time, not all of them
    for start in range(0, rows.shape[0], chunk):
        part = (head, rows[start : start + chunk], targets[start : start + chunk])
        losses = checkpoint(_head_losses, *part, use_reentrant=False) if recompute else _head_losses(*part)  # [m]
        total = total + losses.sum()
        per_row.index_add_(0, row_of[start : start + chunk], losses.detach())
    if rows.shape[0] == 0:  # nothing scored (stand-ins for unreadable images): 0, with every weight in the graph
        total = total + 0.0 * head(hidden[:1, :1]).float().sum()  # (DDP expects a gradient for each one)
    divisor = num_items_in_batch if num_items_in_batch is not None else scored.sum()
    if torch.is_tensor(divisor):
        divisor = divisor.to(total.device)
    return LabelledLMOutput(loss=total / divisor, logits=None, sample_losses=per_row)


def sample_losses(output: CausalLMOutputWithPast, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed token loss [B] (fp32, no gradient) of a causal LM output on `labels` [B, T]: the one
    `labelled_lm_loss` computed, else from the output's full logits [B, T, V] (transformers' own path), as
    transformers' `ForCausalLMLoss` scores them (position t predicts token t + 1, fp32, -100 ignored). Rows are
    samples where the batch is not packed."""
    if getattr(output, "sample_losses", None) is not None:
        return output.sample_losses
    logits = output.logits[:, :-1].detach().float()  # [B, T-1, V]
    targets = labels[:, 1:].to(logits.device)  # [B, T-1]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.sum(1)  # [B]
