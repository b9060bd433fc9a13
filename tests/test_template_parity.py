"""Templates against the reference implementations, on real tokenizers.

The references are restated here from their sources (not imported): LLaVA (haotian-liu/LLaVA,
llava/train/train.py `preprocess_multimodal`, `preprocess_plain`, `preprocess_v1`; llava/mm_utils.py
`tokenizer_image_token`; llava/conversation.py `conv_vicuna_v1`), INF-LLaVA (INF_llava/train/train.py
`preprocess_llama3`, INF_llava/conversation.py `conv_llama3`) and LLaVA-NeXT (LLaVA-VL/LLaVA-NeXT,
llava/train/train.py `preprocess_multimodal`, `preprocess_qwen`, `preprocess_plain`; its removal of the string
"QA_GT_caption_based_noisy", a clean-up of one data set, is not restated). The tokenizers are the real ones
(tests/fixtures/build_tokenizers.py), built once per checkout into data/generated/tokenizers/; without network
on a fresh checkout these tests fail.
"""

from __future__ import annotations

import os

import pytest

from datamodules import load_tokenizer
from datamodules.templates import IGNORE_INDEX, VICUNA_SYSTEM, encode

IMG = "<image>"
QWEN_SYSTEM = "You are a helpful assistant."  # LLaVA-NeXT's preprocess_qwen default


def turns(*values: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


CONVERSATIONS = {
    "image first": turns(f"{IMG}\nWhat is shown in this image?", "A red circle and a blue square."),
    "image last": turns(f"What is this?\n{IMG}", "It is a cat."),
    "image middle": turns(f"Look at this {IMG} and tell me the colour.", "Red."),
    "image alone": turns(IMG, "Two red circles at the top left."),
    "multi-turn image": turns(
        f"{IMG}\nHow many shapes are there?", "There are 3 shapes.", "Which one is largest?", "The blue square."
    ),
    "three turns": turns(f"{IMG} Describe it.", "A dog.", "Colour?", "Brown.", "Is it happy?", "Yes, it is!"),
    "text only": turns("What is the capital of France?", "Paris."),
    "text only multi-turn": turns("Say hi.", "Hi!", "Now in German.", "Hallo!"),
    "unicode": turns(f"{IMG}\nDescribe it in German.", "Äpfel und Birnen — 3½ Stück, 🦙."),
    "newline in answer": turns("List two fruits.", "1. apples\n2. pears"),
    # LLaVA moves and strips these; LLaVA-NeXT keeps a turn that starts with the placeholder as written
    "image first, no newline": turns(f"{IMG}What is in the picture?", "A cat."),
    "image turn with outer whitespace": turns(f"{IMG}\n  Describe it.\n ", "A dog.", " And now? ", "Sitting."),
    "image last, whitespace": turns(f" Where is it?\n{IMG}  ", "In a box."),
}
PLAIN = {k: v for k, v in CONVERSATIONS.items() if len(v) == 2 and IMG in v[0]["value"]}
# preprocess_plain keeps a caption's whitespace (only the project's refusal of an all-whitespace one differs)
PLAIN |= {repr(c): turns(IMG, c) for c in [" leading space", "trailing space ", "\nnewline first", "newline last\n"]}
SYSTEMS = [None, "Answer briefly."]
EDGE_ANSWERS = [" leading space", "trailing space ", "\n\nblank line first", "ends with a newline\n", "a\tb  c", "ok"]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def toks(real_tokenizer):
    return {name: real_tokenizer(name) for name in ("vicuna", "llama3", "qwen2")}


# ---- the references, restated -------------------------------------------------------------------


def llava_move_image(conv: list[dict]) -> list[tuple[str, str]]:
    """preprocess_multimodal: a turn holding the placeholder becomes placeholder, newline, then the
    rest of its text with the placeholder removed and both ends stripped."""
    out = []
    for t in conv:
        v = t["value"]
        if IMG in v:
            v = (IMG + "\n" + v.replace(IMG, "").strip()).strip()
        out.append((t["from"], v))
    return out


def llava_next_move_image(conv: list[dict]) -> list[tuple[str, str]]:
    """LLaVA-NeXT's preprocess_multimodal: LLaVA's move, applied only to a turn holding exactly one
    placeholder that does not start with it; every other turn stays as written."""
    out = []
    for t in conv:
        v = t["value"]
        if v.count(IMG) == 1 and not v.startswith(IMG):
            v = (IMG + "\n" + v.replace(IMG, "").strip()).strip()
        out.append((t["from"], v))
    return out


def image_token_ids(tok, prompt: str) -> list[int]:
    """tokenizer_image_token: every text chunk between placeholders is tokenised on its own with the
    tokenizer's special tokens; the first chunk's BOS stays, the later chunks' BOS is dropped, and the
    image id goes between chunks (LLaVA writes -200 there; the project's placeholder id stands in)."""
    chunks = [tok(c)["input_ids"] for c in prompt.split(IMG)]
    skip = 1 if chunks[0][:1] == [tok.bos_token_id] and tok.bos_token_id is not None else 0
    out = chunks[0][:skip]
    for k, chunk in enumerate(chunks):
        if k:
            out.append(tok.convert_tokens_to_ids(IMG))
        out += chunk[skip:]
    return out


def count_masking(tok, ids, rounds, sep, start, extra, later_adjust):
    """LLaVA's and INF-LLaVA's label masking: walk the rounds by token counts; in each round the
    text up to `sep` is masked (its length minus `extra`), the round advances `len + start`-style
    counts; a round without exactly one `sep` stops the walk, and if the counted length differs from
    the ids' the whole sample is masked."""
    labels = list(ids)
    cur = start
    labels[:cur] = [IGNORE_INDEX] * cur
    for i, rnd in enumerate(rounds):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        round_len = len(image_token_ids(tok, rnd)) + extra[0]
        instruction_len = len(image_token_ids(tok, parts[0] + sep)) + extra[1]
        if i > 0:
            round_len -= later_adjust
            instruction_len -= later_adjust
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * max(0, len(labels) - cur)
    if cur != len(ids):
        labels = [IGNORE_INDEX] * len(ids)
    return labels


def ref_vicuna_v1(tok, conv, system):
    """preprocess_v1 with conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>")."""
    msgs = llava_move_image(conv)
    sys_text = VICUNA_SYSTEM if system is None else system

    def prompt(messages, generation):
        text = sys_text + " "
        for k, (frm, v) in enumerate(messages):
            text += ("USER" if frm == "human" else "ASSISTANT") + ": " + v + (" " if k % 2 == 0 else "</s>")
        return text + ("ASSISTANT:" if generation else "")

    full = prompt(msgs, False)
    ids = image_token_ids(tok, full)
    # Rounds split at "</s>"; the instruction is counted with its BOS and the "▁" of the trailing space
    # (minus 2); a round's BOS stands for its removed "</s>"; after round 0, a non-legacy tokenizer
    # writes "USER" after "</s>" without the word-start "▁" it gets alone (minus 1).
    later = 0 if getattr(tok, "legacy", True) else 1
    labels = count_masking(tok, ids, full.split("</s>"), " ASSISTANT: ", 1, (0, -2), later)
    return ids, labels, image_token_ids(tok, prompt(msgs[:-1], True))


def ref_llama3(tok, conv, system):
    """preprocess_llama3 with conv_llama3 (SeparatorStyle.MPT, sep <|eot_id|>), one BOS."""
    msgs = llava_move_image(conv)
    sys_text = VICUNA_SYSTEM if system is None else system
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"

    def prompt(messages, generation):
        text = "<|begin_of_text|>" + header.format("system") + sys_text + "<|eot_id|>"
        for frm, v in messages:
            text += header.format("user" if frm == "human" else "assistant") + v + "<|eot_id|>"
        return text + (header.format("assistant") if generation else "")

    full = prompt(msgs, False)
    ids = image_token_ids(tok, full)
    # Rounds: system + first exchange, then one per exchange; a round's count adds its removed
    # <|eot_id|> (+1); after round 0 the BOS each round's own tokenisation adds is taken off (-1).
    parts = full.split("<|eot_id|>")
    rounds = ["<|eot_id|>".join(parts[:3])] + ["<|eot_id|>".join(parts[j : j + 2]) for j in range(3, len(parts), 2)]
    labels = count_masking(tok, ids, rounds, "<|eot_id|>" + header.format("assistant"), 0, (1, 0), 1)
    gen = image_token_ids(tok, prompt(msgs[:-1], True))
    # The system text carries <|begin_of_text|> and the tokenizer adds another: keep one (the second is
    # masked, so the labels lose nothing).
    bos = tok.bos_token_id
    assert ids[:2] == [bos, bos] and gen[:2] == [bos, bos] and labels[1] == IGNORE_INDEX
    return ids[1:], labels[1:], gen[1:]


def qwen_messages(conv, system):
    msgs = [("user" if frm == "human" else "assistant", v) for frm, v in llava_next_move_image(conv)]
    return ([("system", system)] if system else []) + msgs


def ref_qwen(tok, conv, system):
    """preprocess_qwen ids (after LLaVA-NeXT's preprocess_multimodal): each message rendered as
    <|im_start|>role\\ntext<|im_end|>\\n and tokenised on its own, <image> a special token. Labels as this
    project defines them for ChatML (README; `ref_qwen_labels` has the reference's): an answer and its
    <|im_end|>."""
    msgs = qwen_messages(conv, system)
    ids, labels = [], []
    for role, v in msgs:
        head = tok(f"<|im_start|>{role}\n", add_special_tokens=False)["input_ids"]
        msg = tok(f"<|im_start|>{role}\n{v}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ids += msg
        if role == "assistant":
            assert msg[: len(head)] == head
            labels += [IGNORE_INDEX] * len(head) + msg[len(head) : -1] + [IGNORE_INDEX]
        else:
            labels += [IGNORE_INDEX] * len(msg)
    last = len(tok(f"<|im_start|>assistant\n{msgs[-1][1]}<|im_end|>\n", add_special_tokens=False)["input_ids"])
    gen = ids[:-last] + tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    return ids, labels, gen


def ref_qwen_labels(tok, conv, system):
    """preprocess_qwen's own labels: a system or user message masked, an assistant message trained whole
    (header, answer, <|im_end|>, "\\n"), then every token with the id of "\\n" (198), <|im_start|> or
    <|im_end|> trained wherever it is."""
    labels = []
    for role, v in qwen_messages(conv, system):
        msg = tok(f"<|im_start|>{role}\n{v}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        labels += msg if role == "assistant" else [IGNORE_INDEX] * len(msg)
    ids = ref_qwen(tok, conv, system)[0]
    unmask = {198, tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")}
    return [t if t in unmask else lab for t, lab in zip(ids, labels)]


def ref_plain(tok, conv):
    """preprocess_plain: the human turn is replaced by the placeholder; caption + "\\n" follows; the
    placeholder part (with BOS) is masked."""
    ids = image_token_ids(tok, IMG + conv[1]["value"] + "\n")
    n = len(image_token_ids(tok, IMG))
    return ids, [IGNORE_INDEX] * n + ids[n:], image_token_ids(tok, IMG)


# ---- tests --------------------------------------------------------------------------------------


def check(enc, ref):
    ids, labels, gen = ref
    assert enc.input_ids == ids
    assert enc.labels == labels
    assert enc.prompt_ids == gen
    assert enc.input_ids[: len(enc.prompt_ids)] == enc.prompt_ids


@pytest.mark.parametrize("system", SYSTEMS)
def test_vicuna_v1_equals_llava(toks, system):
    tok = toks["vicuna"]
    for name, conv in CONVERSATIONS.items():
        check(encode(tok, conv, "vicuna_v1", system), ref_vicuna_v1(tok, conv, system))
    print(f"vicuna_v1: {len(CONVERSATIONS)} conversations equal LLaVA's preprocess_v1")


@pytest.mark.parametrize("system", SYSTEMS)
def test_llama3_equals_inf_llava(toks, system):
    tok = toks["llama3"]
    for conv in CONVERSATIONS.values():
        check(encode(tok, conv, "llama3", system), ref_llama3(tok, conv, system))


@pytest.mark.parametrize("system", [None, QWEN_SYSTEM])
def test_chatml_equals_llava_next(toks, system):
    tok = toks["qwen2"]
    for conv in CONVERSATIONS.values():
        check(encode(tok, conv, "chatml", system), ref_qwen(tok, conv, system))


@pytest.mark.parametrize("name", ["vicuna", "llama3", "qwen2"])
def test_plain_equals_llava(toks, name):
    tok = toks[name]
    for conv in PLAIN.values():
        check(encode(tok, conv, "plain"), ref_plain(tok, conv))


@pytest.mark.parametrize(
    "name, named, system, jinja_system",
    [
        ("qwen2", "chatml", QWEN_SYSTEM, QWEN_SYSTEM),
        ("qwen2", "chatml", "You are a helpful assistant", None),  # the GGUF's Qwen template default
        ("llama3", "llama3", "Answer briefly.", "Answer briefly."),
        ("llama3", "llama3", "", None),  # Llama-3's template has no default system text
    ],
)
def test_chat_template_equals_named_template(toks, name, named, system, jinja_system):
    """The tokenizer's own Jinja template and the named template give the same ids, labels and prompt: under
    Qwen2's template for every conversation, whitespace in answers included; under Llama-3's where its template
    (which trims each message) and LLaVA's placement (INF-LLaVA's, the named llama3's) leave the text as
    LLaVA-NeXT's placement (chat_template's) does (`test_llama3_chat_template_differs_where_documented`)."""
    tok = toks[name]
    convs = list(CONVERSATIONS.values()) + [turns(f"{IMG}\nQ?", "A.", "More?", a) for a in EDGE_ANSWERS]
    if name == "llama3":
        same = [c for c in convs if llava_move_image(c) == llava_next_move_image(c)]
        convs = [c for c in same if all(v == v.strip() for _, v in llava_move_image(c))]
        assert len(convs) >= 10
    for conv in convs:
        a = encode(tok, conv, named, system)
        b = encode(tok, conv, "chat_template", jinja_system)
        assert (a.input_ids, a.labels, a.prompt_ids) == (b.input_ids, b.labels, b.prompt_ids)


def decoded_labels(tok, labels: list[int]) -> str:
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


@pytest.mark.parametrize("template", ["chatml", "chat_template"])
def test_qwen_trains_what_chatml_does(toks, template):
    """The "\\n" after <|im_end|> is a separator under both (named and Qwen2's own): masked, as generation
    stops at <|im_end|>; also for answers ending in whitespace."""
    tok = toks["qwen2"]
    enc = encode(tok, CONVERSATIONS["multi-turn image"], template)
    assert decoded_labels(tok, enc.labels) == "There are 3 shapes.<|im_end|>The blue square.<|im_end|>"
    enc = encode(tok, turns("Q?", "spaces \n", "More?", "\nnewlines\n\n"), template)
    assert decoded_labels(tok, enc.labels) == "spaces \n<|im_end|>\nnewlines\n\n<|im_end|>"


def test_chatml_labels_against_llava_next(toks):
    """What preprocess_qwen trains beyond chatml is exactly README's list: assistant headers, and the "\\n",
    <|im_start|> and <|im_end|> tokens outside answers; everything chatml trains, it trains too."""
    tok = toks["qwen2"]
    extra = {"<|im_start|>", "assistant", "\n", "<|im_end|>"}
    for conv in CONVERSATIONS.values():
        ours, theirs = encode(tok, conv, "chatml", QWEN_SYSTEM).labels, ref_qwen_labels(tok, conv, QWEN_SYSTEM)
        assert len(ours) == len(theirs)
        assert all(b == a for a, b in zip(ours, theirs) if a != IGNORE_INDEX)
        assert {tok.decode([b]) for a, b in zip(ours, theirs) if a == IGNORE_INDEX != b} == extra
    conv = CONVERSATIONS["multi-turn image"]
    assert decoded_labels(tok, ref_qwen_labels(tok, conv, QWEN_SYSTEM)) == (
        "<|im_start|>\n<|im_end|>\n"  # system
        "<|im_start|>\n\n<|im_end|>\n"  # user: the "\\n" after the header and the one after <image>
        "<|im_start|>assistant\nThere are 3 shapes.<|im_end|>\n"
        "<|im_start|>\n<|im_end|>\n"
        "<|im_start|>assistant\nThe blue square.<|im_end|>\n"
    )


def test_llama3_chat_template_differs_where_documented(toks):
    """Llama-3's own template trims each message, and chat_template places the image as LLaVA-NeXT does (a turn
    starting with it stays as written); the named llama3 is INF-LLaVA's (LLaVA's placement, text as written)."""
    tok = toks["llama3"]
    conv = turns(f"{IMG} Describe it.", " A dog. ")
    named, own = encode(tok, conv, "llama3", "S"), encode(tok, conv, "chat_template", "S")
    assert "user<|end_header_id|>\n\n<image>\nDescribe it.<|eot_id|>" in tok.decode(named.input_ids)
    assert "user<|end_header_id|>\n\n<image> Describe it.<|eot_id|>" in tok.decode(own.input_ids)
    assert decoded_labels(tok, named.labels) == " A dog. <|eot_id|>"
    assert decoded_labels(tok, own.labels) == "A dog.<|eot_id|>"


@pytest.mark.parametrize(
    "name, template", [("vicuna", "vicuna_v1"), ("llama3", "llama3"), ("qwen2", "chatml"), ("qwen2", "chat_template")]
)
def test_a_turn_with_several_images_is_kept_as_written(toks, name, template):
    """LLaVA-NeXT keeps a turn with several placeholders as written (chatml: its ids and labels); LLaVA-1.5 has
    no such records (its move would leave one placeholder for two images): the project keeps them under every
    template, so each placeholder can take its image."""
    tok = toks[name]
    image_id = tok.convert_tokens_to_ids(IMG)
    for first in [f"{IMG}\n{IMG}\nCompare them.", f"Compare {IMG} and {IMG} .", f"{IMG}{IMG}"]:
        conv = turns(first, "Alike.", "Sure?", "Yes.")
        enc = encode(tok, conv, template, QWEN_SYSTEM)
        assert enc.input_ids.count(image_id) == 2
        assert enc.input_ids == encode(tok, conv, template, QWEN_SYSTEM, image_first=False).input_ids
        if template == "chatml":
            check(enc, ref_qwen(tok, conv, QWEN_SYSTEM))


@pytest.mark.parametrize("name, template", [("llama3", "llama3"), ("qwen2", "chatml"), ("qwen2", "chat_template")])
def test_answer_starting_with_newline_stays_consistent_with_generation(toks, name, template):
    """References tokenise header "\\n\\n" (or "\\n") and an answer's leading "\\n" as one merged token
    that a model prompted with the header can never produce; here the prompt is the generation prompt
    and the answer is tokenised after it."""
    tok = toks[name]
    conv = turns(f"{IMG}\nWrite two lines.", "\nfirst line\nsecond line")
    enc = encode(tok, conv, template, QWEN_SYSTEM)
    stop = "<|eot_id|>" if name == "llama3" else "<|im_end|>"
    assert enc.input_ids[: len(enc.prompt_ids)] == enc.prompt_ids
    answer = tok(conv[1]["value"] + stop, add_special_tokens=False)["input_ids"]
    assert enc.input_ids[len(enc.prompt_ids) : len(enc.prompt_ids) + len(answer)] == answer
    assert [t for t in enc.labels if t != IGNORE_INDEX] == answer
    gen = encode(tok, turns(f"{IMG}\nWrite two lines.", "x"), template, QWEN_SYSTEM).prompt_ids
    assert enc.prompt_ids == gen


def test_vicuna_answer_containing_the_separator(toks):
    """LLaVA finds answers by splitting at " ASSISTANT: ", so an answer containing it masks the whole
    sample (a "tokenization mismatch"); here the answer is trained as written."""
    tok = toks["vicuna"]
    conv = turns("What does the log say?", "It says USER: hi ASSISTANT: hello.")
    enc = encode(tok, conv, "vicuna_v1")
    ids, labels, _ = ref_vicuna_v1(tok, conv, None)
    assert enc.input_ids == ids and all(t == IGNORE_INDEX for t in labels)
    trained = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tok.decode(trained) == "It says USER: hi ASSISTANT: hello.</s>"


def test_image_in_place_for_interleaved_text(toks):
    """image_first=False: the placeholder stays where the text puts it, ids as LLaVA would give them
    for that text (tokenizer_image_token without preprocess_multimodal)."""
    tok = toks["vicuna"]
    conv = CONVERSATIONS["image middle"]
    enc = encode(tok, conv, "vicuna_v1", image_first=False)
    prompt = f"{VICUNA_SYSTEM} USER: {conv[0]['value']} ASSISTANT: {conv[1]['value']}</s>"
    assert enc.input_ids == image_token_ids(tok, prompt)
    assert encode(tok, conv, "vicuna_v1").input_ids != enc.input_ids


def test_sentencepiece_only_directory_loads_as_llama(tokenizer_dir, toks):
    """A directory with only `tokenizer.model` gives the ids of the configured Vicuna directory."""
    bare = load_tokenizer(os.path.join(tokenizer_dir, "spm-only"))
    for conv in CONVERSATIONS.values():
        for t in conv:
            assert bare(t["value"])["input_ids"] == toks["vicuna"](t["value"])["input_ids"]
    assert bare("Hello world")["input_ids"] == [1, 15043, 3186]  # llama.cpp's ids, with LLaMA's BOS


def test_chat_template_whose_prefixes_are_not_prefixes_is_refused(toks, monkeypatch):
    """Llama-3-Instruct's first-release template writes the assistant header after every
    conversation, so answers cannot be located; the error names the named templates instead."""
    from datamodules.templates import TemplateError

    tok = toks["llama3"]
    tail = "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    fixed = "{% if add_generation_prompt %}" + tail + "{% endif %}"
    assert fixed in tok.chat_template
    monkeypatch.setattr(tok, "chat_template", tok.chat_template.replace(fixed, tail))
    with pytest.raises(TemplateError, match="use a named template"):
        encode(tok, CONVERSATIONS["multi-turn image"], "chat_template")


@pytest.mark.parametrize(
    "name, template",
    [("vicuna", "vicuna_v1"), ("vicuna", "plain"), ("llama3", "llama3"), ("llama3", "chat_template"),
     ("qwen2", "chatml"), ("qwen2", "chat_template"), ("qwen2", "plain")],
)  # fmt: skip
def test_prompt_is_a_prefix_and_only_answers_train(toks, name, template):
    """Whatever the answer's whitespace, generation's prompt is the start of the training ids and the
    trained tokens are the answers (with their end-of-turn marker) and nothing else."""
    tok = toks[name]
    for answer in EDGE_ANSWERS:
        conv = turns(f"{IMG}\nQ?", answer) if template == "plain" else turns(f"{IMG}\nQ?", "A.", "More?", answer)
        enc = encode(tok, conv, template)
        assert enc.input_ids[: len(enc.prompt_ids)] == enc.prompt_ids
        rest, labels = enc.input_ids[len(enc.prompt_ids) :], enc.labels[len(enc.prompt_ids) :]
        n = next((k for k, lab in enumerate(labels) if lab == IGNORE_INDEX), len(labels))
        assert n > 0 and labels[:n] == rest[:n]  # the last answer trains from the prompt's end ...
        assert all(lab == IGNORE_INDEX for lab in labels[n:]) and tok.decode(rest[n:]).strip() == ""  # ... to its end
        assert answer.strip() in tok.decode(rest[:n])
