"""Referee role (Lion, arXiv 2305.12870): parse a judgment, then combine the two answer orders.

The referee scores answers A and B from 1 to 10 after a written comparison, once with the teacher's answer
as A and once with the student's as A. parse_judgment never raises on teacher text; combine_orders labels
an instruction hard iff mean(teacher) - mean(student) >= tau, and "unscored" when either order failed to
parse (the original Lion scripts counted those as easy: a bug, since a broken judge then hides hard items).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from agentkd.roles.json_reply import MAX_REPLY_CHARS, find_json

SCORE_MIN, SCORE_MAX = 1.0, 10.0
MAX_COMPARISON_CHARS = 4_000
# Means of two integer scores are exact in binary, but scores like 8.1 and 7.1 are not; this keeps
# "difference >= tau" from failing by one ulp.
_TAU_SLACK = 1e-9

_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
}
_VALUE = r"(?P<value>[+-]?\d+(?:\.\d+)?|[A-Za-z]+)(?P<scale>\s*(?:/|out\s+of)\s*\d+(?:\.\d+)?)?"
_SLOT_SCORE = re.compile(
    r"(?:\bscore\s*(?:for\s+)?(?:answer\s+|assistant\s+)?|\banswer\s*|\bassistant\s*|^[ \t>#*-]*)"
    r"[_ ]?(?P<slot>[ab12])(?![\w'’])[\s*_]*(?:score)?[\s*]*[:=][\s*]*" + _VALUE,
    re.IGNORECASE | re.MULTILINE,
)
_PAIR_LINE = re.compile(
    r"\s*(?P<a>[+-]?\d+(?:\.\d+)?)(?:\s*/\s*10)?\s*[,;\s]\s*(?P<b>[+-]?\d+(?:\.\d+)?)(?:\s*/\s*10)?\s*"
)
_A_KEYS = ("score_a", "scorea", "a_score", "a", "answer_a", "assistant_a", "score_1", "assistant_1")
_B_KEYS = ("score_b", "scoreb", "b_score", "b", "answer_b", "assistant_b", "score_2", "assistant_2")
_COMPARISON_KEYS = ("comparison", "explanation", "reasoning", "analysis", "rationale")


@dataclass(frozen=True)
class Judgment:
    score_a: float | None
    score_b: float | None
    comparison: str | None
    ok: bool  # both scores found and in 1..10
    reason: str | None  # why not ok


@dataclass(frozen=True)
class Verdict:
    teacher_score: float | None  # mean over the two orders
    student_score: float | None
    label: Literal["hard", "easy", "unscored"]
    order_disagreement: bool  # the two orders prefer different answers (strictly: one each way)
    reason: str | None = None  # why unscored


def parse_judgment(text: Any) -> Judgment:
    """Scores from JSON (bare, fenced or inside prose), "Score A: 8", "8/10", "eight", or a "8 7" first line."""
    if not isinstance(text, str) or not text.strip():
        return _failed("empty reply")
    if len(text) > MAX_REPLY_CHARS:
        return _failed(f"reply too long ({len(text)} chars)")
    found, value = find_json(text)
    if found and isinstance(value, dict):
        keys = {_norm_key(k): v for k, v in value.items() if isinstance(k, str)}
        raw_a = next((keys[k] for k in _A_KEYS if k in keys), None)
        raw_b = next((keys[k] for k in _B_KEYS if k in keys), None)
        scores = keys.get("scores")
        if raw_a is None and raw_b is None and isinstance(scores, list) and len(scores) == 2:
            raw_a, raw_b = scores
        if raw_a is not None or raw_b is not None:
            comparison = next((keys[k] for k in _COMPARISON_KEYS if isinstance(keys.get(k), str)), None)
            return _judgment(raw_a, raw_b, comparison)
    return _parse_prose(text)


def combine_orders(teacher_first: Judgment, student_first: Judgment, tau: float) -> Verdict:
    """teacher_first has the teacher as A; student_first has the student as A. Means over both orders."""
    failed = [name for name, j in (("teacher_first", teacher_first), ("student_first", student_first)) if not j.ok]
    if failed:
        why = "; ".join(
            f"{name}: {j.reason}" for name, j in (("teacher_first", teacher_first), ("student_first", student_first))
            if not j.ok
        )
        return Verdict(None, None, "unscored", False, why)
    assert teacher_first.score_a is not None and teacher_first.score_b is not None  # ok implies scores
    assert student_first.score_a is not None and student_first.score_b is not None
    teacher = (teacher_first.score_a + student_first.score_b) / 2
    student = (teacher_first.score_b + student_first.score_a) / 2
    margin_1 = teacher_first.score_a - teacher_first.score_b  # teacher minus student, order 1
    margin_2 = student_first.score_b - student_first.score_a  # teacher minus student, order 2
    label: Literal["hard", "easy"] = "hard" if teacher - student >= tau - _TAU_SLACK else "easy"
    return Verdict(teacher, student, label, margin_1 * margin_2 < 0)


def judgment_schema() -> dict[str, Any]:
    """JSON schema for structured referee output, strict-mode shaped."""
    score = {"type": "integer", "minimum": 1, "maximum": 10}
    return {
        "type": "object",
        "properties": {"comparison": {"type": "string"}, "score_a": score, "score_b": score},
        "required": ["comparison", "score_a", "score_b"],
        "additionalProperties": False,
    }


def _parse_prose(text: str) -> Judgment:
    slots: dict[str, list[str | float]] = {"a": [], "b": []}
    problems: dict[str, str] = {}
    for match in _SLOT_SCORE.finditer(text):
        slot = {"1": "a", "2": "b"}.get(match.group("slot").lower(), match.group("slot").lower())
        value, why = _score_text(match.group("value"), match.group("scale"))
        if why == "not a number word":
            continue  # "A: excellent" is prose, not a score
        slots[slot].append(value if value is not None else why or "invalid score")
    comparison = text.strip()[:MAX_COMPARISON_CHARS] or None
    if not slots["a"] and not slots["b"]:
        first = next((line for line in text.splitlines() if line.strip()), "")
        pair = _PAIR_LINE.fullmatch(first)
        if pair is None:
            return _failed("no scores found")
        rest = text.strip()[len(first.strip()) :].strip() or None
        return _judgment(pair.group("a"), pair.group("b"), rest)
    values: dict[str, float] = {}
    for slot in ("a", "b"):
        found = slots[slot]
        if not found:
            problems[slot] = f"no score for answer {slot.upper()}"
        elif any(isinstance(v, str) for v in found):
            problems[slot] = f"score {slot.upper()}: " + next(v for v in found if isinstance(v, str))
        elif len(set(found)) > 1:
            problems[slot] = f"conflicting scores for answer {slot.upper()}: {sorted(set(found))}"
        else:
            values[slot] = float(found[0])
    if problems:
        return Judgment(values.get("a"), values.get("b"), comparison, False, "; ".join(problems.values()))
    return Judgment(values["a"], values["b"], comparison, True, None)


def _judgment(raw_a: Any, raw_b: Any, comparison: Any) -> Judgment:
    a, why_a = _score(raw_a)
    b, why_b = _score(raw_b)
    text = (comparison.strip()[:MAX_COMPARISON_CHARS] or None) if isinstance(comparison, str) else None
    problems = [f"score {s}: {w}" for s, w in (("A", why_a), ("B", why_b)) if w]
    if problems:
        return Judgment(a, b, text, False, "; ".join(problems))
    return Judgment(a, b, text, True, None)


def _score(raw: Any) -> tuple[float | None, str | None]:
    """A score in 1..10 from a JSON value or text, or (None, why)."""
    if raw is None:
        return None, "missing"
    if isinstance(raw, bool):
        return None, "a boolean, not a score"
    if isinstance(raw, (int, float)):
        return _in_range(float(raw))
    if isinstance(raw, str):
        match = re.fullmatch(r"\s*" + _VALUE + r"\s*", raw)
        if match is None:
            return None, f"not a score: {raw.strip()[:40]!r}"
        return _score_text(match.group("value"), match.group("scale"))
    return None, f"not a score: {type(raw).__name__}"


def _score_text(value: str, scale: str | None) -> tuple[float | None, str | None]:
    word = value.lower()
    if word in ("nan", "inf", "infinity"):
        return None, f"not a finite number: {value!r}"
    if word in _WORDS:
        number = float(_WORDS[word])
    elif re.fullmatch(r"[+-]?\d+(?:\.\d+)?", value):
        number = float(value)
    else:
        return None, "not a number word"
    if scale is not None:
        top = float(re.sub(r"[^\d.]", "", scale))
        if top != SCORE_MAX:
            return None, f"not on the 1-10 scale: {value}{scale.strip()}"
    return _in_range(number)


def _in_range(number: float) -> tuple[float | None, str | None]:
    if not math.isfinite(number):
        return None, f"not a finite number: {number}"
    if not SCORE_MIN <= number <= SCORE_MAX:
        return None, f"out of range 1-10: {number:g}"
    return number, None


def _norm_key(key: str) -> str:
    return re.sub(r"[\s-]+", "_", key.strip().lower())


def _failed(reason: str) -> Judgment:
    return Judgment(None, None, None, False, reason)
