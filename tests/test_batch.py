"""Batch mode end to end: `agentkd teach` against the sim's OpenAI and Anthropic batch APIs, over real
loopback HTTP through the official SDKs, with kill -9 after submission and between upload and create,
expiry with partial results, a failed batch, a lost create response and a cap below the job's worst case.

What must hold every time: each agentkd batch (a chunk) is one batch at the provider, every result is
stored and paid once, and a resumed run finishes what the killed one started.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from agentkd.gateway.budget import BudgetExhausted
from agentkd.config import SimSection, load_config
from agentkd.gateway.ledger import prior_spend
from agentkd.store.writer import Store
from agentkd.teach import teach
from agentkd.teachers.sim import sim_in_thread
from agentkd.teachers.sim.world import sample_problems

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = ["openai", "anthropic"]
KEY_ENV = "AGENTKD_BATCH_TEST_KEY"


def write_run(tmp_path: Path, provider: str, base_url: str, *, rows: int = 20, max_requests: int = 8,
              usd: float | None = None, extra: str = "") -> tuple[Path, Path, Path]:
    url = base_url + "/v1" if provider == "openai" else base_url
    budget = f"[budget]\nusd = {usd!r}\n" if usd is not None else ""
    config = tmp_path / "run.toml"
    config.write_text(
        f'[run]\nname = "b"\ndir = "{tmp_path / "runs"}"\n'
        f'[teacher]\nprovider = "{provider}"\nmodel = "sim-teacher-1"\nbase_url = "{url}"\n'
        f'api_key_env = "{KEY_ENV}"\nmode = "batch"\n'
        f'[batch]\ncollect_s = 0.2\npoll_s = 0.05\npoll_max_s = 0.2\nmax_requests = {max_requests}\n{extra}{budget}')
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"instruction": p.text, "id": i}) + "\n"
                            for i, p in enumerate(sample_problems(rows, seed=29))))
    return config, data, tmp_path / "out.jsonl"


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-batch-test-key-0000")


def run_teach(config: Path, data: Path, out: Path) -> None:
    asyncio.run(teach(load_config(config), "answerer", data, out, show_progress=False))


def owner(batch: dict) -> str | None:
    """The agentkd batch id a sim batch belongs to: its metadata (OpenAI) or its custom_ids (both)."""
    ids = {c.rsplit("-", 1)[0] for c in batch["custom_ids"]}
    assert len(ids) == 1, "a provider batch mixes requests of two agentkd batches"
    if batch["metadata"] is not None:
        assert batch["metadata"]["agentkd_batch_id"] == next(iter(ids))
    return next(iter(ids))


@contextmanager
def run_store(config: Path) -> Iterator[Store]:
    """The run's database, read-only, closed afterwards (the run's next command may open it for writing)."""
    store = Store(config.parent / "runs" / "b" / "agentkd.duckdb", read_only=True)
    try:
        yield store
    finally:
        store.close_sync()


def check_once(store: Store, sim_stats: dict, rows: int) -> None:
    """One provider batch per agentkd batch; every custom_id billed once; every row's answer stored once."""
    batches = sim_stats["batches"]
    owners = Counter(owner(b) for b in batches)
    assert all(n == 1 for n in owners.values()), f"an agentkd batch was submitted twice: {owners}"
    prepared = {r[0] for r in store.query("SELECT DISTINCT batch_id FROM batches WHERE event = 'prepared'")}
    assert set(owners) <= prepared
    billed = sim_stats["billed_by_key"]
    assert all(n == 1 for n in billed.values())
    stored = store.query("SELECT key, count(*) FROM calls WHERE status = 'ok' GROUP BY key")
    assert len(stored) == rows and all(n == 1 for _, n in stored)
    # each stored answer is a result the sim billed under the custom_id the store names for it
    done = store.query("SELECT custom_id FROM batch_requests WHERE event = 'done'")
    assert len(done) == rows and all(billed.get(c) == 1 for (c,) in done)
    assert sim_stats["billed_requests"] == rows
    prior = prior_spend(store)
    assert prior.batch_requests == 0 and prior.interrupted == 0
    calls_usd = store.query("SELECT sum(cost_usd) FROM calls")[0][0]
    assert prior.settled_usd == pytest.approx(calls_usd)


def teach_cmd(config: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "agentkd.cli", "teach", str(config), "--role", "answerer", "--input",
            str(data), "--output", str(out), "--no-progress"]


@pytest.mark.slow
@pytest.mark.parametrize(("provider", "kill_at"), [("openai", "external"), ("openai", "uploaded"),
                                                   ("anthropic", "external"), ("anthropic", "submitted")])
def test_kill9_after_submission_resumes_without_submitting_twice(tmp_path, provider, kill_at):
    """kill -9 from outside once every chunk is at the provider (some may not be durable as submitted
    yet: the re-run finds those by their agentkd id), right after a batch is durable as submitted, or
    between upload and create (OpenAI; Anthropic has no upload step). The re-run finds each batch
    instead of making another and collects every result once."""
    # Slow enough that the killed run cannot have collected its batches.
    settings = SimSection(batch_time_scale=1e-3, batch_hours=0.5)
    with sim_in_thread(settings) as sim:
        config, data, out = write_run(tmp_path, provider, sim.base_url)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if kill_at != "external":
            env["AGENTKD_TEST_KILL_AT"] = kill_at
        proc = subprocess.Popen(teach_cmd(config, data, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if kill_at == "external":
            deadline = time.monotonic() + 60
            while len(sim.stats()["batches"]) < 3 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err
        at_kill = sim.stats()
        assert all(b["results"] < b["requests"] for b in at_kill["batches"])  # killed before results came
        with run_store(config) as store:
            pending = prior_spend(store)
        assert pending.batch_requests > 0 and pending.batch_usd > 0  # counted against the cap meanwhile
        resumed = subprocess.run(teach_cmd(config, data, out), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                 capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming" in resumed.stderr
        stats = sim.stats()
    assert len(stats["batches"]) == 3  # 20 rows in chunks of 8: 3 batches, however the kill fell
    with run_store(config) as store:
        check_once(store, stats, 20)
    assert len(out.read_text().splitlines()) == 20


@pytest.mark.slow
@pytest.mark.parametrize("provider", PROVIDERS)
def test_kill9_once_results_are_settled_counts_only_the_pending_batch(tmp_path, provider):
    """The first batch expires half done: its 3 answers are settled, its 3 others go into a second batch,
    which the sim holds. kill -9 once that batch is at the provider: nothing is in flight online and the
    only spend not settled is the held batch's 3 requests. The resumed run must count the settled results
    as settled and nothing as possibly billed by the killed session (issue 13: what was outstanding, plus
    a margin for online calls only), and the held batch at its worst case until its results settle."""
    settings = SimSection(batch_time_scale=1e-4, batch_faults=["expire:0.5", "hold"])
    with sim_in_thread(settings) as sim:
        config, data, out = write_run(tmp_path, provider, sim.base_url, rows=6)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(teach_cmd(config, data, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(sim.stats()["batches"]) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err
        first, held = sim.stats()["batches"]
        assert first["results"] == 6 and held["requests"] == 3 and held["results"] == 0
        with run_store(config) as store:
            prior = prior_spend(store)
            settled = store.query("SELECT sum(cost_usd), count(*) FROM calls WHERE status = 'ok'")[0]
            held_worst = store.query("SELECT sum(reserved_usd) FROM batch_requests WHERE event = 'queued' "
                                     "AND custom_id IN (SELECT unnest(?::VARCHAR[]))", [held["custom_ids"]])[0][0]
        assert settled[1] == 3 and prior.settled_usd == pytest.approx(settled[0])
        assert prior.unsettled_usd == 0.0 and prior.unsettled_tokens == 0 and prior.interrupted == 0, prior
        assert prior.batch_requests == 3 and prior.batch_usd == pytest.approx(held_worst)
        assert prior.usd == pytest.approx(settled[0] + held_worst)

        cancel = f"{sim.base_url}/v1/messages/batches/{held['id']}/cancel" if provider == "anthropic" else \
            f"{sim.base_url}/v1/batches/{held['id']}/cancel"
        httpx.post(cancel, timeout=10).raise_for_status()  # its 3 requests go again in a third batch
        resumed = subprocess.run(teach_cmd(config, data, out), cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        stats = sim.stats()
    assert [b["requests"] for b in stats["batches"]] == [6, 3, 3]
    with run_store(config) as store:
        check_once(store, stats, 6)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_expiry_with_partial_results_requeues_only_the_unfinished(tmp_path, provider):
    settings = SimSection(batch_time_scale=1e-4, batch_faults=["expire:0.4"])
    with sim_in_thread(settings) as sim:
        config, data, out = write_run(tmp_path, provider, sim.base_url, rows=10, max_requests=100)
        run_teach(config, data, out)
        stats = sim.stats()
    first, second = stats["batches"]
    assert first["status"] in ("expired", "ended") and first["results"] == 10
    with run_store(config) as store:
        answered_first = {k for (k,) in store.query(
            "SELECT key FROM batch_requests WHERE event = 'done' AND batch_id = ?", [owner(first)])}
        requeued = {k for (k,) in store.query(
            "SELECT key FROM batch_requests WHERE event = 'requeued' AND batch_id = ?", [owner(first)])}
        in_second = {k for (k,) in store.query(
            "SELECT key FROM batch_requests WHERE event = 'queued' AND batch_id = ?", [owner(second)])}
        assert len(answered_first) == 4 and len(requeued) == 6
        assert in_second == requeued  # only the unfinished ones went again
        assert second["requests"] == 6
        check_once(store, stats, 10)
        # nothing billed for the expired requests: their holds were released
        released = store.query("SELECT count(*), sum(usd) FROM reservations WHERE event = 'release'")[0]
        assert released[0] == 6 and released[1] == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_no_wait_exits_once_submitted_and_a_rerun_collects(tmp_path, provider):
    from agentkd.batches import BatchesPending

    with sim_in_thread(SimSection(batch_time_scale=1e-3, batch_hours=0.5)) as sim:
        config, data, out = write_run(tmp_path, provider, sim.base_url, rows=10, extra="wait = false\n")
        with pytest.raises(BatchesPending):
            run_teach(config, data, out)
        assert len(sim.stats()["batches"]) == 2 and not out.read_text()  # submitted, nothing collected
        run_teach(config, data, out)
        stats = sim.stats()
    with run_store(config) as store:
        check_once(store, stats, 10)
    assert len(out.read_text().splitlines()) == 10


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_failed_batch_is_asked_again(tmp_path, provider):
    with sim_in_thread(SimSection(batch_time_scale=1e-4, batch_faults=["fail"])) as sim:
        config, data, out = write_run(tmp_path, provider, sim.base_url, rows=6)
        run_teach(config, data, out)
        stats = sim.stats()
    assert len(stats["batches"]) == 2
    with run_store(config) as store:
        check_once(store, stats, 6)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_lost_create_response_finds_the_batch_instead_of_creating_another(tmp_path, provider):
    with sim_in_thread(SimSection(batch_time_scale=1e-4, batch_faults=["drop_create"])) as sim:
        config, data, out = write_run(tmp_path, provider, sim.base_url, rows=6)
        run_teach(config, data, out)
        stats = sim.stats()
    assert len(stats["batches"]) == 1
    with run_store(config) as store:
        check_once(store, stats, 6)
        submitted = store.query("SELECT provider_batch_id FROM batches WHERE event = 'submitted'")
        assert submitted == [(stats["batches"][0]["id"],)]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_job_whose_worst_case_passes_the_cap_never_spends_past_it(tmp_path, provider):
    """Holds at the batch price are taken before each batch is made: what does not fit waits for results
    to settle, and the run stops (BudgetExhausted) with its spend and the sim's bill under the cap."""
    from agentkd.gateway.budget import Budget
    from agentkd.roles.requests import RolePrompts
    from agentkd.gateway.tokens import estimate_prompt

    with sim_in_thread(SimSection(batch_time_scale=1e-4)) as sim:
        config, data, out = write_run(tmp_path, provider, sim.base_url, rows=30, max_requests=100)
        cfg = load_config(config)
        prompts, budget = RolePrompts(cfg), Budget(usd=None, tokens=None, price_of=cfg.price)
        worst = max(budget.worst_case(r.model, estimate_prompt(r.messages, r.provider).tokens, r.max_tokens,
                                      batch=True)[0]
                    for line in data.read_text().splitlines()
                    for r in [prompts.answer(json.loads(line)["instruction"])])
        cap = 1.5 * worst  # one request's worst case at a time, and a few more as results settle far below it
        config, data, out = write_run(tmp_path, provider, sim.base_url, rows=30, max_requests=100, usd=cap)
        with pytest.raises(BudgetExhausted):
            run_teach(config, data, out)
        stats = sim.stats()
    with run_store(config) as store:
        prior = prior_spend(store)
        billed_usd = (stats["billed_input_tokens"] * 0.15 + stats["billed_output_tokens"] * 0.60) / 1e6 * 0.5
        assert prior.settled_usd == pytest.approx(billed_usd) and prior.batch_requests == 0
        assert billed_usd <= cap + 1e-12
        stored = store.query("SELECT count(*) FROM calls WHERE status = 'ok'")[0][0]
        assert 1 < stored < 30 and stored == stats["billed_requests"]
        assert len(stats["batches"]) == len({owner(b) for b in stats["batches"]}) > 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_chunk_over_the_byte_limit_is_split(tmp_path, provider):
    with sim_in_thread(SimSection(batch_time_scale=1e-4)) as sim:
        config, data, out = write_run(tmp_path, provider, sim.base_url, rows=12, max_requests=100,
                                      extra="max_bytes = 2000\n")
        run_teach(config, data, out)
        stats = sim.stats()
    with run_store(config) as store:
        check_once(store, stats, 12)
    assert len(stats["batches"]) >= 3  # ~650 bytes a request: 3 in each 2,000-byte batch
    assert all(b["requests"] <= 4 for b in stats["batches"])


@pytest.mark.slow
@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_batch_created_but_not_recorded_is_found_while_still_running(tmp_path, provider):
    """kill -9 after the provider created the batch and before the store knew its id; the batch is still
    running when the re-run looks for it. OpenAI finds it by its metadata at once. Anthropic can tell a
    batch is ours only from its results, which exist once it has ended: the re-run waits for the running
    candidate, saying so with its status and counts, never creates a second one, and takes it as ours
    once it ends (here cancelled, so its requests go again in a new batch)."""
    with sim_in_thread(SimSection(batch_time_scale=1e-4, batch_faults=["hold"])) as sim:
        config, data, out = write_run(tmp_path, provider, sim.base_url, rows=6)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        killed = subprocess.run(teach_cmd(config, data, out), cwd=ROOT, env={**env, "AGENTKD_TEST_KILL_AT": "created"},
                                capture_output=True, text=True, timeout=60)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        (held,) = sim.stats()["batches"]
        with run_store(config) as store:
            assert store.query("SELECT count(*) FROM batches WHERE event = 'submitted'")[0][0] == 0

        resumed = subprocess.Popen(teach_cmd(config, data, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        # The re-run says it is waiting on the held batch (Anthropic) or polls it once found (OpenAI).
        marker = "that may be it still running" if provider == "anthropic" else f"found at {provider} as {held['id']}"
        seen = []
        for line in resumed.stderr:
            seen.append(line)
            if marker in line:
                break
        assert any(marker in line for line in seen), "".join(seen)[-3000:]
        assert len(sim.stats()["batches"]) == 1  # waiting, not creating another
        cancel = f"{sim.base_url}/v1/messages/batches/{held['id']}/cancel" if provider == "anthropic" else \
            f"{sim.base_url}/v1/batches/{held['id']}/cancel"
        httpx.post(cancel, timeout=10).raise_for_status()
        rest, _ = resumed.communicate(timeout=60)
        assert resumed.returncode == 0, "".join(seen) + (rest or "")
        stats = sim.stats()
    first, second = stats["batches"]
    assert first["id"] == held["id"] and first["results"] == 6 and second["requests"] == 6
    with run_store(config) as store:
        check_once(store, stats, 6)
        found = store.query("SELECT provider_batch_id, detail FROM batches WHERE event = 'submitted' "
                            "ORDER BY created_at")
        assert found[0] == (held["id"], "found at the provider after a restart")
        assert store.query("SELECT count(*) FROM batch_requests WHERE event = 'requeued'")[0][0] == 6
    assert len(out.read_text().splitlines()) == 6
