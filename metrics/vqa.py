"""VQA accuracy (VQAv2, TextVQA, VizWiz): min(#humans who gave the answer / 3, 1), averaged over the
10-choose-9 subsets of the human answers, after the official answer normalisation.

Three protocols, each equal to the scoring LLaVA-1.5 numbers come from:

- `vqav2`: LLaVA's `scripts/convert_vqav2_for_submission.py` passes every prediction through
  `EvalAIAnswerProcessor` (haotian-liu/LLaVA `llava/eval/m4c_evaluator.py`), then the evaluation
  server runs the official `VQAEval.evaluate` (GT-Vision-Lab/VQA
  `PythonEvaluationTools/vqaEvaluation/vqaEval.py`): whitespace-normalise, and only when the human
  answers are not all identical, apply `processPunctuation` + `processDigitArticle` to both sides.
- `textvqa`: LLaVA's `llava/eval/eval_textvqa.py` -> `TextVQAAccuracyEvaluator.eval_pred_list`
  (`m4c_evaluator.py`): `EvalAIAnswerProcessor` on the prediction and on every human answer.
- `vizwiz`: LLaVA's `scripts/convert_vizwiz_for_submission.py` (`EvalAIAnswerProcessor`), then the
  VizWiz server's `VQAEval.evaluate` (vizwiz.org VQA evaluation, a fork of the VQA one): the prediction
  is always punctuation/digit/article-processed, the human answers are compared as given.
  Known difference: that fork's contraction table uses typographic apostrophes (’); ours uses "'",
  which only matters for an answer that is a listed contraction.

`preprocess=False` drops the LLaVA submission step (scores a raw prediction as the server would).
Quirks of the official code kept on purpose (they change numbers): the period regex strips only the
first 32 periods (`re.UNICODE` lands in `sub`'s count argument), and its "lookbehind" is a lookahead,
so any "." not followed by a digit is removed; the comma rule switches *all* punctuation to
deletion when a digit,digit pattern occurs anywhere in the answer.
"""

from __future__ import annotations

import re
from typing import Sequence

from metrics.common import check_lengths, mean

# Contractions written without an apostrophe -> the annotators' form (the official table, quirks
# such as "somebody'd" -> "somebodyd" included: they decide matches on real answers).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# A "." that is not followed by a digit (see the module docstring for why that is the official rule).
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_REMOVED = 32  # the official call passes re.UNICODE (== 32) as `count`
_DIGIT_COMMA_DIGIT = {"vqa": re.compile(r"\d,\d"), "evalai": re.compile(r"\d,+\d")}

PROTOCOLS = ("vqav2", "textvqa", "vizwiz")


def process_punctuation(text: str, comma_rule: str = "vqa") -> str:
    """`processPunctuation`: each listed mark is deleted when it touches a space (or when the answer
    holds digit,digit anywhere), else replaced by a space; then periods not before a digit go."""
    delete_all = _DIGIT_COMMA_DIGIT[comma_rule].search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = (mark + " ") in text or (" " + mark) in text  # tested on the input, as officially
        out = out.replace(mark, "" if touches_space or delete_all else " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """`processDigitArticle`: lower-case words, number words -> digits, drop articles, restore contractions."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def evalai_normalize(answer: str) -> str:
    """`EvalAIAnswerProcessor.__call__` (m4c_evaluator.py): lower-case, drop "," and "?", split "'s",
    then the VQA punctuation and digit/article rules."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _clean_whitespace(text)
    return process_digit_article(process_punctuation(text, comma_rule="evalai"))


def leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the human answers i of min(1, #{j != i : answers[j] == prediction} / 3)."""
    matches = sum(a == prediction for a in answers)
    return sum(min(1.0, (matches - (a == prediction)) / 3) for a in answers) / len(answers)


def vqa_score(prediction: str, answers: Sequence[str], protocol: str = "vqav2", preprocess: bool = True) -> float:
    """One question's score in [0, 1] under `protocol` (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown VQA protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    if protocol == "textvqa":
        return leave_one_out_accuracy(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])
    pred = _clean_whitespace(evalai_normalize(prediction) if preprocess else prediction)
    if protocol == "vizwiz":
        return leave_one_out_accuracy(process_digit_article(process_punctuation(pred)), list(answers))
    gts = [_clean_whitespace(a) for a in answers]
    if len(set(gts)) > 1:  # the official evaluator normalises only when the humans disagree
        pred = process_digit_article(process_punctuation(pred))
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
    return leave_one_out_accuracy(pred, gts)


def vqa_accuracy(
    predictions: list[str], references: list[list[str]], protocol: str = "vqav2", preprocess: bool = True
) -> dict[str, float]:
    """VQA accuracy in [0, 1] (the official code prints 100x this).

    Args:
        predictions: one generated answer per question.
        references: per question, the human answers (10 for VQAv2 / TextVQA / VizWiz).
        protocol: "vqav2", "textvqa" or "vizwiz" (see the module docstring).
        preprocess: apply LLaVA's submission step (`EvalAIAnswerProcessor`) before the server's rules;
            ignored by "textvqa", whose evaluator always applies it.
    """
    check_lengths(predictions, references)
    scores = [vqa_score(p, r, protocol, preprocess) for p, r in zip(predictions, references)]
    return {"accuracy": mean(scores)}
