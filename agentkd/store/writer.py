"""The run's DuckDB file: schema, the single writer, and the queries the loop and trainer use.

One file per run (runs/<name>/agentkd.duckdb). All tables are append-only and all DDL runs when the
store opens, never while calls are in flight. Writes go through one asyncio writer task that drains a
queue into batched appends; a row counts as stored (its future resolves) only after the batch that
contains it has committed, so an acknowledged row survives kill -9 (DuckDB replays its WAL). The
DuckDB connection itself is db.Database (store/db.py).

An instruction is stored once: a row of `instructions` whose id the file already holds (or that an
earlier row of the same write holds) is not written, so an id has one pool, the one first decided.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agentkd.store.db import Database
from agentkd.store.schema import COLUMN_SETS, COLUMNS, SCHEMA, VIEWS, StoreError, StoreLockedError

__all__ = ["COLUMNS", "SCHEMA", "VIEWS", "Store", "StoreError", "StoreLockedError"]

_FLUSH_BATCH = 2_000
# A test hook for "no acknowledged row is lost" (RELIABILITY.md 17): with AGENTKD_TEST_KILL_AFTER_ACKS=N
# the process SIGKILLs itself the moment it acknowledges its N-th write, wherever the writer does that,
# so a crash test can check that every acknowledged row was committed without racing a kill against it.
_KILL_AFTER_ACKS = int(os.environ.get("AGENTKD_TEST_KILL_AFTER_ACKS") or 0)
_acks = 0


def _resolve(items: list, error: BaseException | None) -> None:
    for _, _, future in items:
        if future is not None and not future.done():
            if error is None:
                future.set_result(None)
                if _KILL_AFTER_ACKS:
                    _count_ack()
            else:
                future.set_exception(error)


def _count_ack() -> None:
    global _acks
    _acks += 1
    if _acks >= _KILL_AFTER_ACKS:
        os.kill(os.getpid(), signal.SIGKILL)


def _to_tuple(table: str, row: Mapping[str, Any]) -> tuple:
    """A row in column order. created_at left empty is stamped when the row is committed (store/db.py)."""
    if not row.keys() <= COLUMN_SETS[table]:
        raise KeyError(f"{table}: unknown column(s) {sorted(set(row) - COLUMN_SETS[table])}")
    return tuple(map(row.get, COLUMNS[table]))


class Store:
    """The run database. Writes: `await write(...)` (async writer) or `append_now(...)` (sync)."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = Database(self.path, read_only=read_only)
        self._queue: asyncio.Queue | None = None
        self._writer: asyncio.Task | None = None
        self.failure: StoreError | None = None
        # Called on the event loop just before each batch goes to the database: a file that must hold
        # at least what the store holds (teach's --output) writes its pending lines there.
        self.before_commit: list[Callable[[], None]] = []
        self._instruction_ids: set[str] | None = None  # loaded at the first instructions write

    def _first_rows(self, table: str, rows: Iterable[Mapping[str, Any]]) -> list[tuple]:
        """Rows in column order; for `instructions`, only ids not stored yet (see the module docstring)."""
        if table != "instructions":
            return [_to_tuple(table, r) for r in rows]
        if self._instruction_ids is None:
            self._instruction_ids = {r[0] for r in self.query("SELECT DISTINCT id FROM instructions")}
        fresh = []
        for row in rows:
            if row["id"] not in self._instruction_ids:
                fresh.append(_to_tuple(table, row))
                self._instruction_ids.add(row["id"])
        return fresh

    # ---- writing -----------------------------------------------------------------------------
    def append_now(self, table: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Append and commit rows from the calling thread; returns how many were stored."""
        tuples = self._first_rows(table, rows)
        self._flush({table: tuples})
        return len(tuples)

    def _flush(self, batch: Mapping[str, Sequence[tuple]]) -> None:
        """Commit one batch: all of its tables in one transaction, or none of it."""
        if self.failure is not None:
            raise self.failure
        try:
            self._db.append(batch)
        except StoreError as err:
            self.failure = err
            raise

    async def start(self) -> None:
        """Start the single writer task on the running event loop."""
        if self.read_only:
            raise StoreError(f"{self.path}: opened read-only")
        if self._writer is None:
            self._queue = asyncio.Queue()
            self._writer = asyncio.create_task(self._write_loop(), name="agentkd-store-writer")

    def submit(self, table: str, rows: Iterable[Mapping[str, Any]]) -> asyncio.Future:
        """Queue rows of one table; the future resolves once all of them are committed."""
        if self.failure is not None:
            raise self.failure
        if self._queue is None:
            raise RuntimeError("Store.start() must run before async writes")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((table, self._first_rows(table, rows), future))
        return future

    def enqueue(self, table: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Queue rows without waiting for them: the writer is FIFO, so anything awaited later commits
        after them; if their batch fails, `failure` is set and the next write raises it."""
        if self.failure is not None:
            raise self.failure
        if self._queue is None:
            raise RuntimeError("Store.start() must run before async writes")
        self._queue.put_nowait((table, self._first_rows(table, rows), None))

    async def write(self, table: str, row: Mapping[str, Any]) -> None:
        await self.submit(table, [row])

    async def write_many(self, table: str, rows: Iterable[Mapping[str, Any]]) -> None:
        await self.submit(table, rows)

    async def _write_loop(self) -> None:
        assert self._queue is not None
        while True:
            first = await self._queue.get()
            if first is None:
                return
            items = [first]
            queued_rows = len(first[1])
            stop = False
            while queued_rows < _FLUSH_BATCH and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stop = True
                    break
                items.append(item)
                queued_rows += len(item[1])
            batch: dict[str, list[tuple]] = defaultdict(list)
            for table, rows, _ in items:
                batch[table].extend(rows)
            try:
                self._before_commit()
                await asyncio.to_thread(self._flush, batch)
            except StoreError as err:
                _resolve(items, err)
            else:
                _resolve(items, None)
            if stop:
                return

    def _before_commit(self) -> None:
        try:
            for hook in self.before_commit:
                hook()
        except Exception as err:  # e.g. the output file's disk is full: stop as for a failed write
            self.failure = StoreError(f"{self.path}: not committing: {type(err).__name__}: {err}")
            raise self.failure from None

    async def close(self) -> None:
        """Drain the queue, stop the writer, checkpoint and close the file."""
        if self._writer is not None and self._queue is not None:
            self._queue.put_nowait(None)
            await self._writer
            self._writer = None
        self.close_sync()

    def close_sync(self) -> None:
        self._db.close(checkpoint=not self.read_only and self.failure is None)

    # ---- reading -----------------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Run a read query; the result is fully fetched."""
        return self._db.query(sql, params)

    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self._db.query_dicts(sql, params)

    def count(self, table: str) -> int:
        return self.query(f'SELECT count(*) FROM "{table}"')[0][0]

    def call_by_key(self, key: str) -> dict[str, Any] | None:
        """The stored successful answer for a request key, if any (what the cache serves)."""
        rows = self.query_dicts(
            "SELECT * FROM calls WHERE key = ? AND status = 'ok' ORDER BY created_at LIMIT 1", [key]
        )
        return rows[0] if rows else None

    def ok_call_keys(self) -> set[str]:
        return {row[0] for row in self.query("SELECT DISTINCT key FROM calls WHERE status = 'ok'")}

    def stages_done(self) -> set[tuple[int, str]]:
        return {(r[0], r[1]) for r in self.query("SELECT iteration, stage FROM loop_state")}
