"""An optimizer stepped inside backward (`optim.in_backward`): each parameter steps as soon as its gradient is
complete, and that gradient is freed at once, so a step never holds the gradients of all parameters together.

Without it a step's memory peaks with every gradient alive (as large as the weights) at the end of backward, plus,
for the multi-tensor (foreach) AdamW kernel, temporaries as large as the weights again inside the optimizer step.
Stepping in backward keeps about one parameter's gradient (and one parameter's temporaries) at a time; at Llama-3's
128,256-token vocabulary that is the embedding's or the head's, each as large as a vocabulary x hidden matrix. The
idea is torchtune's `optimizer_in_bwd`; the mechanism is PyTorch's `Tensor.register_post_accumulate_grad_hook`.

    hidden = model(batch); loss.backward()
        -> for each trainable parameter p, once its gradient is accumulated: AdamW step of p; p.grad = None
    optimizer.step()
        -> the parameters that got no gradient this step (the vision path on a text-only batch) step with a zero
           one, as VLMModule's normal path gives them on one device; the lr scheduler then steps as usual

`in_backward(AdamW)` (`AdamWInBackward`) is a `torch.optim.AdamW` over the same parameter groups as the normal path
(one per part, with and without weight decay), so an lr scheduler sets each group's rate, Lightning's checkpointing
saves and restores it, and its `state_dict` is AdamW's own: a checkpoint's optimizer state is the same either way.
The per-parameter steps are instances of the same optimizer class over one parameter each, sharing this optimizer's
`state`, with the hyperparameters of its group (the current lr included) copied in before every step. Any optimizer
that steps each parameter from its own state alone works the same way: bitsandbytes' AdamW8bit (`optim.states:
8bit`, lit_modules/optimizer.py) does.

It cannot be correct where something must see every gradient before any step: gradient accumulation, clipping by
the global norm, a loss scaler (fp16), or a strategy that reduces gradients across ranks after backward (DDP, FSDP,
DeepSpeed). experiment/validate.py refuses those configurations.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch


class StepsInBackward:
    """Mixed in before an optimizer class (see `in_backward`): its parameters step during backward, one at a time,
    each gradient freed after its step.

    Args:
        params: parameter groups, as for the optimizer class.
        **kwargs: the optimizer's settings (betas, eps, weight_decay, fused, ...). For torch's AdamW `fused=True`
            matters here: the fused kernel updates a parameter without temporaries, the single-tensor one
            allocates one as large as the parameter.
    """

    def __init__(self, params: Iterable, **kwargs) -> None:
        super().__init__(params, **kwargs)
        stepper = type(self).__mro__[type(self).__mro__.index(StepsInBackward) + 1]  # the optimizer class
        self._single: dict[torch.Tensor, tuple[int, torch.optim.Optimizer]] = {}  # param -> (its group, its own)
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                one = stepper([p])
                one.state = self.state  # one state for all: state_dict and load_state_dict are the optimizer's own
                self._single[p] = (index, one)
        self._stepped: set[torch.Tensor] = set()
        self._handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in self._single]

    def _step_one(self, p: torch.Tensor) -> None:
        index, one = self._single[p]
        # the group's current settings: the scheduler changes its lr, a restored checkpoint replaces the group dicts
        one.param_groups[0].update((k, v) for k, v in self.param_groups[index].items() if k != "params")
        one.step()
        p.grad = None
        self._stepped.add(p)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Finish the step that backward began: every parameter whose hook did not fire (no gradient this step)
        steps with a zero gradient, so every trainable parameter steps every step (AdamW's momentum and weight
        decay apply), as in VLMModule's normal path on one device."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in self._single:
            if p not in self._stepped:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self._step_one(p)
        self._stepped.clear()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.state: point the per-parameter steps at the new one
        for _, one in self._single.values():
            one.state = self.state

    def remove_hooks(self) -> None:
        """Detach from the parameters: a later backward (another fit of the same model) steps nothing here."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


@functools.cache
def in_backward(optimizer_class: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`optimizer_class` stepped inside backward: a subclass with `StepsInBackward` mixed in (one class per
    optimizer class, so `isinstance` and checkpoints see a stable type)."""
    return type(f"{optimizer_class.__name__}InBackward", (StepsInBackward, optimizer_class), {})


AdamWInBackward = in_backward(torch.optim.AdamW)
