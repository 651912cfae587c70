"""The sim's label world: verifiable NLI / multiple-choice items, and what its roles say about them."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from agentkd.config import SimSection, TaskSection
from agentkd.roles.items import item_schema, parse_item, render
from agentkd.roles.explainer import parse_explanation, task_definition
from agentkd.teachers.sim import label_world as lw
from agentkd.teachers.sim.roles import reply

NLI = task_definition(TaskSection(kind="nli"))
MC = task_definition(TaskSection(kind="multiple_choice"))


def test_nli_labels_are_checked_by_the_premise() -> None:
    cases = {
        ("Ann has 3 apples.", "Ann has some apples."): "entailment",
        ("Ann has 3 apples.", "Ann has no apples."): "contradiction",
        ("Ann has 3 apples.", "Ben has no apples."): "neutral",  # nothing is said of Ben
        ("Ann has 3 apples.", "Ann likes apples."): "neutral",
        ("Ann has 3 apples. Ben has 5 pens.", "Ben has exactly 5 pens."): "entailment",
        ("Ann has 3 apples. Ben has 5 pens.", "Ben has exactly 4 pens."): "contradiction",
        ("Ann has 3 apples.", "Ann has more than 3 apples."): "contradiction",
        ("Ann has 3 apples.", "Ann has fewer than 4 apples."): "entailment",
        ("Ann has 3 apples.", "Ann has fewer than 4 pens."): "neutral",
    }
    for (premise, hypothesis), label in cases.items():
        item = lw.solve(lw.render({"premise": premise, "hypothesis": hypothesis}))
        assert item is not None and item.label == label, (premise, hypothesis)
    assert lw.solve("premise: Ann owns a boat.\nhypothesis: Ann has some apples.") is None


def test_mc_items_have_exactly_one_right_option() -> None:
    item = lw.solve(lw.render({"question": "Which of these is a fruit?", "options": ["dog", "pear", "saw"]}))
    assert item is not None and item.label == "b"
    assert lw.solve(lw.render({"question": "Which of these is a fruit?", "options": ["pear", "plum", "saw"]})) is None
    assert lw.solve(lw.render({"question": "What is 3 plus 4?", "options": ["6", "8", "7"]})).label == "c"
    for item in lw.sample_items("multiple_choice", 200, seed=1):
        assert 3 <= len(item.fields["options"]) <= 5


def test_world_items_render_as_agentkd_renders_fields() -> None:
    for task in ("nli", "multiple_choice"):
        schema = item_schema(TaskSection(kind=task))
        for item in lw.sample_items(task, 50, seed=3):
            assert render(item.fields, schema) == item.text


@pytest.mark.parametrize("task", ["nli", "multiple_choice"])
def test_explainer_replies_vary_and_parse_to_the_label_they_give(task: str) -> None:
    """Every phrasing and synonym the sim uses is read back as the label it meant, with a rationale."""
    items = lw.sample_items(task, 300, seed=0, sizes=(1, 2))
    replies, wrong = set(), 0
    for k, item in enumerate(items):
        definition = NLI if task == "nli" else MC.with_options(item.fields["options"])
        for json_mode in (False, True):
            text = lw.explain(item.text, json_mode=json_mode, with_reason=True, rng=random.Random(k), error_rate=0.0)
            parsed = parse_explanation(text, definition)
            assert parsed.label == item.label, text
            assert parsed.rationale is not None and len(parsed.rationale.split()) >= 5, text
            replies.add(text.split(":", 1)[0][:12])
        label_only = lw.explain(item.text, json_mode=False, with_reason=False, rng=random.Random(k), error_rate=0.0)
        assert "\n" not in label_only and parse_explanation(label_only, definition).label == item.label
        noisy = lw.explain(item.text, json_mode=False, with_reason=True, rng=random.Random(k + 10_000), error_rate=0.3)
        wrong += parse_explanation(noisy, definition).label != item.label
    assert len(replies) >= 5  # the forms differ, not only the words inside one form
    assert 0.2 < wrong / len(items) < 0.4  # the configured error rate, within sampling noise


def test_generator_writes_items_of_the_seed_structure() -> None:
    seed = lw.solve(lw.render({"premise": "Ann has 3 apples. Ben has 5 pens.", "hypothesis": "Ben has exactly 5 pens."}))
    rng = random.Random(0)
    same = [lw.solve(lw.render(lw.generate(seed.text, easy=False, rng=rng))) for _ in range(20)]
    assert all(s is not None and s.kind == "exact" and s.size == 2 for s in same)
    rarer = [lw.solve(lw.render(lw.generate(seed.text, easy=True, rng=rng))) for _ in range(20)]
    assert all(r is not None and r.kind != "exact" for r in rarer)
    kinds = Counter(r.kind for r in rarer)
    assert all(lw.NLI_KINDS[k] <= lw.NLI_KINDS["exact"] for k in kinds)


def test_sim_routes_label_items_to_the_label_world() -> None:
    """Through roles.reply, as the HTTP server calls it: a rendered item in the prompt's data blocks."""
    item = lw.sample_items("multiple_choice", 1, seed=5)[0]
    block = f'<data name="input">\n{item.text}\n</data>\n<data name="labels">\na, b, c\n</data>'
    text = reply("", f"Say the label and a Reason.\n{block}", json_mode=False, rng=random.Random(0), phrasing=None,
                 error_rate=0.0).text
    assert parse_explanation(text, MC.with_options(item.fields["options"])).label == item.label
    seed = f'<data name="seed_instruction">\n{item.text}\n</data>'
    generated = reply("", seed, json_mode=True, rng=random.Random(0), phrasing=None, error_rate=0.0)
    parsed = parse_item(generated.text, "stop", item_schema(TaskSection(kind="multiple_choice")))
    assert parsed.ok and lw.solve(parsed.text) is not None
    bad = reply("", seed, json_mode=True, rng=random.Random(0), phrasing=None, error_rate=0.0,
                output_faults=SimSection(generator_bad_rate=1.0))
    assert not parse_item(bad.text, "stop", item_schema(TaskSection(kind="multiple_choice"))).ok
    judged = reply("", f'<data name="instruction">\n{item.text}\n</data>\n<data name="answer_a">\n'
                       f'The answer is {item.label}.\n</data>\n<data name="answer_b">\nnothing\n</data>',
                   json_mode=True, rng=random.Random(0), phrasing=None, error_rate=0.0)
    scores = json.loads(judged.text)
    assert scores["score_a"] >= 8 and scores["score_b"] <= 6
