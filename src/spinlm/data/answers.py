"""The answer extractor: the final answer in a model's reply, normalised for exact match.

Rule (the same for ground truth and model replies):

1. If the reply contains "answer is" (any case), the answer is the text after its LAST
   occurrence, up to the end of that sentence: a period followed by whitespace or the end
   of the text, or a line break. A leading ":" and surrounding quotes / "**" are dropped.
2. Otherwise the answer is the last number in the reply ("-3", "2.5", "1,200").
3. Otherwise there is no answer (None), which never matches.

Normalisation (`normalize_answer`): lower case, whitespace collapsed, thousands separators
removed ("1,200" -> "1200"), list commas written as ", ", a trailing period dropped. So
"The answer is 1,200." and "the answer is 1200" both give "1200", and "3,5, 9" gives "3, 5, 9".

The bundled task (`spinlm.data.tasks`) writes every ground-truth answer as
"... The answer is X.", so `extract_answer(ground_truth) == normalize_answer(X)`.
"""

from __future__ import annotations

import re

_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def normalize_answer(text: str) -> str:
    """Canonical form of an answer string for exact-match comparison."""
    text = text.strip().strip("*\"'`").strip()
    text = _THOUSANDS.sub("", text)
    text = re.sub(r"\s*,\s*", ", ", text)
    text = re.sub(r"\s+", " ", text).lower().strip()
    return text.rstrip(".").strip()


def extract_answer(reply: str) -> str | None:
    """The normalised final answer of a reply (see the module docstring), or None."""
    matches = list(_ANSWER_IS.finditer(reply))
    if matches:
        rest = reply[matches[-1].end():].lstrip(" \t:")
        end = _SENTENCE_END.search(rest)
        answer = normalize_answer(rest[: end.start()] if end else rest)
        if answer:
            return answer
    numbers = _NUMBER.findall(reply)
    return normalize_answer(numbers[-1]) if numbers else None


def is_correct(reply: str, expected: str) -> bool:
    """Exact match of the extracted answers of a reply and of the ground-truth answer."""
    got, want = extract_answer(reply), extract_answer(expected)
    return got is not None and got == want
