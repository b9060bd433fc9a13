"""Multiple-choice accuracy with option-letter parsing (ScienceQA-IMG, MMBench).

Two parsers, each the rule of the code that produced the published numbers:

- `scienceqa`: haotian-liu/LLaVA `llava/eval/eval_science_qa.py` (`__main__` + `get_pred_idx`). The
  whole reply must be a letter of A-E; or start with "<letter>. "; or contain exactly one match of
  `The answer is ([A-Z]).` (the final "." is any character, so "The answer is B" at the very end does
  not match). Anything else is FAILED, and so is a letter past the question's number of choices.
- `mmbench`: open-compass/VLMEvalKit `vlmeval/utils/matching_util.py::can_infer` as of c6bdffd3 (March
  2024, the rule of the LLaVA-1.5 era; later versions only accept a letter among the last tokens).
  `can_infer_option`: a fixed set of refusals -> "Z"; replace each of `.()[],:;!*#{}` by a space and
  split; exactly one option letter among the tokens -> that letter; none but a "Z" token -> "Z".
  Otherwise `can_infer_text`: exactly one option text (lower-cased) inside the lower-cased reply.
  No LLM judge: an unparsed reply is "Z" (VLMEvalKit's `exact_matching` policy), i.e. wrong.
  With a `group` per reference (MMBench's `index % 1_000_000`), `circular_accuracy` is CircularEval:
  a question counts only when every rotation of its options is answered right.
"""

from __future__ import annotations

import re
import string
from typing import Any

from metrics.common import check_lengths, mean

PARSERS = ("scienceqa", "mmbench")
FAILED = "FAILED"

SCIENCEQA_LETTERS = ("A", "B", "C", "D", "E")  # the script's `--options` default
_SCIENCEQA_PATTERN = re.compile(r"The answer is ([A-Z]).")

# VLMEvalKit treats these replies as "none of the options" ("Z").
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_API_FAILURE = "Failed to obtain answer via API"
_SEPARATORS = ".()[],:;!*#{}"


def parse_scienceqa(reply: str, num_choices: int) -> str:
    """The option letter LLaVA's ScienceQA evaluation reads from `reply`, or FAILED."""
    letters = SCIENCEQA_LETTERS
    if reply in letters:
        letter = reply
    elif len(reply) >= 3 and reply[0] in letters and reply[1:3] == ". ":
        letter = reply[0]
    else:
        found = _SCIENCEQA_PATTERN.findall(reply)
        letter = found[0] if len(found) == 1 else FAILED
    return letter if letter in letters[:num_choices] else FAILED


def _infer_option(reply: str, letters: list[str]) -> str | None:
    if _API_FAILURE in reply:
        return None
    if any(refusal in reply for refusal in _REFUSALS):
        return "Z"
    for sep in _SEPARATORS:
        reply = reply.replace(sep, " ")
    tokens = reply.split()
    present = [letter for letter in letters if letter in tokens]
    if len(present) == 1:
        return present[0]
    if not present and "Z" in tokens:
        return "Z"
    return None


def _infer_text(reply: str, options: dict[str, str]) -> str | None:
    reply = reply.lower()
    found = [letter for letter, text in options.items() if str(text).lower() in reply]
    return found[0] if len(found) == 1 else None


def parse_mmbench(reply: str, choices: list[str]) -> str:
    """The option letter MMBench's matching reads from `reply`, or "Z" when it finds none."""
    options = dict(zip(string.ascii_uppercase, choices))
    return _infer_option(reply, list(options)) or _infer_text(reply, options) or "Z"


def _answer_letter(answer: int | str) -> str:
    return string.ascii_uppercase[answer] if isinstance(answer, int) else answer


def multiple_choice(
    predictions: list[str], references: list[dict[str, Any]], parser: str = "scienceqa"
) -> dict[str, float]:
    """Accuracy of the option letters parsed from the replies.

    Args:
        predictions: the generated replies.
        references: per question `{"choices": [option texts in letter order], "answer": index or
            letter}`, plus `"group"` (any hashable) to get MMBench's CircularEval accuracy.
        parser: "scienceqa" or "mmbench" (see the module docstring).

    Returns:
        `accuracy`, `parse_failure` (share of replies without a usable letter) and, when every
        reference has a group, `circular_accuracy`.
    """
    if parser not in PARSERS:
        raise ValueError(f"unknown parser {parser!r}; choose one of: {', '.join(PARSERS)}")
    check_lengths(predictions, references)
    parsed = [
        parse_scienceqa(p, len(r["choices"])) if parser == "scienceqa" else parse_mmbench(p, list(r["choices"]))
        for p, r in zip(predictions, references)
    ]
    correct = [letter == _answer_letter(r["answer"]) for letter, r in zip(parsed, references)]
    result = {
        "accuracy": mean([float(c) for c in correct]),
        "parse_failure": mean([float(letter in (FAILED, "Z")) for letter in parsed]),
    }
    if references and all("group" in r for r in references):
        groups: dict[Any, bool] = {}
        for ok, ref in zip(correct, references):
            groups[ref["group"]] = groups.get(ref["group"], True) and ok
        result["circular_accuracy"] = mean([float(ok) for ok in groups.values()])
    return result
