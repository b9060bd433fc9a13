"""A FLOP model of one training step: vision tower (encoder, reducer, enhancer) -> projector -> LLM.

What is counted (matmul-class work only; norms, activations, softmax, the embedding lookup and the
optimizer step are left out, as in PaLM's MFU, arXiv 2204.02311 appendix B):
- Linear / Conv layers: 2 * m * n * k per matmul, i.e. 2 * (weight elements per output position)
  * output positions. The positions are the ones the layer really sees: for a ViT every token incl.
  prefix (CLS / register) tokens, for SAM's windowed blocks the window-padded grid (64x64 -> 70x70
  at 1024 px), for a conv its output grid.
- Attention: scores Q K^T and the weighted sum over V, 2 * 2 * Tq * Tk * d per attention call
  (d = attention width = heads * head_dim). SAM's windowed blocks: one call per 14x14 window
  (T = 196); its global blocks T = 4096. Causal LLM attention is *not* halved: the full T x T square is
  counted, as FlopCounterMode and PaLM's 12 * L * d * T per token do (a flash kernel skips the upper
  triangle, so a causal model's MFU here is slightly optimistic on the attention part).
- The LLM runs on each sample's real length (attention-mask sum: text + image tokens; with packed
  rows, each packed sample's own length, from the `position_ids` resets), summed over samples, not on
  the padded length. The LM head is counted where it runs: on the labelled positions only when the
  loss takes that path (model/loss.py; once more in backward when they are more than one chunk, which
  is recomputed there), else on every real position (transformers' own path).

The vision tower's per-image FLOPs come from one forward of a 1-image batch on the meta device (a copy
with no memory, no weights) with hooks on its Linear / Conv / attention modules, so reducers,
INF-LLaVA's dual-perspective passes (`DualPerspective.encoder_passes` encoder calls per image) and
windowing are counted as they run. Attention modules are found by class name (`*Attention`: timm,
SAM, CLIP, INF-LLaVA's DEM); their width d is taken as the input token width C (true for these ViTs).

Backward, per part (in the order encoder, reducer, enhancer, projector, llm):
- gradients flow through a part when it, or any part before it, has trainable parameters. Then its
  backward costs the input gradients, 1x its dense forward + 2x its attention forward (dQ, dK from
  the scores and dP, dV from the values), plus the weight gradients, 1x the dense forward of its
  *trainable* layers (a frozen LLM behind a trained projector: 1x dense + 2x attention, no weight
  gradients; LoRA: the adapters' weight gradients only).
- nothing before it trains and it has no trainable parameters (a frozen encoder in alignment): 0.
A fully trained model thus costs 3x its forward (the usual 6 * params * tokens). The first layer of
the first trained part computes no input gradient in reality; that small overcount is not removed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from encoders import encoder_chain
from foundation.stages import PARTS  # the order data flows in; a part gets gradients when it or one before it trains
from model.loss import CHUNK, labelled_only


def dense_flops(module: nn.Module, output: torch.Tensor) -> int:
    """2 * m * n * k of one Linear / Conv call from its weight and output shape."""
    if isinstance(module, nn.Linear):
        return 2 * module.in_features * output.numel()  # output [.., out]: positions * out
    # Conv: each output element takes in/groups * prod(kernel) multiply-adds
    per_out = module.weight.shape[1] * module.weight[0, 0].numel()
    return 2 * per_out * output.numel()


@dataclass
class PartFlops:
    """Forward FLOPs of one part: `dense[name]` per Linear / Conv module (for the trainable share) and attention."""

    dense: dict[str, int] = field(default_factory=dict)
    attention: int = 0

    @property
    def forward(self) -> int:
        return sum(self.dense.values()) + self.attention


def vision_flops_per_image(vision: nn.Module) -> dict[str, PartFlops]:
    """Forward FLOPs of one image through the vision tower, by part, from a meta-device forward.

    Returns {part: PartFlops} with module names relative to `vision` (so their `requires_grad` can be
    looked up on the real model).
    """
    meta = _meta_copy(vision)
    owner = _part_of_modules(meta)
    result: dict[str, PartFlops] = {}
    handles = []

    def on_dense(name: str):
        def hook(mod, args, out):
            result.setdefault(owner[name], PartFlops()).dense.setdefault(name, 0)
            result[owner[name]].dense[name] += dense_flops(mod, out)

        return hook

    def on_attention(name: str):
        def hook(mod, args, kwargs, out):
            tensors = [a for a in args if isinstance(a, torch.Tensor)] + [
                kwargs[k] for k in ("hidden_states", "query", "context") if isinstance(kwargs.get(k), torch.Tensor)
            ]
            query = tensors[0]
            context = tensors[1] if len(tensors) > 1 else query  # cross-attention (DEM) or self-attention
            width, calls = query.shape[-1], query.shape[0]
            tq, tk = query.numel() // (calls * width), context.numel() // (calls * width)
            result.setdefault(owner[name], PartFlops()).attention += 2 * 2 * calls * tq * tk * width

        return hook

    for name, mod in meta.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(mod.register_forward_hook(on_dense(name)))
        elif type(mod).__name__.endswith("Attention"):
            handles.append(mod.register_forward_hook(on_attention(name), with_kwargs=True))
    try:
        with torch.no_grad():
            # in the tower's own dtype: DeepSpeed's bf16 casts the model's weights, not its inputs
            dtype = next((p.dtype for p in meta.parameters() if p.is_floating_point()), torch.float32)
            meta(torch.zeros(1, 3, vision.image_size, vision.image_size, device="meta", dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return result


def linear_flops_per_position(module: nn.Module) -> dict[str, int]:
    """{Linear name: 2 * in * out} for modules applied once per token (projector, LLM)."""
    return {n: 2 * m.in_features * m.out_features for n, m in module.named_modules() if isinstance(m, nn.Linear)}


class StepFlops:
    """FLOPs of one training step of a `VisionLanguageModel`; `step_flops(batch)` per batch.

    Per-image vision FLOPs and per-token projector / LLM FLOPs are computed once here; which layers
    train is read from the model at each call, so a stage change is picked up.

    Args:
        model: the VisionLanguageModel (vision, projector, llm).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.vision = vision_flops_per_image(model.vision)
        self.image_tokens = model.vision.num_tokens
        self.projector = linear_flops_per_position(model.projector)
        self.llm = linear_flops_per_position(model.llm)
        head = model.llm.get_output_embeddings()
        # the head runs on the labelled positions only (model/loss.py) for most LLMs
        self.head = (
            next((n for n, m in model.llm.named_modules() if m is head), None) if labelled_only(model.llm) else None
        )
        text = model.llm.config.get_text_config()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        self.llm_layers, self.llm_attn_width = text.num_hidden_layers, heads * head_dim

    def parts(self, num_images: int, lengths: list[int], scored: int | None = None) -> dict[str, PartFlops]:
        """Forward FLOPs by part for `num_images` images and LLM sequences of real `lengths`, `scored` of their
        positions labelled (None: all; the LM head runs on those only, see the module docstring)."""
        parts = {
            p: PartFlops({n: f * num_images for n, f in pf.dense.items()}, pf.attention * num_images)
            for p, pf in self.vision.items()
        }
        tokens = num_images * self.image_tokens
        parts["projector"] = PartFlops({n: f * tokens for n, f in self.projector.items()})
        attention = sum(2 * 2 * t * t * self.llm_attn_width for t in lengths) * self.llm_layers
        positions = {n: sum(lengths) for n in self.llm}
        if self.head is not None and scored is not None:
            positions[self.head] = scored + (scored if scored > CHUNK else 0)  # chunks recomputed in backward
        parts["llm"] = PartFlops({n: f * positions[n] for n, f in self.llm.items()}, attention)
        return parts

    def step_flops(self, num_images: int, lengths: list[int], scored: int | None = None) -> dict[str, int]:
        """{"forward", "backward", "total"} FLOPs of one step, backward by the rule in the module docstring."""
        roots = {"projector": self.model.projector, "llm": self.model.llm}
        fwd = bwd = 0
        flowing = False
        parts = self.parts(num_images, lengths, scored)
        for part in PARTS:
            if part not in parts:
                continue
            pf = parts[part]
            root = roots.get(part, self.model.vision)
            trained = {n: f for n, f in pf.dense.items() if _weight_trains(root, n)}
            flowing = flowing or bool(trained) or _has_trainable(self.model, part)
            fwd += pf.forward
            if flowing:
                bwd += sum(pf.dense.values()) + 2 * pf.attention + sum(trained.values())
        return {"forward": fwd, "backward": bwd, "total": fwd + bwd}

    def batch_flops(self, batch: dict) -> int:
        """Total FLOPs of one training step on a collated batch (input_ids, attention_mask, pixel_values)."""
        pixels = batch.get("pixel_values")
        num_images = 0 if pixels is None else int(pixels.shape[0])
        labels = batch.get("labels")
        scored = None if labels is None else int((labels[:, 1:] != -100).sum())
        return self.step_flops(num_images, sample_lengths(batch), scored)["total"]


def sample_lengths(batch: dict) -> list[int]:
    """Real tokens per sample: attention-mask sums per row, or per packed sample (datamodules/packing.py)
    where `position_ids` restart at 0 at each sample (attention never crosses those boundaries)."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    positions = batch.get("position_ids")
    if positions is None:
        return [int(n) for n in mask.sum(dim=1).tolist()]
    lengths = []
    for row, row_mask in zip(positions.tolist(), mask.tolist()):
        starts = [t for t, p in enumerate(row) if p == 0] + [len(row)]
        for a, b in zip(starts[:-1], starts[1:]):
            if sum(row_mask[a:b]):  # the padding at a row's end is a "sample" of masked tokens
                lengths.append(sum(row_mask[a:b]))
    return lengths


def _weight_trains(root: nn.Module, name: str) -> bool:
    weight = getattr(root.get_submodule(name), "weight", None)
    return weight is not None and weight.requires_grad


def _has_trainable(model: nn.Module, part: str) -> bool:
    return any(p.requires_grad for _, p in model.parts().get(part, []))


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers live on the meta device (shapes only, no memory)."""
    memo = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _part_of_modules(vision: nn.Module) -> dict[str, str]:
    """{module name: part} along the wrapper chain, as `encoders.split_parts` groups parameters."""
    chain = encoder_chain(vision)
    owner: dict[str, str] = {}
    for depth, module in enumerate(chain):
        inner_ids = {id(m) for m in chain[depth + 1].modules()} if depth + 1 < len(chain) else set()
        for name, m in module.named_modules():
            if id(m) not in inner_ids:
                owner["inner." * depth + name] = module.part
    return owner
