"""LoRA / QLoRA adapters on the LLM through peft (Hu et al. 2021; Dettmers et al. 2023).

With `model.llm.lora` set, the LLM is a `peft.PeftModel`: its base weights stay frozen and only the
adapter weights (`lora_A` / `lora_B`) train as the "llm" part (`VisionLanguageModel.parts()` puts the
base under "llm_base", never trainable). Checkpoints keep the adapters with the projector and
enhancer; `python -m tools.merge_lora` folds them into plain weights.

QLoRA (`quantization: 4bit | 8bit`) loads the base through bitsandbytes (CUDA only, optional
install: `pip install bitsandbytes`) and prepares it with peft's `prepare_model_for_kbit_training`.
"""

from __future__ import annotations

import importlib.util
import inspect
import os

import torch
from torch import nn

QUANTIZATIONS = ("4bit", "8bit")
BITSANDBYTES_INSTALL = "pip install bitsandbytes"


def is_lora(module: nn.Module) -> bool:
    return getattr(module, "peft_config", None) is not None


def adapter_prefix(module: nn.Module) -> str:
    """Substring of adapter parameter names (peft's `LoraModel.prefix`, "lora_")."""
    return module.base_model.prefix


def apply_lora(
    llm: nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: str | list[str] = "all-linear",
    modules_to_save: list[str] | None = None,
    quantized: bool = False,
    grad_checkpointing: bool = False,
) -> nn.Module:
    """Wrap a transformers causal LM with LoRA adapters (base weights frozen by peft).

    Args:
        llm: the causal LM.
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or "all-linear" (every linear layer but the LM head,
            as LLaVA-1.5's LoRA recipe adapts all linear layers).
        modules_to_save: modules trained in full next to the adapters (e.g. ["embed_tokens"]).
        quantized: the base was loaded in 4 / 8 bit (QLoRA): cast norms to fp32, enable input grads.
        grad_checkpointing: passed to peft's k-bit preparation (it re-enables checkpointing).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        llm = prepare_model_for_kbit_training(
            llm, use_gradient_checkpointing=grad_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        task_type="CAUSAL_LM",
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
    return get_peft_model(llm, config)


# What `model.llm.lora` may set: apply_lora's options (the rest come from `model.llm`).
LORA_OPTIONS = tuple(
    p for p in inspect.signature(apply_lora).parameters if p not in ("llm", "quantized", "grad_checkpointing")
)


def quantization_config(quantization: str, dtype: torch.dtype | None):
    """bitsandbytes settings for QLoRA; fails clearly without CUDA or without bitsandbytes."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not valid; choose one of: {', '.join(QUANTIZATIONS)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            f"quantization={quantization!r} (QLoRA) needs bitsandbytes, an optional install: {BITSANDBYTES_INSTALL}"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"quantization={quantization!r} (QLoRA) needs a CUDA GPU (bitsandbytes kernels); "
            "none is available here. Use LoRA without quantization on CPU."
        )
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # The QLoRA paper's settings: NF4 with double quantisation, compute in the weights' dtype (bf16 default).
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype or torch.bfloat16,
    )


def quantized_device_map() -> dict:
    """bitsandbytes weights are placed at load time: this process's GPU (LOCAL_RANK under DDP / torchrun)."""
    return {"": int(os.environ.get("LOCAL_RANK", 0))}
