"""How generated answers to multiple-choice questions are judged: ports of the official scorers, and our strict one.

Published MMAU / MMAR / MMSU numbers come from the benchmarks' own scripts, so `string_match` and `mmsu_letter`
re-implement them exactly (quirks included) and are checked against fixtures of their documented behaviour:

* MMAU `evaluation.py` (Sakshi113/MMAU, last changed in 74682927cf7f434cc9ed585b1f8a5e6150381e91) and MMAR
  `code/evaluation.py` (ddlBoJack/MMAR, a355584b33638e48462c817a7c001db1c54f6eb2) share one `string_match`: a
  bag-of-words test, so a bare letter ("B") is almost never counted, and a wrong option whose words are a subset of
  the answer's (or the same words in another order) is counted right.
* R1-AQA `src/test.py` (xiaomi-research/r1-aqa, 2850ffbb30cf4bcf5f74bc8c25738e537951639e), whose `<answer>` prompt
  AudioMCQ and `soda-finetune instruct` use, hands `string_match` the first `<answer>...</answer>` on one line
  (stripped), or the whole output when there is none: `r1aqa_answer`.
* MMSU `mmsu_evaluation.py` (dingdongwang/MMSU_Bench, 321b2767d8fcab91e117e63d7fab920c78bd5db1) reads a letter: the
  first character if it is A-D, else the second-to-last ("The answer is C."). A response in neither form is
  dropped from the denominator, and an empty or "None" response reuses the previous record's letter (a variable
  not reset); `mmsu_compat_accuracy` reproduces both, and our own figure counts such responses wrong.

The strict parser takes one well-formed answer or nothing: the index of the option it names, else None (wrong).
"""

from __future__ import annotations

import math
import re

SCORER_VERSIONS = {
    "string_match": "MMAU evaluation.py @74682927 (2025-01-29) = MMAR code/evaluation.py @a355584b (2026-02-16)",
    "r1aqa_answer": "r1-aqa src/test.py extract_answer @2850ffbb",
    "mmsu_letter": "MMSU_Bench mmsu_evaluation.py @321b2767",
    "strict": "soda-strict-1: exactly one <answer>...</answer> equal to one option's text (case-insensitive), "
              "or for the mmsu prompt a single letter",
}
MMSU_LETTERS = "ABCD"
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
SINGLE_LETTER = re.compile(r"^\(?([A-Za-z])\)?\.?$")


# --- MMAU / MMAR ----------------------------------------------------------------------------------
def _words(text: str) -> set[str]:
    return set(re.findall(r"\b\w+\b", text.lower()))


def string_match(answer: str, prediction: str, choices: list[str]) -> bool:
    """MMAU's / MMAR's `string_match`: every word of the answer is in the prediction, and none of the words that
    wrong options add to the answer's (a choice with exactly the answer's word set adds none)."""
    predicted, wanted = _words(prediction), _words(answer)
    if not predicted:
        return False
    wrong: set[str] = set()
    for choice in choices:
        words = _words(choice)
        if words != wanted:
            wrong |= words - wanted
    return wanted <= predicted and predicted.isdisjoint(wrong)


R1AQA_TAG = re.compile(r"<answer>(.*?)</answer>")  # no DOTALL, as R1-AQA: a tag split over lines is not found


def r1aqa_answer(output: str) -> str:
    """What R1-AQA's test script scores: the first <answer>...</answer> on one line, stripped, else the output."""
    m = R1AQA_TAG.search(output)
    return (m.group(1) if m else output).strip()


# --- MMSU -----------------------------------------------------------------------------------------
def mmsu_letter(response) -> str | None:
    """The letter MMSU's script reads from a response: A-D, "" for an empty / "None" response (the script then
    reuses the previous record's letter), or None for a wrong-format one (the script drops it from the total)."""
    if not isinstance(response, str):
        return None  # the script's `except: continue` around response.strip()
    predict = response.strip().replace("\n", "")
    if predict == "None" or not predict:
        return ""
    if predict[0] in MMSU_LETTERS:
        return predict[0]
    if len(predict) > 1 and predict[-2] in MMSU_LETTERS:
        return predict[-2]
    return None


def mmsu_correct(letter: str | None, choices: list[str], answer: str) -> bool:
    """The script's test: the letter's choice text equals `answer_gt` (letters beyond the choices never match)."""
    if not letter:
        return False
    i = MMSU_LETTERS.index(letter)
    return i < len(choices) and choices[i] == answer


def mmsu_compat_accuracy(records: list[tuple]) -> dict:
    """MMSU's overall accuracy over (response, choices, answer text) records, as its script computes it: wrong-format
    responses leave the denominator; an empty / "None" one is scored with the previous record's letter (none before
    the first: wrong, where the script would crash)."""
    correct = total = dropped = 0
    previous = None
    for response, choices, answer in records:
        letter = mmsu_letter(response)
        if letter is None:
            dropped += 1
            continue
        if letter == "":
            letter = previous
        previous = letter
        correct += mmsu_correct(letter, choices, answer)
        total += 1
    return {"accuracy": correct / total if total else None, "correct": correct, "total": total, "dropped": dropped}


# --- strict ---------------------------------------------------------------------------------------
def strict_answer(response: str, choices: list[str]) -> int | None:
    """The option named by exactly one <answer>...</answer> whose content equals its text (case-insensitive, outer
    spaces ignored); None when there is no tag, more than one, or the content names no option or several."""
    tags = ANSWER_TAG.findall(response or "")
    if len(tags) != 1:
        return None
    content = tags[0].strip().casefold()
    hits = [i for i, c in enumerate(choices) if c.strip().casefold() == content]
    return hits[0] if len(hits) == 1 else None


def strict_letter(response: str, n_choices: int) -> int | None:
    """The option of a response that is a single letter ("B", "B.", "(B)"), within the options; else None."""
    m = SINGLE_LETTER.match((response or "").strip())
    if not m:
        return None
    i = ord(m.group(1).upper()) - ord("A")
    return i if i < n_choices else None


# --- chance ---------------------------------------------------------------------------------------
def chance(option_counts: list[int]) -> float:
    """Expected accuracy of a uniform random pick: the mean of 1/options over the items."""
    return math.fsum(1 / n for n in option_counts) / len(option_counts)
