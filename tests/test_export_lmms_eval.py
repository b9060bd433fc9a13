"""lmms-eval's own `llava_hf` on an exported run (README: `python -m lmms_eval --model llava_hf --model_args
pretrained=exported/X`), offline on CPU, on the local shapes task of tests/test_lmms_eval.py: the answers it
logs, through lmms-eval 0.7.0's chat class (what `llava_hf` resolves to) and its simple one, are the
project's greedy answers, for vicuna_v1 and chatml exports.

llava_hf calls `generate(eos_token_id=tokenizer.eos_token_id)`, which replaces the exported
`generation_config.eos_token_id` (the run's stop ids), and applies no `until` (the simple class pops it, the
chat class never reads it): the export makes the template's end of turn its tokenizer's EOS (chatml's
`<|im_end|>`, not the LLM's `</s>`; inference/export.py `with_end_of_turn_as_eos`). `device_map` must be given:
llava_hf's default "" is refused by transformers' `from_pretrained` (asserted here). Not asserted: a question
without an image fails in both classes of lmms-eval 0.7.0 (found by hand; the simple one never sets its image
tokens, the chat one calls the processor with `images=[]`); the project's own adapter (tools/lmms_eval)
answers it.
"""

from __future__ import annotations

import pytest
import torch
from lmms_eval.models import get_model
from transformers import AutoTokenizer

from datamodules.llava_data import LLaVADataset, Sample, collate
from experiment.assemble import build_module
from experiment.config import load_config
from inference.export import export_llava
from inference.load import load_predictor
from lit_modules.predictor import PLACEHOLDER_ANSWER
from tests.support.lmms_tasks import record, shapes_docs, write_tasks
from tests.support.quickstart import tiny_overrides
from tests.support.runs import fit
from tests.support.tiny_models import TINY_CLIP_ENCODER

MAX_NEW_TOKENS = 4  # the task's, written by write_tasks (with until ["\n\n"])
# device_map: llava_hf's default "" fails in transformers' from_pretrained (test_llava_hf_needs_a_device_map)
CPU = "device=cpu,device_map=cpu,dtype=float32"
# Long enough that answers end with the template's end of turn well inside MAX_NEW_TOKENS (a 2-step run says
# "does does does does" to everything): ~7 s a template on 2 CPU cores.
STEPS = 300


@pytest.fixture(scope="module")
def exports(shapes_root, tmp_path_factory):
    """template -> (Predictor of a tiny CLIP run trained under it, its export directory), built once."""
    built = {}

    def get(template: str):
        if template not in built:
            runs = str(tmp_path_factory.mktemp("runs"))
            overrides = [TINY_CLIP_ENCODER, f"trainer.max_steps={STEPS}", "trainer.max_epochs=100",
                         "trainer.limit_val_batches=0", f"data.template={template}"]  # fmt: skip
            cfg = load_config(None, tiny_overrides(shapes_root, runs) + overrides)
            predictor = load_predictor(fit(cfg).logger.log_dir)
            out = export_llava(predictor.module, template, str(tmp_path_factory.mktemp("export")))
            built[template] = predictor, out
        return built[template]

    return get


@torch.no_grad()
def new_tokens(predictor, docs: list[dict], image_folder: str, stop_ids: list[int]) -> list[list[int]]:
    """The project's greedy new tokens for the docs (its template, preprocessing and generate), stopping only
    at `stop_ids` (stop excluded)."""
    dm, module = predictor.datamodule, predictor.module
    samples = [Sample(record(d, image_folder, PLACEHOLDER_ANSWER), i, 0, True) for i, d in enumerate(docs)]
    dataset = LLaVADataset(samples, "-", image_folder, dm.encode, dm.transform, dm.image_token_id, dm.image.num_tokens)
    batch = collate([dataset[i] for i in range(len(dataset))], dm.tokenizer.pad_token_id)
    return module.model.generate(
        batch["prompt_ids"], batch["prompt_mask"], batch["pixel_values"], MAX_NEW_TOKENS, stop_ids,
        dm.tokenizer.pad_token_id,
    )  # fmt: skip


@pytest.mark.slow  # two 300-step runs (~7 s each), then lmms-eval four times (~1 s each)
@pytest.mark.parametrize("force_simple", [False, True], ids=["chat", "simple"])
@pytest.mark.parametrize("template", ["chatml", "vicuna_v1"])
def test_llava_hf_logs_the_exported_runs_answers(exports, shapes_root, tmp_path, monkeypatch, template, force_simple):
    import datasets
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))  # as test_lmms_eval
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    predictor, out = exports(template)
    module, tokenizer = predictor.module, predictor.module.tokenizer
    docs = shapes_docs(shapes_root)[:5]  # the image questions (llava_hf cannot take the text-only sixth)
    rows = [dict(d, choices=[], choice=None) for d in docs]
    tasks = TaskManager(include_path=write_tasks(tmp_path / "tasks", rows), include_defaults=False)
    assert get_model("llava_hf", force_simple).is_simple == force_simple  # "llava_hf" is the chat class unless forced
    results = simple_evaluate(
        model="llava_hf", model_args=f"pretrained={out},{CPU}", tasks=["shapes_vqa"], task_manager=tasks,
        log_samples=True, force_simple=force_simple,
    )  # fmt: skip
    logged = [s["filtered_resps"][0] for s in sorted(results["samples"]["shapes_vqa"], key=lambda s: s["doc_id"])]
    ours = predictor.answer_records([record(d, shapes_root) for d in docs], shapes_root, max_new_tokens=MAX_NEW_TOKENS)
    assert any(ours) and len(set(ours)) > 1  # a model that answers, and not the same to everything

    # What llava_hf does: greedy, stopping at the exported tokenizer's EOS only, special tokens skipped, no `until`.
    eos = AutoTokenizer.from_pretrained(out).eos_token_id
    unstopped = new_tokens(predictor, docs, shapes_root, [eos])
    assert logged == [tokenizer.decode(t, skip_special_tokens=True) for t in unstopped]
    # The project's answers: the same tokens cut at the first of the run's stop ids (= generation_config's).
    cut = [t[: next((k for k, x in enumerate(t) if x in module.stop_ids), len(t))] for t in unstopped]
    assert ours == [tokenizer.decode(t, skip_special_tokens=True).strip() for t in cut]

    # The export's tokenizer EOS is the template's end of turn (chatml: <|im_end|>, not the LLM's </s>), so
    # llava_hf, which stops at the tokenizer's EOS alone, stops where the project does.
    assert tokenizer.convert_ids_to_tokens(eos) == {"vicuna_v1": "</s>", "chatml": "<|im_end|>"}[template]
    assert eos in module.stop_ids and any(len(t) < MAX_NEW_TOKENS for t in unstopped)  # some answers stop there
    assert logged == ours


def test_llava_hf_needs_a_device_map(tiny_cfg, tmp_path):
    """llava_hf's default `device_map=""` is refused by transformers' from_pretrained: the README's command
    gives one (`device_map=cuda:0`, or `cpu`)."""
    out = export_llava(build_module(tiny_cfg(TINY_CLIP_ENCODER)), "chatml", str(tmp_path / "export"))
    for force_simple in (False, True):
        with pytest.raises(ValueError, match="device"):
            get_model("llava_hf", force_simple)(pretrained=out, device="cpu", dtype="float32")
        model = get_model("llava_hf", force_simple)(pretrained=out, device="cpu", device_map="cpu", dtype="float32")
        assert model.tokenizer.eos_token == "<|im_end|>"  # the template's end of turn (with_end_of_turn_as_eos)
