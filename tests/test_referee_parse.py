"""Referee judgments (Lion, 2305.12870): typed parse, both orders, unscored never easy (RELIABILITY 21)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkd.roles.referee import Judgment, combine_orders, judgment_schema, parse_judgment


@pytest.mark.parametrize(
    ("reply", "a", "b"),
    [('{"comparison": "A is more accurate.", "score_a": 8, "score_b": 6}', 8, 6),
     ('Sure, here it is: {"comparison": "c", "score_a": 9, "score_b": 3} Hope that helps.', 9, 3),
     ('```json\n{"comparison": "c", "score_a": "8/10", "score_b": "seven"}\n```', 8, 7),
     ("Score A: 8/10\nScore B: 7/10\nA gives more detail.", 8, 7),
     ("Assistant 1: eight\nAssistant 2: Nine", 8, 9),
     ("**Score A**: 9\n**Score B**: 4", 9, 4),
     ("score_a = 7.5, score_b = 6", 7.5, 6),
     ("8 7\nAnswer A covers more ground.", 8, 7),
     ("8/10 6/10", 8, 6),
     ('{"scores": [10, 1]}', 10, 1)],
)
def test_accepted_forms(reply: str, a: float, b: float) -> None:
    judgment = parse_judgment(reply)
    assert (judgment.ok, judgment.score_a, judgment.score_b, judgment.reason) == (True, a, b, None)


def test_comparison_is_kept() -> None:
    assert parse_judgment('{"comparison": "A is longer.", "score_a": 8, "score_b": 6}').comparison == "A is longer."
    assert parse_judgment("8 7\nA covers more.").comparison == "A covers more."


@pytest.mark.parametrize(
    ("reply", "reason_part"),
    [("", "empty"), ("   ", "empty"), ('{"score_a": 11, "score_b": 5}', "out of range"),
     ('{"score_a": 0, "score_b": 5}', "out of range"), ('{"score_a": -3, "score_b": 5}', "out of range"),
     ('{"score_a": NaN, "score_b": 5}', "finite"), ('{"score_a": "NaN", "score_b": 5}', "finite"),
     ('{"score_a": true, "score_b": 5}', "boolean"), ('{"score_a": 8}', "missing"),
     ('{"score_a": [8], "score_b": 5}', "not a score"), ("Score A: 11\nScore B: 3", "out of range"),
     ("Score A: eleven\nScore B: 3", "out of range"), ("Score A: 4/5\nScore B: 3/5", "1-10 scale"),
     ("Score A: 8\nScore A: 3\nScore B: 5", "conflicting"), ("Score A: 8", "no score for answer B"),
     ("Both answers are fine.", "no scores"), ("A: great\nB: poor", "no scores"),
     ("Score A: -2\nScore B: 5", "out of range")],
)
def test_rejected_forms_are_not_ok_with_a_reason(reply: str, reason_part: str) -> None:
    judgment = parse_judgment(reply)
    assert not judgment.ok
    assert reason_part in (judgment.reason or ""), judgment


def ok(a: float, b: float) -> Judgment:
    return Judgment(a, b, "c", True, None)


def test_means_over_both_orders_and_tau() -> None:
    # teacher_first: teacher is A; student_first: student is A.
    verdict = combine_orders(ok(9, 6), ok(7, 8), tau=1.0)
    assert (verdict.teacher_score, verdict.student_score) == (8.5, 6.5)
    assert verdict.label == "hard" and not verdict.order_disagreement
    assert combine_orders(ok(8, 7), ok(7, 8), tau=1.0).label == "hard"  # difference exactly tau
    assert combine_orders(ok(8, 7.5), ok(7, 7.5), tau=1.0).label == "easy"
    assert combine_orders(ok(8.1, 7.1), ok(7.1, 8.1), tau=1.0).label == "hard"  # no float-rounding miss


def test_order_disagreement_is_a_flip_of_the_preferred_answer() -> None:
    # Position bias: each order prefers whichever answer came first.
    flipped = combine_orders(ok(9, 6), ok(9, 6), tau=1.0)
    assert flipped.order_disagreement and flipped.label == "easy"
    assert not combine_orders(ok(8, 8), ok(6, 9), tau=1.0).order_disagreement  # a tie is not a flip


@pytest.mark.parametrize("broken", ["", "eleven out of ten", '{"score_a": 11, "score_b": 2}', "NaN"])
def test_one_unparsed_order_is_unscored_never_easy(broken: str) -> None:
    for verdict in (combine_orders(parse_judgment(broken), ok(2, 9), tau=1.0),
                    combine_orders(ok(9, 2), parse_judgment(broken), tau=1.0),
                    combine_orders(parse_judgment(broken), parse_judgment(broken), tau=1.0)):
        assert verdict.label == "unscored"
        assert verdict.teacher_score is None and verdict.student_score is None
        assert verdict.reason


def test_schema_is_strict_shaped() -> None:
    schema = judgment_schema()
    assert set(schema["required"]) == {"comparison", "score_a", "score_b"}
    assert schema["properties"]["score_a"]["minimum"] == 1 and schema["properties"]["score_a"]["maximum"] == 10


score_values = st.one_of(st.integers(-20, 20), st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from(["eight", "8/10", "11", "NaN", "", "-1", "ten", "7.5", "4/5"]))
replies = st.one_of(
    st.text(max_size=300),
    st.builds(lambda a, b: f'{{"comparison": "x", "score_a": {a}, "score_b": {b}}}', score_values, score_values),
    st.builds(lambda a, b, t: f"{t}\nScore A: {a}\nScore B: {b}", score_values, score_values, st.text(max_size=50)),
    st.builds(lambda a, b: f"```\n{a} {b}\n```", score_values, score_values),
    st.sampled_from(["{" * 2000, "[" * 5000, "Score A: " + "9" * 5000]),
)


@settings(max_examples=500, deadline=None)
@given(replies)
def test_parser_never_raises_and_ok_scores_are_in_range(text: str) -> None:
    judgment = parse_judgment(text)
    if judgment.ok:
        for score in (judgment.score_a, judgment.score_b):
            assert score is not None and math.isfinite(score) and 1 <= score <= 10
        assert judgment.reason is None
    else:
        assert judgment.reason


@settings(max_examples=100, deadline=None)
@given(replies, replies, st.floats(0, 5))
def test_verdict_is_unscored_exactly_when_an_order_failed(first: str, second: str, tau: float) -> None:
    a, b = parse_judgment(first), parse_judgment(second)
    verdict = combine_orders(a, b, tau)
    assert (verdict.label == "unscored") == (not (a.ok and b.ok))
    if verdict.label != "unscored":
        assert (verdict.label == "hard") == (verdict.teacher_score - verdict.student_score >= tau - 1e-9)
