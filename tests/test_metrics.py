"""Benchmark metrics against the official scoring code.

Expected numbers are what the official code returns on these hand-made cases: run live where it is
pip-installable and offline (pycocoevalcap's `Cider`, and its Java PTB tokenizer when Java is there),
otherwise computed with that code and written here with a comment naming the file and function. The
official scripts print percentages; our metrics return fractions, so the numbers below are /100.
"""

from __future__ import annotations

import shutil

import pytest

from metrics import METRICS
from metrics.anls import anls_score, levenshtein
from metrics.caption import cider, cider_scores, ptb_tokenize
from metrics.choice import FAILED, parse_mmbench, parse_scienceqa
from metrics.pope import parse_yes_no
from metrics.vqa import evalai_normalize, process_digit_article, process_punctuation, vqa_score

# ---------------------------------------------------------------------------------------------------
# VQA accuracy
# (prediction, 10 human answers, protocol, preprocess, score)
# vqav2 / vizwiz with preprocess: LLaVA scripts/convert_{vqav2,vizwiz}_for_submission.py
#   (m4c_evaluator.py::EvalAIAnswerProcessor), then GT-Vision-Lab/VQA vqaEval.py::VQAEval.evaluate
#   (vizwiz: the VizWiz fork of VQAEval.evaluate); textvqa: LLaVA llava/eval/m4c_evaluator.py::
#   TextVQAAccuracyEvaluator.eval_pred_list.
VQA_CASES = [
    # "two" -> "2" once the humans disagree: 7 matching answers, every 9-subset has >= 3 -> 1.0
    ("Two", ["2"] * 4 + ["two"] * 3 + ["3"] * 3, "vqav2", True, 1.0),
    # 3 matches: 3 subsets see 2 of them (2/3), 7 see 3 (1) -> 0.9
    ("dog", ["dog"] * 3 + ["cat"] * 7, "vqav2", True, 0.9),
    # 1 match: it scores 0 in its own subset, 1/3 in the 9 others -> 0.3
    ("dog", ["dog"] + ["cat"] * 9, "vqav2", True, 0.3),
    # comma inside a number: EvalAI drops it from the prediction, VQAEval deletes it from "1,000"
    ("1,000", ["1000"] * 2 + ["1,000"] + ["thousand"] * 7, "vqav2", True, 0.9),
    # articles: "a dog", "the dog", "dog" are one answer
    ("a dog", ["dog"] * 2 + ["the dog"] + ["cat"] * 7, "vqav2", True, 0.9),
    # contraction written without apostrophe
    ("dont know", ["don't know"] + ["unknown"] * 9, "vqav2", True, 0.3),
    # punctuation touching a space is deleted, else replaced by a space: both read "left right"
    ("left - right", ["left-right"] * 3 + ["up"] * 7, "vqav2", False, 0.9),
    # identical human answers: VQAEval normalises nothing, so a raw "Yes" misses ...
    ("Yes", ["yes"] * 10, "vqav2", False, 0.0),
    # ... but LLaVA's submission step lower-cases it first
    ("Yes", ["yes"] * 10, "vqav2", True, 1.0),
    # trailing period of a raw answer is stripped (the humans disagree, so both sides are processed)
    ("sun.", ["sun"] * 3 + ["moon"] * 7, "vqav2", False, 0.9),
    # "3.5" keeps its period (followed by a digit)
    ("3.5", ["3.5"] * 4 + ["35"] * 6, "vqav2", False, 1.0),
    ("35", ["3.5"] * 4 + ["35"] * 2 + ["4"] * 4, "vqav2", False, 0.6),
    # empty prediction
    ("", ["yes"] * 5 + ["no"] * 5, "vqav2", True, 0.0),
    # TextVQA: EvalAIAnswerProcessor on both sides, "'s" split off
    ("McDonald's", ["mcdonald's"] * 2 + ["McDonalds"] * 8, "textvqa", True, 0.6),
    ("Coca-Cola", ["coca cola"] * 3 + ["pepsi"] * 7, "textvqa", True, 0.9),
    ("  STOP! ", ["stop"] * 10, "textvqa", True, 1.0),
    # VizWiz: the prediction is processed, the human answers are compared as given
    ("Unanswerable.", ["unanswerable"] * 10, "vizwiz", True, 1.0),
    ("unanswerable", ["Unanswerable"] * 10, "vizwiz", True, 0.0),
    ("The two dogs", ["2 dogs"] * 2 + ["dogs"] * 8, "vizwiz", True, 0.6),
]


@pytest.mark.parametrize("prediction, answers, protocol, preprocess, expected", VQA_CASES)
def test_vqa_score_matches_official(prediction, answers, protocol, preprocess, expected):
    assert vqa_score(prediction, answers, protocol, preprocess) == pytest.approx(expected)


def test_vqa_normalisation_steps():
    # vqaEval.py::processPunctuation / processDigitArticle, m4c_evaluator.py::EvalAIAnswerProcessor
    assert process_punctuation("yes, it is!") == "yes it is "  # ", " touches a space: deleted; "!" -> " "
    assert process_punctuation("a,b") == "a b"  # no space -> replaced by a space
    assert process_punctuation("2,000 (approx)") == "2000 approx"  # digit,digit -> all marks deleted
    assert process_punctuation("." * 40) == "." * 8  # only the first 32 periods go (re.UNICODE as count)
    assert process_digit_article("The Three Dogs") == "3 dogs"
    assert process_digit_article("none") == "0"
    assert process_digit_article("isnt it") == "isn't it"
    assert evalai_normalize("What's up?") == "what 's up"
    assert evalai_normalize("Two, maybe\tthree.") == "2 maybe 3"


def test_vqa_accuracy_is_the_mean_and_checks_inputs():
    preds = ["dog", "Two"]
    refs = [["dog"] * 3 + ["cat"] * 7, ["2"] * 4 + ["two"] * 3 + ["3"] * 3]
    assert METRICS.get("vqa_accuracy")(preds, refs) == {"accuracy": pytest.approx(0.95)}
    with pytest.raises(ValueError, match="protocol"):
        vqa_score("a", ["a"], protocol="okvqa")
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        METRICS.get("vqa_accuracy")(preds, refs[:1])


# ---------------------------------------------------------------------------------------------------
# GQA exact match: official eval.py compares `predicted == gold`; LLaVA's scripts/convert_gqa_for_eval.py
# writes `text.rstrip('.').lower()` first.
def test_exact_match_gqa():
    preds = ["Yes.", " Table. ", "the table", "no", "Left"]
    refs = ["yes", "table", "table", "yes", "left"]
    assert METRICS.get("exact_match")(preds, refs) == {"accuracy": pytest.approx(3 / 5)}
    assert METRICS.get("exact_match")(preds, refs, normalize="none") == {"accuracy": 0.0}
    assert METRICS.get("exact_match")([], []) == {"accuracy": 0.0}


# ---------------------------------------------------------------------------------------------------
# Multiple choice
# ScienceQA: LLaVA llava/eval/eval_science_qa.py (__main__'s parsing + get_pred_idx), options A-E.
SCIENCEQA_CASES = [
    ("B", "B"),
    ("B. dog", "B"),  # "<letter>. " prefix
    ("B.", FAILED),  # too short for the prefix rule, no "The answer is"
    ("(B)", FAILED),
    ("The answer is B.", "B"),
    ("The answer is B", FAILED),  # the pattern needs one character after the letter
    ("The answer is BC", "B"),  # ... any character
    ("The answer is D.", FAILED),  # D is past the 3 choices -> index -1
    ("The answer is A. No: The answer is B.", FAILED),  # two matches
    ("b", FAILED),
    ("", FAILED),
]


@pytest.mark.parametrize("reply, letter", SCIENCEQA_CASES)
def test_scienceqa_parsing_matches_official(reply, letter):
    assert parse_scienceqa(reply, num_choices=3) == letter


# MMBench: open-compass/VLMEvalKit vlmeval/utils/matching_util.py::can_infer at c6bdffd3.
MMBENCH_CHOICES = ["cat", "dog", "bird", "fish"]
MMBENCH_CASES = [
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("The answer is B", "B"),
    ("**B**: dog", "B"),
    ("A or B", "Z"),  # two letters, and no option text alone
    ("dog", "B"),  # option text
    ("It is a dog.", "B"),  # lower-case "a" is no letter; the text decides
    ("A dog", "A"),  # an upper-case article reads as option A
    ("a cat or a dog", "Z"),  # two option texts
    ("Z", "Z"),
    ("I'm sorry, but without the image provided I cannot say.", "Z"),
    ("", "Z"),
]


@pytest.mark.parametrize("reply, letter", MMBENCH_CASES)
def test_mmbench_parsing_matches_official(reply, letter):
    assert parse_mmbench(reply, MMBENCH_CHOICES) == letter


def test_multiple_choice_accuracy_and_circular_eval():
    fn = METRICS.get("multiple_choice")
    refs = [{"choices": ["cat", "dog", "bird"], "answer": 1}] * len(SCIENCEQA_CASES)
    out = fn([reply for reply, _ in SCIENCEQA_CASES], refs)
    assert out["accuracy"] == pytest.approx(4 / 11)
    assert out["parse_failure"] == pytest.approx(7 / 11)
    # Two MMBench questions, each asked in two rotations; only question 0 is right in both.
    preds = ["B", "(A)", "dog", "C"]
    refs = [
        {"choices": ["cat", "dog"], "answer": "B", "group": 0},
        {"choices": ["dog", "cat"], "answer": "A", "group": 0},
        {"choices": ["dog", "cat"], "answer": 0, "group": 1},
        {"choices": ["cat", "dog"], "answer": 1, "group": 1},
    ]
    out = fn(preds, refs, parser="mmbench")
    assert out == {"accuracy": 0.75, "parse_failure": 0.25, "circular_accuracy": 0.5}  # "C": no such option
    with pytest.raises(ValueError, match="parser"):
        fn(preds, refs, parser="seed")


# ---------------------------------------------------------------------------------------------------
# POPE: LLaVA llava/eval/eval_pope.py::eval_pope.
POPE_CASES = [  # (reply, label, parsed)
    ("Yes, there is a dog in the image.", "yes", "yes"),  # TP
    ("No, there is no dog.", "no", "no"),  # TN
    ("There is not a cat. Yes", "yes", "no"),  # first sentence only -> FN
    ("NO", "no", "yes"),  # only "No", "no", "not" count -> FP
    ("Yes. No dog.", "yes", "yes"),  # TP
    ("", "no", "yes"),  # FP
    ("no", "no", "no"),  # TN
    ("Not really", "yes", "yes"),  # "Not" is not in the list -> TP
]


def test_pope_matches_official():
    assert [parse_yes_no(reply) for reply, _, _ in POPE_CASES] == [parsed for _, _, parsed in POPE_CASES]
    out = METRICS.get("pope")([r for r, _, _ in POPE_CASES], [label for _, label, _ in POPE_CASES])
    # TP 3, FP 2, TN 2, FN 1
    assert out == pytest.approx(
        {"accuracy": 5 / 8, "precision": 3 / 5, "recall": 3 / 4, "f1": 2 / 3, "yes_ratio": 5 / 8}
    )


def test_pope_without_positive_predictions_scores_zero_instead_of_raising():
    out = METRICS.get("pope")(["No.", "not sure"], ["yes", "no"])
    assert out == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}


# ---------------------------------------------------------------------------------------------------
# ANLS: the RRC DocVQA / InfographicVQA script, QwenLM/Qwen-VL eval_mm/infographicsvqa_eval.py::
# evaluate_method (also lmms-eval lmms_eval/api/metrics.py::anls).
ANLS_CASES = [  # (prediction, answers, score)
    ("Hello", ["hello"], 1.0),
    ("helo", ["hello"], 0.8),  # distance 1 / 5
    ("ab", ["ac"], 0.5),  # exactly the threshold: kept
    ("abc", ["axy"], 0.0),  # 1 - 2/3 < 0.5
    ("abc", ["xyz"], 0.0),
    ("hell", ["help me", "hello"], 0.8),  # best answer
    ("  Hello   World ", ["hello world"], 1.0),  # whitespace collapsed, case ignored
    ("  hello worl  ", ["hello world"], 1 - 1 / 14),  # divided by the raw (14-char) length
    ("", [""], 1.0),  # both empty
    ("", ["abc"], 0.0),
]


@pytest.mark.parametrize("prediction, answers, expected", ANLS_CASES)
def test_anls_matches_official(prediction, answers, expected):
    assert anls_score(prediction, answers) == pytest.approx(expected)


def test_anls_mean_and_levenshtein():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    preds = [p for p, _, _ in ANLS_CASES]
    refs = [a for _, a, _ in ANLS_CASES]
    expected = sum(s for _, _, s in ANLS_CASES) / len(ANLS_CASES)
    assert METRICS.get("anls")(preds, refs) == {"anls": pytest.approx(expected)}


# ---------------------------------------------------------------------------------------------------
# CIDEr-D: salaniz/pycocoevalcap cider/cider.py::Cider.compute_score (CiderScorer). Golden numbers from
# pycocoevalcap 1.2; the live comparison runs when it is installed.
CAPTION_CANDIDATES = [
    "a man riding a horse on a beach",
    "two dogs playing in the grass",
    "a plate of food on a table",
    "",
]
CAPTION_REFERENCES = [
    ["a man rides a horse along the beach", "a person on a horse at the beach", "man riding horse by the sea"],
    ["two dogs play on the grass", "a couple of dogs running in a field"],
    ["a plate with food sitting on a wooden table", "food on a plate on the table", "a dish of pasta"],
    ["a red bus on the street", "a bus driving down a road"],
]
# Cider().compute_score with pycocoevalcap 1.2 on the captions above: per image, then the mean.
CAPTION_GOLDEN = [2.0641493739188888, 1.8561383343855489, 2.125504331220487, 0.0]
CAPTION_GOLDEN_MEAN = 1.511448009881231


def test_cider_matches_pycocoevalcap():
    scores = cider_scores(CAPTION_CANDIDATES, CAPTION_REFERENCES)
    assert scores == pytest.approx(CAPTION_GOLDEN, rel=1e-12)  # the last, empty caption scores 0
    out = METRICS.get("cider")(CAPTION_CANDIDATES, CAPTION_REFERENCES, tokenize=False)
    assert out["cider"] == pytest.approx(CAPTION_GOLDEN_MEAN, rel=1e-12)
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider

    gts = {i: refs for i, refs in enumerate(CAPTION_REFERENCES)}
    res = {i: [cand] for i, cand in enumerate(CAPTION_CANDIDATES)}
    score, per_image = Cider().compute_score(gts, res)
    assert out["cider"] == pytest.approx(float(score), rel=1e-12)
    assert scores == pytest.approx([float(s) for s in per_image], rel=1e-12)


def test_cider_quirks():
    # One image: log(#images) = 0, so every TF-IDF weight is 0 (CiderScorer.compute_cider).
    assert cider_scores(["a cat"], [["a cat"]]) == [0.0]
    # A caption equal to its only reference (4+ words, so every n has a non-zero vector): cosine 1 for
    # n = 1..4, no length penalty -> 10 per image (pycocoevalcap gives [10, 10, 10]).
    caps = ["a black cat sleeping", "a red bus on the road", "two birds in the sky"]
    assert cider_scores(caps, [[c] for c in caps]) == pytest.approx([10.0] * 3)


PTB_SENTENCES = [
    "A man (in red) is riding a horse.",
    "The dog doesn't like the cat's toy!",
    'Two people, one black-and-white dog; "quoted" text...',
    "A 3.5 inch U.S. flag at 5:30 pm",
    "They're here & we'll go, I'm sure. It costs $5.",
    "a red-haired woman/man with 2,000 books? yes",
    "Cannot go; gonna do it. e.g. this",
    "a 12.5% drop @ home #1",
]
# pycocoevalcap tokenizer/ptbtokenizer.py::PTBTokenizer.tokenize (Stanford PTBTokenizer 3.4.1, Java).
PTB_TOKENIZED = [
    "a man -lrb- in red -rrb- is riding a horse",
    "the dog does n't like the cat 's toy",
    "two people one black-and-white dog quoted text",
    "a 3.5 inch u.s. flag at 5:30 pm",
    "they 're here & we 'll go i 'm sure it costs $ 5",
    "a red-haired woman/man with 2,000 books yes",
    "can not go gon na do it e.g. this",
    "a 12.5 % drop @ home # 1",
]


def test_ptb_tokenize_matches_coco_tokenizer():
    assert [ptb_tokenize(s) for s in PTB_SENTENCES] == PTB_TOKENIZED


@pytest.mark.skipif(shutil.which("java") is None, reason="the COCO tokenizer needs Java")
def test_ptb_tokenize_matches_coco_tokenizer_live():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(PTB_SENTENCES)})
    assert [out[i][0] for i in range(len(PTB_SENTENCES))] == PTB_TOKENIZED


def test_cider_tokenizes_by_default():
    tokenized = cider(["A man, riding a horse."] * 2, [["a man riding a horse"], ["a dog"]])
    raw = cider(["a man riding a horse"] * 2, [["a man riding a horse"], ["a dog"]], tokenize=False)
    assert tokenized == raw


# ---------------------------------------------------------------------------------------------------
# The registry: every metric has the one signature and returns floats.
REGISTRY_EXAMPLES = {
    "vqa_accuracy": (["yes"], [["yes"] * 10]),
    "exact_match": (["yes"], ["yes"]),
    "multiple_choice": (["A"], [{"choices": ["x", "y"], "answer": 0}]),
    "pope": (["Yes"], ["yes"]),
    "anls": (["yes"], [["yes"]]),
    "cider": (["a cat", "a dog"], [["a cat"], ["a dog"]]),
}


@pytest.mark.parametrize("name", METRICS.names())
def test_every_metric_has_the_common_signature(name):
    predictions, references = REGISTRY_EXAMPLES[name]
    out = METRICS.build(name, predictions, references)
    assert out and all(isinstance(k, str) and isinstance(v, float) for k, v in out.items())
    assert "predictions" not in METRICS.options(name) and "references" not in METRICS.options(name)


def test_unknown_metric_lists_the_valid_ones():
    with pytest.raises(ValueError, match="anls, cider, exact_match"):
        METRICS.get("bleu")
