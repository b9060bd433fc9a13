"""Conversation templates: LLaVA records -> token ids and labels (-100 everywhere but answers).

A template renders a conversation as text segments, each marked trainable or not, and each segment
is tokenised on its own (as LLaVA does per round), so label masks are exact by construction:

- plain      LLaVA's alignment format: `<image>` + caption + "\\n"; loss on the caption only.
- llama3     Llama-3-Instruct headers (INF-LLaVA's SFT template); loss on assistant text + <|eot_id|>.
- vicuna_v1  LLaVA-1.5's Vicuna format: "SYSTEM USER: q ASSISTANT: a</s>".
- chatml     <|im_start|>role\\ntext<|im_end|>\\n (Qwen and the built-in tokenizer).
- chat_template  the tokenizer's own Jinja chat template; assistant spans are found by rendering
                 each prefix of the conversation, so any template whose prefixes are prefixes works.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}
LLAMA3_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)


class TemplateError(ValueError):
    """A conversation the template cannot encode (the caller adds file and record id)."""


@dataclass
class Encoded:
    input_ids: list[int]  # [T], image placeholder not yet expanded
    labels: list[int]  # [T], IGNORE_INDEX outside answers
    prompt_ids: list[int]  # the conversation up to the last answer, ready for generation
    answer: str  # the last answer (the exact-match target)


def _segments(
    template: str, messages: list[tuple[str, str]], system: str | None, bos: str | None, generation_prompt: bool
) -> list[tuple[str, bool]]:
    """Text segments (text, trainable) for hand-written templates; messages are (user|assistant, text)."""
    segs: list[tuple[str, bool]] = []
    if template == "plain":
        if generation_prompt:
            return [(bos or "", False), ("<image>", False)]
        return [(bos or "", False), ("<image>", False), (messages[1][1] + "\n", True)]
    if template == "llama3":
        segs.append(("<|begin_of_text|>", False))
        sys_text = LLAMA3_SYSTEM if system is None else system
        if sys_text:
            segs.append((f"<|start_header_id|>system<|end_header_id|>\n\n{sys_text}<|eot_id|>", False))
        for role, text in messages:
            segs.append((f"<|start_header_id|>{role}<|end_header_id|>\n\n", False))
            segs.append((text + "<|eot_id|>", role == "assistant"))
        if generation_prompt:
            segs.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    elif template == "vicuna_v1":
        segs.append(((bos or "") + (VICUNA_SYSTEM if system is None else system), False))
        for role, text in messages:
            if role == "user":
                segs.append((f" USER: {text} ASSISTANT:", False))
            else:
                segs.append((f" {text}</s>", True))
    elif template == "chatml":
        if system:
            segs.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
        for role, text in messages:
            segs.append((f"<|im_start|>{role}\n", False))
            segs.append((text + "<|im_end|>", role == "assistant"))
            segs.append(("\n", False))
        if generation_prompt:
            segs.append(("<|im_start|>assistant\n", False))
    else:
        raise TemplateError(f"unknown template {template!r}")
    return segs


STOP_STRINGS = {"plain": "\n", "llama3": "<|eot_id|>", "vicuna_v1": "</s>", "chatml": "<|im_end|>"}


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end a generated answer under `template` (plus the tokenizer's EOS)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stop = STOP_STRINGS.get(template)
    if stop is not None:
        tok = tokenizer.encode(stop, add_special_tokens=False)
        if len(tok) == 1:
            ids.append(tok[0])
    return sorted(set(ids))


def to_messages(conversations: list[dict], template: str) -> list[tuple[str, str]]:
    """LLaVA turns -> [(user|assistant, text)], checking the human/gpt order."""
    if not conversations:
        raise TemplateError("no conversations")
    messages = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise TemplateError(f"turn {k} is not a {{'from', 'value'}} mapping")
        want = "human" if k % 2 == 0 else "gpt"
        if turn["from"] != want:
            raise TemplateError(f"turn {k} is from {turn['from']!r}, expected {want!r} (turns alternate human, gpt)")
        messages.append((ROLES[turn["from"]], str(turn["value"])))
    if len(messages) % 2:
        raise TemplateError("the conversation ends with a human turn (no answer to learn)")
    if template == "plain" and len(messages) != 2:
        raise TemplateError(f"the plain template takes one human/gpt pair, got {len(messages) // 2}")
    return messages


def encode(tokenizer, conversations: list[dict], template: str, system: str | None = None) -> Encoded:
    """Tokenise one LLaVA conversation under `template`; see the module docstring."""
    messages = to_messages(conversations, template)
    if template == "chat_template":
        return _encode_chat_template(tokenizer, messages, system)
    bos = tokenizer.bos_token
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in _segments(template, messages, system, bos, generation_prompt=False):
        tok = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids += tok
        labels += tok if trainable else [IGNORE_INDEX] * len(tok)
    prompt: list[int] = []
    for text, _ in _segments(template, messages[:-1], system, bos, generation_prompt=True):
        prompt += tokenizer.encode(text, add_special_tokens=False) if text else []
    return Encoded(ids, labels, prompt, messages[-1][1])


def _render(tokenizer, messages: list[tuple[str, str]], system: str | None, generation_prompt: bool) -> str:
    chat = ([{"role": "system", "content": system}] if system else []) + [
        {"role": r, "content": t} for r, t in messages
    ]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)


def _encode_chat_template(tokenizer, messages: list[tuple[str, str]], system: str | None) -> Encoded:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template 'chat_template' needs a tokenizer with a chat template")
    full = _render(tokenizer, messages, system, False)
    spans = []  # character spans of each answer (with its end-of-turn marker)
    for k in range(1, len(messages), 2):
        start = _render(tokenizer, messages[:k], system, True)
        end = _render(tokenizer, messages[: k + 1], system, False)
        if not (full.startswith(start) and full.startswith(end)):
            raise TemplateError(
                "the tokenizer's chat template does not render prefixes as prefixes; "
                "use a named template (llama3, chatml, vicuna_v1)"
            )
        spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE_INDEX for t, (s, _) in zip(ids, enc["offset_mapping"])]
    prompt = tokenizer(_render(tokenizer, messages[:-1], system, True), add_special_tokens=False)["input_ids"]
    return Encoded(ids, labels, list(prompt), messages[-1][1])
