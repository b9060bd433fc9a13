"""Sequence packing (datamodules/packing.py): a packed row computes, for each of its samples, what the
sample alone computes (logits, per-sample loss, batch loss), on eager and sdpa attention; the
DataModule packs every training sample exactly once per epoch into rows of at most max_length."""

from __future__ import annotations

import json
import os
from collections import Counter

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from datamodules import ImageSpec, LLaVADataModule
from datamodules.llava_data import collate
from datamodules.packing import first_fit, pack
from datamodules.templates import IGNORE_INDEX
from encoders import build_encoder
from encoders.preprocess import ResizeCrop
from experiment.assemble import build_datamodule, build_module
from experiment.runner import build_trainer
from foundation.schema import DataConfig
from lit_modules.vlm_module import VLMModule
from model.projector import PROJECTORS
from model.vlm import VisionLanguageModel
from tests.support.tiny_models import TINY_LLAMA, TINY_VIT

TEXT = TINY_LLAMA
VOCAB, PAD, IMAGE_ID = TEXT["vocab_size"], 0, TEXT["vocab_size"] - 1
N = 4  # image tokens per image: 16 px / patch 8 -> 2 x 2


def tiny_vlm(attn: str) -> VisionLanguageModel:
    torch.manual_seed(0)
    vision = build_encoder(
        "timm:vit_tiny_patch16_224",
        image_size=16,
        model_kwargs=TINY_VIT,
    )
    llm = LlamaForCausalLM(LlamaConfig(**TEXT, attn_implementation=attn))
    assert llm.config._attn_implementation == attn
    return VisionLanguageModel(vision, PROJECTORS.build("mlp2x_gelu", 32, 32), llm, IMAGE_ID).eval()


def item(name: str, n: int, image: bool, seed: int, loss_on_all: bool = False) -> dict:
    """A dataset item: n tokens (N image tokens after the first when `image`), loss on the last third
    (`loss_on_all`: on every token, the first included, as in plain-text pretraining)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, IMAGE_ID, (n,), generator=g).tolist()
    if image:
        ids[1 : 1 + N] = [IMAGE_ID] * N
    answer = 0 if loss_on_all else n - max(1, n // 3)
    labels = [IGNORE_INDEX] * answer + ids[answer:]
    return {
        "id": name,
        "input_ids": ids,
        "labels": labels,
        "prompt_ids": ids[:answer],
        "answer": "",
        "question": "",
        "pixel_values": torch.randn(3, 16, 16, generator=g) if image else None,
    }


# Text-only and image samples of mixed lengths; with max_length 24 they need several rows.
ITEMS = [
    item("a", 11, True, 1),
    item("b", 6, False, 2),
    item("c", 9, True, 3),
    item("d", 3, False, 4, loss_on_all=True),  # packed after "g": its first label must not be scored
    item("e", 14, False, 5),
    item("f", 7, True, 6),
    item("g", 5, False, 7),
]
MAX_LENGTH = 24


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[T, V], [T] -> [T] the causal LM loss of each position (logit t scores label t+1; 0 where ignored)."""
    shifted = torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])
    return F.cross_entropy(logits.float(), shifted, ignore_index=IGNORE_INDEX, reduction="none")


def test_first_fit_rows_fit_and_hold_every_sample_once():
    lengths = [11, 6, 9, 3, 14, 7, 24, 1]
    rows = first_fit(lengths, MAX_LENGTH)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= MAX_LENGTH for r in rows)
    assert len(rows) == 4  # 75 tokens need >= 4 rows of 24


def test_pack_positions_labels_and_images():
    batch = pack(ITEMS, MAX_LENGTH, PAD)
    R, T = batch["input_ids"].shape
    assert batch["spans"][batch["ids"].index("d")][1] > 0  # "d" (loss on every token) does not start its row
    assert R < len(ITEMS) and T <= MAX_LENGTH
    assert sorted(batch["ids"]) == sorted(x["id"] for x in ITEMS)
    by_id = {x["id"]: x for x in ITEMS}
    ends = {}
    for name, (r, start, n) in zip(batch["ids"], batch["spans"]):
        x = by_id[name]
        assert batch["input_ids"][r, start : start + n].tolist() == x["input_ids"]
        assert batch["position_ids"][r, start : start + n].tolist() == list(range(n))  # reset per sample
        assert batch["attention_mask"][r, start : start + n].eq(1).all()
        # the first label is never scored (the previous sample's last token would predict it); the rest as given
        assert batch["labels"][r, start] == IGNORE_INDEX
        assert batch["labels"][r, start + 1 : start + n].tolist() == x["labels"][1:]
        ends[r] = max(ends.get(r, 0), start + n)
    for r, end in ends.items():  # padding only at the row end, as its own position segment
        assert batch["input_ids"][r, end:].eq(PAD).all() and batch["labels"][r, end:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][r, end:].eq(0).all()
        assert batch["position_ids"][r, end:].tolist() == list(range(T - end))
    # images in packed order: the k-th image of the batch belongs to the k-th image sample in row-major order
    expected = torch.stack([by_id[i]["pixel_values"] for i in batch["ids"] if by_id[i]["pixel_values"] is not None])
    assert torch.equal(batch["pixel_values"], expected)
    assert batch["has_image"].tolist() == [by_id[i]["pixel_values"] is not None for i in batch["ids"]]
    # the scored labels are those of the unpacked batch (what VLMModule counts for DDP token weighting)
    unpacked = collate(ITEMS, PAD)
    assert (batch["labels"][:, 1:] != IGNORE_INDEX).sum() == (unpacked["labels"][:, 1:] != IGNORE_INDEX).sum()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_equals_unpacked(attn):
    """Same logits at every sample position, same per-sample loss sum, same batch loss: samples in a row
    do not see each other, and the boundary does not train one sample's first token on another's last."""
    model = tiny_vlm(attn)
    module = VLMModule(model, tokenizer=type("Tok", (), {"eos_token_id": 1})(), stage="sft")
    packed = pack(ITEMS, MAX_LENGTH, PAD)
    unpacked = collate(ITEMS, PAD)
    with torch.no_grad():
        out_p = module(packed, full_logits=True)  # VLMModule.forward: position_ids in, no attention mask
        out_u = module(unpacked, full_logits=True)
        leaky = model(packed["input_ids"], packed["attention_mask"], packed["pixel_values"])  # plain causal
    row = {name: b for b, name in enumerate(unpacked["ids"])}
    differs = False
    for name, (r, start, n) in zip(packed["ids"], packed["spans"]):
        b = row[name]
        ref_logits = out_u.logits[b, :n]
        got_logits = out_p.logits[r, start : start + n]
        torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=1e-5)
        ref_loss = token_losses(ref_logits, unpacked["labels"][b, :n]).sum()
        # packed: score within the row, so the sample's last logit meets the next sample's first label
        got_loss = token_losses(out_p.logits[r], packed["labels"][r])[start : start + n].sum()
        assert ref_loss > 0
        torch.testing.assert_close(got_loss, ref_loss, atol=1e-5, rtol=1e-5)
        differs |= not torch.allclose(leaky.logits[r, start : start + n], ref_logits, atol=1e-3)
    torch.testing.assert_close(out_p.loss, out_u.loss, atol=1e-5, rtol=1e-5)
    assert differs  # without the position resets samples would see each other: the check has teeth


@pytest.fixture
def packing_json(shapes_root, tmp_path) -> str:
    """20 image records from the built-in set plus 7 text-only ones."""
    records = json.load(open(os.path.join(shapes_root, "sft_train.json")))[:20]
    for k in range(7):
        question = "What color is grass?" + " Really?" * k
        records.append(
            {
                "id": f"txt{k}",
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "green"}],
            }
        )
    path = tmp_path / "packing.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_datamodule_packs_each_sample_once(tokenizer, shapes_root, packing_json):
    max_length = 64
    data = DataConfig(
        train_json=packing_json,
        val_json=os.path.join(shapes_root, "sft_val.json"),
        image_folder=shapes_root,
        template="chatml",
        max_length=max_length,
        batch_size=5,
        packing=True,
    )
    image = ImageSpec(32, (0.5,) * 3, (0.5,) * 3, 9, ResizeCrop.clip(32, (0.5,) * 3, (0.5,) * 3))
    dm = LLaVADataModule(tokenizer, data, image, stage="sft")
    dm.setup()
    seen, rows, samples = Counter(), 0, 0
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[1] <= max_length
        assert batch["attention_mask"].sum(1).le(max_length).all()
        assert (
            batch["pixel_values"].shape[0]
            == int(batch["has_image"].sum())
            == int((batch["input_ids"] == dm.image_token_id).sum() // 9)
        )
        seen.update(batch["ids"])
        rows += batch["input_ids"].shape[0]
        samples += len(batch["ids"])
        assert len(batch["ids"]) <= 5  # the batch size counts samples
    assert seen == Counter({r["id"]: 1 for r in json.load(open(packing_json))})
    assert rows < samples  # some rows hold more than one sample
    val = next(iter(dm.val_dataloader()))
    assert "position_ids" not in val and "prompt_ids" in val  # validation / generation stay unpacked


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.rows: list[int] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.rows.append(int(batch["input_ids"].shape[0]))


def test_training_with_packing_follows_unpacked_training(tiny_cfg):
    """`data.packing=true` end to end (config -> DataModule -> VLMModule): the same samples per step give
    the same losses as without packing, in fewer rows."""
    runs = {}
    for packing in (False, True):
        cfg = tiny_cfg(
            "trainer.max_steps=3",
            "trainer.limit_val_batches=0",
            "trainer.log_every_n_steps=1",
            f"data.packing={packing}",
        )
        L.seed_everything(cfg.seed, workers=True)
        module = build_module(cfg)
        recorder = LossRecorder()
        trainer = build_trainer(cfg, None)
        trainer.callbacks.append(recorder)
        trainer.fit(module, datamodule=build_datamodule(cfg, module.tokenizer))
        runs[packing] = recorder
    assert len(runs[True].losses) == 3
    assert runs[True].losses[0] == pytest.approx(runs[False].losses[0], abs=1e-5)
    assert runs[True].losses == pytest.approx(runs[False].losses, abs=1e-4)  # after updates: summation order
    assert sum(runs[True].rows) < sum(runs[False].rows)
