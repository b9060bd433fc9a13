"""Export to transformers' LLaVA: the exported model and processor, loaded with `from_pretrained`, give the
project's token ids, pixels (within the PIL / torch resize difference), logits and greedy answers on real
photos; the exported chat templates give training's ids on real tokenizers (Qwen2, Vicuna, Llama-3); what
cannot be exported (an architecture, a template whose ids would differ) is refused by name."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from PIL import Image
from skimage import data as photos
from transformers import AutoProcessor, CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

from datamodules.llava_data import LLaVADataset, Sample, collate
from datamodules.templates import TEMPLATES, VICUNA_SYSTEM, Template, encode
from experiment.assemble import build_module
from experiment.config import load_config
from inference.export import ExportError, chat_template, export_llava
from inference.load import load_predictor
from tests.support.quickstart import tiny_overrides
from tests.support.runs import fit
from tests.support.tiny_models import TINY_CLIP_ENCODER


@pytest.fixture(scope="module", params=["chatml", "vicuna_v1"])
def exported(shapes_root, tmp_path_factory, request):
    """A tiny run under a template, exported and loaded back (the built-in tokenizer adds no BOS: the exported
    vicuna_v1 template writes `<s>` itself)."""
    runs = str(tmp_path_factory.mktemp("runs"))
    overrides = [
        TINY_CLIP_ENCODER,
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        f"data.template={request.param}",
    ]
    cfg = load_config(None, tiny_overrides(shapes_root, runs) + overrides)
    predictor = load_predictor(fit(cfg).logger.log_dir)
    out = export_llava(predictor.module, predictor.datamodule.template, str(tmp_path_factory.mktemp("export")))
    return predictor, LlavaForConditionalGeneration.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out), out


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "rocket"])
def test_exported_model_equals_the_project(exported, photo, tmp_path):
    predictor, hf, processor, _ = exported
    dm, module = predictor.datamodule, predictor.module
    Image.fromarray(getattr(photos, photo)()).save(tmp_path / "photo.png")
    question = "What color are the shapes?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    theirs = processor(images=Image.open(tmp_path / "photo.png"), text=text, return_tensors="pt")

    record = {"id": photo, "image": "photo.png", "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "."}]}  # fmt: skip
    dataset = LLaVADataset([Sample(record, 0, 0, True)], "-", str(tmp_path), dm.encode, dm.transform,
                           dm.image_token_id, dm.image.num_tokens)  # fmt: skip
    ours = collate([dataset[0]], dm.tokenizer.pad_token_id)
    assert ours["prompt_ids"][0].tolist() == theirs["input_ids"][0].tolist()  # the chat template is the training one
    # transformers' default CLIP processor resizes with torch, the project as LLaVA (PIL): within 2 8-bit steps
    step = 1 / 255 / min(dm.image.pixel_std)
    assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max() <= 2 * step
    with torch.no_grad():
        mine = module.model(ours["prompt_ids"], ours["prompt_mask"], ours["pixel_values"]).logits
        hf_logits = hf(
            input_ids=ours["prompt_ids"], attention_mask=ours["prompt_mask"], pixel_values=ours["pixel_values"]
        ).logits
        torch.testing.assert_close(hf_logits, mine, rtol=1e-5, atol=1e-5)
    # the standard path: the processor's ids and pixels, the exported generation config (greedy, stop ids)
    assert hf.generation_config.eos_token_id == module.stop_ids
    generated = hf.generate(**theirs, max_new_tokens=6)
    answer = processor.decode(generated[0, theirs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer == predictor.ask(question, str(tmp_path / "photo.png"), max_new_tokens=6)


def test_predict_takes_an_export_and_answers_as_the_run(exported, shapes_root, tmp_path):
    """`tools.predict <export dir>` (load_predictor -> ExportedPredictor: transformers' model, processor and
    chat template) answers held-out records, batched or one by one, and a question, as the run's Predictor."""
    import json

    from inference.exported import ExportedPredictor
    from tools.predict import main

    predictor, _, _, out = exported
    records = json.load(open(os.path.join(shapes_root, "sft_val.json")))[:6]
    records.append({"id": "text", "conversations": [{"from": "human", "value": "What color is the sky?"}]})
    loaded = load_predictor(out)
    assert isinstance(loaded, ExportedPredictor)
    ours = predictor.answer_records(records, shapes_root, batch_size=4)
    assert loaded.answer_records(records, shapes_root, batch_size=4) == ours
    assert loaded.answer_records(records, shapes_root, batch_size=1) == ours
    image = os.path.join(shapes_root, records[0]["image"])
    main([out, "--image", image, "--question", "What color are the shapes?"])
    assert predictor.ask("What color are the shapes?", image) == loaded.ask("What color are the shapes?", image)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.reducer={name: avgpool, factor: 2}", "the vision tower is wrapped (TokenReducer)"),
        ("model.projector=linear", "the projector is not mlp2x_gelu"),
        ("model.llm.lora={r: 2}", "merge them first"),
        (None, "is not a transformers CLIP tower"),
    ],
)
def test_what_cannot_be_exported_is_named(tiny_cfg, tmp_path, override, needle):
    cfg = tiny_cfg(*([TINY_CLIP_ENCODER, override] if override else []))
    with pytest.raises(ExportError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        export_llava(build_module(cfg), "chatml", str(tmp_path))


def test_a_template_without_a_jinja_form_is_refused(tiny_cfg, tmp_path):
    module = build_module(tiny_cfg(TINY_CLIP_ENCODER))
    TEMPLATES.register("unexported", Template(lambda messages, system: [], None))
    try:
        with pytest.raises(ExportError, match="template 'unexported' has no Jinja chat template here"):
            export_llava(module, "unexported", str(tmp_path / "out"))
    finally:
        TEMPLATES.unregister("unexported")
    assert not (tmp_path / "out").exists()  # refused before anything is written


@functools.cache
def real_processor(tokenizer, template: str, system: str | None, image_first: bool = True) -> LlavaProcessor:
    """The processor an export writes (`export_llava` builds it so) for a run with this tokenizer, template,
    `data.system_prompt` and `data.image_first`: 32 px images, 4 x 4 patches."""
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=chat_template(tokenizer, template, system, image_first),
        num_additional_image_tokens=1,
    )


def expand(ids: list[int], tokenizer) -> list[int]:
    """Training's ids with each image placeholder repeated for its 4 x 4 patches, as the processor writes them."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    return [t for i in ids for t in ([i] * 16 if i == image_id else [i])]


# (the run's data.system_prompt, the text of a `system` message): the template's default system text, one a
# message gives, none (an empty system message), the run's own
SYSTEMS = [(None, None), (None, "You are a pirate.\nSpeak so."), (None, ""), ("Be brief.", None)]


PROMPTS = [
    ["What is in this picture?"],
    ["  Describe it.\nBriefly. "],  # LLaVA strips the text of the turn with the image
    [""],  # the image alone
    ["What color is it?", "red", "And the shape?\n\n"],  # a multi-turn prompt, a question ending in blank lines
]


@pytest.mark.parametrize(
    "template, name, turns",
    [
        (template, name, turns)
        for template, name in [("chatml", "qwen2"), ("vicuna_v1", "vicuna"), ("llama3", "llama3"), ("plain", "vicuna")]
        for turns in PROMPTS
        if template != "plain" or len(turns) == 1  # plain trains on one human / gpt pair
    ],
)
def test_exported_chat_template_gives_the_training_ids(real_tokenizer, template, name, turns):
    """The processor an export writes (its chat template + the tokenizer on the whole string, special tokens
    added as `processor(text=...)` does) tokenises a prompt on a real tokenizer into the ids training used
    (`encode`: segment by segment, the text after the image on its own, LLaVA's image placement), for images
    as message parts and as `<image>` in the text, with each kind of system text."""
    tokenizer = real_tokenizer(name)
    image = Image.fromarray(photos.astronaut()).resize((32, 32))
    for run_system, message_system in SYSTEMS:
        processor = real_processor(tokenizer, template, run_system)
        for parts in (True, False):
            messages = [] if message_system is None else [{"role": "system", "content": message_system}]
            conversations = []
            for k, text in enumerate(turns):
                value = ("<image>\n" if k == 0 else "") + text
                content = [{"type": "image"}, {"type": "text", "text": text}] if k == 0 and parts else value
                messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": content})
                conversations.append({"from": "human" if k % 2 == 0 else "gpt", "value": value})
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            theirs = processor(images=image, text=prompt, return_tensors="pt")["input_ids"][0].tolist()
            system = run_system if message_system is None else message_system
            ours = encode(tokenizer, conversations + [{"from": "gpt", "value": "x"}], template, system).prompt_ids
            expanded = expand(ours, tokenizer)
            assert theirs == expanded, (run_system, message_system, parts, prompt)
            # one BOS (the tokenizer's: the text has none) where the tokenizer has one (Qwen2 has none)
            assert theirs.count(tokenizer.bos_token_id) == (tokenizer.bos_token is not None)
            if parts:  # transformers' tokenising path: special tokens added unless the text starts with BOS
                messages[0 if message_system is None else 1]["content"][0]["image"] = image
                out = processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=True
                )
                assert out["input_ids"][0] == expanded


@pytest.mark.parametrize("template, name", [("chatml", "qwen2"), ("vicuna_v1", "vicuna"), ("llama3", "llama3")])
def test_a_run_without_image_first_keeps_the_image_where_the_parts_put_it(real_tokenizer, template, name):
    tokenizer = real_tokenizer(name)
    processor = real_processor(tokenizer, template, None, image_first=False)
    parts = [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": " what is it?\n"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    image = Image.fromarray(photos.astronaut()).resize((32, 32))
    theirs = processor(images=image, text=prompt)["input_ids"][0]
    record = [{"from": "human", "value": "Look: <image> what is it?\n"}, {"from": "gpt", "value": "x"}]
    ours = encode(tokenizer, record, template, image_first=False).prompt_ids
    assert theirs == expand(ours, tokenizer)


@pytest.mark.parametrize("template, name", [("chatml", "qwen2"), ("vicuna_v1", "vicuna"), ("llama3", "llama3")])
def test_the_exported_template_places_the_image_by_the_templates_rule(real_tokenizer, template, name):
    """String content placed as training places it (`Template.placement`): chatml keeps a turn that starts with
    the image as written (LLaVA-NeXT), the others move and strip it (LLaVA); several images stay as written."""
    tokenizer = real_tokenizer(name)
    processor = real_processor(tokenizer, template, None)
    image = Image.fromarray(photos.astronaut()).resize((32, 32))
    for value in ["<image>What is it?", "<image>\n  Spaced. ", " What?\n<image> ", "<image>\n<image>\nCompare."]:
        prompt = processor.apply_chat_template([{"role": "user", "content": value}], add_generation_prompt=True)
        images = [image] * value.count("<image>")
        theirs = processor(images=images, text=prompt)["input_ids"][0]
        ours = encode(tokenizer, [{"from": "human", "value": value}, {"from": "gpt", "value": "x"}], template)
        assert theirs == expand(ours.prompt_ids, tokenizer), (value, prompt)


def test_sentencepiece_needs_a_space_after_the_image(real_tokenizer):
    """Measured on Vicuna's tokenizer: LLaMA's SentencePiece puts "▁" in front of a string but not after a
    special token, so the text after <image>, tokenised on its own in training, starts with "▁" that the
    whole prompt lacks; the exported template writes "<image> \n" to get it back."""
    tokenizer = real_tokenizer("vicuna")

    def tokens(text):
        return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])

    assert tokens("\nWhat") == ["▁", "<0x0A>", "What"]  # training's chunk after the image
    assert tokens("<image>\nWhat") == ["<image>", "<0x0A>", "What"]
    assert tokens("<image> \nWhat") == ["<image>", "▁", "<0x0A>", "What"]
    processor = real_processor(tokenizer, "vicuna_v1", None)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == VICUNA_SYSTEM + " USER: <image> \nWhat? ASSISTANT:"  # and no "<s>": the tokenizer adds it


@pytest.mark.parametrize(
    "template, name, needle",
    [
        # training's ids under chatml / llama3 have no <s>; the processor call would add it
        ("chatml", "vicuna", r"the tokenizer adds \['<s>'\] in front of every text.* start with 'no BOS'"),
        ("llama3", "vicuna", r"the tokenizer adds \['<s>'\] .* start with '<\|begin_of_text\|>'"),
        # Llama-3-Instruct's own template writes <|begin_of_text|>, which the tokenizer adds too
        ("chat_template", "llama3", r"from token 1: \['<\|begin_of_text\|>', '<\|start_header_id\|>'"),
        ("chat_template", "vicuna", "this tokenizer has none"),
    ],
)
def test_what_cannot_give_the_training_ids_is_refused(real_tokenizer, template, name, needle):
    with pytest.raises(ExportError, match=needle):
        chat_template(real_tokenizer(name), template)
