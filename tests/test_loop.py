"""The Lion loop end to end on the simulated teacher: report, resume after kill -9, budget stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentkd.cli import main
from agentkd.config import SimSection
from agentkd.store.writer import Store
from agentkd.teachers.sim import sim_in_thread

ROOT = Path(__file__).resolve().parents[1]
SMALL = """
[run]
name = "loop"
dir = "{runs}"
[teacher]
provider = "sim"
{base_url}
[sim]
error_rate = 0.05
[budget]
usd = {usd}
[limits]
max_concurrency = 16
[train]
max_seconds = 3
epochs = 20
cpu_threads = 1
[loop]
iterations = 2
seed_count = 60
heldout_count = 30
world_steps = [1, 1]
world_digits = [1, 1]
new_per_iteration = 40
judge_sample = 30
eval_judge_sample = 5
rouge_max = 0.9
"""


def small_config(tmp_path: Path, *, usd: float = 1.0, base_url: str | None = None) -> Path:
    path = tmp_path / "loop.toml"
    path.write_text(SMALL.format(runs=tmp_path / "runs", usd=usd,
                                 base_url=f'base_url = "{base_url}"' if base_url else ""))
    return path


def open_store(tmp_path: Path) -> Store:
    return Store(tmp_path / "runs" / "loop" / "agentkd.duckdb", read_only=True)


@pytest.mark.slow
def test_loop_runs_end_to_end_and_writes_the_report(tmp_path, capsys):
    assert main(["run", str(small_config(tmp_path)), "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "held-out accuracy" in summary and "report:" in summary
    run_dir = tmp_path / "runs" / "loop"
    report = (run_dir / "report.md").read_text()
    assert "Iteration" in report or "iteration" in report
    assert list((run_dir / "plots").glob("*.png"))
    store = open_store(tmp_path)
    try:
        accuracy = dict(store.query("SELECT iteration, value FROM metrics WHERE name = 'accuracy'"))
        assert set(accuracy) == {0, 1, 2}
        labels = {r[0] for r in store.query("SELECT label FROM verdicts")}
        assert labels <= {"hard", "easy", "unscored"} and "hard" in labels
        children = store.query("SELECT count(*) FROM instructions WHERE source IN ('hard', 'easy') "
                               "AND parent_id IS NOT NULL AND pool = 'train'")[0][0]
        assert children > 0
        # Both referee orders are stored for every judged item.
        orders = store.query("SELECT count(DISTINCT \"order\") FROM judgments")[0][0]
        assert orders == 2
        assert store.stages_done() >= {(2, "eval"), (2, "generate"), (1, "train")}
    finally:
        store.close_sync()
    assert (run_dir / "checkpoints" / "2" / "config.json").exists()
    # export: training data for other trainers, no held-out rows
    assert main(["export", str(run_dir), "--format", "jsonl"]) == 0
    exported = [json.loads(l) for l in (run_dir / "export" / "training_data.jsonl").read_text().splitlines()]
    assert exported and all(r["teacher_answer"] for r in exported)


def _run_until(cmd: list[str], marker: str, timeout: float) -> subprocess.Popen:
    """Start the loop and return once `marker` appears in its output (the stage is under way)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if marker in line or time.monotonic() > deadline:
            break
    return proc


@pytest.mark.slow
def test_kill_9_in_stages_then_resume_pays_no_stored_call_twice(tmp_path):
    in_flight: set[str] = set()  # billed by the provider but not yet stored when the process died
    stored_then: dict[str, int] = {}  # key stored before a kill -> times billed at that moment
    with sim_in_thread(SimSection(latency_ms=30, error_rate=0.05), seed=2) as sim:
        config = small_config(tmp_path, base_url=sim.base_url)
        cmd = [sys.executable, "-m", "agentkd.cli", "run", str(config), "--no-progress"]
        for marker in ("1/2 · judge", "1/2 · generate", "2/2 · answer"):
            proc = _run_until(cmd, marker, timeout=180)
            time.sleep(0.3)  # inside the stage
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            # The sim finishes (and bills) requests whose client just died, as a provider would: count
            # what it billed once nothing is left in flight there, or those calls look paid twice later.
            deadline = time.monotonic() + 10
            while sim.stats()["in_flight"] and time.monotonic() < deadline:
                time.sleep(0.02)
            billed = sim.stats()["billed_by_key"]
            store = open_store(tmp_path)
            stored = store.ok_call_keys()
            store.close_sync()
            in_flight |= set(billed) - stored
            stored_then.update({k: billed[k] for k in stored})
        final = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-3000:]
        billed = sim.stats()["billed_by_key"]
    store = open_store(tmp_path)
    try:
        assert store.stages_done() >= {(2, "eval")}
        assert len(store.ok_call_keys()) > 100
    finally:
        store.close_sync()
    # No stored answer was ever bought again.
    assert all(billed[k] == n for k, n in stored_then.items())
    # Only a call in flight at a kill (the provider billed it, the answer died with the process) can be
    # billed twice; the ledger counted its reservation as spent.
    assert {k for k, n in billed.items() if n > 1} <= in_flight


@pytest.mark.slow
def test_budget_stop_exits_3_and_a_larger_budget_finishes(tmp_path, capsys):
    config = small_config(tmp_path, usd=0.004)
    assert main(["run", str(config), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "budget" in err and "the rest would cost" in err and "more" in err
    assert main(["run", str(config), "--no-progress", "--set", "budget.usd=1"]) == 0
    store = open_store(tmp_path)
    try:
        assert (2, "eval") in store.stages_done()
    finally:
        store.close_sync()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["rationale", "posterior_kd", "proxy_kd"])
def test_every_objective_runs_through_the_loop(tmp_path, objective):
    config = small_config(tmp_path)
    assert main(["run", str(config), "--no-progress", "--set", f'train.objective="{objective}"',
                 "--set", "loop.iterations=1", "--set", "loop.seed_count=40", "--set", "loop.new_per_iteration=10",
                 "--set", "loop.judge_sample=10", "--set", "loop.eval_judge_sample=2",
                 "--set", "train.max_seconds=2", "--set", 'train.proxy_spec="students/tiny-proxy.toml"',
                 "--set", "train.proxy_max_seconds=2", "--set", "loop.rationale_rate=0.5"]) == 0
    store = open_store(tmp_path)
    try:
        assert store.query("SELECT objective FROM train_runs") == [(objective,)]
        rationales = store.query("SELECT count(*), count(rationale) FROM rationales")[0]
    finally:
        store.close_sync()
    if objective in ("posterior_kd", "proxy_kd"):  # the proxy stage trained the run's proxy and kept it
        assert (tmp_path / "runs" / "loop" / "proxy" / "1" / "agentkd_proxy.json").exists()
    if objective == "rationale":  # the explainer labelled every answered row, with reasons for about XR
        assert rationales[0] == 40 and 0 < rationales[1] < 40


@pytest.mark.slow
def test_random_selection_runs_the_loop_with_no_referee_outside_eval_and_seeds_from_the_whole_pool(tmp_path):
    assert main(["run", str(small_config(tmp_path)), "--no-progress", "--set", "loop.selection=random"]) == 0
    store = open_store(tmp_path)
    try:
        roles = dict(store.query("SELECT role, count(*) FROM calls GROUP BY role"))
        verdicts = store.count("verdicts")
        children = store.query("SELECT i.iteration, i.source, p.iteration FROM instructions i "
                               "JOIN (SELECT id, min(iteration) AS iteration FROM instructions GROUP BY id) p "
                               "ON p.id = i.parent_id WHERE i.parent_id IS NOT NULL")
        generator_prompts = {r[0] for r in store.query(
            "SELECT DISTINCT split_part(prompt_version, ':', 1) FROM calls WHERE role = 'generator'")}
        accuracy = dict(store.query("SELECT iteration, value FROM metrics WHERE name = 'accuracy'"))
        parents_1 = store.query("SELECT count(DISTINCT parent_id) FROM instructions WHERE iteration = 2 "
                                "AND parent_id IS NOT NULL")[0][0]
    finally:
        store.close_sync()
    assert "referee" not in roles and verdicts == 0  # the judge stage bought nothing
    assert roles["eval"] > 0 and roles["generator"] == 2 * 40
    assert generator_prompts == {"generator_plain"}
    assert {source for _, source, _ in children} == {"plain"}
    assert parents_1 > 20  # 40 uniform draws over 60 seeds reach most of them
    # Iteration 2 draws from all of B(2): seeds and iteration 1's accepted children alike.
    assert {parent_iteration for it, _, parent_iteration in children if it == 3} == {1, 2}
    assert set(accuracy) == {0, 1, 2}
