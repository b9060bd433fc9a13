"""The index build's token counter (datamodules/token_count.py) on the real byte-level BPE tokenizers (Llama-3's
and Qwen2's): its counts equal the length of `templates.encode`'s ids, the tokenisation training uses, on text
that reaches every branch of their split pattern (contractions, digit runs, punctuation and whitespace runs, tabs,
carriage returns, non-ASCII letters and emoji, the template's own markers typed in the text), the same count again
from its caches; and its ASCII split in the standard `re` splits as the `regex` module's pattern and the backend's
own pre-tokenizer do."""

from __future__ import annotations

import random

import pytest

from datamodules.templates import encode
from datamodules.token_count import TokenCounter

PIECES = [
    "What's", "it'S", "we'LL", "they'd", "I'm", "12", "123456", "3.14", "x2", "?!", "...", "--", "(a)", '"q"', "\t",
    "  ", "\n", "\n\n", "\r\n", " \n ", "caf\u00e9", "\u65e5\u672c\u8a9e", "\U0001f600", "\u00a0", "na\u00efve",
    "\u2167", "<|eot_id|>", "<|im_end|>", "Answer the question using a single word or phrase.", "Yes", "No", "red",
]  # fmt: skip


def text(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        out.append(rng.choice(PIECES))
        out.append(rng.choice(["", " ", " ", " ", "\n"]))
    return "".join(out)


def conversation(rng: random.Random) -> list[dict]:
    turns = []
    for t in range(rng.randint(1, 4)):
        question = text(rng, rng.randint(1, 12))
        if t == 0 and rng.random() < 0.7:
            question = rng.choice([f"<image>\n{question}", f"{question}\n<image>", f"{question} <image> {question}"])
        # short answers recur (the counter keeps whole sections): the same text with and without a cut in it
        answers = ["Yes", "No", " red", "\n\nYes", question.replace("<image>", "")]
        answer = rng.choice(answers) if t % 2 else text(rng, 6)
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


@pytest.mark.parametrize("name, template", [("llama3", "llama3"), ("qwen2", "chatml")])
def test_byte_level_counts_equal_full_encoding(real_tokenizer, name, template):
    tok = real_tokenizer(name)
    rng = random.Random(7)
    counter = TokenCounter(tok, template, None, True, "<image>")
    assert counter.why_not is None and counter.whole  # one piece a record: "<image>" is an added token
    assert counter.ascii_split is not None and counter.byte_map is not None
    records = [conversation(rng) for _ in range(50)]
    counted = 0
    for turns in records + records[:15]:  # again: from the word and section caches
        n = counter.count(turns)
        if n is not None:
            assert n == len(encode(tok, turns, template, None, True).input_ids), turns
            counted += 1
    # None: a cut inside a word (an answer whose first characters join the prompt's last word), encoded in full
    assert counted > 35


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_the_ascii_split_is_the_patterns_split_and_the_backends(real_tokenizer, name):
    tok = real_tokenizer(name)
    counter = TokenCounter(tok, "chatml", None, True, "<image>")
    rng = random.Random(3)
    alphabet = [chr(c) for c in range(128)] + list("    aaeeoosstt'''\n\n\r11..") + ["'s", "'LL", "\r\n"]
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        words = counter.ascii_split.findall(s)
        assert words == counter.split.findall(s), repr(s)
        # the backend's own split (Oniguruma) and byte-level map give these words, mapped by the counter's table
        theirs = [w for w, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(s)]
        assert [w.encode().decode("latin-1").translate(counter.byte_map) for w in words] == theirs, repr(s)
