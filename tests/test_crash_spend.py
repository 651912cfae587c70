"""kill -9 of `agentkd teach` against the sim: what a resumed run counts, and what the output file holds.

After each kill the sim's ledger says how many requests reached it; those without a committed attempt
row in the run's ledger were sent and not answered as far as the store knows (in flight). The spend a
resumed run assumes beyond the settled rows must stay within their worst cases plus max(2 worst-case
calls, 1% of the cap), whatever max_concurrency is, and the resumed run must then finish. A kill in
the moment between a call's cover commit and its request reaching the sim also counts that call (the
ledger's last row says how many calls were reserved); the test reports how often a kill lands there.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentkd.config import SimSection, load_config
from agentkd.lion.dedup import instruction_id
from agentkd.estimate import requests_for
from agentkd.gateway.ledger import prior_spend
from agentkd.roles.requests import RolePrompts
from agentkd.store.writer import Store
from agentkd.teachers.sim import sim_in_thread
from agentkd.teachers.sim.world import sample_problems
from agentkd.gateway.tokens import estimate_prompt

ROOT = Path(__file__).resolve().parents[1]
ROWS, CONCURRENCY, KILLS = 60, 8, 10


def write_run(tmp_path: Path, base_url: str, usd: float | None = None) -> tuple[Path, Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "run.toml"
    budget = f"[budget]\nusd = {usd!r}\n" if usd is not None else ""
    config.write_text(f'[run]\nname = "t"\ndir = "{tmp_path / "runs"}"\n[teacher]\nprovider = "sim"\n'
                      f'base_url = "{base_url}"\n[limits]\nmax_concurrency = {CONCURRENCY}\n{budget}')
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"instruction": p.text, "id": i}) + "\n"
                            for i, p in enumerate(sample_problems(ROWS, seed=13))))
    return config, data, tmp_path / "out.jsonl"


def worst_case_usd(config_path: Path, data: Path) -> float:
    """The largest worst case the gateway reserves for one of these rows (prompt estimate + max_tokens)."""
    config = load_config(config_path, [])
    prompts = RolePrompts(config)
    worst = 0.0
    for line in data.read_text().splitlines():
        for r in requests_for(prompts, "answerer", json.loads(line), 1.0):
            price = config.price(r.model)
            tokens = estimate_prompt(r.messages, r.provider).tokens
            worst = max(worst, (tokens * price.input_per_mtok + r.max_tokens * price.output_per_mtok) / 1e6)
    return worst


def teach_cmd(config: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "agentkd.cli", "teach", str(config), "--role", "answerer", "--input",
            str(data), "--output", str(out), "--no-progress"]


def kill_after(cmd: list[str], sim, seconds: float) -> int:
    """Start teach; SIGKILL it `seconds` after its first request reached the sim. Returns the requests
    the sim was still answering at the kill."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 30
    while sim.stats()["requests"] < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    at_kill = sim.stats()["in_flight"]
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"teach ended before the kill: {err}"
    time.sleep(0.2)  # requests already on the wire reach the sim
    return at_kill


def output_vs_store(out: Path, store: Store, config_path: Path) -> tuple[int, int, int]:
    """(rows in the output file, rows whose answer teach had stored that are missing from it, rows whose
    call alone was committed that are missing from it). Every line must be a whole JSON object."""
    lines = out.read_text().splitlines() if out.exists() else []
    rows = [json.loads(line) for line in lines]  # a torn line fails here
    written = {instruction_id(r["instruction"]) for r in rows}
    answered = {r[0] for r in store.query("SELECT instruction_id FROM responses WHERE actor = 'teacher'")}
    prompts = RolePrompts(load_config(config_path, []))
    ok_keys = {r[0] for r in store.query("SELECT key FROM calls WHERE status = 'ok'")}
    committed = {instruction_id(json.loads(line)["instruction"])
                 for line in (config_path.parent / "in.jsonl").read_text().splitlines()
                 if prompts.answer(json.loads(line)["instruction"]).key in ok_keys}
    return len(rows), len(answered - written), len(committed - written)


@pytest.mark.slow
def test_kill_9_at_random_moments_counts_only_the_calls_in_flight_and_the_resumed_run_finishes(tmp_path):
    rng = random.Random(13)
    figures = []
    with sim_in_thread(SimSection(error_rate=0.0, latency_ms=60.0, latency_jitter=0.5), seed=1) as sim:
        probe, probe_data, _ = write_run(tmp_path, sim.base_url)
        worst = worst_case_usd(probe, probe_data)
        cap = 20 * worst  # a budget that fits ~20 worst-case calls
        margin = max(2 * worst, 0.01 * cap)
        for trial in range(KILLS):
            sim.reset()
            config, data, out = write_run(tmp_path / f"trial{trial}", sim.base_url, usd=cap)
            # A moment drawn uniformly over most of the run (the whole run takes ~0.5 s of sim time).
            at_sim = kill_after(teach_cmd(config, data, out), sim, rng.uniform(0.0, 0.4))
            requests = sim.stats()["requests"]
            store = Store(config.parent / "runs" / "t" / "agentkd.duckdb", read_only=True)
            prior = prior_spend(store)
            attempts = store.query("SELECT count(*) FROM reservations WHERE event IN ('settle', 'release')")[0][0]
            written, missing_answered, missing_committed = output_vs_store(out, store, config)
            store.close_sync()
            in_flight = requests - attempts  # reached the sim, no committed attempt row
            assert in_flight >= at_sim
            # A call counts from the commit of its cover, a moment before its request is on the wire:
            # when the kill lands in that moment, the ledger's last row has more calls reserved than
            # reached the sim, and those calls (covered, being sent) are in the bound too.
            being_sent = max((prior.in_flight or 0) - in_flight, 0)
            bound = (in_flight + being_sent) * worst + margin
            figures.append({"trial": trial, "requests": requests, "in_flight": in_flight, "sim_in_flight": at_sim,
                            "being_sent": being_sent,
                            "assumed_unsettled": round(prior.unsettled_usd, 7), "bound": round(bound, 7),
                            "beyond_in_flight_in_worst_cases": round(prior.unsettled_usd / worst - in_flight, 2),
                            "settled": round(prior.settled_usd, 7), "recorded_in_flight": prior.in_flight,
                            "output_rows": written, "committed_calls_not_in_output": missing_committed})
            assert prior.interrupted == 1
            assert prior.unsettled_usd <= bound + 1e-12, figures[-1]
            assert missing_answered == 0, figures[-1]  # every row whose answer teach stored is in the file
            # The resumed run: the interrupted session is reported, and with what it counts it still fits.
            resumed = subprocess.run(teach_cmd(config, data, out), capture_output=True, text=True, cwd=ROOT,
                                     timeout=60)
            assert resumed.returncode == 0, (figures[-1], resumed.stderr[-2000:])
            assert "resuming after an interrupted session" in resumed.stderr
            assert "possibly billed by an interrupted session" in resumed.stdout
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            assert [r["id"] for r in rows] == list(range(ROWS))  # the final file: every row, in input order
            billed = sim.stats()["billed_by_key"]
            assert len(billed) == ROWS
    print(f"\ncrash exposure per kill (USD; worst case {worst:.7f}, margin {margin:.7f}); kills while "
          f"covered calls were being sent: {sum(f['being_sent'] > 0 for f in figures)}")
    for f in figures:
        print(json.dumps(f))


@pytest.mark.slow
def test_after_kill_9_the_output_file_holds_every_row_the_store_had_committed(tmp_path):
    with sim_in_thread(SimSection(error_rate=0.0, latency_ms=40.0, latency_jitter=0.5), seed=2) as sim:
        config, data, out = write_run(tmp_path, sim.base_url, usd=1.0)
        kill_after(teach_cmd(config, data, out), sim, 0.25)
        store = Store(config.parent / "runs" / "t" / "agentkd.duckdb", read_only=True)
        answered = store.count("responses")
        written, missing_answered, missing_committed = output_vs_store(out, store, config)
        store.close_sync()
    assert answered > 0 and written >= answered
    assert missing_answered == 0
    # A call committed a moment before the kill, whose row teach had not yet stored, may be missing:
    # at most the items in progress.
    assert missing_committed <= 4 * CONCURRENCY
