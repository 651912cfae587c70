"""report.md and plots from a run database: tables carry the stored numbers, PNGs are real, no secrets."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agentkd.lion.report import write_report
from agentkd.store.writer import Store, StoreError, StoreLockedError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIM_KEY = "sk-sim-secret-0123456789abcdef"  # sim.require_api_key is a real config field holding a key

# iteration -> per-iteration metrics as the loop writes them
METRICS = {
    0: {"accuracy": 0.125, "capability_ratio": 0.301, "usd/eval": 0.0042, "usd_cumulative": 0.0042,
        "pool/train": 40, "pool/cache": 0},
    1: {"accuracy": 0.375, "capability_ratio": 0.55, "hard_share": 0.625, "unscored_share": 0.05,
        "order_disagreement_rate": 0.1, "accepted": 37, "generated": 40, "usd/answerer": 0.0101,
        "usd/explainer": 0.0033, "usd/referee": 0.0067, "usd/generator": 0.0021, "usd/eval": 0.0042,
        "usd_cumulative": 0.0306, "usd_per_hard": 0.0011, "usd_per_accuracy_point": 0.00105},
    2: {"accuracy": 0.5, "capability_ratio": 0.712, "hard_share": 0.4, "hard_yield": 0.55,
        "unscored_share": 0.0, "order_disagreement_rate": 0.075, "accepted": 35, "generated": 40,
        "usd/answerer": 0.0098, "usd/explainer": 0.003, "usd/referee": 0.0061, "usd/generator": 0.002,
        "usd/eval": 0.0042, "usd_cumulative": 0.0557, "usd_per_hard": 0.0013,
        "usd_per_accuracy_point": 0.00137},
}


def sim_config(name: str = "demo") -> dict:
    return {
        "run": {"name": name, "dir": "runs", "seed": 0},
        "teacher": {"provider": "sim", "model": "sim-teacher-1", "api_key_env": None, "base_url": None},
        "roles": {"referee": {"provider": "openai", "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}},
        "student": {"spec": "students/tiny.toml"},
        "train": {"objective": "rationale"},
        "loop": {"iterations": 2, "new_per_iteration": 40, "tau": 1.0, "heldout": None},
        "budget": {"usd": 1.0, "tokens": None},
        "sim": {"require_api_key": SIM_KEY},
    }


def make_run(run_dir: Path, *, metrics: dict | None = None, config: dict | None = None) -> Path:
    """A run folder as the loop leaves it: config.json and agentkd.duckdb with every table filled."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config or sim_config(run_dir.name)), encoding="utf-8")
    t0 = dt.datetime(2025, 1, 1)
    at = lambda s: t0 + dt.timedelta(seconds=s)
    store = Store(run_dir / "agentkd.duckdb")
    metrics = METRICS if metrics is None else metrics
    rows = [{"iteration": i, "name": n, "value": v} for i, values in metrics.items() for n, v in values.items()]
    rows += [{"iteration": i, "name": "train/loss", "value": 3.0 - 0.1 * s, "step": s}
             for i in metrics if i > 0 for s in range(5)]
    store.append_now("metrics", rows)
    store.append_now("calls", [
        {"key": f"k{n}", "role": role, "provider": "sim", "model": "sim-teacher-1", "input_tokens": 100,
         "output_tokens": 50, "cached_tokens": 0, "cost_usd": 0.001, "status": status}
        for n, (role, status) in enumerate([("answerer", "ok")] * 3 + [("referee", "ok"), ("referee", "error"),
                                                                      ("generator", "ok")])])
    store.append_now("instructions", [
        # seeds in iteration 0, the first one later moved cache -> train by a newer row
        {"id": "s1", "text": "What is 2+3?", "source": "seed", "iteration": 0, "pool": "cache", "created_at": at(1)},
        {"id": "s1", "text": "What is 2+3?", "source": "seed", "iteration": 1, "pool": "train", "created_at": at(5)},
        {"id": "s2", "text": "What is 7*6?", "source": "seed", "iteration": 0, "pool": "train", "created_at": at(1)},
        {"id": "h1", "text": "A shop sells 12 pens...", "source": "hard", "parent_id": "s2", "iteration": 1,
         "pool": "train", "rouge_nearest": 0.3, "created_at": at(6)},
        {"id": "e1", "text": "What is 1+1?", "source": "easy", "parent_id": "s1", "iteration": 1,
         "pool": "cache", "rouge_nearest": 0.4, "created_at": at(6)},
        {"id": "r1", "text": "What is 2+3 ?", "source": "easy", "parent_id": "s1", "iteration": 1,
         "pool": "rejected", "rouge_nearest": 0.95, "rejected_reason": "rouge", "created_at": at(6)},
        {"id": "x1", "text": "Held-out: 9-4?", "source": "seed", "iteration": 0, "pool": "heldout",
         "created_at": at(1)},
        {"id": "n1", "text": "No teacher answer yet", "source": "hard", "iteration": 2, "pool": "cache",
         "created_at": at(9)},
    ])
    store.append_now("responses", [
        {"instruction_id": "s1", "actor": "teacher", "iteration": 0, "text": "4", "created_at": at(2)},
        {"instruction_id": "s1", "actor": "teacher", "iteration": 1, "text": "5", "created_at": at(7)},
        {"instruction_id": "s1", "actor": "student", "iteration": 1, "text": "6", "created_at": at(8)},
        {"instruction_id": "s2", "actor": "teacher", "iteration": 0, "text": "42", "created_at": at(2)},
        {"instruction_id": "h1", "actor": "teacher", "iteration": 1, "text": "36 pens", "created_at": at(7)},
        {"instruction_id": "e1", "actor": "teacher", "iteration": 1, "text": "2", "created_at": at(7)},
        {"instruction_id": "r1", "actor": "teacher", "iteration": 1, "text": "5", "created_at": at(7)},
        {"instruction_id": "x1", "actor": "teacher", "iteration": 0, "text": "5", "created_at": at(2)},
    ])
    store.append_now("rationales", [
        {"example_id": "s1", "label": "5", "rationale": "Two plus three makes five.", "parsed_ok": True,
         "created_at": at(3)},
        {"example_id": "s1", "label": None, "rationale": None, "parsed_ok": False, "reason": "no label",
         "created_at": at(4)},
        {"example_id": "h1", "label": "36", "rationale": "Twelve pens times three is 36.", "parsed_ok": True,
         "created_at": at(7)},
    ])
    store.append_now("verdicts", [
        {"instruction_id": "s1", "iteration": 1, "teacher_score": 9, "student_score": 3, "label": "hard",
         "order_disagreement": False},
    ])
    store.append_now("train_runs", [
        {"iteration": i, "objective": "rationale", "checkpoint": f"checkpoints/it{i}", "steps": 5,
         "examples": 40 + i, "final_loss": 2.6 - 0.1 * i, "seconds": 12.5}
        for i in metrics if i > 0
    ])
    store.close_sync()
    return run_dir


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # a drawn figure, not an empty canvas


def test_report_writes_markdown_and_three_valid_pngs(tmp_path):
    run_dir = make_run(tmp_path / "demo")
    path = write_report(run_dir)
    assert path == run_dir / "report.md"
    for name in ("spend_by_role.png", "hard_share.png", "score_vs_usd.png"):
        _assert_png(run_dir / "plots" / name)
    text = path.read_text(encoding="utf-8")
    for name in ("spend_by_role.png", "hard_share.png", "score_vs_usd.png"):
        assert f"](plots/{name})" in text


def test_report_table_rows_carry_the_stored_numbers(tmp_path):
    text = write_report(make_run(tmp_path / "demo")).read_text(encoding="utf-8")
    assert text.startswith("# agentkd run report: demo")
    assert "provider `sim`, model `sim-teacher-1`" in text
    assert "referee: provider `openai`, model `gpt-4o-mini`" in text
    assert "`students/tiny.toml`" in text
    # iteration 0: baseline, only eval spend; iteration 2: everything, USD(iter) = sum of roles = 0.0251
    assert "| 0 | 12.5% | 0.301 | — | — | — | — | — | $0.0042 | $0.0042 | — | — |" in text
    assert "| 1 | 37.5% | 0.550 | 62.5% | — | 5.0% | 10.0% | 37 | $0.0264 | $0.0306 | $0.0011 | $0.0010 |" in text
    assert "| 2 | 50.0% | 0.712 | 40.0% | 55.0% | 0.0% | 7.5% | 35 | $0.0251 | $0.0557 | $0.0013 | $0.0014 |" in text
    # calls table totals: 6 calls, 5 ok, 600 input tokens, 300 output, $0.006
    assert "| referee | 2 | 1 | 200 | 100 | 0 | $0.0020 |" in text
    assert "| **total** | 6 | 5 | 600 | 300 | 0 | $0.0060 |" in text
    assert "error 1, ok 5" in text
    assert "| 2 | rationale | `checkpoints/it2` | 5 | 42 | 2.4000 | 12.5 |" in text
    assert "drawn from the training distribution of the simulated teacher's world" in text


def test_report_contains_no_key_like_strings(tmp_path):
    text = write_report(make_run(tmp_path / "demo")).read_text(encoding="utf-8")
    assert SIM_KEY not in text
    assert not re.search(r"\bsk-[A-Za-z0-9_-]{8,}", text)


def test_report_with_only_the_baseline_says_so(tmp_path):
    run_dir = make_run(tmp_path / "base", metrics={0: METRICS[0]})
    text = write_report(run_dir).read_text(encoding="utf-8")
    assert "Only iteration 0" in text
    assert "Not measured in this run:" in text and "`hard_share`" in text
    assert "No training run recorded." in text
    _assert_png(run_dir / "plots" / "score_vs_usd.png")
    assert not (run_dir / "plots" / "hard_share.png").exists()
    assert "Hard share, hard yield and unscored share: no data recorded, no plot." in text


def test_report_with_no_metrics_and_no_config_does_not_crash(tmp_path):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    Store(run_dir / "agentkd.duckdb").close_sync()
    text = write_report(run_dir).read_text(encoding="utf-8")
    assert "No metrics recorded yet" in text
    assert "config.json is missing" in text
    assert "No teacher calls recorded." in text
    assert list((run_dir / "plots").iterdir()) == []


def test_real_teacher_gets_no_sim_note(tmp_path):
    config = sim_config("real")
    config["teacher"] = {"provider": "openai", "model": "gpt-4o", "api_key_env": "OPENAI_API_KEY"}
    text = write_report(make_run(tmp_path / "real", config=config)).read_text(encoding="utf-8")
    assert "provider `openai`, model `gpt-4o`" in text
    assert "simulated teacher" not in text


def test_missing_run_database_is_a_clear_store_error(tmp_path):
    with pytest.raises(StoreError, match="no run database"):
        write_report(tmp_path)


def test_report_while_a_run_writes_names_the_lock_holder(tmp_path):
    run_dir = make_run(tmp_path / "busy")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from agentkd.store.writer import Store
            s = Store({str(run_dir / 'agentkd.duckdb')!r})
            print("ready", flush=True)
            time.sleep(30)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=rf"process {holder.pid}.*wait for the run to finish"):
            write_report(run_dir)
    finally:
        holder.kill()
        holder.wait()


def test_report_warns_where_the_proxy_ends_an_iteration_below_the_student(tmp_path):
    run_dir = make_run(tmp_path / "demo")
    store = Store(run_dir / "agentkd.duckdb")
    t0 = dt.datetime(2025, 1, 1)
    store.append_now("proxy_stages", [  # iteration 1 ends below the student, iteration 2 above it
        {"iteration": i, "stage": stage, "steps": 10, "examples": 20, "seconds": 1.0, "proxy_logp": lp,
         "student_logp": -1.0, "created_at": t0 + dt.timedelta(seconds=n)}
        for n, (i, stage, lp) in enumerate([(1, "before", -4.0), (1, "warmup", -1.5), (2, "before", -1.5),
                                            (2, "warmup", -0.5)])])
    store.close_sync()
    text = write_report(run_dir).read_text(encoding="utf-8")
    assert "**Iteration 1:** the proxy predicts held-out teacher answers worse than the student" in text
    assert "(log p per token -1.500 < -1.000)" in text
    assert "**Iteration 2:**" not in text  # ahead of the student by its last stage


def test_report_states_prompt_cache_tokens_and_the_usd_they_saved(tmp_path):
    config = sim_config()
    del config["roles"]  # the sim's built-in price, nothing else to price
    run_dir = make_run(tmp_path / "demo", config=config)
    store = Store(run_dir / "agentkd.duckdb")
    store.append_now("calls", [  # sim prices: input $0.15, cached reads $0.075 per million; batch at half price
        {"key": "c1", "role": "answerer", "provider": "sim", "model": "sim-teacher-1", "input_tokens": 12_000,
         "output_tokens": 10, "cached_tokens": 10_000, "cost_usd": 0.001, "status": "ok", "mode": "online"},
        {"key": "c2", "role": "answerer", "provider": "sim", "model": "sim-teacher-1", "input_tokens": 25_000,
         "output_tokens": 10, "cached_tokens": 20_000, "cost_usd": 0.001, "status": "ok", "mode": "batch"}])
    store.close_sync()
    text = write_report(run_dir).read_text(encoding="utf-8")
    # 10,000 x $0.075/M online + 20,000 x $0.075/M x 0.5 in batch = $0.00075 + $0.00075
    assert "Prompt cache: 30,000 input tokens read from it, 0 written to it: $0.0015 saved" in text
