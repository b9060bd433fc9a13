"""Exact token counts of templated conversations without tokenising them whole: the index build's fast path.

`templates.encode` tokenises each record's text piece by piece with offsets: about 1,500 multi-turn LLaVA records
a second on one core with a SentencePiece tokenizer, whose BPE runs over a whole piece at once. The count of a
piece is also the sum of the counts of its words, wherever no token can span two words:
- a tokenizer with a pre-tokenizer (Llama-3's and Qwen2's regex + byte level) never merges across its
  pre-tokens: the words are the pre-tokens, as the backend itself splits them;
- LLaMA / Vicuna's SentencePiece BPE (Metaspace without a split) has no token with "▁" after another character
  (checked on the vocabulary), so no merge crosses a space: the words are the runs "▁*[^▁]+".
Each distinct word is tokenised once and its count cached; LLaVA data repeats its words, so most are look-ups.

Where a piece would be cut between a prompt and an answer inside a word (`templates._tokenize` then tokenises
both sides on their own) the count is not attempted: `count` returns None and the caller encodes the record in
full. The index build also encodes a sample of records in full and falls back to full encoding for the whole
file if a count ever differs (datamodules/record_index.py), and tests/test_record_index.py compares counts with
`encode` on the real LLaMA, Llama-3 and Qwen2 tokenizers.
"""

from __future__ import annotations

import json
import re

import regex

from datamodules.templates import TEMPLATES, _added_bos, move_image_first, segment_layout, to_messages

# Pre-tokenizers whose split of a text section does not depend on where the section starts.
CACHE_WORDS = 1 << 21  # distinct words kept (about 200 MB at most); LLaVA-665K has far fewer
POSITION_FREE = {"Split", "Whitespace", "WhitespaceSplit", "Digits", "Punctuation", "BertPreTokenizer"}


class TokenCounter:
    """Counts `len(templates.encode(...).input_ids)` for a record, or says it cannot (None).

    Args:
        tokenizer: the LLM's tokenizer (a transformers tokenizer over a `tokenizers` backend).
        template: a `TEMPLATES` name.
        system: the system prompt (None: the template's default).
        image_first: as `templates.encode`.
        image_token: the placeholder string.
    """

    def __init__(self, tokenizer, template: str, system: str | None, image_first: bool, image_token: str) -> None:
        self.template, self.system, self.image_first, self.image_token = template, system, image_first, image_token
        self.segments = TEMPLATES.get(template).segments
        self.bos = len(_added_bos(tokenizer)) if TEMPLATES.get(template).bos else 0
        self.cache: dict[str, int] = {}
        self.why_not = self._analyse(tokenizer)  # None: the fast path is open

    def _analyse(self, tokenizer) -> str | None:
        if self.segments is None:
            return f"template {self.template!r} renders through the tokenizer's Jinja template"
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return f"{type(tokenizer).__name__} has no `tokenizers` backend"
        spec = json.loads(backend.to_str())
        added = spec.get("added_tokens") or []
        if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
            return "an added token strips whitespace or matches single words only"
        self.backend, self.model, self.normalizer = backend, backend.model, backend.normalizer
        contents = sorted({t["content"] for t in added}, key=len, reverse=True)  # longest match first, as the backend
        self.added = re.compile("(" + _trie(contents) + ")") if contents else None
        pre = spec.get("pre_tokenizer") or {}
        kind = pre.get("type")
        if kind == "Metaspace" and not pre.get("split", True) and spec["model"]["type"] in ("BPE", "Unigram"):
            space = pre["replacement"]
            inner = re.compile(f"[^{re.escape(space)}]{re.escape(space)}")
            if any(inner.search(piece) for piece in backend.get_vocab()):
                return f"a vocabulary token holds {space!r} after another character"
            self.mode, self.space, self.prepend = "metaspace", space, pre.get("prepend_scheme", "always")
            self.words = re.compile(f"{re.escape(space)}*[^{re.escape(space)}]+|{re.escape(space)}+")
            return None
        parts = pre.get("pretokenizers", [pre]) if kind == "Sequence" else [pre]
        split = parts[0] if len(parts) == 2 and parts[0].get("type") == "Split" else {}
        if (
            "Regex" in split.get("pattern", {})
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("add_prefix_space")
            and not parts[1].get("use_regex", True)
        ):
            # Llama-3 / Qwen2: the split regex run here (the `regex` module reads \p{L}), each new word mapped to
            # bytes by the backend; one backend call a word instead of one a text section.
            self.mode, self.split = "regex", regex.compile(split["pattern"]["Regex"])
            return None
        for part in parts:
            byte_level = part.get("type") == "ByteLevel" and not part.get("add_prefix_space")
            if not (byte_level or part.get("type") in POSITION_FREE):
                return f"pre-tokenizer {part.get('type')!r} is not one whose words are position-free"
        if not parts or not parts[0]:
            return "no pre-tokenizer and no Metaspace: a token may span any two words"
        self.mode = "pretokens"
        return None

    def count(self, conversations: list[dict]) -> int | None:
        """Tokens of the record's ids before image expansion, or None (encode it in full). Raises
        `TemplateError` as `encode` does for a conversation the template cannot take."""
        messages = to_messages(conversations, self.template)
        if self.image_first:
            messages = move_image_first(messages, self.image_token)
        if self.why_not is not None:
            return None
        segments = self.segments(messages, self.system)
        text, _, _, cuts = segment_layout(segments)
        total, a = self.bos, 0
        while True:
            k = text.find(self.image_token, a)
            end = len(text) if k < 0 else k
            n = self._piece(text, a, end, [c for c in cuts if a < c < end])
            if n is None:
                return None
            total += n
            if k < 0:
                return total
            total += 1  # the placeholder, one id before expansion
            a = k + len(self.image_token)

    def _piece(self, text: str, a: int, b: int, cuts: list[int]) -> int | None:
        if a == b:
            return 0
        piece = text[a:b]
        sections = self.added.split(piece) if self.added else [piece]
        n, start, spans = 0, 0, []
        for k, section in enumerate(sections):
            if k % 2:  # an added token: one id
                n += 1
            elif section:
                counted = self._section(section, start)
                if counted is None:
                    return None
                n += counted
                spans.append((start, start + len(section)))
            start += len(section)
        for c in cuts:  # each must fall where a word starts: no token crosses it
            c -= a
            inside = next(((s, e) for s, e in spans if s < c < e), None)
            if inside is not None and not self._word_starts_at(piece, inside, c):
                return None
        return n

    def _word_starts_at(self, piece: str, section: tuple[int, int], c: int) -> bool:
        if self.mode == "metaspace":
            return piece[c] == " " and piece[c - 1] != " "
        s, e = section
        if self.mode == "regex":
            return any(s + m.start() == c for m in self.split.finditer(piece[s:e]))
        return any(s + start == c for _, (start, _) in self.backend.pre_tokenizer.pre_tokenize_str(piece[s:e]))

    def _section(self, section: str, start: int) -> int | None:
        if self.normalizer is not None and self.normalizer.normalize_str(section) != section:
            return None  # the normaliser moves characters: word offsets would not be the text's
        if self.mode == "metaspace":
            spaced = section.replace(" ", self.space)
            # The backend's Metaspace adds the prefix only where the text does not start with a space already.
            prefix = (self.prepend == "always" or (self.prepend == "first" and start == 0)) and spaced[0] != self.space
            words = self.words.findall(self.space + spaced if prefix else spaced)
        elif self.mode == "regex":
            words = self.split.findall(section)
            if sum(map(len, words)) != len(section):  # text the pattern leaves out: the backend would keep it
                return None
        else:
            words = [word for word, _ in self.backend.pre_tokenizer.pre_tokenize_str(section)]
        cache = self.cache
        try:
            return sum(map(cache.__getitem__, words))
        except KeyError:
            if len(cache) > CACHE_WORDS:
                cache.clear()
            for word in words:
                if word not in cache:
                    cache[word] = self._tokens(word)
            return sum(map(cache.__getitem__, words))

    def _tokens(self, word: str) -> int:
        if self.mode != "regex":
            return len(self.model.tokenize(word))
        return sum(len(self.model.tokenize(w)) for w, _ in self.backend.pre_tokenizer.pre_tokenize_str(word))


def _trie(words: list[str]) -> str:
    """One regex alternation of `words` as a trie, longest match first: Llama-3's 256 added tokens as a plain
    alternation cost 37 us a text piece."""
    root: dict = {}
    for word in words:
        node = root
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        alts = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(root)
