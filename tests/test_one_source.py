"""Lists written once: each test shows that the code reading a list reads the one source of it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import inference.export as export
import model.flops
import model.vlm
from datamodules import ImageSpec, LLaVADataModule, builtin_data
from datamodules.shapes import COLOURS, COUNTS, QUADRANTS, SHAPES, TEXT_ONLY
from datamodules.templates import TEMPLATES, tokenizer_chat_template
from encoders import BLOCK_REGISTRIES, encoder_chain
from encoders.preprocess import ResizeCrop
from experiment.assemble import build_datamodule, build_module, tokenizer_path
from experiment.config import REPLACED_WHOLE
from experiment.describe import build_on_meta
from experiment.preflight import check_files, tokenizer_source
from foundation.schema import NAMED_BLOCKS, BuiltinDataConfig, ConfigError, DataConfig, ModelConfig
from foundation.stages import PARTS, STAGES, Stage
from inference.export import chat_template as export_chat_template
from metrics import METRICS
from metrics.exact_match import gqa_normalize
from model.build import build_vision

IMAGE = ImageSpec(32, (0.5,) * 3, (0.5,) * 3, num_tokens=4, preprocess=ResizeCrop.clip(32, (0.5,) * 3, (0.5,) * 3))


def test_the_flop_model_and_the_vlm_share_the_parts():
    assert model.flops.PARTS is model.vlm.PARTS is PARTS


@pytest.mark.parametrize("stage", STAGES.names())
def test_the_stage_table_drives_the_freezing(tiny_cfg, stage):
    vlm, table = build_on_meta(tiny_cfg(f"stage={stage}", "trainable=null"))
    trained = {part for part, params in vlm.parts().items() if all(p.requires_grad for _, p in params)}
    frozen = {part for part, params in vlm.parts().items() if not any(p.requires_grad for _, p in params)}
    assert trained == set(STAGES.get(stage).trains) & set(vlm.parts())
    assert frozen == set(vlm.parts()) - trained
    assert f"stage {stage!r}" in table


@pytest.mark.parametrize("stage", STAGES.names())
def test_the_stage_table_drives_the_data(tokenizer, shapes_root, stage):
    row = STAGES.get(stage)
    builtin = BuiltinDataConfig(root=shapes_root, image_size=32, num_train=48, num_val=8)  # conftest's dataset
    data = builtin_data(DataConfig(builtin=builtin), stage)
    assert data.train_json == f"{shapes_root}/{row.builtin_train}"
    assert data.val_json == (None if row.builtin_val is None else f"{shapes_root}/{row.builtin_val}")
    dm = LLaVADataModule(tokenizer, data, IMAGE, stage=stage)
    assert dm.template == row.default_template
    named = LLaVADataModule(tokenizer, dataclasses.replace(data, template="chatml"), IMAGE, stage=stage)
    assert named.template == "chatml"


def test_a_new_stage_is_valid_and_freezes_by_its_row(tiny_cfg):
    with pytest.raises(ConfigError, match=f"choose one of: {', '.join(STAGES.names())}$"):
        tiny_cfg("stage=projector_only")
    STAGES.register("projector_only", Stage(("projector",), "chatml", "sft_train.json", "sft_val.json"))
    try:
        vlm, _ = build_on_meta(tiny_cfg("stage=projector_only", "trainable=null"))
        assert [part for part, params in vlm.parts().items() if params[0][1].requires_grad] == ["projector"]
    finally:
        STAGES.unregister("projector_only")


def test_validation_exact_match_is_the_benchmark_metric(tiny_cfg):
    cfg = tiny_cfg()
    module = build_module(cfg)
    dm = build_datamodule(cfg, module.tokenizer)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    answers = batch["answers"]
    # right, right with a final period (the metric drops it), and wrong; the first sample's image counts as
    # unreadable, so it is not scored
    texts = [[a, f"{a} .", "blue" if a != "blue" else "red"][k % 3] for k, a in enumerate(answers)]
    ids = [module.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    module.model.generate = lambda *args, **kwargs: ids
    batch["skipped"][0] = True
    outputs = module.validation_step(batch, 0)["outputs"]
    expected = METRICS.build("exact_match", outputs[1:], answers[1:])["accuracy"]
    assert 0 < expected < 1
    assert module.val_accuracy.compute().item() == pytest.approx(expected)


def test_builtin_answers_are_what_exact_match_compares():
    # the metric normalises predictions only: references already in that form score as before the switch
    refs = [*COLOURS, *SHAPES, *COUNTS, *QUADRANTS, *(a for _, a in TEXT_ONLY)]
    assert all(gqa_normalize(r) == r for r in refs)
    assert METRICS.build("exact_match", [f" {r.upper()}." for r in refs], refs)["accuracy"] == 1.0


def test_decoded_builtin_captions_are_the_references(tokenizer, shapes_root):
    # the built-in tokenizer decodes without a space before punctuation, so a caption the model writes back word
    # for word equals its reference as a raw string (GQA's clean-up drops the prediction's final period only,
    # so under it a caption reference, which has one, never matches: align-stage val/exact_match reads 0)
    import json

    captions = [r["conversations"][-1]["value"] for r in json.load(open(f"{shapes_root}/align.json"))[:20]]
    decoded = [tokenizer.decode(tokenizer(c, add_special_tokens=False).input_ids) for c in captions]
    assert decoded == captions
    assert METRICS.build("exact_match", decoded, captions, normalize="none")["accuracy"] == 1.0


def test_preflight_checks_the_tokenizer_the_run_loads(tiny_cfg, tmp_path):
    for overrides, key in (((), "data.builtin"), ((f"model.tokenizer={tmp_path}/tok",), "model.tokenizer")):
        cfg = tiny_cfg(*overrides)
        assert tokenizer_source(cfg) == (key, tokenizer_path(cfg))
    with pytest.raises(ConfigError, match=f"'model.tokenizer' = '{tmp_path}/tok': tokenizer directory not found"):
        check_files(cfg)


def test_named_blocks_are_the_schema_fields_with_a_registry():
    assert set(BLOCK_REGISTRIES) == set(NAMED_BLOCKS)
    assert set(NAMED_BLOCKS) <= {f.name for f in dataclasses.fields(ModelConfig)}
    assert {f"model.{block}" for block in NAMED_BLOCKS} <= set(REPLACED_WHOLE)


@pytest.mark.parametrize("block", NAMED_BLOCKS)
def test_each_named_block_is_validated_against_its_registry(tiny_cfg, block):
    with pytest.raises(ConfigError, match=rf"'model\.{block}\.name' = 'nope' .* {BLOCK_REGISTRIES[block].choices()}$"):
        tiny_cfg(f"model.{block}={{name: nope}}")


def test_a_named_block_is_replaced_whole_and_built_in_order(tiny_cfg):
    cfg = tiny_cfg("model.reducer={name: avgpool, factor: 2}", "model.reducer={name: conv}")
    assert dict(cfg.model.reducer) == {"name": "conv"}  # avgpool's factor does not leak into conv
    cfg = tiny_cfg("model.reducer={name: avgpool, factor: 2}")
    with torch.device("meta"):
        vision = build_vision(cfg.model)
    assert [type(m).__module__ for m in encoder_chain(vision)] == ["encoders.token_reducer", "encoders.timm_vit"]


def test_chatml_is_written_once_in_the_template_registry(tokenizer):
    chatml = TEMPLATES.get("chatml")
    # the built-in tokenizer's chat template and marker tokens are the registered template's
    assert tokenizer.chat_template == tokenizer_chat_template("chatml")
    for marker in chatml.special_tokens:
        assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1
    # and an export writes the same Jinja form (after its settings and macros)
    exported = export_chat_template(tokenizer, "chatml")
    assert exported.endswith(chatml.jinja)
    assert all(chatml.special_tokens[0] not in m and chatml.special_tokens[1] not in m for m in (export._MACROS,))
