"""Exact token counts of templated conversations without tokenising them whole: the index build's fast path.

`templates.encode` tokenises each record's text piece by piece with offsets: about 1,500 multi-turn LLaVA records
a second on one core with a SentencePiece tokenizer, whose BPE runs over a whole piece at once. The count of a
piece is also the sum of the counts of its words, wherever no token can span two words:
- a tokenizer with a pre-tokenizer (Llama-3's and Qwen2's regex + byte level) never merges across its
  pre-tokens: the words are the pre-tokens, as the backend itself splits them;
- LLaMA / Vicuna's SentencePiece BPE (Metaspace without a split) has no token with "▁" after another character
  (checked on the vocabulary), so no merge crosses a space: the words are the runs "▁*[^▁]+".
Each distinct word is tokenised once and its count cached; LLaVA data repeats its words, so most are look-ups.
The text between two added tokens (a section: the backend splits added tokens out first and the rest section by
section) is counted once too while short, so the template's own (Llama-3's role headers, its default system
prompt) and recurring short answers cost one look-up. With a position-free split and the placeholder an added
token, a record's text is one piece. Llama-3's split runs in the standard `re` on ASCII sections (checked equal to
the `regex` module's at start), and its byte-level map is one `str.translate`. On the benchmark's Llama-3 records
(bench/bench_data_scale.py) this counts at about Vicuna's speed; tokenising in batches with the backend
(`encode_batch`, Rust, its own threads) was measured at half the speed of the cached words, so it is not used.

Where a piece would be cut between a prompt and an answer inside a word (`templates._tokenize` then tokenises
both sides on their own) the count is not attempted: `count` returns None and the caller encodes the record in
full. The index build also encodes a sample of records in full and falls back to full encoding for the whole
file if a count ever differs (datamodules/record_index.py), and tests/test_record_index.py and
tests/test_token_count.py compare counts with `encode` on the real LLaMA, Llama-3 and Qwen2 tokenizers.
"""

from __future__ import annotations

import itertools
import json
import re

import regex

from datamodules.templates import TEMPLATES, _added_bos, move_image_first, segment_layout, to_messages

CACHE_WORDS = 1 << 21  # distinct words kept (about 200 MB at most); LLaVA-665K has far fewer
CACHE_SECTIONS, SECTION_CHARS = 1 << 16, 256  # sections between added tokens kept whole: about 40 MB a dict at most
# Pre-tokenizers whose split of a text section does not depend on where the section starts.
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
        self.segments, self.placement = TEMPLATES.get(template).segments, TEMPLATES.get(template).placement
        self.bos = len(_added_bos(tokenizer)) if TEMPLATES.get(template).bos else 0
        self.cache: dict[str, int] = {}  # word -> tokens
        # section (with the cuts inside it, if any) -> tokens; known_first: a piece's first section
        self.known: dict[str | tuple, int] = {}
        self.known_first: dict[str | tuple, int] = {}
        self.byte_map: dict[int, str] | None = None
        self.ascii_split = None  # regex mode: the pattern for ASCII text in the standard `re` (twice as fast)
        self.whole = False
        self.why_not = self._analyse(tokenizer)  # None: the fast path is open

    def _analyse(self, tokenizer) -> str | None:
        if self.segments is None:
            return f"template {self.template!r} renders through the tokenizer's Jinja template"
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return f"{type(tokenizer).__name__} has no `tokenizers` backend"
        # The parts read one by one: the whole tokenizer's JSON (`to_str`, Llama-3's 9 MB) cost 0.7 s a process.
        added = list(backend.get_added_tokens_decoder().values())
        if any(t.lstrip or t.rstrip or t.single_word for t in added):
            return "an added token strips whitespace or matches single words only"
        self.backend, self.model, self.normalizer = backend, backend.model, backend.normalizer
        contents = sorted({t.content for t in added}, key=len, reverse=True)  # longest match first, as the backend
        self.added = re.compile("(" + _trie(contents) + ")") if contents else None
        # Where no word depends on its place (not Metaspace, whose prefix goes on a piece's first word), a record's
        # text is one piece: the placeholder an added token like the others, which no other one overlaps.
        whole = self.image_token in contents and not any(_overlap(t, self.image_token) for t in contents)
        pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
        kind = pre.get("type")
        if kind == "Metaspace" and not pre.get("split", True) and type(backend.model).__name__ in ("BPE", "Unigram"):
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
            self.ascii_split = _ascii_split(split["pattern"]["Regex"], self.split)
            self.byte_map, self.whole = _byte_map(), whole
            return None
        for part in parts:
            byte_level = part.get("type") == "ByteLevel" and not part.get("add_prefix_space")
            if not (byte_level or part.get("type") in POSITION_FREE):
                return f"pre-tokenizer {part.get('type')!r} is not one whose words are position-free"
        if not parts or not parts[0]:
            return "no pre-tokenizer and no Metaspace: a token may span any two words"
        self.mode, self.whole = "pretokens", whole
        return None

    def count(self, conversations: list[dict]) -> int | None:
        """Tokens of the record's ids before image expansion, or None (encode it in full). Raises
        `TemplateError` as `encode` does for a conversation the template cannot take."""
        messages = to_messages(conversations, self.template)
        if self.image_first:  # by the template's rule, as `encode` places it (LLaVA-NeXT's keeps the whitespace)
            messages = move_image_first(messages, self.image_token, self.placement)
        if self.why_not is not None:
            return None
        segments = self.segments(messages, self.system)
        text, _, _, cuts = segment_layout(segments)
        if self.whole:  # the placeholder is an added token: one id, and the text around it split there anyway
            n = self._piece(text, cuts)
            return None if n is None else self.bos + n
        token, total, a = self.image_token, self.bos, 0
        while True:
            k = text.find(token, a)
            end = len(text) if k < 0 else k
            if a < end:
                n = self._piece(text[a:end], [c - a for c in cuts if a < c < end])
                if n is None:
                    return None
                total += n
            if k < 0:
                return total
            total += 1  # the placeholder, one id before expansion
            a = k + len(token)

    def _piece(self, piece: str, cuts: list[int]) -> int | None:
        """Tokens of one placeholder-free piece: its added tokens one id each, each section between them counted
        on its own (the backend splits added tokens out first). `cuts` (offsets in the piece, in order) must each
        fall where a word starts: no token crosses them."""
        sections = self.added.split(piece) if self.added else [piece]
        ends = list(itertools.accumulate(map(len, sections)))  # odd items are the added tokens: one id each
        n, j, m, known, known_first = len(sections) // 2, 0, len(cuts), self.known, self.known_first
        for k in range(0, len(sections), 2):
            section = sections[k]
            if not section:
                continue
            end = ends[k]
            start = end - len(section)
            while j < m and cuts[j] <= start:
                j += 1
            if j < m and cuts[j] < end:  # cuts inside: each must fall where a word starts
                inner = tuple(c - start for c in cuts[j:] if c < end)
                key = (section, inner)
            else:
                inner, key = (), section
            # The template's own sections (role headers, the default system prompt) and short answers recur: counted
            # once. A Metaspace prefix depends on the section being the piece's first.
            cache = known_first if start == 0 else known
            counted = cache.get(key)
            if counted is None:
                counted = self._section(section, start, inner)
                if counted is None:
                    return None
                if len(section) <= SECTION_CHARS:
                    if len(cache) > CACHE_SECTIONS:
                        cache.clear()
                    cache[key] = counted
            n += counted
        return n

    def _section(self, section: str, start: int, cuts: tuple[int, ...]) -> int | None:
        if self.normalizer is not None and self.normalizer.normalize_str(section) != section:
            return None  # the normaliser moves characters: word offsets would not be the text's
        if self.mode == "metaspace":
            if cuts and not all(section[c] == " " and section[c - 1] != " " for c in cuts):
                return None  # a word starts at a space after a non-space ("▁*[^▁]+")
            spaced = section.replace(" ", self.space)
            # The backend's Metaspace adds the prefix only where the text does not start with a space already.
            prefix = (self.prepend == "always" or (self.prepend == "first" and start == 0)) and spaced[0] != self.space
            words = self.words.findall(self.space + spaced if prefix else spaced)
        elif self.mode == "regex":
            split = self.ascii_split if self.ascii_split is not None and section.isascii() else self.split
            words = split.findall(section)
            if len("".join(words)) != len(section):  # text the pattern leaves out: the backend would keep it
                return None
            if cuts and not _starts_words(words, cuts):
                return None
        else:
            split = self.backend.pre_tokenizer.pre_tokenize_str(section)
            if cuts and not set(cuts) <= {s for _, (s, _) in split}:
                return None
            words = [word for word, _ in split]
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
        if self.byte_map is not None and word.isascii():
            # ByteLevel's mapping as one str.translate (each UTF-8 byte a character: latin-1 maps them 1:1); the
            # `regex` module and the backend's Oniguruma split ASCII text alike (tests/test_token_count.py).
            return len(self.model.tokenize(word.encode().decode("latin-1").translate(self.byte_map)))
        return sum(len(self.model.tokenize(w)) for w, _ in self.backend.pre_tokenizer.pre_tokenize_str(word))


def _starts_words(words: list[str], cuts: tuple[int, ...]) -> bool:
    """Whether each cut (in order) falls where one of `words` (a split of a text, in order) starts. The cuts lie
    near a section's start (after "\\n\\n" in Llama-3's answers): the words are walked only that far."""
    pos, k = 0, 0
    for c in cuts:
        while pos < c:
            pos += len(words[k])
            k += 1
        if pos != c:
            return False
    return True


def _ascii_split(pattern: str, split) -> re.Pattern | None:
    """`pattern` (the `regex` module's, Unicode classes) for ASCII text in the standard `re`, which runs
    Llama-3's split twice as fast: \\p{L} is [a-zA-Z] there, \\p{N} [0-9], and re.ASCII keeps \\s, \\d, \\w to
    ASCII, as they are on ASCII text. None where the pattern names another property, or where the two patterns
    split any string of up to two ASCII characters, or of three from a mixed alphabet, differently."""
    out, inside, k = [], False, 0
    while k < len(pattern):
        ch = pattern[k]
        if ch == "\\":
            escape = pattern[k : k + 5] if pattern[k + 1 : k + 2] in ("p", "P") else pattern[k : k + 2]
            if escape in (r"\p{L}", r"\p{N}"):
                chars = "a-zA-Z" if escape == r"\p{L}" else "0-9"
                out.append(chars if inside else f"[{chars}]")
            elif escape[1] in "pPXNu":  # another property, a grapheme, a named or \\u character: not translated
                return None
            else:
                out.append(escape)
            k += len(escape)
            continue
        if ch == "[" and not inside:
            inside = True
            out.append(pattern[k : k + 2] if pattern[k + 1 : k + 2] in ("^", "]") else ch)
            k += len(out[-1])
            continue
        inside = inside and ch != "]"
        out.append(ch)
        k += 1
    try:
        ascii_split = re.compile("".join(out), re.ASCII)
    except re.error:
        return None
    chars = [chr(c) for c in range(128)]
    mixed = " \t\n\r\x0b\x1c'aZsSdLl09.,!-_"
    probes = chars + [a + b for a in chars for b in chars] + ["".join(t) for t in itertools.product(mixed, repeat=3)]
    probes += ["I'm here", "we'LL  go\n\n  now  ", "x 123456 y", "?!\n\r\n a", "  \t\n"]
    if any(ascii_split.findall(p) != split.findall(p) for p in probes):
        return None
    return ascii_split


def _overlap(a: str, b: str) -> bool:
    """Whether added tokens `a` and `b` differ and could match overlapping text (one inside the other, or an end
    of one the start of the other)."""
    if a == b:
        return False
    return a in b or b in a or any(a.endswith(b[:k]) or b.endswith(a[:k]) for k in range(1, min(len(a), len(b))))


def _byte_map() -> dict[int, str] | None:
    """ByteLevel's byte -> character map as a `str.translate` table over latin-1 text, or None where the
    backend's own ByteLevel maps otherwise. GPT-2's scheme: the printable bytes ("!".."~", "¡".."¬", "®".."ÿ")
    stand for themselves, every other byte, in order, for chr(256 + k)."""
    from tokenizers import pre_tokenizers

    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in kept]
    table = {b: chr(b) for b in kept} | {b: chr(256 + k) for k, b in enumerate(others)}
    probe = "".join(map(chr, range(256))) + "\u00e9\u65e5\u2581\U0001f600"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    theirs = "".join(w for w, _ in byte_level.pre_tokenize_str(probe))
    return table if probe.encode().decode("latin-1").translate(table) == theirs else None


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
