"""CIDEr-D for captions (COCO, NoCaps, TextCaps), restating the COCO caption evaluation's `Cider`
(salaniz/pycocoevalcap `cider/cider_scorer.py::CiderScorer`, the code behind published CIDEr).

Per image: n-gram counts (n = 1..4) of the candidate and of each reference, weighted by TF-IDF with
the document frequency taken over the evaluated images' reference sets
(weight = tf * (log #images - log max(1, df))); for each n, the clipped cosine
sum_g min(c_g, r_g) * r_g / (|c| |r|), times a Gaussian length penalty exp(-delta^2 / (2 * 6^2));
averaged over n, summed over references, divided by their number, times 10. The corpus score is the
mean over images. Kept quirks: delta counts *bigrams*, not words, and the IDF is computed on the
evaluated split, so one image alone scores 0.

pycocoevalcap (1.2, 104 MB with Java jars) is the reference the tests compare against; it is not a
runtime dependency here. Its tokenizer is Stanford CoreNLP's PTBTokenizer in Java; `ptb_tokenize` is a
Python approximation (lower-case, split clitics and punctuation, drop the punctuation tokens the COCO
code drops). Pass `tokenize=False` with text tokenized by the Java tool for exact COCO numbers.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from metrics.common import check_lengths

NGRAMS = 4
SIGMA = 6.0
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# Words PTB splits in two ("cannot" -> "can not").
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na", "lemme": "lem me"}
_TOKEN = re.compile(
    r"(?:[a-z]\.){2,}"  # acronyms keep their periods: "u.s.", "p.m."
    r"|\d+(?:[.,:/-]\d+)+"  # numbers keep inner marks: "2,000", "5:30", "3.5"
    r"|n't|'[a-z]+"  # clitics split off by _CLITIC
    r"|[a-z0-9]+(?:[-.'/][a-z0-9]+)*"  # words, hyphenated words kept whole
    r"|\S"
)
# PTB writes brackets as escapes; lower-cased, the COCO wrapper keeps them (its list has upper-case ones).
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Tokens the COCO tokenizer wrapper removes after tokenization (quotes and sentence marks).
_PUNCTUATION = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'})


def ptb_tokenize(text: str) -> str:
    """Approximate COCO caption tokenization (Stanford PTBTokenizer -lowerCase, then the punctuation
    tokens dropped): clitics split ("don't" -> "do n't"), brackets as "-lrb-" etc."""
    text = _CLITIC.sub(r" \1", text.replace("\n", " ").lower())
    tokens = []
    for token in _TOKEN.findall(text):
        token = _BRACKETS.get(token, _SPLIT_WORDS.get(token, token))
        if token not in _PUNCTUATION:
            tokens.append(token)
    return " ".join(tokens)


def _ngrams(sentence: str) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, NGRAMS + 1) for i in range(len(words) - k + 1))


def _tfidf(counts: Counter, df: Counter, log_images: float) -> tuple[list[dict], list[float], int]:
    """Per-n TF-IDF vectors, their norms, and the bigram count (the official "length")."""
    vec: list[dict] = [{} for _ in range(NGRAMS)]
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, norms, length


def _similarity(cand: tuple, ref: tuple, sigma: float) -> float:
    (vc, nc, lc), (vr, nr, lr) = cand, ref
    penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
    total = 0.0
    for n in range(NGRAMS):
        dot = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vc[n].items())
        if nc[n] != 0 and nr[n] != 0:
            dot /= nc[n] * nr[n]
        total += dot * penalty
    return total / NGRAMS


def cider_scores(candidates: list[str], references: list[list[str]], sigma: float = SIGMA) -> list[float]:
    """CIDEr-D of each candidate (already tokenized, space-separated) against its references."""
    check_lengths(candidates, references)
    cand_counts = [_ngrams(c) for c in candidates]
    ref_counts = [[_ngrams(r) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in ref_counts:
        df.update({gram for counts in refs for gram in counts})
    log_images = math.log(float(len(candidates))) if candidates else 0.0
    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        if not refs:
            raise ValueError("CIDEr needs at least one reference caption per image")
        vc = _tfidf(cand, df, log_images)
        scores.append(10.0 * sum(_similarity(vc, _tfidf(r, df, log_images), sigma) for r in refs) / len(refs))
    return scores


def cider(
    predictions: list[str], references: list[list[str]], tokenize: bool = True, sigma: float = SIGMA
) -> dict[str, float]:
    """Corpus CIDEr-D (the COCO "CIDEr"; published tables print it x100).

    Args:
        predictions: one generated caption per image.
        references: per image, its reference captions.
        tokenize: run `ptb_tokenize` on both sides; False when they are tokenized already.
        sigma: the length penalty's standard deviation (6 in CIDEr-D).
    """
    if tokenize:
        predictions = [ptb_tokenize(p) for p in predictions]
        references = [[ptb_tokenize(r) for r in refs] for refs in references]
    scores = cider_scores(predictions, references, sigma)
    return {"cider": sum(scores) / len(scores) if scores else 0.0}
