"""runs/<name>/status.json: what a running `teach` or `run` is doing, for other processes to read.

DuckDB lets no other process open the run database while a run writes, not even read-only, so the
running process keeps this small file current instead: at start, at every stage, every
STATUS_INTERVAL_S while it runs, and once more at the end with how it ended. Each write goes to a
temporary file that then replaces status.json (os.replace), so a reader sees the old file or the new
one, never half of one. It is not fsynced: it is rewritten every second, and after a crash the
database, not this file, is the record (`agentkd status` then reads the database).

Fields: run, command, role (teach), pid, process_start (to tell a live pid from a reused one),
started_at, updated_at, state (running | finished | stopped | interrupted | failed), stop_reason,
iteration and iterations (run), stage, items (label, done, total, failed), spend (settled_usd,
in_flight_usd, interrupted_usd, cap_usd, settled_tokens, cap_tokens), requests (sent, per_second over
the last RATE_WINDOW_S, rate_limited, answered_from_store), failures (items skipped, by class) and
results (the fail-fast tallies per role and stage: results, unusable, share).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"
STATUS_INTERVAL_S = 1.0
RATE_WINDOW_S = 10.0


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after "(comm)"


def process_alive(pid: int | None, started: str | None) -> bool:
    """True while the process that wrote a status file still runs (not merely a process with its pid)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    now = process_start(pid)
    return started is None or now is None or now == started


class RunStatus:
    """The writer side. One per teacher session; its heartbeat runs on the session's event loop."""

    def __init__(self, run_dir: Path, gateway, *, run: str, command: str, role: str | None = None,
                 iterations: int | None = None) -> None:
        self.path = Path(run_dir) / STATUS_FILE
        self.gateway = gateway
        pid = os.getpid()
        self.fields: dict[str, Any] = {
            "run": run, "command": command, "role": role, "pid": pid, "process_start": process_start(pid),
            "started_at": _now(), "state": "running", "stop_reason": None,
            "iteration": None, "iterations": iterations, "stage": None, "items": None,
        }
        self.failures: Counter = Counter()
        self._items: dict[str, Any] | None = None
        self._sent: deque[tuple[float, int]] = deque()
        self._heartbeat: asyncio.Task | None = None

    # ---- what the run reports ----------------------------------------------------------------
    def set_stage(self, stage: str, iteration: int | None = None) -> None:
        self.fields.update(stage=stage, iteration=iteration)
        self._items = None
        if self.gateway.reply_check is not None:  # counted per stage of each iteration
            self.gateway.reply_check.stage = stage if iteration is None else f"{stage} (iteration {iteration})"
        self.write()

    def items_started(self, label: str, total: int) -> None:
        self._items = {"label": label, "done": 0, "total": total, "failed": 0}

    def item_finished(self, failure_class: str | None) -> None:
        if self._items is not None:
            self._items["done"] += 1
            if failure_class is not None:
                self._items["failed"] += 1
        if failure_class is not None:
            self.failures[failure_class] += 1

    # ---- writing -----------------------------------------------------------------------------
    async def start(self) -> None:
        self.write()
        self._heartbeat = asyncio.create_task(self._beat(), name="agentkd-status")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            try:
                self.write()
            except OSError:
                pass  # a full disk stops the run through the store, not through its status file

    async def close(self, error: BaseException | None) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        self.fields.update(end_state(error))
        self.write()

    def snapshot(self) -> dict[str, Any]:
        g = self.gateway
        budget, prior, stats = g.budget, g.prior, g.stats
        now = time.monotonic()
        self._sent.append((now, stats.sent))
        while len(self._sent) > 2 and now - self._sent[1][0] >= RATE_WINDOW_S:
            self._sent.popleft()
        (then, sent_then) = self._sent[0]
        elapsed = now - then
        rate = (stats.sent - sent_then) / elapsed if elapsed > 0 else 0.0
        replies = g.reply_check.shares() if g.reply_check is not None else {}
        return {
            **self.fields, "updated_at": _now(), "items": dict(self._items) if self._items else None,
            "spend": {"settled_usd": round(budget.settled_usd - prior.unsettled_usd, 6),
                      "in_flight_usd": round(max(budget.reserved_usd, 0.0), 6),
                      "interrupted_usd": round(prior.unsettled_usd, 6), "cap_usd": budget.cap_usd,
                      "settled_tokens": budget.settled_tokens, "cap_tokens": budget.cap_tokens},
            "requests": {"sent": stats.sent, "per_second": round(rate, 2), "rate_limited": stats.rate_limited,
                         "answered_from_store": stats.cache_hits},
            "failures": dict(self.failures), "results": replies,
        }

    def write(self) -> None:
        partial = self.path.with_name(f".{STATUS_FILE}.{os.getpid()}.partial")
        partial.write_text(json.dumps(self.snapshot(), indent=1) + "\n", encoding="utf-8")
        os.replace(partial, self.path)


def end_state(error: BaseException | None) -> dict[str, Any]:
    """How a session ended, from the exception that ended it (None: it finished)."""
    from agentkd.gateway.budget import BudgetExhausted
    from agentkd.roles.replies import UnusableReplies
    from agentkd.teachers.base import AuthError, QuotaExceeded

    if error is None:
        return {"state": "finished", "stop_reason": None}
    if isinstance(error, (KeyboardInterrupt, asyncio.CancelledError)):
        return {"state": "interrupted", "stop_reason": "Ctrl-C; resumable"}
    if isinstance(error, BudgetExhausted):
        return {"state": "stopped", "stop_reason": "budget exhausted; resumable with a larger budget"}
    if isinstance(error, UnusableReplies):
        return {"state": "stopped", "stop_reason": f"fail-fast: {error}"}
    if isinstance(error, (AuthError, QuotaExceeded)):
        return {"state": "stopped", "stop_reason": f"the provider refused: {type(error).__name__}"}
    return {"state": "failed", "stop_reason": type(error).__name__}


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The last status a process wrote for this run, or None. A file that does not decode is None too
    (it is only ever replaced whole, so that means someone else wrote it)."""
    try:
        data = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_running(status: dict[str, Any] | None) -> bool:
    return bool(status) and status.get("state") == "running" and process_alive(
        status.get("pid"), status.get("process_start"))
