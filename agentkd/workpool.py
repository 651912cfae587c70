"""Run one async handler over many items with the gateway's failure semantics and a progress bar.

A skipped call (CallFailed) is recorded and the rest go on; a deferred item goes to the back of the
line after the wait its provider asked for (its concurrency slot is free meanwhile); budget, auth,
quota and store failures, and a role whose results are unusable (fail-fast), stop everything and
propagate.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agentkd.batches import BatchesPending
from agentkd.gateway.budget import BudgetExhausted
from agentkd.gateway.core import CallFailed, Gateway, SendingStopped
from agentkd.gateway.ledger import spend_text
from agentkd.roles.replies import UnusableReplies
from agentkd.gateway.retry import Deferred
from agentkd.run_status import RunStatus
from agentkd.store.writer import StoreError
from agentkd.teachers.base import TeacherError

class Interrupted(KeyboardInterrupt):
    """Ctrl-C: calls in flight were allowed to finish and are stored; the run resumes on re-run."""


T = TypeVar("T")
R = TypeVar("R")
MAX_DEFERRALS = 3
# Items in progress per HTTP slot. An item holds its worker while its answer is committed to the store
# (~10 ms under load) and while its handler does its own work; with one worker per slot those waits
# leave slots idle. The limiter still caps requests in flight at max_concurrency. Measured on the
# zero-latency sim (benchmarks/gateway_overhead.py, 64 slots): 1x 1,780 rps, 2x 1,800, 4x 2,290.
WORKERS_PER_SLOT = 4


@dataclass
class PoolOutcome(Generic[R]):
    results: dict[int, R] = field(default_factory=dict)  # item index -> result, for items that succeeded
    failed: dict[int, str] = field(default_factory=dict)  # item index -> error class
    deferred: int = 0

    @property
    def failure_classes(self) -> Counter:
        return Counter(self.failed.values())


async def run_all(items: Sequence[T], handle: Callable[[T], Awaitable[R]], *, gateway: Gateway, label: str,
                  concurrency: int, console: Console | None = None, show_progress: bool = True,
                  on_done: Callable[[], None] | None = None,
                  outcome: PoolOutcome[R] | None = None, status: RunStatus | None = None) -> PoolOutcome[R]:
    """Pass `outcome` to keep the partial results when a budget or provider stop raises; `status`
    (status.json) follows the items done."""
    outcome = outcome if outcome is not None else PoolOutcome()
    if not items:
        return outcome
    if status is not None:
        status.items_started(label, len(items))
    queue: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
    for i in range(len(items)):
        queue.put_nowait((i, 0))
    remaining = len(items)
    finished = asyncio.Event()
    stop: list[BaseException] = []
    loop = asyncio.get_running_loop()
    budget = gateway.budget

    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[spend]}"), TextColumn("{task.fields[rate]}"),
                        TextColumn("429s {task.fields[limited]}"), TimeElapsedColumn(),
                        console=console, disable=not show_progress, transient=False)
    task_id = progress.add_task(label, total=len(items), spend="", rate="", limited=0)
    started = time.monotonic()
    sent_before = gateway.stats.sent

    def advance(failure_class: str | None = None) -> None:
        nonlocal remaining
        remaining -= 1
        if status is not None:
            status.item_finished(failure_class)
        elapsed = max(time.monotonic() - started, 1e-9)
        progress.update(task_id, advance=1, spend=spend_text(budget, gateway.prior, short=True),
                        rate=f"{(gateway.stats.sent - sent_before) / elapsed:.1f} req/s",
                        limited=gateway.stats.rate_limited)
        if on_done is not None:
            on_done()
        if remaining == 0:
            finished.set()

    async def worker() -> None:
        while not stop:
            item = await queue.get()
            if item is None:
                return
            index, deferrals = item
            try:
                outcome.results[index] = await handle(items[index])
            except SendingStopped:
                return  # the run is stopping: this item was not sent, a re-run picks it up
            except Deferred as deferred:
                outcome.deferred += 1
                if deferrals < MAX_DEFERRALS:
                    loop.call_later(deferred.wait_s, queue.put_nowait, (index, deferrals + 1))
                    continue
                outcome.failed[index] = deferred.cause.error_class
            except CallFailed as failed:
                outcome.failed[index] = failed.error.error_class
            except (BudgetExhausted, StoreError, TeacherError, UnusableReplies, BatchesPending) as err:
                halt(err)
                return
            advance(outcome.failed.get(index))

    def halt(reason: BaseException) -> None:
        stop.append(reason)
        gateway.stop_sending()  # what has not been sent yet is not sent
        finished.set()

    def interrupt() -> None:
        # First Ctrl-C: stop taking items and let calls in flight finish, so nothing the provider already
        # answered is bought again on resume. A second Ctrl-C falls through to Python's default.
        loop.remove_signal_handler(signal.SIGINT)
        console_note = "interrupted: finishing the calls in flight (Ctrl-C again to abort)"
        (console or Console(stderr=True)).print(console_note)
        halt(Interrupted())

    graceful = threading.current_thread() is threading.main_thread()
    if graceful:
        loop.add_signal_handler(signal.SIGINT, interrupt)
    slots = concurrency * WORKERS_PER_SLOT
    if gateway.batches is not None and gateway.batches.collecting:
        slots = len(items)  # a batch answers what it was given: every item's request goes into it at once
    workers = [asyncio.create_task(worker()) for _ in range(min(slots, len(items)))]
    try:
        with progress:
            await finished.wait()
            if stop:
                # Drain: calls in flight finish (and are kept), idle workers leave, nothing new starts.
                for _ in workers:
                    queue.put_nowait(None)
                await asyncio.gather(*workers, return_exceptions=True)
    finally:
        if graceful:
            loop.remove_signal_handler(signal.SIGINT)
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        gateway.resume_sending()
    if stop:
        raise stop[0]
    return outcome
