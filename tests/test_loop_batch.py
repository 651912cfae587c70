"""`agentkd run` (the Lion loop) in batch mode, stopped while a batch is pending and run again.

The answerer and the generator go through the sim's batch API (real CLI, real loopback HTTP). The first
run exits once the answer stage's batch is submitted (`batch.wait = false`, exit 6, which says how to
resume); the second picks that batch up and is killed (-9) right after the eval stage's batch is durable
as submitted; the third picks that one up and finishes the loop. What must hold: one provider batch per
agentkd batch, every batch result billed once and stored once, nothing left open, and after the kill
(no online call in flight) nothing counted beyond the settled results but the pending batch's worst case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from agentkd.config import SimSection
from agentkd.gateway.ledger import prior_spend
from agentkd.teachers.sim import sim_in_thread
from tests.test_batch import owner
from tests.test_loop import ROOT, open_store, small_config

SEEDS, NEW = 20, 10
# One iteration at small sizes; the answerer and the generator in batch mode, polled often.
LEAN = ["loop.iterations=1", f"loop.seed_count={SEEDS}", "loop.heldout_count=10", f"loop.new_per_iteration={NEW}",
        "loop.judge_sample=10", "loop.eval_judge_sample=3", "train.max_seconds=1", "train.epochs=2",
        'roles.answerer.mode="batch"', 'roles.generator.mode="batch"',
        "batch.collect_s=0.2", "batch.poll_s=0.05", "batch.poll_max_s=0.2"]


def spend_at(tmp_path):
    """(what a resumed run counts, the calls rows' cost, the worst cases of requests queued and not done)."""
    store = open_store(tmp_path)
    try:
        calls_usd = store.query("SELECT coalesce(sum(cost_usd), 0) FROM calls")[0][0]
        open_usd = store.query(
            "SELECT coalesce(sum(reserved_usd), 0) FROM batch_requests q WHERE event = 'queued' AND NOT EXISTS "
            "(SELECT 1 FROM batch_requests c WHERE c.custom_id = q.custom_id AND c.event <> 'queued')")[0][0]
        return prior_spend(store), calls_usd, open_usd
    finally:
        store.close_sync()


def open_requests(tmp_path) -> tuple[int, int]:
    """(batch requests held open in the store, results stored under a `done` row)."""
    store = open_store(tmp_path)
    try:
        done = store.query("SELECT count(*) FROM batch_requests WHERE event = 'done'")[0][0]
        return prior_spend(store).batch_requests, done
    finally:
        store.close_sync()


@pytest.mark.slow
def test_run_stopped_with_a_batch_pending_resumes_it_without_submitting_twice(tmp_path):
    """Stopped twice: by `batch.wait = false` at the answer stage's batch, then by kill -9 right after
    the eval stage's batch is durable as submitted; each re-run collects what the last one left."""
    with sim_in_thread(SimSection(batch_time_scale=1e-3, batch_hours=0.1)) as sim:
        config = small_config(tmp_path, base_url=sim.base_url)
        cmd = [sys.executable, "-m", "agentkd.cli", "run", str(config), "--no-progress"]
        for setting in LEAN:
            cmd += ["--set", setting]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        def run(*extra: str, kill_at: str = "") -> tuple[int, str]:
            done = subprocess.run(cmd + list(extra), cwd=ROOT, env={**env, "AGENTKD_TEST_KILL_AT": kill_at},
                                  capture_output=True, text=True, timeout=240)
            return done.returncode, done.stdout + done.stderr

        code, output = run("--set", "batch.wait=false")
        assert code == 6 and "re-run the same command" in output, output[-3000:]
        first = sim.stats()["batches"]
        assert len(first) == 1 and first[0]["requests"] == SEEDS
        assert open_requests(tmp_path) == (SEEDS, 0)  # pending: none stored, all held against the cap

        code, output = run(kill_at="submitted")
        assert code == -signal.SIGKILL, output[-3000:]
        assert f"resuming 1 batch(es) left open by an earlier session: {SEEDS} requests" in output
        assert f"{SEEDS} answered and stored" in output  # the pending batch's status and counts were shown
        assert open_requests(tmp_path) == (3, SEEDS)  # the eval stage's batch (3 held-out answers) pending
        # The killed session settled 20 batch results and had no online call in flight: a resumed run counts
        # those at their cost and the pending batch at its worst case, and nothing as possibly billed.
        prior, calls_usd, open_usd = spend_at(tmp_path)
        assert prior.interrupted == 0 and prior.unsettled_usd == 0.0 and prior.unsettled_tokens == 0, prior
        assert prior.settled_usd == pytest.approx(calls_usd) and prior.batch_usd == pytest.approx(open_usd)

        code, output = run()
        assert code == 0, output[-4000:]
        assert "resuming 1 batch(es) left open by an earlier session: 3 requests" in output
        assert "resuming after" not in output and "possibly billed" not in output
        stats = sim.stats()

    batches = stats["batches"]
    owners = Counter(owner(b) for b in batches)
    assert all(n == 1 for n in owners.values()), f"an agentkd batch was submitted twice: {owners}"
    assert owner(batches[0]) == owner(first[0])  # the pending batch was collected, not made again
    # answer A(1), the eval answers (3 held-out items, asked once: iteration 1's eval reuses them), generate
    assert sorted(b["requests"] for b in batches) == sorted([SEEDS, 3, NEW])
    billed = stats["billed_by_key"]
    custom_ids = [c for b in batches for c in b["custom_ids"]]
    assert all(billed[c] == 1 for c in custom_ids)
    store = open_store(tmp_path)
    try:
        assert {(1, "answer"), (1, "generate"), (1, "eval")} <= store.stages_done()
        stored = store.query("SELECT key, count(*) FROM calls WHERE mode = 'batch' AND status = 'ok' GROUP BY key")
        assert len(stored) == len(custom_ids) and all(n == 1 for _, n in stored)
        done = [c for (c,) in store.query("SELECT custom_id FROM batch_requests WHERE event = 'done'")]
        assert sorted(done) == sorted(custom_ids)  # every result stored under the custom_id it was billed as
        assert store.query("SELECT count(*) FROM responses WHERE actor = 'teacher' AND iteration = 1")[0][0] == SEEDS
        prior = prior_spend(store)
        assert prior.batch_requests == 0 and prior.interrupted == 0  # no batch request left open
        assert prior.settled_usd == pytest.approx(store.query("SELECT sum(cost_usd) FROM calls")[0][0])
    finally:
        store.close_sync()
