"""The run's DuckDB file: schema, the single writer, and the queries the loop and trainer use.

One file per run (runs/<name>/agentkd.duckdb). All tables are append-only and all DDL runs when the
store opens, never while calls are in flight. Writes go through one asyncio writer task that drains a
queue into batched appender flushes; a row counts as stored (its future resolves) only after the flush
that contains it has committed, so an acknowledged row survives kill -9 (DuckDB replays its WAL).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb

# table -> ordered (column, type). Adding a column is a schema change: append it at the end.
SCHEMA: dict[str, list[tuple[str, str]]] = {
    "calls": [
        ("key", "VARCHAR"), ("role", "VARCHAR"), ("provider", "VARCHAR"), ("model", "VARCHAR"),
        ("prompt_version", "VARCHAR"), ("request_json", "VARCHAR"), ("response_text", "VARCHAR"),
        ("finish_reason", "VARCHAR"), ("truncated", "BOOLEAN"), ("input_tokens", "BIGINT"),
        ("output_tokens", "BIGINT"), ("cached_tokens", "BIGINT"), ("cost_usd", "DOUBLE"),
        ("latency_s", "DOUBLE"), ("attempts", "INTEGER"), ("status", "VARCHAR"),
        ("error_class", "VARCHAR"), ("error_detail", "VARCHAR"), ("request_id", "VARCHAR"),
        ("batch_id", "VARCHAR"), ("estimator", "VARCHAR"), ("logprobs_json", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
    ],
    # The budget ledger: a reserve row before every HTTP attempt, and a settle (or release) row after
    # it that also records the attempt: its number, HTTP status, error class and latency. One row per
    # attempt, so retries are visible (the `attempts` view) without a third table to commit per call.
    "reservations": [
        ("reservation_id", "VARCHAR"), ("key", "VARCHAR"), ("event", "VARCHAR"), ("usd", "DOUBLE"),
        ("tokens", "BIGINT"), ("created_at", "TIMESTAMP"), ("attempt", "INTEGER"),
        ("status_code", "INTEGER"), ("error_class", "VARCHAR"), ("latency_s", "DOUBLE"),
    ],
    "instructions": [
        ("id", "VARCHAR"), ("text", "VARCHAR"), ("source", "VARCHAR"), ("parent_id", "VARCHAR"),
        ("iteration", "INTEGER"), ("pool", "VARCHAR"), ("rouge_nearest", "DOUBLE"),
        ("rejected_reason", "VARCHAR"), ("answer", "VARCHAR"), ("created_at", "TIMESTAMP"),
    ],
    "responses": [
        ("instruction_id", "VARCHAR"), ("actor", "VARCHAR"), ("iteration", "INTEGER"),
        ("checkpoint", "VARCHAR"), ("text", "VARCHAR"), ("call_key", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
    ],
    "judgments": [
        ("instruction_id", "VARCHAR"), ("iteration", "INTEGER"), ("order", "VARCHAR"),
        ("teacher_score", "DOUBLE"), ("student_score", "DOUBLE"), ("parsed_ok", "BOOLEAN"),
        ("reason", "VARCHAR"), ("call_key", "VARCHAR"), ("created_at", "TIMESTAMP"),
    ],
    "verdicts": [
        ("instruction_id", "VARCHAR"), ("iteration", "INTEGER"), ("teacher_score", "DOUBLE"),
        ("student_score", "DOUBLE"), ("label", "VARCHAR"), ("order_disagreement", "BOOLEAN"),
        ("created_at", "TIMESTAMP"),
    ],
    "rationales": [
        ("example_id", "VARCHAR"), ("label", "VARCHAR"), ("rationale", "VARCHAR"),
        ("parsed_ok", "BOOLEAN"), ("reason", "VARCHAR"), ("call_key", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
    ],
    "train_runs": [
        ("iteration", "INTEGER"), ("objective", "VARCHAR"), ("checkpoint", "VARCHAR"),
        ("steps", "INTEGER"), ("examples", "INTEGER"), ("final_loss", "DOUBLE"),
        ("seconds", "DOUBLE"), ("created_at", "TIMESTAMP"),
    ],
    "metrics": [
        ("iteration", "INTEGER"), ("name", "VARCHAR"), ("value", "DOUBLE"), ("step", "INTEGER"),
        ("created_at", "TIMESTAMP"),
    ],
    # Loop progress markers: a stage row is written when the stage has finished, so a resumed run
    # skips exactly the stages that completed.
    "loop_state": [("iteration", "INTEGER"), ("stage", "VARCHAR"), ("created_at", "TIMESTAMP")],
}

# Read-only views over the tables, created with them.
VIEWS: dict[str, str] = {
    "attempts": "SELECT key, attempt, status_code, error_class, latency_s, created_at FROM reservations "
                "WHERE event <> 'reserve'",
}

COLUMNS: dict[str, tuple[str, ...]] = {t: tuple(c for c, _ in cols) for t, cols in SCHEMA.items()}
_COLUMN_SETS: dict[str, frozenset[str]] = {t: frozenset(cols) for t, cols in COLUMNS.items()}
_FLUSH_BATCH = 2_000


class StoreError(Exception):
    """The store cannot be opened or written; paid calls must stop."""


class StoreLockedError(StoreError):
    """Another process holds the run's database open for writing."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _to_tuple(table: str, row: Mapping[str, Any]) -> tuple:
    if not row.keys() <= _COLUMN_SETS[table]:
        raise KeyError(f"{table}: unknown column(s) {sorted(set(row) - _COLUMN_SETS[table])}")
    get = row.get
    values = [get(c) for c in COLUMNS[table]]
    if get("created_at") is None:
        values[COLUMNS[table].index("created_at")] = _now()
    return tuple(values)


def _open(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as err:
        text = str(err)
        if "lock" in text.lower():
            pid = re.search(r"PID (\d+)", text)
            holder = f"process {pid.group(1)}" if pid else "another process"
            raise StoreLockedError(
                f"{path}: the run database is open for writing in {holder}; stop it or wait for it "
                f"to finish (read-only access: agentkd report/export, or duckdb -readonly)"
            ) from None
        raise StoreError(f"{path}: cannot open the run database: {text}") from None


class Store:
    """The run database. Writes: `await write(...)` (async writer) or `append_now(...)` (sync)."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.read_only = read_only
        self._con = _open(self.path, read_only)
        if not read_only:
            self._create_schema()
        self._write_lock = threading.Lock()
        self._appenders: dict[str, duckdb.Appender] = {}  # reused: creating one costs ~1 ms
        self._queue: asyncio.Queue | None = None
        self._writer: asyncio.Task | None = None
        self.failure: StoreError | None = None

    def _create_schema(self) -> None:
        for table, cols in SCHEMA.items():
            body = ", ".join(f'"{c}" {t}' for c, t in cols)
            self._con.execute(f'CREATE TABLE IF NOT EXISTS "{table}" ({body})')
        # A file from an earlier version: columns are only ever appended, so add the missing ones.
        present = set(self._con.execute("SELECT table_name, column_name FROM information_schema.columns")
                      .fetchall())
        for table, cols in SCHEMA.items():
            for column, kind in cols:
                if (table, column) not in present:
                    self._con.execute(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {kind}')
        existing = {r[0] for r in self._con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'").fetchall()}
        for view, sql in VIEWS.items():
            if view not in existing:  # earlier versions had an `attempts` table: it stays readable as is
                self._con.execute(f'CREATE OR REPLACE VIEW "{view}" AS {sql}')

    # ---- writing -----------------------------------------------------------------------------
    def append_now(self, table: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Append and commit rows from the calling thread; returns how many were stored."""
        tuples = [_to_tuple(table, r) for r in rows]
        self._flush({table: tuples})
        return len(tuples)

    def _flush(self, batch: Mapping[str, Sequence[tuple]]) -> None:
        if self.failure is not None:
            raise self.failure
        with self._write_lock:
            try:
                # One transaction per batch (all of its tables or none), through appenders kept open.
                self._con.begin()
                try:
                    for table, rows in batch.items():
                        if not rows:
                            continue
                        appender = self._appenders.get(table)
                        if appender is None:
                            appender = self._appenders[table] = self._con.appender(table)
                        appender.append_rows(rows)
                        appender.flush()
                    self._con.commit()
                except BaseException:
                    self._appenders.clear()
                    try:
                        self._con.rollback()
                    except duckdb.Error:
                        pass
                    raise
            except (duckdb.Error, OSError) as err:
                self.failure = StoreError(f"{self.path}: write failed: {err}")
                raise self.failure from err

    async def start(self) -> None:
        """Start the single writer task on the running event loop."""
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
        self._queue.put_nowait((table, [_to_tuple(table, r) for r in rows], future))
        return future

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
                await asyncio.to_thread(self._flush, batch)
            except StoreError as err:
                for _, _, future in items:
                    if not future.done():
                        future.set_exception(err)
            else:
                for _, _, future in items:
                    if not future.done():
                        future.set_result(None)
            if stop:
                return

    async def close(self) -> None:
        """Drain the queue, stop the writer, checkpoint and close the file."""
        if self._writer is not None and self._queue is not None:
            self._queue.put_nowait(None)
            await self._writer
            self._writer = None
        self.close_sync()

    def close_sync(self) -> None:
        with self._write_lock:
            self._appenders.clear()
            if not self.read_only and self.failure is None:
                try:
                    self._con.execute("CHECKPOINT")
                except duckdb.Error:
                    pass  # the WAL still holds every committed row
            self._con.close()

    # ---- reading -----------------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Run a read query on its own cursor (fully fetched, so it never blocks a flush)."""
        cursor = self._con.cursor()
        try:
            return cursor.execute(sql, list(params)).fetchall()
        finally:
            cursor.close()

    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self._con.cursor()
        try:
            result = cursor.execute(sql, list(params))
            names = [d[0] for d in result.description]
            return [dict(zip(names, row)) for row in result.fetchall()]
        finally:
            cursor.close()

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
