"""The one DuckDB connection of a run: schema at open, batched appends, queries.

`Store` (store/writer.py) puts the asyncio side in front of it: the queue, the single writer task and the
queries the rest of agentkd uses.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from agentkd.store.schema import COLUMNS, SCHEMA, VIEWS, StoreError, StoreLockedError

CREATED_AT = {table: COLUMNS[table].index("created_at") for table in SCHEMA}
ONE_MICROSECOND = dt.timedelta(microseconds=1)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Database:
    """One DuckDB connection to a run file."""

    def __init__(self, path: Path, *, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        self._con = _open(path, read_only)
        if not read_only:
            self._create_schema()
        self._create_views(temporary=read_only)
        self._appenders: dict[str, duckdb.Appender] = {}  # reused: creating one costs ~1 ms
        self._last_stamp = dt.datetime.min
        self._write_lock = threading.Lock()  # the async writer's thread and append_now callers
        self._read_lock = threading.Lock()

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

    def _create_views(self, *, temporary: bool) -> None:
        """The views of this version. Read-only, as temporary views (nothing is written to the file): a
        file last written by an earlier version then reads like a current one, as far as its columns go."""
        existing = {r[0] for r in self._con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'").fetchall()}
        for view, sql in VIEWS.items():
            if view in existing:  # earlier versions had an `attempts` table: it stays readable as is
                continue
            try:
                self._con.execute(f'CREATE OR REPLACE {"TEMP " if temporary else ""}VIEW "{view}" AS {sql}')
            except duckdb.Error as err:
                if not temporary:
                    raise StoreError(f"{self.path}: cannot create view {view}: {err}") from None
                # read-only, a file from before a column the view needs: readers of that view fail
                # with DuckDB's own message; every other view and table still reads

    def append(self, batch: Mapping[str, Sequence[tuple]]) -> None:
        """Append a batch of rows to its tables in one transaction: all of them or none."""
        with self._write_lock:
            self._append(batch)

    def _append(self, batch: Mapping[str, Sequence[tuple]]) -> None:
        try:
            self._con.begin()
            try:
                for table, rows in batch.items():
                    if not rows:
                        continue
                    rows = self._stamp(table, rows)
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
        except (duckdb.Error, OSError, TypeError, ValueError) as err:
            raise StoreError(f"{self.path}: write failed: {err}") from None

    def _stamp(self, table: str, rows: Sequence[tuple]) -> Sequence[tuple]:
        """Fill an empty created_at with the commit time, strictly increasing in insertion order.

        Queries take "the latest row" by created_at (arg_max), so rows of one batch must not tie.
        """
        at = CREATED_AT[table]
        if all(row[at] is not None for row in rows):
            return rows
        stamped = []
        for row in rows:
            if row[at] is None:
                now = _now()
                self._last_stamp = now if now > self._last_stamp else self._last_stamp + ONE_MICROSECOND
                row = (*row[:at], self._last_stamp, *row[at + 1:])
            stamped.append(row)
        return stamped

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._cursor() as cursor:
            return cursor.execute(sql, list(params)).fetchall()

    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._cursor() as cursor:
            result = cursor.execute(sql, list(params))
            names = [d[0] for d in result.description]
            return [dict(zip(names, row)) for row in result.fetchall()]

    @contextmanager
    def _cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of its own (queries run beside the writer thread); read-only, the connection itself,
        one query at a time, since a cursor does not see the connection's temporary views."""
        if self.read_only:
            with self._read_lock:
                yield self._con
            return
        cursor = self._con.cursor()
        try:
            yield cursor
        finally:
            cursor.close()

    def close(self, *, checkpoint: bool = True) -> None:
        self._appenders.clear()
        if checkpoint and not self.read_only:
            try:
                self._con.execute("CHECKPOINT")
            except duckdb.Error:
                pass  # the WAL still holds every committed row
        self._con.close()


def _open(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as err:
        text = str(err)
        if "lock" in text.lower():
            pid = re.search(r"PID (\d+)", text)
            holder = f"process {pid.group(1)}" if pid else "another process"
            # Name only what works: DuckDB refuses every other process meanwhile, read-only opens included.
            raise StoreLockedError(
                f"{path}: the run database is open for writing in {holder}, and DuckDB lets no other process "
                f"open it meanwhile, not even read-only. `agentkd status {path.parent}` shows what the run is "
                f"doing; stop it (it resumes) or wait for the run to finish, then run this command again"
            ) from None
        raise StoreError(f"{path}: cannot open the run database: {text}") from None
