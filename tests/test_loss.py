"""The loss on labelled positions only equals transformers' own causal LM loss, value and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

from model.loss import labelled_lm_loss, labelled_only, sample_losses

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
CONFIGS = {
    "llama": LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
}


def _batch(seed: int = 0, b: int = 3, t: int = 24):
    """LLaVA-shaped labels: a prompt (image and question positions) unlabelled, then an answer, then padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL["vocab_size"], (b, t), generator=gen)
    labels = torch.full((b, t), -100)
    mask = torch.ones(b, t, dtype=torch.long)
    for row, (start, end) in enumerate([(10, 16), (14, 24), (5, 9)][:b]):
        labels[row, start:end] = ids[row, start:end]
        mask[row, end:] = 0
    return ids, mask, labels


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("num_items", [None, 7.0])
@pytest.mark.parametrize("chunk", [4096, 5])  # one call; several checkpointed chunks
def test_the_loss_and_its_gradients_equal_transformers(name, num_items, chunk):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name], attn_implementation="eager").float()
    ids, mask, labels = _batch()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}

    reference = model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **extra).loss
    reference.backward()
    expected, expected_input = _grads(model), embeds.grad.clone()
    model.zero_grad()
    embeds.grad = None

    ours = labelled_lm_loss(model, embeds, labels, mask, extra.get("num_items_in_batch"), chunk=chunk)
    assert ours.logits is None
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, reference, rtol=1e-5, atol=0)
    got = _grads(model)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-8, msg=key)
    torch.testing.assert_close(embeds.grad, expected_input, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("chunk", [4096, 5])
def test_each_rows_summed_loss_is_its_own_forward(chunk):
    # validation per source sums these (lit_modules/source_metrics.py): row b's is transformers' loss of row b
    # alone times its scored tokens, and transformers' full logits give the same (its own path's `sample_losses`)
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"], attn_implementation="eager").float()
    ids, mask, labels = _batch()
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        ours = labelled_lm_loss(model, embeds, labels, mask, chunk=chunk)
        full = sample_losses(model(inputs_embeds=embeds, attention_mask=mask, labels=labels), labels)
        alone = [model(inputs_embeds=embeds[b : b + 1], attention_mask=mask[b : b + 1], labels=labels[b : b + 1]).loss
                 * (labels[b, 1:] != -100).sum() for b in range(3)]  # fmt: skip
    assert sample_losses(ours, labels) is ours.sample_losses and ours.sample_losses.shape == (3,)
    torch.testing.assert_close(ours.sample_losses, torch.stack(alone), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full, torch.stack(alone), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.sample_losses.sum() / (labels[:, 1:] != -100).sum(), ours.loss)


def test_packed_rows_score_like_transformers():
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"], attn_implementation="sdpa").float()
    ids, _, labels = _batch(b=2, t=20)
    positions = torch.tensor([list(range(12)) + list(range(8)), list(range(20))])  # two samples in row 0
    embeds = model.get_input_embeddings()(ids)
    kw = dict(position_ids=positions, use_cache=False)
    reference = model(inputs_embeds=embeds, labels=labels, **kw).loss
    ours = labelled_lm_loss(model, embeds, labels, None, **kw).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=0)


def test_nothing_scored_is_zero_with_every_weight_in_the_graph():
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"]).float()
    ids, mask, _ = _batch()
    loss = labelled_lm_loss(model, model.get_input_embeddings()(ids), torch.full_like(ids, -100), mask, 1.0).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None for p in model.parameters())  # DDP needs a gradient for every parameter


def test_a_head_that_is_more_than_a_linear_map_keeps_transformers_path():
    gemma = Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0)
    assert labelled_only(AutoModelForCausalLM.from_config(CONFIGS["llama"]))
    assert not labelled_only(AutoModelForCausalLM.from_config(gemma))
