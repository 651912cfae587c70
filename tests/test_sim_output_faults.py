"""The sim's output faults (RELIABILITY.md 21-23): unusable referee, generator and explainer replies at
configurable shares, each one its parser rejects, the same for the same prompt in every run."""

from __future__ import annotations

import random

import pytest

from agentkd.config import SimSection, config_from_dict
from agentkd.roles.explainer import parse_explanation
from agentkd.roles.generator import parse_generated
from agentkd.roles.referee import combine_orders, parse_judgment
from agentkd.roles.requests import RolePrompts
from agentkd.teachers.base import TeacherRequest
from agentkd.teachers.sim.roles import UNPARSEABLE_JUDGMENTS, bad_generations, reply
from agentkd.teachers.sim.world import sample_problems, worked_answer

PROBLEMS = sample_problems(200, seed=21)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> RolePrompts:
    return RolePrompts(config_from_dict({"run": {"name": "f", "dir": str(tmp_path_factory.mktemp("runs"))},
                                         "teacher": {"provider": "sim"}}))


def sim_text(request: TeacherRequest, faults: SimSection, *, json_mode: bool = True, seed: int = 0) -> str:
    system = next((m["content"] for m in request.messages if m["role"] == "system"), "")
    user = request.messages[-1]["content"]
    return reply(system, user, json_mode=json_mode, rng=random.Random(seed), phrasing=None, error_rate=0.0,
                 output_faults=faults).text


def pair(prompts: RolePrompts, problem, faults: SimSection, **kw):
    teacher, student = worked_answer(problem, None), "The answer is 99999."
    first = parse_judgment(sim_text(prompts.judge(problem.text, teacher, student), faults, **kw))
    second = parse_judgment(sim_text(prompts.judge(problem.text, student, teacher), faults, **kw))
    return first, second, combine_orders(first, second, tau=1.0)


def test_every_unusable_form_is_rejected_by_its_parser():
    assert not [text for text in UNPARSEABLE_JUDGMENTS if parse_judgment(text).ok]
    assert not [text for text in bad_generations(PROBLEMS[0].text) if parse_generated(text).ok]


def test_without_output_faults_every_reply_parses(prompts):
    faults = SimSection(error_rate=0.0)
    for problem in PROBLEMS[:40]:
        assert pair(prompts, problem, faults)[2].label != "unscored"
        assert parse_generated(sim_text(prompts.generate(problem.text, prompt="hard"), faults)).ok
        assert parse_explanation(sim_text(prompts.explain(problem.text), faults), prompts.task).label is not None


@pytest.mark.parametrize("json_mode", [True, False])
def test_unparseable_referee_share_leaves_that_share_of_orders_unscored(prompts, json_mode):
    faults = SimSection(referee_unparseable_rate=0.3)
    orders = [j for problem in PROBLEMS for j in pair(prompts, problem, faults, json_mode=json_mode)[:2]]
    failed = sum(not j.ok for j in orders)
    assert 0.22 < failed / len(orders) < 0.38, failed
    # The share is a property of the prompt, not a draw: the same replies in another run.
    again = [j for problem in PROBLEMS for j in pair(prompts, problem, faults, json_mode=json_mode, seed=5)[:2]]
    assert [j.ok for j in again] == [j.ok for j in orders]


def test_one_order_missing_fails_exactly_one_order_of_each_faulted_pair(prompts):
    results = [pair(prompts, problem, SimSection(referee_one_order_rate=0.5)) for problem in PROBLEMS]
    faulted = [(a.ok, b.ok) for a, b, _ in results if not (a.ok and b.ok)]
    assert faulted and all(ok.count(False) == 1 for ok in faulted)  # never both: one order missing
    assert 0.4 < len(faulted) / len(results) < 0.6
    assert all(v.label == "unscored" and v.reason for a, b, v in results if not (a.ok and b.ok))
    everything = [pair(prompts, problem, SimSection(referee_one_order_rate=1.0)) for problem in PROBLEMS[:30]]
    assert all([a.ok, b.ok].count(False) == 1 and v.label == "unscored" for a, b, v in everything)


@pytest.mark.parametrize("prompt", ["hard", "easy", "plain"])
def test_bad_generator_share_is_rejected_with_a_reason(prompts, prompt):
    faults = SimSection(generator_bad_rate=0.4)
    parsed = [parse_generated(sim_text(prompts.generate(p.text, prompt=prompt), faults)) for p in PROBLEMS]
    rejected = [g for g in parsed if not g.ok]
    assert 0.3 < len(rejected) / len(parsed) < 0.5
    assert all(g.reason for g in rejected)
    assert len({g.reason.split(":")[0] for g in rejected}) >= 3  # a list, a missing field, a non-string...


@pytest.mark.parametrize("json_mode", [True, False])
@pytest.mark.parametrize("with_rationale", [True, False])
def test_explainer_no_label_share_is_a_parse_failure(prompts, json_mode, with_rationale):
    faults = SimSection(explainer_no_label_rate=0.3)
    parsed = [parse_explanation(sim_text(prompts.explain(p.text, with_rationale=with_rationale), faults,
                                         json_mode=json_mode), prompts.task) for p in PROBLEMS]
    unlabelled = [e for e in parsed if e.label is None]
    assert 0.2 < len(unlabelled) / len(parsed) < 0.4
    assert all(not e.ok and e.reason for e in unlabelled)
