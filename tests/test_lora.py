"""LoRA on the LLM: what trains, what the checkpoint keeps, and merge -> plain weights with the same logits."""

from __future__ import annotations

import os

import pytest
import torch

from experiment.assemble import build_datamodule, build_module
from experiment.config import ConfigError, config_from_dict, load_config
from inference.load import load_module
from tests.support.optim import optimizer_of
from tools.merge_lora import merge_lora

LORA = "model.llm.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: all-linear}"


@pytest.fixture
def base_llm(tiny_cfg, tokenizer, tmp_path) -> str:
    """A pretrained-style LLM directory (weights + tokenizer): LoRA's frozen base comes back from it."""
    path = str(tmp_path / "base-llm")
    build_module(tiny_cfg()).model.llm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def lora_cfg(tiny_cfg, base_llm, *extra):
    return tiny_cfg("model.llm.config=null", f"model.llm.path={base_llm}", LORA, *extra)


def test_lora_trains_only_the_adapters_and_counts_stay_truthful(tiny_cfg, base_llm):
    plain = build_module(tiny_cfg())
    module = build_module(lora_cfg(tiny_cfg, base_llm))
    parts = module.model.parts()
    adapters = parts["llm"]
    assert adapters and all("lora_" in n and p.requires_grad for n, p in adapters)
    assert not any(p.requires_grad for _, p in parts["llm_base"])
    base_total = sum(p.numel() for _, p in plain.model.parts()["llm"])
    assert sum(p.numel() for _, p in parts["llm_base"]) == base_total
    # r=4 on every linear layer of 2 decoder layers (q, k, v, o: 32->32; gate, up: 32->64; down: 64->32)
    assert sum(p.numel() for _, p in adapters) == 2 * (4 * 4 * (32 + 32) + 2 * 4 * (32 + 64) + 4 * (64 + 32))
    rows = {line.split()[0]: line.split()[1:] for line in module.parameter_table.splitlines()[2:]}
    assert rows["llm"] == [f"{sum(p.numel() for _, p in adapters):,}"] * 2
    assert rows["llm_base"] == [f"{base_total:,}", "0"]
    trained = {id(p) for g in _optimizer_groups(module) for p in g["params"]}
    assert trained == {id(p) for ps in module.model.parts().values() for _, p in ps if p.requires_grad}


def _optimizer_groups(module):
    groups = optimizer_of(module, steps=10)[0].param_groups
    module._trainer = None
    return groups


def test_lora_round_trip_save_merge_load_gives_the_same_logits(tiny_cfg, base_llm, tmp_path):
    from tests.support.runs import fit

    trainer = fit(
        lora_cfg(
            tiny_cfg,
            base_llm,
            "trainer.max_steps=3",
            "trainer.limit_val_batches=0",
            "checkpoint.every_n_train_steps=3",
            "optim.lr=0.01",
            "optim.warmup_ratio=0",
        )
    )
    ckpt = os.path.join(trainer.logger.log_dir, "checkpoints", "last.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any("lora_B" in k for k in state) and any(k.startswith("model.projector.") for k in state)
    assert not any(k.startswith("model.llm.") and "lora_" not in k for k in state)  # frozen base left out
    assert any(state[k].abs().sum() > 0 for k in state if "lora_B" in k)  # the adapters moved from zero init

    lora = load_module(ckpt)  # a LoRA checkpoint loads for generation
    cfg = config_from_dict(lora.hparams["config"])  # the config the checkpoint carries
    merged_ckpt = merge_lora(ckpt, str(tmp_path / "merged"))
    merged_cfg = load_config(str(tmp_path / "merged" / "config.yaml"))
    assert merged_cfg.model.llm.lora is None
    plain = build_module(merged_cfg)  # no LoRA: a plain transformers LLM from <out>/llm
    assert not hasattr(plain.model.llm, "peft_config")
    plain.load_state_dict(torch.load(merged_ckpt, weights_only=True)["state_dict"], strict=True)
    base = build_module(tiny_cfg("model.llm.config=null", f"model.llm.path={base_llm}"))  # no adapters folded in
    base.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("model.llm.")}, strict=False)

    dm = build_datamodule(cfg, lora.tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        logits = [m.eval()(batch, full_logits=True).logits for m in (lora, plain, base)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    assert (logits[2] - logits[0]).abs().max() > 1e-3  # the adapters matter, so equal logits mean a real merge
    gen = [
        m.model.generate(
            batch["prompt_ids"], batch["prompt_mask"], batch["pixel_values"], 4, m.stop_ids, m.tokenizer.pad_token_id
        )
        for m in (lora, plain)
    ]
    assert gen[0] == gen[1]


def test_merge_refuses_a_random_init_base(tiny_cfg, tmp_path):
    from tests.support.runs import fit

    trainer = fit(
        tiny_cfg(LORA, "trainer.max_steps=1", "trainer.limit_val_batches=0", "checkpoint.every_n_train_steps=1")
    )
    with pytest.raises(ValueError, match="randomly initialised"):
        merge_lora(os.path.join(trainer.logger.log_dir, "checkpoints", "last.ckpt"), str(tmp_path / "out"))


def test_lora_and_quantization_options_are_validated(tiny_cfg, base_llm):
    with pytest.raises(ConfigError, match=r"unknown key 'model.llm.lora.rank'; valid options: r, alpha"):
        tiny_cfg("model.llm.lora={rank: 4}")
    with pytest.raises(ConfigError, match=r"'model.llm.quantization' = '2bit' is not valid; choose one of: 4bit, 8bit"):
        lora_cfg(tiny_cfg, base_llm, "model.llm.quantization=2bit")
    with pytest.raises(ConfigError, match="needs 'model.llm.lora'"):
        tiny_cfg("model.llm.config=null", f"model.llm.path={base_llm}", "model.llm.quantization=4bit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_qlora_on_cpu_fails_clearly(tiny_cfg, base_llm):
    cfg = lora_cfg(tiny_cfg, base_llm, "model.llm.quantization=4bit")
    with pytest.raises(RuntimeError, match="bitsandbytes|CUDA GPU"):
        build_module(cfg)
