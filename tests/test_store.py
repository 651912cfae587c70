"""The run database: schema, async single writer, durability under kill -9, lock errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import duckdb
import pytest

from agentkd.store.writer import SCHEMA, VIEWS, Store, StoreError, StoreLockedError
from agentkd.store.db import Database


def test_schema_has_the_tables_the_design_requires(tmp_path):
    store = Store(tmp_path / "run.duckdb")
    kinds = dict(store.query("SELECT table_name, table_type FROM information_schema.tables"))
    store.close_sync()
    tables = {name for name, kind in kinds.items() if kind == "BASE TABLE"}
    assert {"calls", "instructions", "responses", "judgments", "rationales", "reservations",
            "train_runs", "metrics"} <= tables == set(SCHEMA)
    assert {name for name, kind in kinds.items() if kind == "VIEW"} == set(VIEWS) == {
        "attempts", "instruction_pool", "training_examples", "spend", "failures"}


def test_a_file_from_an_earlier_version_gains_the_new_columns(tmp_path):
    path = tmp_path / "run.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE reservations (reservation_id VARCHAR, key VARCHAR, event VARCHAR, usd DOUBLE, "
                "tokens BIGINT, created_at TIMESTAMP)")
    con.execute("INSERT INTO reservations VALUES ('r0', 'k', 'reserve', 1.0, 10, now())")
    con.close()
    store = Store(path)
    store.append_now("reservations", [{"reservation_id": "r0", "key": "k", "event": "settle", "usd": 0.5,
                                       "tokens": 5, "attempt": 1, "status_code": 200}])
    assert store.query("SELECT event, attempt, status_code FROM reservations ORDER BY created_at") == [
        ("reserve", None, None), ("settle", 1, 200)]
    assert store.query("SELECT key, attempt, status_code FROM attempts") == [("k", 1, 200)]
    store.close_sync()


def test_a_batch_is_one_transaction_and_appenders_are_reused(tmp_path):
    db = Database(tmp_path / "run.duckdb", read_only=False)
    for i in range(3):
        db.append({"metrics": [(i, "x", float(i), i, None)], "loop_state": [(i, "done", None)]})
    assert db.query("SELECT count(*) FROM metrics") == [(3,)] == db.query("SELECT count(*) FROM loop_state")
    assert set(db._appenders) == {"metrics", "loop_state"}
    # A batch that fails part-way leaves nothing of itself behind.
    with pytest.raises(StoreError, match="write failed"):
        db.append({"metrics": [(1, "y", 1.0, 1, None)], "loop_state": [("not an int", "x", None)]})
    assert db.query("SELECT count(*) FROM metrics") == [(3,)]
    db.close()


def test_rows_of_one_batch_get_strictly_increasing_commit_stamps(tmp_path):
    """"The latest row" is taken by created_at: rows committed together must not tie."""
    store = Store(tmp_path / "run.duckdb")
    store.append_now("responses", [{"instruction_id": "i", "actor": "student", "text": str(n)} for n in range(50)])
    stamps = [r[0] for r in store.query("SELECT created_at FROM responses ORDER BY rowid")]
    assert all(a < b for a, b in zip(stamps, stamps[1:]))
    assert store.query("SELECT arg_max(text, created_at) FROM responses") == [("49",)]
    store.close_sync()


async def test_async_writes_are_readable_after_ack(tmp_path):
    store = Store(tmp_path / "run.duckdb")
    await store.start()
    await store.write_many("metrics", [{"iteration": 0, "name": "loss", "value": float(i), "step": i}
                                       for i in range(500)])
    assert store.count("metrics") == 500
    await store.close()
    # Reopen: the rows were committed to the file.
    again = Store(tmp_path / "run.duckdb", read_only=True)
    assert again.query("SELECT sum(step) FROM metrics")[0][0] == sum(range(500))
    again.close_sync()


async def test_enqueued_rows_commit_before_a_later_awaited_write(tmp_path):
    store = Store(tmp_path / "run.duckdb")
    await store.start()
    for i in range(300):
        store.enqueue("metrics", [{"iteration": 0, "name": "queued", "value": float(i), "step": i}])
    await store.write("metrics", {"iteration": 0, "name": "awaited", "value": 0.0, "step": 0})
    # FIFO writer: once the awaited row is acknowledged, every row queued before it is stored too.
    assert store.query("SELECT name, count(*) FROM metrics GROUP BY name ORDER BY name") == [
        ("awaited", 1), ("queued", 300)]
    await store.close()


async def test_a_failed_enqueued_batch_fails_the_next_write(tmp_path):
    store = Store(tmp_path / "run.duckdb")
    await store.start()
    store.query("DROP TABLE metrics")  # the enqueued row's batch will fail
    store.enqueue("metrics", [{"name": "x", "value": 1.0}])
    with pytest.raises(StoreError, match="write failed"):
        await store.write("calls", {"key": "k"})  # same batch as the failing row, or refused after it
    with pytest.raises(StoreError):
        store.enqueue("calls", [{"key": "k2"}])
    assert store.failure is not None
    await store.close()


async def test_before_commit_hooks_run_before_each_batch_is_committed(tmp_path):
    """teach's --output writes its pending lines there: no row queued later is durable before them."""
    store = Store(tmp_path / "run.duckdb")
    await store.start()
    seen: list[int] = []
    store.before_commit.append(lambda: seen.append(store.count("metrics")))
    for i in range(3):
        await store.write("metrics", {"iteration": 0, "name": "m", "value": float(i)})
    assert seen == [0, 1, 2]
    await store.close()


async def test_a_failing_before_commit_hook_fails_the_batch_and_stops_writes(tmp_path):
    store = Store(tmp_path / "run.duckdb")
    await store.start()

    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    store.before_commit.append(disk_full)
    with pytest.raises(StoreError, match="not committing: OSError: .*No space left"):
        await store.write("metrics", {"iteration": 0, "name": "m", "value": 1.0})
    assert store.failure is not None and store.count("metrics") == 0
    with pytest.raises(StoreError):
        await store.write("metrics", {"iteration": 0, "name": "m", "value": 2.0})
    store.before_commit.clear()
    await store.close()


async def test_unknown_column_is_rejected_before_queueing(tmp_path):
    store = Store(tmp_path / "run.duckdb")
    await store.start()
    with pytest.raises(KeyError, match="calls: unknown column"):
        store.submit("calls", [{"key": "k", "api_key": "nope"}])
    await store.close()


def test_call_by_key_returns_only_successful_calls(tmp_path):
    store = Store(tmp_path / "run.duckdb")
    store.append_now("calls", [
        {"key": "a", "status": "error", "response_text": None},
        {"key": "a", "status": "ok", "response_text": "42"},
        {"key": "b", "status": "error"},
    ])
    assert store.call_by_key("a")["response_text"] == "42"
    assert store.call_by_key("b") is None
    assert store.ok_call_keys() == {"a"}
    store.close_sync()


def test_second_writer_process_gets_a_clear_error_naming_the_pid(tmp_path):
    path = tmp_path / "run.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from agentkd.store.writer import Store
            s = Store({str(path)!r})
            print("ready", flush=True)
            time.sleep(30)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=rf"process {holder.pid}"):
            Store(path)
    finally:
        holder.kill()
        holder.wait()


def test_write_failure_marks_the_store_failed(tmp_path):
    store = Store(tmp_path / "run.duckdb")
    store.query("DROP TABLE metrics")  # simulate a broken file under the writer
    with pytest.raises(StoreError, match="write failed"):
        store.append_now("metrics", [{"name": "x", "value": 1.0}])
    # Every later write refuses at once: callers stop sending paid calls.
    with pytest.raises(StoreError):
        store.append_now("calls", [{"key": "k"}])
    store.close_sync()


WRITER = textwrap.dedent("""
    import asyncio, sys
    from agentkd.store.writer import Store

    async def main(path):
        store = Store(path)
        await store.start()
        i = 0
        while True:
            await store.write_many("calls", [{"key": f"k{i}-{j}", "status": "ok"} for j in range(50)])
            # Only after the await returned is the batch acknowledged.
            print(f"acked {i}", flush=True)
            i += 1

    asyncio.run(main(sys.argv[1]))
""")


@pytest.mark.slow
def test_acknowledged_rows_survive_kill_9(tmp_path):
    path = tmp_path / "run.duckdb"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    acked = -1
    deadline = time.monotonic() + 60
    while acked < 40 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("acked"):
            acked = int(line.split()[1])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert acked >= 40
    store = Store(path, read_only=True)
    keys = {r[0] for r in store.query("SELECT key FROM calls")}
    store.close_sync()
    missing = [f"k{i}-{j}" for i in range(acked + 1) for j in range(50) if f"k{i}-{j}" not in keys]
    assert missing == []


async def test_the_writer_commits_what_is_queued_in_batches_of_at_most_2000_rows(tmp_path):
    from agentkd.store import writer as store_module

    store = Store(tmp_path / "run.duckdb")
    await store.start()
    batches: list[int] = []
    store.before_commit.append(lambda: batches.append(store.count("calls")))
    # Five submissions of 1,000 queued before the writer wakes: 2,000 + 2,000 + 1,000, in order.
    futures = [store.submit("calls", [{"key": f"k{i}-{j}"} for j in range(1_000)]) for i in range(5)]
    await futures[-1]
    assert all(f.done() and f.exception() is None for f in futures)
    assert store_module._FLUSH_BATCH == 2_000 and batches == [0, 2_000, 4_000]
    assert store.count("calls") == 5_000
    await store.close()


async def test_a_clean_close_stops_the_writer_and_checkpoints(tmp_path):
    path = tmp_path / "run.duckdb"
    store = Store(path)
    await store.start()
    await store.write("metrics", {"iteration": 0, "name": "m", "value": 1.0})
    assert path.with_name(path.name + ".wal").exists()  # committed, not yet checkpointed
    await store.close()
    assert not path.with_name(path.name + ".wal").exists()
    assert store._writer is None
    await store.close()  # a second close (a finally after an explicit close) is harmless
    store = Store(path, read_only=True)
    assert store.count("metrics") == 1
    with pytest.raises(StoreError, match="read-only"):
        await store.start()
    store.close_sync()


def test_async_writes_before_start_are_a_clear_error(tmp_path):
    store = Store(tmp_path / "run.duckdb")
    with pytest.raises(RuntimeError, match=r"^Store\.start\(\) must run before async writes$"):
        store.enqueue("metrics", [{"name": "m", "value": 1.0}])
    with pytest.raises(RuntimeError, match=r"^Store\.start\(\) must run before async writes$"):
        store.submit("metrics", [{"name": "m", "value": 1.0}])
    store.close_sync()


async def test_rows_queued_just_before_close_are_committed_by_it(tmp_path):
    """close() queues its stop behind what is queued: the writer drains everything before it ends."""
    store = Store(tmp_path / "run.duckdb")
    await store.start()
    futures = [store.submit("metrics", [{"iteration": 0, "name": "m", "value": float(i)}]) for i in range(3)]
    store.enqueue("metrics", [{"iteration": 0, "name": "m", "value": 3.0}])
    await store.close()  # awaited directly: its stop is queued before the writer first runs
    assert all(f.done() and f.exception() is None for f in futures)
    store = Store(tmp_path / "run.duckdb", read_only=True)
    assert store.count("metrics") == 4
    store.close_sync()


def test_a_row_may_set_every_column_of_its_table(tmp_path):
    from agentkd.store.writer import COLUMNS

    store = Store(tmp_path / "run.duckdb")
    row = {c: None for c in COLUMNS["metrics"]} | {"name": "m", "value": 1.0, "iteration": 0}
    assert store.append_now("metrics", [row]) == 1
    store.close_sync()
