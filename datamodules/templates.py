"""Conversation templates: LLaVA records -> token ids and labels (-100 everywhere but answers).

A template (one registered function in `TEMPLATES`) renders a conversation as text segments, each
marked trainable (an answer with its end-of-turn marker) or not. Each run of text between image
placeholders is tokenised whole, as LLaVA's `tokenizer_image_token` does chunk by chunk, so the ids
equal the reference implementations' on real tokenizers (tests/test_template_parity.py):

- plain      LLaVA's `preprocess_plain`: BOS <image> caption "\n"; loss on the caption and "\n".
- vicuna_v1  LLaVA-1.5 (`--version v1`, `conv_vicuna_v1`, `preprocess_v1`):
             BOS "SYSTEM USER: q ASSISTANT: a</s>USER: ..."; loss on " a</s>".
- llama3     INF-LLaVA's `conv_llama3` / `preprocess_llama3` with one <|begin_of_text|> (INF-LLaVA's
             system text carries one and the tokenizer adds another); loss on answer + <|eot_id|>.
- chatml     <|im_start|>role\ntext<|im_end|>\n (LLaVA-NeXT's `preprocess_qwen` ids, the built-in
             tokenizer); loss on answer + <|im_end|>, not the "\n" after it (never generated).
- chat_template  the tokenizer's own Jinja template; answers found by rendering each prefix of the
                 conversation, so any template whose prefixes render as prefixes works. Whitespace the
                 template writes after an end-of-turn special token is not trained, as in chatml.

Generation stays consistent with training: `prompt_ids` is `input_ids` cut before the last answer,
and a token that would straddle the end of a prompt and the start of an answer (a merged "\n\n\n" under
Llama-3 or Qwen when an answer starts with "\n") is never made: the text is tokenised on both sides
of that point, so training sees the prompt tokens generation feeds (the references merge it).

By default `<image>` is moved to the start of its turn and followed by "\n", by the rule of the template's
reference (`PLACEMENTS`): LLaVA's `preprocess_multimodal` for vicuna_v1, llama3 and plain, LLaVA-NeXT's (which
keeps a turn that already starts with the placeholder as written) for chatml and chat_template. A turn with
several placeholders is kept as written under both. `image_first=False` keeps every placeholder where the text
puts it (interleaved text).

Deliberate differences from the references: an empty or whitespace-only answer is refused (the references
would train only its end-of-turn marker); chatml trains an answer and its `<|im_end|>` only, where LLaVA-NeXT's
`preprocess_qwen` also trains the assistant header, the "\n" after `<|im_end|>` and every "\n", `<|im_start|>`
and `<|im_end|>` token of the system and user turns (none of which the model generates when it answers).

Each named template also carries its Jinja form (the same text for chat messages) and the special tokens its
markers are: inference/export.py writes the form into an exported processor, and the built-in dataset's
tokenizer takes chatml's form and tokens from here (`tokenizer_chat_template`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable

from foundation.errors import UserError
from foundation.registry import Registry

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}
IMAGE_TOKEN = "<image>"
# LLaVA's conv_vicuna_v1 (what LLaVA-1.5 trains with) and INF-LLaVA's conv_llama3 share this text.
LLAMA3_SYSTEM = VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)


class TemplateError(UserError):
    """A conversation the template cannot encode (the caller adds file and record id)."""


@dataclass
class Encoded:
    input_ids: list[int]  # [T], image placeholder not yet expanded
    labels: list[int]  # [T], IGNORE_INDEX outside answers
    prompt_ids: list[int]  # the conversation up to the last answer, ready for generation
    answer: str  # the last answer (the exact-match target)


Messages = list[tuple[str, str]]  # [(user | assistant, text)]
Segments = list[tuple[str, bool]]  # [(text, trainable)]


@dataclass(frozen=True)
class Template:
    """A registered conversation format.

    Attributes:
        segments: `(messages, system) -> [(text, trainable)]`. None for `chat_template`, which renders
            with the tokenizer's Jinja template.
        stop: the text that ends an answer (one token in the tokenizer for it to stop generation), or None.
        bos: the ids start with the BOS the tokenizer adds (`tokenizer(text)`, as LLaVA tokenises).
        jinja: the same format as a Jinja chat template over `messages` (None: none), written in terms of
            `bos` (the BOS text to write), `s.system` (the system text), `image` (the placeholder), the
            macros `text(m)` (a message's text) and `after(t)` (`t` with what an image needs after it);
            inference/export.py defines them for a processor, `tokenizer_chat_template` for a tokenizer.
        special_tokens: the markers a tokenizer must hold as single tokens for this format.
        placement: where `image_first` puts a turn's placeholder: the rule of this format's reference, a name
            in `PLACEMENTS`.
    """

    segments: Callable[[Messages, str | None], Segments] | None
    stop: str | None
    bos: bool = False
    jinja: str | None = None
    special_tokens: tuple[str, ...] = ()
    placement: str = "llava"


def _llava_placement(text: str, image_token: str) -> str:
    """LLaVA's (and INF-LLaVA's) `preprocess_multimodal`: the placeholder, "\n", then the rest of the turn
    without it, both ends stripped (the placeholder alone when nothing is left)."""
    return (image_token + "\n" + text.replace(image_token, "").strip()).strip()


def _llava_next_placement(text: str, image_token: str) -> str:
    """LLaVA-NeXT's `preprocess_multimodal`: LLaVA's, except that a turn already starting with the placeholder
    is kept as written ("<image>What?" gets no "\n"; its whitespace stays)."""
    return text if text.startswith(image_token) else _llava_placement(text, image_token)


# A turn with one placeholder under `image_first` -> its text (`move_image_first`).
PLACEMENTS: dict[str, Callable[[str, str], str]] = {"llava": _llava_placement, "llava_next": _llava_next_placement}

TEMPLATES = Registry("template")


def template(
    name: str,
    stop: str | None,
    bos: bool = False,
    jinja: str | None = None,
    special_tokens=(),
    placement: str = "llava",
):
    """Register `fn` as the segments of template `name` (the other arguments: `Template`'s)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"template {name!r}: placement {placement!r} is not one of {sorted(PLACEMENTS)}")

    def register(fn):
        TEMPLATES.register(name, Template(fn, stop, bos, jinja, tuple(special_tokens), placement))
        return fn

    return register


# For a tokenizer's own chat template: what `Template.jinja` is written in terms of, for string contents.
_TOKENIZER_PRELUDE = (
    "{% set bos = '' %}{% set image = '<image>' %}{% macro text(m) %}{{ m['content'] }}{% endmacro %}"
    "{% macro after(t) %}{{ t }}{% endmacro %}{% set s = namespace(system='') %}"
    "{% for m in messages if m['role'] == 'system' %}{% set s.system = m['content'] %}{% endfor %}"
)


def tokenizer_chat_template(name: str) -> str:
    """Template `name`'s Jinja form as a tokenizer's `chat_template` (string contents, no BOS written, the
    system text from a `system` message), e.g. the built-in dataset's tokenizer's chatml."""
    jinja = TEMPLATES.get(name).jinja
    if jinja is None:
        raise ValueError(f"template {name!r} has no Jinja form")
    return _TOKENIZER_PRELUDE + jinja


@template(
    "plain",
    stop="\n",
    bos=True,
    jinja="{{ bos }}{% set c = namespace(t=image) %}{% for m in messages if m['role'] == 'assistant' %}"
    "{% set c.t = c.t + text(m) + '\\n' %}{% endfor %}{{ after(c.t) }}",
)
def plain(messages: Messages, system: str | None) -> Segments:
    # LLaVA replaces the human turn by the placeholder alone.
    return [(IMAGE_TOKEN, False), (messages[1][1] + "\n", True)]


@template(
    "llama3",
    stop="<|eot_id|>",
    jinja="{{ bos }}{% if s.system %}<|start_header_id|>system<|end_header_id|>\n\n{{ s.system }}<|eot_id|>"
    "{% endif %}{% for m in messages if m['role'] != 'system' %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ text(m) }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
)
def llama3(messages: Messages, system: str | None) -> Segments:
    segs = [("<|begin_of_text|>", False)]
    sys_text = LLAMA3_SYSTEM if system is None else system
    if sys_text:
        segs.append((f"<|start_header_id|>system<|end_header_id|>\n\n{sys_text}<|eot_id|>", False))
    for role, text in messages:
        segs.append((f"<|start_header_id|>{role}<|end_header_id|>\n\n", False))
        segs.append((text + "<|eot_id|>", role == "assistant"))
    return segs


@template(
    "vicuna_v1",
    stop="</s>",
    bos=True,
    jinja="{{ bos }}{{ s.system }} {% for m in messages if m['role'] != 'system' %}"
    "{% if m['role'] == 'user' %}USER: {{ text(m) }}{% else %} ASSISTANT: {{ text(m) }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}",
)
def vicuna_v1(messages: Messages, system: str | None) -> Segments:
    # LLaVA's SeparatorStyle.TWO: system + " ", then "USER: q" + " " and "ASSISTANT: a" + "</s>".
    segs = [((VICUNA_SYSTEM if system is None else system) + " ", False)]
    for role, text in messages:
        if role == "user":
            segs.append((f"USER: {text} ASSISTANT:", False))
        else:
            segs.append((f" {text}</s>", True))
    return segs


# ChatML's markers: a turn is IM_START role "\n" text IM_END "\n".
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@template(
    "chatml",
    stop=IM_END,
    jinja=f"{{{{ bos }}}}{{% if s.system %}}{IM_START}system\n{{{{ s.system }}}}{IM_END}\n{{% endif %}}"
    f"{{% for m in messages if m['role'] != 'system' %}}{IM_START}{{{{ m['role'] }}}}\n{{{{ text(m) }}}}{IM_END}\n"
    f"{{% endfor %}}{{% if add_generation_prompt %}}{IM_START}assistant\n{{% endif %}}",
    special_tokens=(IM_START, IM_END),
    placement="llava_next",  # LLaVA-NeXT's preprocess_qwen is this format's reference
)
def chatml(messages: Messages, system: str | None) -> Segments:
    segs = [(f"{IM_START}system\n{system}{IM_END}\n", False)] if system else []
    for role, text in messages:
        segs.append((f"{IM_START}{role}\n", False))
        segs.append((text + IM_END, role == "assistant"))
        segs.append(("\n", False))
    return segs


# The tokenizer's own Jinja template: answers found by rendering prefixes (`_chat_template_segments`). LLaVA-NeXT,
# which trains with tokenizers' chat templates (Qwen's, Llama-3's), is its reference for the placement.
TEMPLATES.register("chat_template", Template(None, None, placement="llava_next"))


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end a generated answer under `template` (plus the tokenizer's EOS)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stop = TEMPLATES.get(template).stop
    if stop is not None:
        tok = tokenizer.encode(stop, add_special_tokens=False)
        if len(tok) == 1:
            ids.append(tok[0])
    return sorted(set(ids))


def to_messages(conversations: list[dict], template: str) -> list[tuple[str, str]]:
    """LLaVA turns -> [(user|assistant, text)], checking the human/gpt order."""
    if not conversations:
        raise TemplateError("no conversations")
    if not isinstance(conversations, list):
        raise TemplateError(f"'conversations' is a {type(conversations).__name__}, not a list of turns")
    messages = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise TemplateError(f"turn {k} is not a {{'from', 'value'}} mapping")
        want = "human" if k % 2 == 0 else "gpt"
        if turn["from"] != want:
            raise TemplateError(f"turn {k} is from {turn['from']!r}, expected {want!r} (turns alternate human, gpt)")
        value = turn["value"]
        # Never train on str(None) or str(3): a null or a number is a broken record, not text.
        if not isinstance(value, str):
            raise TemplateError(f"turn {k}: 'value' is {type(value).__name__} ({value!r}), not text")
        if want == "gpt" and not value.strip():
            raise TemplateError(f"turn {k}: empty answer (only the end-of-turn token would be learned)")
        messages.append((ROLES[turn["from"]], value))
    if len(messages) % 2:
        raise TemplateError("the conversation ends with a human turn (no answer to learn)")
    if template == "plain" and len(messages) != 2:
        raise TemplateError(f"the plain template takes one human/gpt pair, got {len(messages) // 2}")
    return messages


def move_image_first(messages: Messages, image_token: str = IMAGE_TOKEN, placement: str = "llava") -> Messages:
    """A turn with one placeholder, placed by `PLACEMENTS[placement]` (mostly `<image>\n` + the rest stripped).
    A turn with several is kept as written, as LLaVA-NeXT keeps it: LLaVA's rule would leave one placeholder for
    several images (LLaVA-1.5 trains one image per record)."""
    place = PLACEMENTS[placement]
    return [(role, place(text, image_token) if text.count(image_token) == 1 else text) for role, text in messages]


def encode(
    tokenizer,
    conversations: list[dict],
    template: str,
    system: str | None = None,
    image_first: bool = True,
    image_token: str = IMAGE_TOKEN,
) -> Encoded:
    """Tokenise one LLaVA conversation under `template`; see the module docstring.

    Args:
        tokenizer: the LLM's tokenizer (a fast one: token offsets are used).
        conversations: the record's turns.
        template: a name in `TEMPLATES`.
        system: system text; None takes the template's default.
        image_first: move the placeholder to the start of its turn (the template's `placement`); False keeps
            it in place.
        image_token: the placeholder string.
    """
    messages = to_messages(conversations, template)
    tpl = TEMPLATES.get(template)
    if image_first:
        messages = move_image_first(messages, image_token, tpl.placement)
    if tpl.segments is None:
        segments = _chat_template_segments(tokenizer, messages, system)
    else:
        segments = tpl.segments(messages, system)
    bos = _added_bos(tokenizer) if tpl.bos else []
    ids, labels, answer_start = _tokenize(tokenizer, segments, image_token)
    ids, labels = bos + ids, [IGNORE_INDEX] * len(bos) + labels
    return Encoded(ids, labels, ids[: len(bos) + answer_start], messages[-1][1])


def _added_bos(tokenizer) -> list[int]:
    """The BOS that `tokenizer(text)` puts first (LLaMA, Llama-3), else the tokenizer's BOS token
    when it names one without adding it (the built-in tokenizer); none for Qwen."""
    with_special = tokenizer("a")["input_ids"]
    plain_ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(plain_ids) and with_special[0] == tokenizer.bos_token_id:
        return [with_special[0]]
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def segment_layout(segments: Segments) -> tuple[str, list[int], list[bool], list[int]]:
    """Segments -> (their joined text, each non-empty segment's start offset, its trainable flag, the offsets where
    the text turns from prompt to answer or back: where no token may cross)."""
    text = "".join(t for t, _ in segments)
    bounds, flags, pos = [], [], 0
    for t, trainable in segments:
        if t:
            bounds.append(pos)
            flags.append(trainable)
            pos += len(t)
    return text, bounds, flags, [bounds[k] for k in range(1, len(bounds)) if flags[k] != flags[k - 1]]


def _tokenize(tokenizer, segments: Segments, image_token: str) -> tuple[list[int], list[int], int]:
    """Segments -> (ids, labels, index of the last answer's first token).

    The text is cut at each image placeholder and each piece is tokenised on its own (LLaVA's
    `tokenizer_image_token`; with SentencePiece the text after an image starts a new word). A token
    belongs to the segment its first character is in (SentencePiece's "▁word" starts at its space);
    where a token would cross from a prompt segment into an answer (or back), the piece is tokenised
    on both sides of that point instead, each side on its own.
    """
    text, bounds, flags, cuts = segment_layout(segments)
    ids: list[int] = []
    starts: list[int] = []  # character start of each token

    def piece(a: int, b: int) -> None:
        if a == b:
            return
        enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True)
        offsets = [(a + s, a + e) for s, e in enc["offset_mapping"]]
        cross = next((c for c in cuts if a < c < b and any(s < c < e for s, e in offsets)), None)
        if cross is not None:
            piece(a, cross)
            piece(cross, b)
            return
        ids.extend(enc["input_ids"])
        starts.extend(s for s, _ in offsets)

    a = 0
    while True:
        k = text.find(image_token, a)
        piece(a, len(text) if k < 0 else k)
        if k < 0:
            break
        ids.append(tokenizer.convert_tokens_to_ids(image_token))
        starts.append(k)
        a = k + len(image_token)
    trainable = [flags[bisect.bisect_right(bounds, s) - 1] for s in starts]
    labels = [t if tr else IGNORE_INDEX for t, tr in zip(ids, trainable)]
    last = max(k for k, tr in enumerate(trainable) if tr) if any(trainable) else len(ids)
    while last > 0 and trainable[last - 1]:
        last -= 1
    return ids, labels, last


def _render(tokenizer, messages: Messages, system: str | None, generation_prompt: bool) -> str:
    chat = ([{"role": "system", "content": system}] if system else []) + [
        {"role": r, "content": t} for r, t in messages
    ]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_template_segments(tokenizer, messages: Messages, system: str | None) -> Segments:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template 'chat_template' needs a tokenizer with a chat template")
    full = _render(tokenizer, messages, system, False)
    specials = [t for t in tokenizer.all_special_tokens if t]
    segs, done = [], 0
    for k in range(1, len(messages), 2):
        start = _render(tokenizer, messages[:k], system, True)
        end = _render(tokenizer, messages[: k + 1], system, False)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise TemplateError(
                "the tokenizer's chat template does not render prefixes as prefixes; "
                "use a named template (llama3, chatml, vicuna_v1)"
            )
        # Whitespace the template writes after the end-of-turn token ("<|im_end|>\n") separates turns:
        # not generated (generation stops at that token), so not trained, as in the named templates.
        stripped = end.rstrip()
        if any(stripped.endswith(t) for t in specials):
            end = stripped
        segs += [(full[done : len(start)], False), (full[len(start) : len(end)], True)]
        done = len(end)
    return segs + [(full[done:], False)]
