"""Generator seed selection (Lion's hard/easy vs the random baseline), honest child provenance, and the
discrimination metrics that follow it; the loop's stages run on the embedded sim, no student trained."""

from __future__ import annotations

import json
import random

import pytest
from rich.console import Console

import agentkd.lion.loop as loop_module
from agentkd.config import ConfigError, config_from_dict
from agentkd.lion.loop import Lion
from agentkd.lion.plan import calls_per_iteration, plan_calls
from agentkd.lion.pools import Item
from agentkd.roles.requests import RolePrompts
from agentkd.lion.selection import generator_draws, judge_metrics
from agentkd.session import teacher_session
from agentkd.teachers.base import TeacherReply
from agentkd.teachers.sim.roles import reply
from agentkd.teachers.sim.world import sample_problems, solve, worked_answer


def config(tmp_path, train: dict | None = None, **loop):
    return config_from_dict({
        "run": {"name": "sel", "dir": str(tmp_path / "runs")},
        "teacher": {"provider": "sim"},
        "sim": {"error_rate": 0.0},
        "train": train or {},
        "loop": {"seed_count": 12, "heldout_count": 6, "new_per_iteration": 10, "judge_sample": "all",
                 "eval_judge_sample": 3, **loop},
    })


def items(n: int, *, source: str = "seed", iteration: int = 1) -> list[Item]:
    return [Item(f"{source}{k}", p.text, iteration, source) for k, p in enumerate(sample_problems(n, seed=11))]


# ---- pure selection ------------------------------------------------------------------------------
def test_random_selection_draws_plain_prompts_uniformly_from_the_whole_pool(tmp_path):
    pool = items(30) + items(30, source="hard", iteration=2)
    labels = {i.id: "hard" for i in pool[:3]}  # ignored: random selection uses no verdicts
    draws = generator_draws(config(tmp_path, selection="random", new_per_iteration=300).loop, pool, labels,
                            random.Random(0))
    assert len(draws) == 300
    assert {(d.prompt, d.source) for d in draws} == {("plain", "plain")}
    parents = {d.seed.id for d in draws}
    assert len(parents) > 45  # 300 uniform draws with replacement reach nearly all of 60 seeds
    assert any(p.startswith("hard") for p in parents) and any(p.startswith("seed") for p in parents)
    assert len({d.number for d in draws}) == 300  # every request distinct


def test_without_hard_seeds_easy_seeds_sent_to_the_hard_prompt_are_not_recorded_as_hard(tmp_path):
    pool = items(10)
    draws = generator_draws(config(tmp_path).loop, pool, {i.id: "easy" for i in pool}, random.Random(0))
    assert {(d.prompt, d.source) for d in draws} == {("hard", "hard_prompt_easy_seed"), ("easy", "easy")}
    only_hard = generator_draws(config(tmp_path).loop, pool, {i.id: "hard" for i in pool}, random.Random(0))
    assert {(d.prompt, d.source) for d in only_hard} == {("hard", "hard"), ("easy", "easy_prompt_hard_seed")}


def test_hard_yield_and_hard_share_leave_unscored_verdicts_out():
    children = items(4, source="hard", iteration=2)
    labels = {children[0].id: "hard", children[1].id: "hard", children[2].id: "easy", children[3].id: "unscored"}
    metrics = judge_metrics(labels, children, 2, None)
    assert metrics["hard_yield"] == pytest.approx(2 / 3)
    assert metrics["hard_share"] == pytest.approx(2 / 3)
    assert (metrics["judged"], metrics["scored"], metrics["unscored_share"]) == (4, 3, 0.25)


def test_targeted_generation_needs_lion_selection(tmp_path):
    with pytest.raises(ConfigError, match="loop.targeted_generation"):
        config(tmp_path, selection="random", targeted_generation=True)


# ---- the sim and the plain prompt ----------------------------------------------------------------
def test_sim_answers_the_plain_prompt_with_a_new_problem_of_the_seed_kind_and_difficulty(tmp_path):
    prompts = RolePrompts(config(tmp_path))
    rng = random.Random(4)
    for seed in sample_problems(40, seed=9, steps=(1, 3), digits=(1, 2)):
        messages = prompts.generate(seed.text, prompt="plain").messages
        text = reply(messages[0]["content"], messages[1]["content"], json_mode=True, rng=rng, phrasing=None,
                     error_rate=0.0).text
        new = solve(json.loads(text)["instruction"])
        assert new is not None and new.text != seed.text
        assert (new.kind, new.steps, new.digits) == (seed.kind, seed.steps, seed.digits)


# ---- estimate --------------------------------------------------------------------------------------
def test_estimate_of_random_selection_counts_no_referee_calls_and_the_plain_prompt(tmp_path):
    lion, random_ = config(tmp_path), config(tmp_path, selection="random")
    assert calls_per_iteration(lion, 2)["referee"] == 2 * (12 + 10)
    counted = calls_per_iteration(random_, 2)
    assert "referee" not in counted
    assert counted["generator"] == 10 and counted["eval"] == 3 * 3
    plan = plan_calls(random_)
    assert "referee" not in plan and "generator" in plan
    plain = RolePrompts(random_).generate("x", prompt="plain")
    hard = RolePrompts(lion).generate("x", prompt="hard")
    assert plain.prompt_version.startswith("generator_plain:") and plain.key != hard.key


# ---- the loop's stages on the embedded sim -------------------------------------------------------
class RefusesToJudge:
    """The sim behind the adapter seam, except that the referee gives no verdict on chosen instructions."""

    def __init__(self, inner, texts: set[str]) -> None:
        self.inner, self.texts, self.provider = inner, texts, inner.provider

    async def complete(self, request, *, timeout_s: float) -> TeacherReply:
        if request.role == "referee" and any(t in request.messages[-1]["content"] for t in self.texts):
            return TeacherReply(text="I would rather not say.", finish_reason="stop", input_tokens=30, output_tokens=5)
        return await self.inner.complete(request, timeout_s=timeout_s)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_judge_books_usd_per_hard_and_hard_yield_over_scored_verdicts_only(tmp_path):
    cfg = config(tmp_path)
    async with teacher_session(cfg) as session:
        lion = Lion(cfg, session, Console(quiet=True), show_progress=False)
        await lion.setup()
        children = [Item(f"c{k}", p.text, 1, "hard") for k, p in enumerate(sample_problems(4, seed=77))]
        await session.store.write_many("instructions", [
            {"id": c.id, "text": c.text, "source": "hard", "iteration": 1, "pool": "train"} for c in children])
        pool = session.store.query("SELECT id, text FROM instructions WHERE pool = 'train'")
        await session.store.write_many("responses", [
            {"instruction_id": i, "actor": actor, "iteration": 1, "text": text}
            for i, problem in pool
            for actor, text in (("teacher", worked_answer(solve(problem))), ("student", "The answer is 99999."))])
        unscored = {children[0].text}
        session.gateway.teachers = {k: RefusesToJudge(t, unscored) for k, t in session.gateway.teachers.items()}
        await lion.judge(1)
        spend = lion._spend_metrics(1)
        metrics = dict(session.store.query("SELECT name, arg_max(value, created_at) FROM metrics "
                                           "WHERE iteration = 1 GROUP BY name"))
        referee_usd = session.store.query("SELECT sum(cost_usd) FROM calls WHERE role = 'referee'")[0][0]
    judged = len(pool)
    assert (metrics["judged"], metrics["scored"]) == (judged, judged - 1)
    assert metrics["hard_share"] == 1.0  # a student answer of 99999 is always worse
    assert metrics["hard_yield"] == 1.0  # 3 scored hard children of 3, the unscored one left out
    assert spend["usd_per_hard"] == pytest.approx(referee_usd / (judged - 1))


async def test_generate_with_no_hard_seed_records_hard_prompt_children_of_easy_seeds_honestly(tmp_path):
    cfg = config(tmp_path)
    async with teacher_session(cfg) as session:
        lion = Lion(cfg, session, Console(quiet=True), show_progress=False)
        await lion.setup()
        seeds = session.store.query("SELECT id FROM instructions WHERE source = 'seed'")
        await session.store.write_many("verdicts", [
            {"instruction_id": i, "iteration": 1, "teacher_score": 9.0, "student_score": 9.0, "label": "easy",
             "order_disagreement": False} for (i,) in seeds])
        await lion.generate(1)
        rows = session.store.query("SELECT source, count(*) FROM instructions WHERE parent_id IS NOT NULL "
                                   "GROUP BY source")
        prompts = session.store.query("SELECT split_part(prompt_version, ':', 1), count(*) FROM calls "
                                      "WHERE role = 'generator' GROUP BY 1")
    assert dict(rows) == {"hard_prompt_easy_seed": 5, "easy": 5}
    assert dict(prompts) == {"generator_hard": 5, "generator_easy": 5}


async def test_rationale_student_is_judged_on_its_explanation_and_label_but_scored_on_the_label(tmp_path,
                                                                                                 monkeypatch):
    cfg = config(tmp_path, train={"objective": "rationale"})
    decoded: list[str] = []

    def fake_decode(student, instructions, *, task, **_):  # the student, as a stand-in with known outputs
        decoded.append(task)
        if task == "predict":
            return [str(solve(x).answer) for x in instructions]
        return ["I work through each step in turn." for _ in instructions]

    monkeypatch.setattr(loop_module, "generate_answers", fake_decode)
    async with teacher_session(cfg) as session:
        lion = Lion(cfg, session, Console(quiet=True), show_progress=False)
        lion.student = object()  # never loaded: decoding is faked above
        await lion.setup()
        await lion.evaluate(1)
        accuracy = session.store.query("SELECT value FROM metrics WHERE name = 'accuracy'")[0][0]
        shown = [json.loads(r[0])["messages"][-1]["content"] for r in session.store.query(
            "SELECT request_json FROM calls WHERE role = 'eval' AND prompt_version LIKE 'referee:%'")]
        stored = dict(session.store.query("SELECT actor, count(*) FROM responses GROUP BY actor"))
    assert sorted(decoded) == ["explain", "predict"]
    assert accuracy == 1.0  # held-out accuracy reads the bare label
    assert shown and all("I work through each step in turn. The answer is " in s for s in shown)
    assert stored == {"student": 6, "student_label": 6}
