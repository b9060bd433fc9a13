"""The VLM as a plain nn.Module: vision tower -> projector -> causal LM.

The vision tower is any `VisionEncoder`, possibly wrapped by a token reducer and/or an enhancer
(INF-LLaVA's dual-perspective module) and/or a tiling (LLaVA-NeXT's AnyRes), which satisfy the same contract.
Each `<image>` placeholder in `input_ids` has already been expanded by the DataModule to as many copies as
the image has embeddings (`vision.num_image_tokens`, as transformers' LLaVA / LLaVA-NeXT processors do), so
here the projected image embeddings, packed by the tower (`vision.pack`), simply take those positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from encoders import VisionEncoder, split_parts
from foundation.stages import PARTS, STAGES
from model.attention import PACKED_ATTENTION, packed_inputs
from model.lora import adapter_prefix, is_lora
from model.loss import labelled_lm_loss, labelled_only


class VisionLanguageModel(nn.Module):
    """Vision tower -> projector -> causal LM, image embeddings placed at the placeholder tokens.

    Args:
        vision: the vision tower, pixels [K, 3, S, S] -> [K, N, C] (K = M images, or their views with a tiling).
        projector: [K, N, C] -> [K, N, D].
        llm: a transformers causal LM with hidden size D.
        image_token_id: placeholder id in input_ids (N consecutive copies per image); None when the
            model is built without a tokenizer (shapes only, e.g. `describe` of a recipe whose
            tokenizer is not on this machine).
        packed_attention: how packed rows keep their samples apart (model/attention.py): "mask" (transformers'
            block-diagonal mask), "varlen" or "flex" (the LLM must then use that kernel's `attn_implementation`,
            `model.attention.IMPLEMENTATIONS`, as `build_llm` sets it).
    """

    def __init__(
        self,
        vision: VisionEncoder,
        projector: nn.Module,
        llm: nn.Module,
        image_token_id: int | None,
        packed_attention: str = "mask",
    ) -> None:
        super().__init__()
        if packed_attention not in PACKED_ATTENTION:
            raise ValueError(f"packed_attention = {packed_attention!r}; choose one of: {', '.join(PACKED_ATTENTION)}")
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id
        # LLaVA-NeXT's learned row end in the LLM's input space, initialised as LLaVA-NeXT and transformers
        # (normal, std 1/sqrt(D)); it trains with the projector (see `parts`).
        newline = None
        if vision.uses_image_newline:
            width = llm.get_input_embeddings().embedding_dim
            newline = nn.Parameter(torch.randn(width) / math.sqrt(width))
        self.image_newline = newline
        self.packed_attention = packed_attention

    def parts(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by part: encoder, reducer, enhancer, projector, llm (and llm_base with LoRA).

        With LoRA adapters on the LLM (a peft model), "llm" holds only the adapters and "llm_base" the
        frozen base weights, which no stage trains. Names are state-dict names: FSDP's and activation
        checkpointing's wrapper prefixes are removed, so they match the keys of a full state dict.
        """
        parts = {k: [("vision." + n, p) for n, p in v] for k, v in split_parts(self.vision).items()}
        parts["projector"] = [("projector." + n, p) for n, p in self.projector.named_parameters()]
        if self.image_newline is not None:
            # LLaVA-NeXT trains it in stage 2 only, in its first use; here it is new in whichever stage tiles
            # first, so it trains from there with the projector that feeds the rows it ends.
            parts["projector"].append(("image_newline", self.image_newline))
        llm = [("llm." + n, p) for n, p in self.llm.named_parameters()]
        if not is_lora(self.llm):
            parts["llm"] = llm
        else:  # peft names adapter weights `...lora_A.default.weight` (LoraModel.prefix = "lora_")
            adapter = (adapter_prefix(self.llm), "modules_to_save.")
            parts["llm"] = [(n, p) for n, p in llm if any(a in n for a in adapter)]
            parts["llm_base"] = [(n, p) for n, p in llm if not any(a in n for a in adapter)]
        order = (*PARTS, "llm_base")  # the order data flows in
        return {k: [(_state_dict_name(n), p) for n, p in parts[k]] for k in order if k in parts}

    def freeze_for(self, stage: str, trainable: list[str] | tuple[str, ...] | None = None) -> str:
        """Freeze everything but the stage's parts (or `trainable`); return the per-part parameter table.

        The one place a stage becomes `requires_grad` (prismatic's `freeze_backbones(stage)`, the parts from
        `foundation.stages.STAGES`);
        `describe` calls it on the meta-device build, so its table is the training run's table.
        """
        default = STAGES.get(stage).trains  # an unknown stage: ValueError naming the valid ones
        parts = tuple(trainable) if trainable is not None else default
        present = self.parts()
        why = "`trainable`" if trainable is not None else "the stage's default"
        lines = [
            f"stage {stage!r}: training {', '.join(p for p in present if p in parts)} ({why})",
            f"{'part':<10}{'parameters':>16}{'trainable':>16}",
        ]
        total_all = trainable_all = 0
        for name, params in present.items():
            for _, p in params:
                p.requires_grad_(name in parts)
            total = sum(p.numel() for _, p in params)
            total_all, trainable_all = total_all + total, trainable_all + (total if name in parts else 0)
            lines.append(f"{name:<10}{total:>16,}{total if name in parts else 0:>16,}")
        lines.append(f"{'total':<10}{total_all:>16,}{trainable_all:>16,}")
        return "\n".join(lines)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[K, 3, S, S] normalised pixels -> [K, N, D] embeddings in the LLM's input space, per encoder image."""
        feats = self.vision(pixel_values)  # [K, N, C]
        return self.projector(feats.to(self.projector_dtype()))  # [K, N, D]

    def image_embeddings(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """[K, 3, S, S] (+ image_sizes [M, 2], (height, width)) -> the LLM's image embeddings [L, D], image
        after image, as the tower packs them (a tiling: unpadded, row ends; else N per image)."""
        return self.vision.pack(self.encode_images(pixel_values), image_sizes, self.image_newline)

    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids [B, T] (+ images [K, 3, S, S], image_sizes [M, 2]) -> inputs_embeds [B, T, D], images in place."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, T, D]
        is_image = input_ids == self.image_token_id  # [B, T]
        num_slots = int(is_image.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if num_slots:
                raise ValueError(f"input_ids hold {num_slots} image tokens but no pixel_values were given")
            if self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
                # Text-only batch under DDP: touch the vision path with zero weight so every rank's
                # trainable vision parameters get a (zero) gradient and the all-reduce lines up.
                dummy = torch.zeros(1, 3, self.vision.image_size, self.vision.image_size, device=embeds.device)
                unused = self.encode_images(dummy).sum()
                if self.image_newline is not None:
                    unused = unused + self.image_newline.sum()
                embeds = embeds + 0.0 * unused.to(embeds.dtype)
            return embeds
        images = self.image_embeddings(pixel_values, image_sizes)  # [L, D]
        if num_slots != images.shape[0]:
            num_images = pixel_values.shape[0] if image_sizes is None else image_sizes.shape[0]
            raise ValueError(
                f"input_ids hold {num_slots} image tokens but {num_images} image(s) give {images.shape[0]} embeddings"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), images.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        full_logits: bool = False,
        image_sizes: torch.Tensor | None = None,
    ):
        """Causal LM output (loss when labels [B, T] are given; -100 positions are ignored).

        With labels, the LM head runs on the labelled positions only and `logits` is None (model/loss.py);
        `full_logits=True` (or a model whose head is more than a linear map) takes transformers' own path,
        logits [B, T, V] for every position.

        `num_items_in_batch`: divide the summed token loss by this instead of this batch's label count
        (transformers' loss argument; VLMModule passes the global count / world size under DDP).
        `image_sizes` [M, 2]: (height, width) of each image, for a tiling tower (its views are `pixel_values`).
        `position_ids` [B, T]: for packed rows (datamodules/packing.py), restarting at 0 at each sample, with
        `attention_mask=None`; `packed_attention` keeps the samples apart (model/attention.py): a block-diagonal
        causal mask that transformers builds from the resets, the varlen kernel's segments, or a document BlockMask.
        """
        embeds = self.embed(input_ids, pixel_values, image_sizes)
        extra = {}
        if position_ids is not None:  # (transformers only looks for packed samples when there is no KV cache)
            extra = {"position_ids": position_ids, "use_cache": False}
            extra.update(packed_inputs(self.packed_attention, position_ids))
            attention_mask = extra.pop("attention_mask", attention_mask)  # flex: the document mask
        if labels is not None and not full_logits and labelled_only(self.llm):
            return labelled_lm_loss(self.llm, embeds, labels, attention_mask, num_items_in_batch, **extra)
        if num_items_in_batch is not None:
            extra["num_items_in_batch"] = num_items_in_batch
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **extra)

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")  # compiled blocks (model.compile) would recompile at every length
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int,
        stop_ids: list[int],
        pad_id: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        image_sizes: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Decoding from left-padded prompts [B, P]: greedy with `temperature` 0, else sampling at that
        temperature from the top-`top_p` nucleus. Returns the new tokens of each sample (stop excluded)."""
        embeds = self.embed(prompt_ids, pixel_values, image_sizes)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            **(sampling or {"do_sample": False}),
        )
        # With inputs_embeds only, transformers returns just the generated tokens [B, <= max_new_tokens].
        result = []
        for row in out.tolist():
            cut = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
            result.append(row[:cut])
        return result


def _state_dict_name(name: str) -> str:
    # torch.distributed.fsdp's FSDP_PREFIX and checkpoint_wrapper's _CHECKPOINT_PREFIX (private constants)
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
