"""No acknowledged row is lost on kill -9 (RELIABILITY.md 17), checked at the one moment that matters.

The child process dies by SIGKILL the instant the store acknowledges its N-th write (the store's
AGENTKD_TEST_KILL_AFTER_ACKS hook, inside the code that resolves a write's future), so the check does not
depend on when a parent's kill happens to land: a writer that acknowledged a row before committing it
loses that row every time, and the real writer never does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agentkd.store.writer import Store

ROOT = Path(__file__).resolve().parents[1]
SEQUENTIAL, BURST = 8, 60  # awaited one at a time, then submitted together (several rows per batch)

WRITER = textwrap.dedent(f"""
    import asyncio, sys
    from agentkd.store.writer import Store

    def row(i):
        return {{"key": f"k{{i}}", "role": "answerer", "status": "ok", "response_text": f"answer {{i}}"}}

    async def main(path):
        store = Store(path)
        await store.start()
        for i in range({SEQUENTIAL}):
            await store.write("calls", row(i))
        # Queued at once: the writer drains them into batches and acknowledges them in this order.
        await asyncio.gather(*(store.submit("calls", [row(i)]) for i in range({SEQUENTIAL}, {SEQUENTIAL + BURST})))
        await store.close()
        print("done", flush=True)

    asyncio.run(main(sys.argv[1]))
""")


def write_until_killed(path: Path, kill_after_acks: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "AGENTKD_TEST_KILL_AFTER_ACKS": str(kill_after_acks)}
    return subprocess.run([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


# First row; the last sequential one; inside the burst, at its start and deep into it.
@pytest.mark.parametrize("acks", [1, SEQUENTIAL, SEQUENTIAL + 1, SEQUENTIAL + 23])
def test_every_acknowledged_row_is_in_the_file_after_kill_9_at_its_acknowledgement(tmp_path, acks):
    path = tmp_path / "run.duckdb"
    child = write_until_killed(path, acks)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]  # died at the hook, not at the end
    assert "done" not in child.stdout
    store = Store(path, read_only=True)  # DuckDB replays its WAL
    try:
        keys = {r[0] for r in store.query("SELECT key FROM calls")}
    finally:
        store.close_sync()
    # Futures resolve in submission order, so the acknowledged rows are exactly the first `acks`.
    missing = [f"k{i}" for i in range(acks) if f"k{i}" not in keys]
    assert missing == [], f"acknowledged but lost: {missing}"


def test_without_the_hook_the_writer_finishes(tmp_path):
    child = write_until_killed(tmp_path / "run.duckdb", 0)
    assert child.returncode == 0 and "done" in child.stdout, child.stderr[-2000:]
    store = Store(tmp_path / "run.duckdb", read_only=True)
    try:
        assert store.count("calls") == SEQUENTIAL + BURST
    finally:
        store.close_sync()
