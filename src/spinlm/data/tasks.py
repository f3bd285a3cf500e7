"""A bundled chat task with exactly checkable answers, generated from a seed (`spinlm make-task`).

Eight skills, each with several phrasings: addition, subtraction, multiplication, unit
conversion, counting a letter in a word, sorting a list of numbers, comparing two numbers,
and two-turn follow-ups (a sum or product, then "now multiply that by 3"). About 30% of the
conversations start with a system prompt. Every ground-truth answer has one style: a short
working, then "The answer is X." (so `spinlm.data.answers.extract_answer` recovers X).

Each record is a Hugging Face "messages" line plus two fields the trainer ignores: "skill"
(the evaluation reports accuracy per skill) and "answer" (X, for a reader of the file). The train / validation / test splits are drawn
from one stream without repeating a user question, so no test question is in train.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

SPLITS = ("train", "validation", "test")
SYSTEM_PROMPT_RATE = 0.3
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Keep answers short.",
    "You are a patient tutor who helps students with arithmetic.",
    "You are a careful assistant who double-checks every calculation.",
)
WORDS = (
    "banana", "apple", "strawberry", "mississippi", "committee", "balloon", "letter", "coffee",
    "bookkeeper", "parallel", "address", "success", "pepper", "bubble", "giraffe", "cinnamon",
    "elephant", "tomorrow", "assessment", "possession", "raspberry", "butterfly", "umbrella",
    "occurrence", "necessary", "accommodate", "millennium", "referee", "vacuum", "puzzle",
)
# (singular unit, plural unit, plural target unit, factor)
UNITS = (
    ("kilometer", "kilometers", "meters", 1000),
    ("meter", "meters", "centimeters", 100),
    ("kilogram", "kilograms", "grams", 1000),
    ("hour", "hours", "minutes", 60),
    ("minute", "minutes", "seconds", 60),
    ("day", "days", "hours", 24),
    ("foot", "feet", "inches", 12),
    ("week", "weeks", "days", 7),
    ("dollar", "dollars", "cents", 100),
)

Turns = list[tuple[str, str]]  # (user, assistant) pairs
Example = tuple[Turns, str]  # turns and the final answer X


def _reply(working: str, answer: object) -> str:
    return f"{working} The answer is {answer}."


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(2, 199), rng.randint(2, 199)
    q = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "What is {a} plus {b}?",
                    "Compute the sum of {a} and {b}.", "If you add {b} to {a}, what do you get?"])
    return [(q.format(a=a, b=b), _reply(f"{a} + {b} = {a + b}.", a + b))], str(a + b)


def _sub(rng: random.Random) -> Example:
    b = rng.randint(2, 99)
    a = b + rng.randint(1, 150)
    q = rng.choice(["What is {a} - {b}?", "Subtract {b} from {a}.", "What is {a} minus {b}?",
                    "What do you get when you take {b} away from {a}?"])
    return [(q.format(a=a, b=b), _reply(f"{a} - {b} = {a - b}.", a - b))], str(a - b)


def _mul(rng: random.Random) -> Example:
    a, b = rng.randint(2, 25), rng.randint(2, 12)
    q = rng.choice(["What is {a} * {b}?", "Multiply {a} by {b}.", "What is {a} times {b}?",
                    "Compute the product of {a} and {b}."])
    return [(q.format(a=a, b=b), _reply(f"{a} * {b} = {a * b}.", a * b))], str(a * b)


def _unit(rng: random.Random) -> Example:
    one, many, target, factor = rng.choice(UNITS)
    n = rng.randint(2, 15)
    q = rng.choice(["How many {target} are in {n} {many}?", "Convert {n} {many} to {target}.",
                    "{n} {many} is how many {target}?"])
    work = f"1 {one} is {factor} {target}, so {n} {many} is {n} * {factor} = {n * factor} {target}."
    return [(q.format(target=target, n=n, many=many), _reply(work, n * factor))], str(n * factor)


def _count_letters(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    k = word.count(letter)
    q = rng.choice(['How many times does the letter "{l}" appear in the word "{w}"?',
                    'Count the letter "{l}" in "{w}".', 'How many "{l}"s are in the word "{w}"?'])
    work = f'The word "{word}" contains the letter "{letter}" {k} times.'
    return [(q.format(l=letter, w=word), _reply(work, k))], str(k)


def _sort(rng: random.Random) -> Example:
    numbers = rng.sample(range(1, 100), rng.randint(4, 6))
    ordered = ", ".join(str(x) for x in sorted(numbers))
    shown = ", ".join(str(x) for x in numbers)
    q = rng.choice(["Sort these numbers from smallest to largest: {s}.",
                    "Put these numbers in ascending order: {s}.", "Order from lowest to highest: {s}."])
    return [(q.format(s=shown), _reply(f"In ascending order: {ordered}.", ordered))], ordered


def _compare(rng: random.Random) -> Example:
    a, b = rng.sample(range(1, 1000), 2)
    if rng.random() < 0.5:
        q = rng.choice(["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"])
        x, y, word = max(a, b), min(a, b), "larger"
    else:
        q = rng.choice(["Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?"])
        x, y, word = min(a, b), max(a, b), "smaller"
    return [(q.format(a=a, b=b), _reply(f"{x} is {word} than {y}.", x))], str(x)


def _follow_up(rng: random.Random) -> Example:
    (first, answer1) = rng.choice([_add, _sub, _mul])(rng)
    value = int(answer1)
    k = rng.randint(2, 9)
    op, q = rng.choice([
        ("+", "Now add {k} to that."), ("+", "What if you add {k} to the result?"),
        ("*", "Now multiply that by {k}."), ("*", "And what is that times {k}?"),
        ("-", "Now subtract {k} from that."),
    ])
    result = {"+": value + k, "-": value - k, "*": value * k}[op]
    turns = first + [(q.format(k=k), _reply(f"{value} {op} {k} = {result}.", result))]
    return turns, str(result)


SKILLS: dict[str, Callable[[random.Random], Example]] = {
    "add": _add, "sub": _sub, "mul": _mul, "unit": _unit, "count_letters": _count_letters,
    "sort": _sort, "compare": _compare, "follow_up": _follow_up,
}


def make_record(rng: random.Random, skill: str) -> dict:
    """One conversation of a skill as a "messages" record with "skill" and "answer"."""
    turns, answer = SKILLS[skill](rng)
    messages = []
    if rng.random() < SYSTEM_PROMPT_RATE:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages, "skill": skill, "answer": answer}


def _question_key(record: dict) -> tuple[str, ...]:
    return tuple(m["content"] for m in record["messages"] if m["role"] == "user")


def generate_task(sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """Records per split, deterministic in (sizes, seed); no user question appears twice."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    out: dict[str, list[dict]] = {}
    names = sorted(SKILLS)
    for split, size in sizes.items():
        records: list[dict] = []
        attempts = 0
        while len(records) < size:
            attempts += 1
            if attempts > 100 * size + 1000:
                raise ValueError(f"cannot draw {size} distinct questions for split {split!r}")
            record = make_record(rng, rng.choice(names))
            key = _question_key(record)
            if key not in seen:
                seen.add(key)
                records.append(record)
        out[split] = records
    return out


def write_task(out_dir: str | Path, sizes: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """Write `<split>.jsonl` for each split into `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, records in generate_task(sizes, seed).items():
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths
