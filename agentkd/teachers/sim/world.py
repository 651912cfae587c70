"""The simulated teacher's task world: arithmetic word problems that can be generated, parsed and solved.

A problem is a start sentence, `steps` operation sentences and a question. The first operation gives
the problem its kind; later operations are common ones (add, subtract, multiply). Every sentence comes
from a fixed template, so `solve` parses any text this module writes with plain regexes. The vocabulary
is deliberately small: a tiny student must be able to learn the world from ~2k examples.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo", "Ivy", "Jack", "Kim", "Leo")
ITEMS = ("apples", "pens", "books", "stickers", "coins", "marbles", "cards", "shells", "cookies", "stamps")

# kind -> sampling weight. Common kinds first; the rarer ones are what the easy generator reaches for.
KINDS: dict[str, float] = {
    "add": 0.30,
    "subtract": 0.25,
    "multiply": 0.20,
    "more_than": 0.08,
    "fewer_than": 0.07,
    "times_as_many": 0.05,
    "divide": 0.05,
}
# Two domains: change by an amount, and change by a factor.
DOMAINS: dict[str, str] = {
    "add": "additive", "subtract": "additive", "more_than": "additive", "fewer_than": "additive",
    "multiply": "multiplicative", "times_as_many": "multiplicative", "divide": "multiplicative",
}
COMMON_OPS = ("add", "subtract", "multiply")

# Operation sentences. `who` is the current subject; `other` a new subject for the compare kinds.
_ADD_VERBS = ("gets", "buys", "finds")
_SUB_VERBS = ("gives away", "loses", "sells")
_START = re.compile(r"^(?P<who>[A-Z][a-z]+) has (?P<n>\d+) (?P<item>[a-z]+)$")
_OPS: dict[str, re.Pattern[str]] = {
    "add": re.compile(r"^(?P<who>[A-Z][a-z]+) (?:gets|buys|finds) (?P<n>\d+) more (?P<item>[a-z]+)$"),
    "subtract": re.compile(r"^(?P<who>[A-Z][a-z]+) (?:gives away|loses|sells) (?P<n>\d+) (?P<item>[a-z]+)$"),
    "multiply": re.compile(
        r"^(?P<who>[A-Z][a-z]+) now has (?P<n>\d+) times as many (?P<item>[a-z]+) as before$"
    ),
    "more_than": re.compile(
        r"^(?P<other>[A-Z][a-z]+) has (?P<n>\d+) more (?P<item>[a-z]+) than (?P<who>[A-Z][a-z]+)$"
    ),
    "fewer_than": re.compile(
        r"^(?P<other>[A-Z][a-z]+) has (?P<n>\d+) fewer (?P<item>[a-z]+) than (?P<who>[A-Z][a-z]+)$"
    ),
    "times_as_many": re.compile(
        r"^(?P<other>[A-Z][a-z]+) has (?P<n>\d+) times as many (?P<item>[a-z]+) as (?P<who>[A-Z][a-z]+)$"
    ),
    "divide": re.compile(
        r"^(?P<who>[A-Z][a-z]+) puts the (?P<item>[a-z]+) into (?P<n>\d+) equal piles and keeps one pile$"
    ),
}
_QUESTION = re.compile(r"^How many (?P<item>[a-z]+) does (?P<who>[A-Z][a-z]+) have now$")
_SYMBOL = {"add": "+", "more_than": "+", "subtract": "-", "fewer_than": "-",
           "multiply": "*", "times_as_many": "*", "divide": "/"}
_FINAL = re.compile(r"the answer is\s*:?\s*\$?\s*(-?\d[\d,]*)", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    text: str
    answer: int
    kind: str
    steps: int
    digits: int


@dataclass(frozen=True)
class Step:
    """One operation of a parsed problem: left <symbol> right = result."""

    left: int
    symbol: str
    right: int
    result: int

    def equation(self) -> str:
        return f"{self.left} {self.symbol} {self.right} = {self.result}"


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _sentence(kind: str, who: str, other: str, n: int, item: str, rng: random.Random) -> str:
    if kind == "add":
        return f"{who} {rng.choice(_ADD_VERBS)} {n} more {item}."
    if kind == "subtract":
        return f"{who} {rng.choice(_SUB_VERBS)} {n} {item}."
    if kind == "multiply":
        return f"{who} now has {n} times as many {item} as before."
    if kind == "more_than":
        return f"{other} has {n} more {item} than {who}."
    if kind == "fewer_than":
        return f"{other} has {n} fewer {item} than {who}."
    if kind == "times_as_many":
        return f"{other} has {n} times as many {item} as {who}."
    if kind == "divide":
        return f"{who} puts the {item} into {n} equal piles and keeps one pile."
    raise ValueError(f"unknown kind {kind!r}")


def make_problem(rng: random.Random, kind: str, steps: int, digits: int) -> Problem:
    """One problem of the given kind, number of operations (1..4) and operand size (1..3 digits)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {sorted(KINDS)}")
    if not 1 <= steps <= 4 or not 1 <= digits <= 3:
        raise ValueError("steps must be 1..4 and digits 1..3")
    item = rng.choice(ITEMS)
    names = list(NAMES)
    rng.shuffle(names)
    who = names.pop()
    # Divide: the start is built as factor * quotient so the first step divides evenly.
    factor = rng.randint(2, 9)
    value = factor * _operand(rng, digits) if kind == "divide" else _operand(rng, digits)
    sentences = [f"{who} has {value} {item}."]
    for index in range(steps):
        op = kind if index == 0 else rng.choice(COMMON_OPS)
        # Later factors only apply to small values, so multi-step answers stay a few digits long.
        if index > 0 and op == "multiply" and value > 99:
            op = rng.choice(("add", "subtract"))
        # A subtraction never goes below zero.
        if op in ("subtract", "fewer_than") and value == 0:
            op = "add"
        if op in ("multiply", "times_as_many", "divide"):
            n = factor if op == "divide" else rng.randint(2, 9)
        else:
            n = _operand(rng, digits)
            if op in ("subtract", "fewer_than"):
                n = n if n <= value else rng.randint(1, value)
        other = names.pop() if op in ("more_than", "fewer_than", "times_as_many") else who
        sentences.append(_sentence(op, who, other, n, item, rng))
        value = _apply(op, value, n)
        who = other
    sentences.append(f"How many {item} does {who} have now?")
    text = " ".join(sentences)
    return Problem(text=text, answer=value, kind=kind, steps=steps, digits=digits)


def _apply(op: str, value: int, n: int) -> int:
    symbol = _SYMBOL[op]
    if symbol == "+":
        return value + n
    if symbol == "-":
        return value - n
    if symbol == "*":
        return value * n
    return value // n


def sample_problems(
    n: int,
    seed: int,
    *,
    steps: tuple[int, int] = (1, 2),
    digits: tuple[int, int] = (1, 2),
    kinds: Sequence[str] | None = None,
) -> list[Problem]:
    """n problems with distinct texts, kinds drawn by KINDS weight, steps/digits uniform in the ranges."""
    chosen = list(kinds) if kinds else list(KINDS)
    unknown = [k for k in chosen if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; known: {sorted(KINDS)}")
    weights = [KINDS[k] for k in chosen]
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct problems from this part of the world")
        kind = rng.choices(chosen, weights)[0]
        problem = make_problem(rng, kind, rng.randint(*steps), rng.randint(*digits))
        if problem.text not in seen:
            seen.add(problem.text)
            out.append(problem)
    return out


@functools.lru_cache(maxsize=4096)
def parse_steps(text: str) -> tuple[str, tuple[Step, ...], int] | None:
    """(kind, steps, digits) of a problem statement of this world, or None. Cached: the sim re-reads texts."""
    sentences = [s.strip() for s in re.split(r"(?<=[.?])\s+", text.strip()) if s.strip()]
    if len(sentences) < 3 or not sentences[-1].endswith("?"):
        return None
    start = _START.match(sentences[0].rstrip("."))
    if start is None:
        return None
    who, item, value = start["who"], start["item"], int(start["n"])
    kind = ""
    steps: list[Step] = []
    digits = len(str(value))
    for index, sentence in enumerate(sentences[1:-1]):
        if not sentence.endswith("."):
            return None
        body = sentence[:-1]
        for op, pattern in _OPS.items():
            match = pattern.match(body)
            if match:
                break
        else:
            return None
        if match["who"] != who or match["item"] != item:
            return None
        n = int(match["n"])
        if _SYMBOL[op] == "/" and (n == 0 or value % n):
            return None
        result = _apply(op, value, n)
        if result < 0:
            return None
        if index == 0:
            kind = op
            if op == "divide":
                digits = len(str(value // n))
        steps.append(Step(value, _SYMBOL[op], n, result))
        value = result
        who = match.groupdict().get("other") or who
    question = _QUESTION.match(sentences[-1].rstrip("?"))
    if question is None or question["who"] != who or question["item"] != item:
        return None
    if not 1 <= len(steps) <= 4:
        return None
    return kind, tuple(steps), digits


def solve(text: str) -> Problem | None:
    """Parse a problem statement of this world (the statement alone) and compute its answer; else None."""
    parsed = parse_steps(text)
    if parsed is None:
        return None
    kind, steps, digits = parsed
    return Problem(text=text.strip(), answer=steps[-1].result, kind=kind, steps=len(steps), digits=digits)


_LEADS = ("", "First, ", "We start with the first step: ", "Step by step: ")
_THENS = ("", "Then ", "Next, ", "After that, ")


def worked_answer(problem: Problem, rng: random.Random | None = None, *, final: int | None = None) -> str:
    """One equation per step, then "The answer is N."; rng picks phrasing variants, final forces N."""
    parsed = parse_steps(problem.text)
    if parsed is None:
        answer = problem.answer if final is None else final
        return f"The answer is {answer}."
    steps = list(parsed[1])
    if final is not None and final != steps[-1].result:
        # A slip in the last step: the arithmetic of that step is wrong, the rest is sound.
        last = steps[-1]
        steps[-1] = Step(last.left, last.symbol, last.right, final)
    answer = steps[-1].result
    parts = []
    for index, step in enumerate(steps):
        if rng is None:
            prefix = ""
        else:
            prefix = rng.choice(_LEADS) if index == 0 else rng.choice(_THENS)
        parts.append(f"{prefix}{step.equation()}.")
    parts.append(f"The answer is {answer}.")
    return " ".join(parts)


def slipped_answer(problem: Problem, rng: random.Random) -> int:
    """A plausible wrong final number (off by a little, or by ten), never negative, never the answer."""
    while True:
        wrong = problem.answer + rng.choice((-10, -2, -1, 1, 2, 10))
        if wrong >= 0 and wrong != problem.answer:
            return wrong


def final_number(answer_text: str) -> int | None:
    """N from the last "The answer is N" in the text (commas and a trailing period tolerated), else None."""
    matches = _FINAL.findall(answer_text)
    if not matches:
        return None
    digits = matches[-1].replace(",", "")
    try:
        return int(digits)
    except ValueError:
        return None


def rarer_kind(kind: str, rng: random.Random) -> str:
    """A kind of the same domain that is rarer (lower weight) than kind; the rarest ones swap among peers."""
    domain = DOMAINS.get(kind, "additive")
    weight = KINDS.get(kind, 1.0)
    peers = [k for k in KINDS if DOMAINS[k] == domain and k != kind]
    rarer = [k for k in peers if KINDS[k] < weight]
    if rarer:
        return rng.choice(rarer)
    same = [k for k in peers if KINDS[k] <= weight]
    return rng.choice(same) if same else kind
