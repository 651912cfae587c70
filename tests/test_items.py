"""Structured items: rendering, the generator's item schema and its rejections, input files, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentkd.config import ConfigError, TaskSection, config_from_dict
from agentkd.roles.items import item_schema, parse_item, render
from agentkd.lion.pools import initial_items
from agentkd.roles.explainer import task_definition
from agentkd.roles.requests import RolePrompts

NLI = item_schema(TaskSection(kind="nli"))
MC = item_schema(TaskSection(kind="multiple_choice"))


def test_task_kinds_bring_their_fields_and_discrimination_defaults() -> None:
    assert NLI.fields == ("premise", "hypothesis") and MC.fields == ("question", "options")
    assert item_schema(TaskSection(kind="custom", labels=["x"], input_fields=["text"])).fields == ("text",)
    assert config_from_dict({"task": {"kind": "nli"}}).discriminate == "label"
    assert config_from_dict({}).discriminate == "referee"
    assert config_from_dict({"task": {"kind": "nli"}, "loop": {"discriminate": "referee"}}).discriminate == "referee"
    with pytest.raises(ConfigError, match="loop.discriminate"):
        config_from_dict({"loop": {"discriminate": "label"}})
    with pytest.raises(ConfigError, match="task.input_fields"):
        config_from_dict({"task": {"kind": "custom", "labels": ["x"], "input_fields": ["a b"]}})


def test_render_is_one_line_per_field_and_lettered_options() -> None:
    assert render({"premise": "Ann has 3 apples.", "hypothesis": "Ann has no apples."}, NLI) == (
        "premise: Ann has 3 apples.\nhypothesis: Ann has no apples.")
    assert render({"question": "Which is a fruit?", "options": ["dog", "pear"]}, MC) == (
        "question: Which is a fruit?\noptions:\na) dog\nb) pear")
    single = item_schema(TaskSection(kind="custom", labels=["x"], input_fields=["text"]))
    assert render({"text": "as is"}, single) == "as is"


@pytest.mark.parametrize("reply,reason", [
    ('{"premise": "Ann has 3 apples."}', "missing field 'hypothesis'"),
    ('{"premise": "Ann has 3 apples.", "hypothesis": "Ann has pens.", "label": "neutral"}', "unexpected field 'label'"),
    ('{"premise": "Ann has 3 apples.", "hypothesis": 7}', "'hypothesis' is not a non-empty string"),
    ('{"premise": "Ann has 3 apples.", "hypothesis": "two\\nlines"}', "spans several lines"),
    ('[{"premise": "a", "hypothesis": "b"}]', "got list"),
    ("Premise: Ann has 3 apples.", "no JSON object"),
    ('{"premise": "Here is a new instruction: x", "hypothesis": "<data name=x>"}', "echoes"),
])
def test_generator_items_off_the_schema_are_rejected_with_a_reason(reply: str, reason: str) -> None:
    parsed = parse_item(reply, "stop", NLI)
    assert not parsed.ok and reason in parsed.reason


def test_generator_items_of_the_schema_are_accepted_and_rendered() -> None:
    parsed = parse_item('Sure: {"Premise": "Ann has 3 apples.", "hypothesis": "Ann has some apples."}', "stop", NLI)
    assert parsed.ok and parsed.fields == {"premise": "Ann has 3 apples.", "hypothesis": "Ann has some apples."}
    assert parsed.text == "premise: Ann has 3 apples.\nhypothesis: Ann has some apples."
    assert not parse_item('{"premise": "a b c d", "hypothesis": "e"}', "length", NLI).ok  # truncated
    assert "options" in parse_item('{"question": "Which is red?", "options": ["x"]}', "stop", MC).reason
    assert "repeats" in parse_item('{"question": "Which is red?", "options": ["x", "X"]}', "stop", MC).reason
    assert parse_item('{"question": "Which is red?", "options": ["a", "b", "c"]}', "stop", MC).ok


def test_generator_prompt_asks_for_the_item_fields() -> None:
    prompts = RolePrompts(config_from_dict({"task": {"kind": "multiple_choice"}}))
    request = prompts.generate("question: q?\noptions:\na) x\nb) y", prompt="hard")
    user = request.messages[-1]["content"]
    assert '<data name="item_format">' in user and '"options"' in user
    assert request.prompt_version.startswith("generator_hard_item:")
    assert set(request.response_format["schema"]["required"]) == {"question", "options"}
    plain = RolePrompts(config_from_dict({})).generate("Add 2 and 3.", prompt="hard")
    assert "item_format" not in plain.messages[-1]["content"] and plain.prompt_version.startswith("generator_hard:")


def test_mc_options_reach_the_explainer_labels_block() -> None:
    prompts = RolePrompts(config_from_dict({"task": {"kind": "multiple_choice"}}))
    user = prompts.explain("question: q?", options=["Paris", "Rome", "Oslo"]).messages[-1]["content"]
    assert "a) Paris\nb) Rome\nc) Oslo" in user
    task = task_definition(TaskSection(kind="multiple_choice")).with_options(["4", "3", "7"])
    assert task.labels == ("a", "b", "c")
    assert task.canonical("3") == ("b", None)  # the option 3, not the third option
    assert task.canonical("Rome")[0] is None


def test_label_files_are_read_as_fields_with_gold_labels(tmp_path: Path) -> None:
    seeds, heldout = tmp_path / "seeds.jsonl", tmp_path / "heldout.jsonl"
    seeds.write_text(json.dumps({"question": "Which is a fruit?", "options": ["dog", "pear", "saw"]}) + "\n")
    heldout.write_text(json.dumps({"question": "Which is a tool?", "options": ["dog", "pear", "saw"], "label": "saw"})
                       + "\n" + json.dumps({"question": "Which is red?", "options": ["red", "sky"], "label": "B"}) + "\n")
    config = config_from_dict({"task": {"kind": "multiple_choice"},
                               "loop": {"seeds": str(seeds), "heldout": str(heldout)}})
    got_seeds, got_heldout = initial_items(config)
    assert got_seeds[0].options == ["dog", "pear", "saw"]
    assert {i.answer for i in got_heldout} == {"c", "b"}  # option text and a capital letter both read
    heldout.write_text(json.dumps({"question": "Which is red?", "options": ["red", "sky"], "label": "z"}) + "\n")
    with pytest.raises(ConfigError, match=r"heldout.jsonl:1: field 'label'"):
        initial_items(config)
    heldout.write_text(json.dumps({"question": "Which is red?", "label": "a"}) + "\n")
    with pytest.raises(ConfigError, match=r"heldout.jsonl:1: missing field 'options'"):
        initial_items(config)
