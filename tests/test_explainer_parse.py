"""Explainer replies (2403.15886 zero-shot): labels with synonyms, rationales, failures as data (RELIABILITY 23)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkd.config import ConfigError, TaskSection
from agentkd.roles.explainer import (
    explanation_schema,
    parse_explanation,
    parse_rationale,
    task_definition,
)

NLI = task_definition(TaskSection(kind="nli"))
ARITH = task_definition(TaskSection(kind="arithmetic"))
MC = task_definition(TaskSection(kind="multiple_choice")).with_options(["Paris", "London", "Rome", "Oslo"])
REASON = "The premise states directly that the man is outside."


@pytest.mark.parametrize(
    ("word", "label"),
    [("entailment", "entailment"), ("True", "entailment"), ("valid", "entailment"), ("entails", "entailment"),
     ("yes", "entailment"), ("False", "contradiction"), ("contradicts", "contradiction"), ("no", "contradiction"),
     ("inconclusive", "neutral"), ("uncertain", "neutral"), ("Unknown", "neutral"), ("maybe", "neutral"),
     ("**Neutral**", "neutral"), ('"contradiction".', "contradiction"), ("not enough information", "neutral")],
)
def test_nli_synonyms_map_to_labels(word: str, label: str) -> None:
    result = parse_explanation(f"Label: {word}\nReason: {REASON}", NLI)
    assert (result.ok, result.label, result.rationale) == (True, label, REASON)


@pytest.mark.parametrize(
    ("reply", "label"),
    [("Label: (B)", "b"), ("Label: b)", "b"), ("Label: B.", "b"), ("Label: 2)", "b"), ("Label: 2.", "b"),
     ("Label: London", "b"), ("Label: option c", "c"), ("Answer: (D) Oslo", "d"), ("Label: a", "a")],
)
def test_multiple_choice_forms(reply: str, label: str) -> None:
    result = parse_explanation(f"{reply}\nReason: It is the capital city of that country.", MC)
    assert (result.ok, result.label) == (True, label)


@pytest.mark.parametrize(
    ("reply", "label"),
    [("Label: 19\nReason: Tom had 12 apples and then bought 7 more.", "19"),
     ("Answer: 1,234\nExplanation: adding the two amounts gives this total", "1234"),
     ("Label: -4\nReason: subtracting nine from five leaves minus four", "-4"),
     ("Label: 19.0\nReason: twelve plus seven makes nineteen apples", "19"),
     ("12 + 7 = 19, so she has 19. The answer is 19.", "19"),
     ("19\nBecause twelve plus seven makes nineteen in total.", "19")],
)
def test_arithmetic_label_is_a_whole_number(reply: str, label: str) -> None:
    assert parse_explanation(reply, ARITH).label == label


def test_rationale_after_because_and_echoed_prefixes_stripped() -> None:
    result = parse_explanation("Label: entailment because the premise clearly states the same fact.", NLI)
    assert result.rationale == "the premise clearly states the same fact."
    result = parse_explanation(f"Answer: neutral\nExplanation: Reason: {REASON}", NLI)
    assert result.rationale == REASON
    result = parse_explanation(f"Entailment. {REASON}", NLI)
    assert (result.label, result.rationale) == ("entailment", REASON)


def test_json_reply_and_fenced_json_are_accepted() -> None:
    for reply in (f'{{"label": "true", "rationale": "{REASON}"}}',
                  f'Here you go:\n```json\n{{"Label": "entailment", "reason": "{REASON}"}}\n```'):
        assert parse_explanation(reply, NLI) == parse_explanation(f"Label: entailment\nReason: {REASON}", NLI)
    assert parse_explanation('{"label": 42, "rationale": "six times seven is forty two"}', ARITH).label == "42"
    assert not parse_explanation('{"label": ["a"], "rationale": "x"}', NLI).ok


# RELIABILITY 23: no label -> S (ok False, reason); label not in set -> S; rationale < 5 words -> label only.
@pytest.mark.parametrize(
    ("reply", "reason_part"),
    [("", "empty"), ("   \n", "empty"), ("I am not sure what you mean.", "no label"),
     ("Label: purple\nReason: it is a nice colour to look at", "not in the label set"),
     ("Label: not entailment\nReason: the facts differ in a small way", "negated"),
     ("Label: neutral or contradiction\nReason: could be either of those two", "ambiguous"),
     ("Label:\nReason: there is nothing here to see at all", "empty label")],
)
def test_missing_or_unknown_label_is_a_failure_with_a_reason(reply: str, reason_part: str) -> None:
    result = parse_explanation(reply, NLI)
    assert not result.ok and result.label is None and result.rationale is None
    assert reason_part in (result.reason or "")


@pytest.mark.parametrize("reply", ["Label: 7\nReason: seven", "Label: 12 + 7 = 19 and also 20", "Label: 3.5"])
def test_arithmetic_label_must_be_one_whole_number(reply: str) -> None:
    result = parse_explanation(reply, ARITH)
    assert result.ok == (reply.endswith("seven")), result
    if not result.ok:
        assert result.reason


def test_short_rationale_keeps_the_label_for_the_label_task_only() -> None:
    result = parse_explanation("Label: contradiction\nReason: they differ.", NLI)
    assert (result.ok, result.label, result.rationale) == (True, "contradiction", None)
    assert result.reason == "rationale under 5 words"
    assert parse_explanation("Label: contradiction", NLI).reason == "no rationale"


def test_min_rationale_words_comes_from_config() -> None:
    strict = task_definition(TaskSection(kind="nli", min_rationale_words=12))
    assert parse_explanation(f"Label: yes\nReason: {REASON}", strict).rationale is None


def test_custom_task_uses_config_labels_and_synonyms() -> None:
    task = task_definition(TaskSection(kind="custom", labels=["Positive", "Negative"], synonyms={"good": "positive"}))
    assert task.labels_text == "positive, negative"
    assert parse_explanation("Label: Good\nReason: the reviewer loved every part of it", task).label == "positive"
    with pytest.raises(ConfigError, match="task.labels"):
        task_definition(TaskSection(kind="custom"))
    with pytest.raises(ConfigError, match="task.synonyms.meh"):
        task_definition(TaskSection(kind="custom", labels=["a"], synonyms={"meh": "b"}))


def test_rationalisation_reply() -> None:
    assert parse_rationale(f"Reason: {REASON}", "entailment", NLI).rationale == REASON
    assert parse_rationale(REASON, "entailment", NLI).ok
    failed = parse_rationale("Because yes.", "entailment", NLI)
    assert (failed.ok, failed.label, failed.reason) == (False, "entailment", "rationale under 5 words")


def test_structured_output_schema() -> None:
    schema = explanation_schema(NLI)
    assert schema["properties"]["label"]["enum"] == ["entailment", "neutral", "contradiction"]
    assert schema["required"] == ["label", "rationale"] and schema["additionalProperties"] is False
    assert "pattern" in explanation_schema(ARITH)["properties"]["label"]


reply_text = st.one_of(
    st.text(max_size=300),
    st.builds(lambda a, b: f"Label: {a}\nReason: {b}", st.text(max_size=40), st.text(max_size=80)),
    st.builds(lambda a, b: f'{{"label": {a}, "rationale": {b}}}', st.text(max_size=20), st.text(max_size=40)),
    st.sampled_from(["{" * 500, "[" * 3000, "Label: " + "9" * 5000, "```\n```", "Label: (((", "\x00Label: yes"]),
)


@settings(max_examples=400, deadline=None)
@given(reply_text, st.sampled_from([NLI, ARITH, MC]))
def test_parser_never_raises_and_failures_have_reasons(text: str, task) -> None:
    result = parse_explanation(text, task)
    assert result.ok == (result.label is not None)
    if not result.ok:
        assert result.reason and result.rationale is None
    if result.rationale is not None:
        assert len(result.rationale.split()) >= task.min_rationale_words
    if result.ok and task is NLI:
        assert result.label in NLI.labels
    rationale = parse_rationale(text, "x", task)
    assert rationale.ok == (rationale.rationale is not None) and (rationale.ok or rationale.reason)
