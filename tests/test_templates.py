"""Label masks checked by hand: a word-level tokenizer makes one token per word, so the expected
ids and labels can be written out token by token."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from datamodules.templates import IGNORE_INDEX, TEMPLATES, TemplateError, encode, move_image_first

X = None  # marks a masked position in the expected labels

TWO_TURNS = [
    {"from": "human", "value": "<image>\nWhat color are the shapes?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "two"},
]


def check(tokenizer, enc, expected: list[tuple[str, bool]]) -> None:
    tokens = tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert tokens == [t for t, _ in expected]
    want = [tokenizer.convert_tokens_to_ids(t) if train else IGNORE_INDEX for t, train in expected]
    assert enc.labels == want


def masked(*tokens: str) -> list[tuple[str, bool]]:
    return [(t, False) for t in tokens]


def trained(*tokens: str) -> list[tuple[str, bool]]:
    return [(t, True) for t in tokens]


def test_chatml_multi_turn(tokenizer):
    enc = encode(tokenizer, TWO_TURNS, "chatml")
    check(
        tokenizer,
        enc,
        masked(
            "<|im_start|>",
            "user",
            "<image>",
            "What",
            "color",
            "are",
            "the",
            "shapes",
            "?",
            "<|im_end|>",
            "<|im_start|>",
            "assistant",
        )
        + trained("red", "<|im_end|>")
        + masked(
            "<|im_start|>",
            "user",
            "How",
            "many",
            "shapes",
            "are",
            "there",
            "?",
            "<|im_end|>",
            "<|im_start|>",
            "assistant",
        )
        + trained("two", "<|im_end|>"),
    )
    # The generation prompt is the conversation up to the last answer, ending with the assistant header.
    assert tokenizer.convert_ids_to_tokens(enc.prompt_ids) == [
        t
        for t, _ in masked(
            "<|im_start|>",
            "user",
            "<image>",
            "What",
            "color",
            "are",
            "the",
            "shapes",
            "?",
            "<|im_end|>",
            "<|im_start|>",
            "assistant",
            "red",
            "<|im_end|>",
            "<|im_start|>",
            "user",
            "How",
            "many",
            "shapes",
            "are",
            "there",
            "?",
            "<|im_end|>",
            "<|im_start|>",
            "assistant",
        )
    ]
    assert enc.answer == "two"


def test_text_only_record(tokenizer):
    enc = encode(
        tokenizer, [{"from": "human", "value": "What color is grass?"}, {"from": "gpt", "value": "green"}], "chatml"
    )
    check(
        tokenizer,
        enc,
        masked("<|im_start|>", "user", "What", "color", "is", "grass", "?", "<|im_end|>", "<|im_start|>", "assistant")
        + trained("green", "<|im_end|>"),
    )


def test_plain_alignment(tokenizer):
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "two red circles at the top left."}]
    enc = encode(tokenizer, turns, "plain")
    check(tokenizer, enc, masked("<s>", "<image>") + trained("two", "red", "circles", "at", "the", "top", "left", "."))
    assert tokenizer.convert_ids_to_tokens(enc.prompt_ids) == ["<s>", "<image>"]


def test_tokenizer_chat_template_matches_chatml(tokenizer):
    """The built-in tokenizer's Jinja template is ChatML: both paths must give the same ids and labels."""
    a = encode(tokenizer, TWO_TURNS, "chatml")
    b = encode(tokenizer, TWO_TURNS, "chat_template")
    assert (a.input_ids, a.labels, a.prompt_ids) == (b.input_ids, b.labels, b.prompt_ids)


@pytest.fixture(scope="module")
def llama3_words():
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>", "</s>", "<s>"]
    words = "system user assistant Be brief . What color ? red How many two </s> USER : ASSISTANT".split()
    vocab = {t: i for i, t in enumerate(specials + ["<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", additional_special_tokens=specials
    )


def test_llama3_multi_turn_with_system(llama3_words):
    turns = [
        {"from": "human", "value": "<image>\nWhat color ?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many ?"},
        {"from": "gpt", "value": "two"},
    ]
    enc = encode(llama3_words, turns, "llama3", system="Be brief .")
    H, E, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
    check(
        llama3_words,
        enc,
        masked(
            "<|begin_of_text|>",
            H,
            "system",
            E,
            "Be",
            "brief",
            ".",
            EOT,
            H,
            "user",
            E,
            "<image>",
            "What",
            "color",
            "?",
            EOT,
            H,
            "assistant",
            E,
        )
        + trained("red", EOT)
        + masked(H, "user", E, "How", "many", "?", EOT, H, "assistant", E)
        + trained("two", EOT),
    )


def test_vicuna_v1(llama3_words):
    turns = [{"from": "human", "value": "What color ?"}, {"from": "gpt", "value": "red"}]
    enc = encode(llama3_words, turns, "vicuna_v1", system="Be brief .")
    check(
        llama3_words,
        enc,
        masked("<s>", "Be", "brief", ".", "USER", ":", "What", "color", "?", "ASSISTANT", ":") + trained("red", "</s>"),
    )


@pytest.mark.parametrize(
    "turns, needle",
    [
        ([], "no conversations"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], "turn 0 is from 'gpt', expected 'human'"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "turn 1 is from 'human', expected 'gpt'"),
        ([{"from": "human", "value": "a"}], "ends with a human turn"),
        ([{"value": "a"}], "turn 0 is not"),
        ({"from": "human", "value": "a"}, "'conversations' is a dict, not a list"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": None}], r"turn 1: 'value' is NoneType \(None\)"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}], r"turn 1: 'value' is int \(3\), not text"),
        ([{"from": "human", "value": ["a"]}, {"from": "gpt", "value": "b"}], "turn 0: 'value' is list"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}], "turn 1: empty answer"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": " \n\t"}], "turn 1: empty answer"),
    ],
)
def test_broken_conversations(tokenizer, turns, needle):
    with pytest.raises(TemplateError, match=needle):
        encode(tokenizer, turns, "chatml")


@pytest.mark.parametrize(
    "text, llava, llava_next",
    [
        ("<image>\nWhat?", "<image>\nWhat?", "<image>\nWhat?"),
        ("<image>What?", "<image>\nWhat?", "<image>What?"),  # LLaVA-NeXT adds no newline ...
        ("<image>\n  What? \n", "<image>\nWhat?", "<image>\n  What? \n"),  # ... and strips nothing
        ("  What?\n<image> ", "<image>\nWhat?", "<image>\nWhat?"),  # not at the start: both move it
        ("<image>", "<image>", "<image>"),
        (" <image> ", "<image>", "<image>"),
        ("<image>\n<image>\nCompare.", "<image>\n<image>\nCompare.", "<image>\n<image>\nCompare."),  # as written
        (" No image. ", " No image. ", " No image. "),
    ],
)
def test_image_placement(text, llava, llava_next):
    """Golden strings read off LLaVA's and LLaVA-NeXT's preprocess_multimodal (a turn with one placeholder);
    each named template uses its reference's rule."""
    for placement, want in (("llava", llava), ("llava_next", llava_next)):
        assert move_image_first([("user", text)], "<image>", placement) == [("user", want)]
    names = ["plain", "vicuna_v1", "llama3", "chatml", "chat_template"]
    rules = {name: TEMPLATES.get(name).placement for name in names}
    assert rules == {
        "plain": "llava", "vicuna_v1": "llava", "llama3": "llava", "chatml": "llava_next", "chat_template": "llava_next"
    }  # fmt: skip
