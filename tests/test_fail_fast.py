"""Fail fast (issue 16, problem 8): a teacher that cannot do a role stops the run before the budget goes,
and a non-sim teacher's held-out set comes from the user's data, never from the sim's world."""

from __future__ import annotations

import json

import pytest

from agentkd.cli import EXIT_UNUSABLE, main
from agentkd.config import FailFastSection, SimSection
from agentkd.roles.replies import ReplyCheck, UnusableReplies, wilson_lower
from agentkd.store.writer import Store
from agentkd.teachers.sim import sim_in_thread
from agentkd.teachers.sim.server import Generation
from agentkd.workpool import WORKERS_PER_SLOT
from tests.test_cli import problems, read_rows, write_config, write_rows

# Teacher text with markup and a terminal escape in it: printed as data, it reaches the user verbatim.
PROSE = "I would rather not rank these. [bold]Both[/bold] read well to me \x1b[31mtoday\x1b[0m."


async def answers_in_prose(request) -> Generation:
    return Generation(PROSE, cut=False)


def test_the_check_stops_at_min_results_when_every_result_fails_and_names_role_model_and_share():
    check = ReplyCheck(FailFastSection(), model_of=lambda role: f"{role}-model")
    check.stage = "judge"
    for _ in range(19):
        check.record("referee", False, PROSE, "no scores found")
    with pytest.raises(UnusableReplies) as stop:
        check.record("referee", False, PROSE, "no scores found")
    err = stop.value
    assert (err.role, err.stage, err.model, err.tally.results, err.tally.unusable) == (
        "referee", "judge", "referee-model", 20, 20)
    text = err.report()
    assert "20 of the first 20 referee results in stage judge were unusable (100%, model referee-model)" in text
    assert json.dumps(PROSE, ensure_ascii=False) in text  # quoted as data: the escape shows as \u001b
    assert "\x1b" not in text


def test_the_check_counts_each_role_and_stage_apart_and_tolerates_a_third_unusable():
    check = ReplyCheck(FailFastSection(), model_of=lambda role: "m")
    for stage in ("answer", "generate"):
        check.stage = stage
        for i in range(15):  # 15 failures in each stage: under min_results in both
            check.record("explainer" if stage == "answer" else "generator", False, "x")
    check.stage = "judge"
    for i in range(3000):  # one in three unusable, for a long stage: never stopped by noise
        check.record("referee", i % 3 != 0, "x")
    assert check.shares()["referee/judge"] == {"results": 3000, "unusable": 1000, "share": 0.3333}
    assert check.shares()["explainer/answer"]["unusable"] == 15


def test_a_share_of_one_turns_the_check_off_and_the_bound_is_wilsons():
    check = ReplyCheck(FailFastSection(max_share=1.0), model_of=lambda role: "m")
    for _ in range(500):
        check.record("generator", False, "x")
    assert wilson_lower(20, 20) == pytest.approx(0.8808, abs=1e-4)
    assert wilson_lower(0, 0) == 0.0


def test_teach_stops_a_referee_whose_replies_never_parse_and_a_higher_threshold_finishes(tmp_path, capsys):
    config = write_config(tmp_path, "[sim]\nreferee_unparseable_rate = 1.0\n[limits]\nmax_concurrency = 2\n")
    rows = [{"instruction": p["instruction"], "teacher_answer": "The answer is 4.", "student_answer": "5"}
            for p in problems(30)]
    data, out = write_rows(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    cmd = ["teach", str(config), "--role", "referee", "--input", str(data), "--output", str(out), "--no-progress"]
    assert main(cmd) == EXIT_UNUSABLE
    err = capsys.readouterr().err
    assert "referee results in stage teach were unusable (100%, model sim-teacher-1)" in err
    assert "fail_fast.max_share" in err
    store = Store(tmp_path / "runs" / "t" / "agentkd.duckdb", read_only=True)
    try:
        stopped_at = store.query("SELECT count(DISTINCT key) FROM calls WHERE status = 'ok'")[0][0]
    finally:
        store.close_sync()
    # 20 orders unusable after their re-ask = 40 replies; beyond them, at most the two replies of the
    # order each other worker had under way (workpool: 4 items in progress per concurrency slot).
    assert 40 <= stopped_at <= 40 + 2 * WORKERS_PER_SLOT * 2
    status = json.loads((tmp_path / "runs" / "t" / "status.json").read_text())
    assert status["state"] == "stopped" and status["stop_reason"].startswith("fail-fast: 20 of the first 20")

    assert main([*cmd, "--set", "fail_fast.max_share=1"]) == 0
    assert len(read_rows(out)) == 30 and all(r["verdict"] == "unscored" for r in read_rows(out))
    store = Store(tmp_path / "runs" / "t" / "agentkd.duckdb", read_only=True)
    try:
        per_key = store.query("SELECT max(n) FROM (SELECT count(*) AS n FROM calls WHERE status = 'ok' GROUP BY key)")
    finally:
        store.close_sync()
    assert per_key[0][0] == 1  # the stopped session's replies were reused, not bought again


def test_teach_does_not_stop_an_explainer_missing_a_fifth_of_its_labels(tmp_path, capsys):
    config = write_config(tmp_path, "[sim]\nexplainer_no_label_rate = 0.2\n")
    data, out = write_rows(tmp_path / "in.jsonl", problems(80)), tmp_path / "out.jsonl"
    assert main(["teach", str(config), "--role", "explainer", "--input", str(data), "--output", str(out),
                 "--no-progress"]) == 0
    missing = sum(r["label"] is None for r in read_rows(out))
    assert 0 < missing < 40


LOOP = """
[run]
name = "prose"
dir = "{runs}"
[teacher]
provider = "openai_compatible"
model = "prose-model"
base_url = "{base_url}/v1"
[prices."prose-model"]
input_per_mtok = 1.0
output_per_mtok = 2.0
[budget]
usd = 0.25
[limits]
max_concurrency = 4
[train]
max_steps = 5
cpu_threads = 1
[loop]
iterations = 2
seeds = "{seeds}"
new_per_iteration = 20
judge_sample = 40
"""


@pytest.mark.slow
def test_a_referee_answering_in_prose_stops_the_loop_cheaply_and_the_heldout_set_is_the_users(tmp_path, capsys):
    # The user's own task: no arithmetic, no answers. 60 seeds -> 12 held out (a fifth).
    seeds = [{"instruction": f"Write one friendly sentence about a {colour} {thing}."}
             for colour in ("red", "blue", "green", "yellow", "purple", "grey")
             for thing in ("kite", "boat", "lamp", "chair", "cup", "door", "shoe", "tree", "book", "clock")]
    seeds_path = write_rows(tmp_path / "seeds.jsonl", seeds)
    with sim_in_thread(SimSection(), responder=answers_in_prose) as sim:
        config = tmp_path / "prose.toml"
        config.write_text(LOOP.format(runs=tmp_path / "runs", base_url=sim.base_url, seeds=seeds_path))
        assert main(["run", str(config), "--no-progress"]) == EXIT_UNUSABLE
        err = capsys.readouterr().err
        billed = sim.stats()["billed_requests"]
        assert main(["run", str(config), "--no-progress"]) == EXIT_UNUSABLE  # a re-run stops again...
        assert sim.stats()["billed_requests"] == billed  # ...for free: every reply it needs is stored
    assert "referee results in stage eval (iteration 0) were unusable (100%, model prose-model)" in err
    assert json.dumps(PROSE, ensure_ascii=False) in err  # the raw reply, brackets and all, as data

    run_dir = tmp_path / "runs" / "prose"
    store = Store(run_dir / "agentkd.duckdb", read_only=True)
    try:
        referee_calls = store.query("SELECT count(*) FROM calls WHERE prompt_version LIKE 'referee:%'")[0][0]
        spent = store.query("SELECT sum(cost_usd) FROM calls")[0][0]
        heldout = [r[0] for r in store.query("SELECT DISTINCT text FROM instructions WHERE pool = 'heldout'")]
        trained = {r[0] for r in store.query("SELECT DISTINCT text FROM instructions WHERE pool = 'train'")}
        accuracy = store.query("SELECT count(*) FROM metrics WHERE name = 'accuracy'")[0][0]
    finally:
        store.close_sync()
    # 20 orders judged unusable after their re-asks (40 calls), plus at most two for each of the other
    # items under way (12 held-out items, all in progress at once).
    assert 40 <= referee_calls <= 40 + 2 * 12
    assert spent < 0.25 / 4
    # The held-out set is a fifth of the user's seeds, none of them trained on; none is a sim problem.
    texts = {s["instruction"] for s in seeds}
    assert len(heldout) == 12 and set(heldout) <= texts and not set(heldout) & trained
    assert trained == texts - set(heldout)
    assert accuracy == 0  # no answers to check: no accuracy figure, rather than a 0.0% one

    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["results"]["referee/eval (iteration 0)"]["share"] == 1.0
    assert main(["status", str(run_dir)]) == 0
    shown = capsys.readouterr().out
    assert "stopped: fail-fast" in shown and "referee (eval)" in shown and "(100%)" in shown
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert "## Replies that did not parse" in report and "| referee (eval) |" in report
    assert "fixed split of the seeds" in report


def test_a_non_sim_teachers_heldout_set_is_a_fixed_fifth_of_the_seeds_labels_kept(tmp_path):
    from agentkd.config import config_from_dict
    from agentkd.lion.pools import initial_items

    rows = [{"text": f"Review number {i}: it was {'fine' if i % 2 else 'bad'}.",
             "label": "positive" if i % 2 else "negative"} for i in range(40)]
    seeds = write_rows(tmp_path / "reviews.jsonl", rows)
    base = {"teacher": {"provider": "openai", "model": "m", "api_key_env": "X"},
            "task": {"kind": "custom", "labels": ["positive", "negative"], "input_fields": ["text"]},
            "loop": {"seeds": str(seeds), "heldout_count": 5}}
    kept, held = initial_items(config_from_dict(base))
    assert len(held) == 5 and len(kept) == 35 and not {i.id for i in held} & {i.id for i in kept}
    assert all(i.source == "heldout" and i.iteration == 0 for i in held)
    assert all(i.answer in ("positive", "negative") for i in held) and all(i.answer is None for i in kept)
    # The same split whatever the file's order.
    write_rows(seeds, rows[::-1])
    assert {i.id for i in initial_items(config_from_dict(base))[1]} == {i.id for i in held}
    # The sim teacher keeps drawing its held-out set from its own world (arithmetic, no seeds file).
    sim_kept, sim_held = initial_items(config_from_dict({"loop": {"seed_count": 10, "heldout_count": 4}}))
    assert len(sim_kept) == 10 and len(sim_held) == 4 and all(i.answer is not None for i in sim_held)
