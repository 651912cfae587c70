"""Batch mode: requests collected into provider batches, through the gateway's cache, store and budget.

A request in batch mode reaches the runner only after the gateway's cache (a stored answer, whichever
mode bought it, is never bought again). The runner collects requests until none has come for
`batch.collect_s` (or a chunk is full: the provider's request and byte limits, or batch.max_*), holds
each one's worst case at the batch price in the budget (a request that does not fit waits for earlier
results to settle, and is BudgetExhausted when nothing is left to settle), makes the batch durable
(records.py) before anything is uploaded, submits it with its agentkd id in the metadata (OpenAI) or in
every custom_id (both), polls with backoff, and stores every result as a call row, settling each at its
usage. Expired, cancelled or errored requests go into a later batch (at most batch.max_resubmits
times); the answered ones are kept, paid once. A session that starts with batches left open by an
earlier one (kill -9, Ctrl-C, `batch.wait = false`) holds their requests again and carries on from the
last durable step: it finds the batch at the provider instead of creating it a second time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import signal
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agentkd.batches import BatchesPending
from agentkd.batches.providers import BatchAPI, BatchState, Outcome
from agentkd.batches.records import OpenBatch, open_batches
from agentkd.gateway.budget import BudgetExhausted, Reservation, Usage
from agentkd.config import BatchSection
from agentkd.gateway.core import CallFailed, Completion, Gateway, SendingStopped
from agentkd.store.writer import StoreError
from agentkd.teachers.base import (
    ConnectFailed,
    TeacherError,
    TeacherReply,
    TeacherRequest,
)
from agentkd.gateway.tokens import Estimate, estimate_prompt

T = TypeVar("T")
SUBMIT_ATTEMPTS = 6
# Test hook (like store/writer.py's): SIGKILL this process right after the named step of a batch is durable:
# "prepared", "uploaded" (OpenAI: between the upload and the create), "created" (the provider has the
# batch, the store does not know its id yet), "submitted".
_KILL_AT = os.environ.get("AGENTKD_TEST_KILL_AT") or ""


@dataclass
class Item:
    """One request on its way through a batch, and the callers waiting for its answer."""

    request: TeacherRequest
    estimate: Estimate
    waiters: list[asyncio.Future] = field(default_factory=list)
    resubmits: int = 0
    reservation: Reservation | None = None
    custom_id: str | None = None
    settled: bool = False  # resumed: its settle row is durable already
    stored: bool = False  # resumed: its calls row is durable already


@dataclass
class Chunk:
    batch_id: str
    provider: str
    model: str
    items: list[Item]
    prepared_at: dt.datetime | None = None
    file_id: str | None = None
    provider_batch_id: str | None = None
    status: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    resumed: bool = False


class BatchRunner:
    def __init__(self, gateway: Gateway, apis: dict[str, BatchAPI], settings: BatchSection, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 say: Callable[[str], None] | None = None) -> None:
        self.gateway = gateway
        self.apis = apis  # provider -> batch adapter
        self.settings = settings
        self._sleep = sleep
        self.say = say or (lambda line: None)
        self._items: dict[str, Item] = {}  # request key -> item, until its answer (or refusal) is known
        self._waiting: list[Item] = []  # not yet in a batch
        self._blocked: list[Item] = []  # did not fit the budget: retried when a result settles
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self.chunks: dict[str, Chunk] = {}  # batch id -> chunk, while it runs
        self._serial = itertools.count(1)
        self.stopped = False
        self.collecting = False  # some role is in batch mode: work pools give every item a worker

    # ---- entry points ---------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self._items

    @property
    def busy(self) -> bool:
        return bool(self._items)

    async def complete(self, request: TeacherRequest) -> Completion:
        if self.stopped:
            raise self._stop_error()
        future = asyncio.get_running_loop().create_future()
        item = self._items.get(request.key)
        if item is None:
            estimate = estimate_prompt(request.messages, request.provider)
            item = self._items[request.key] = Item(request, estimate)
            self._waiting.append(item)
            self._schedule_flush()
        item.waiters.append(future)
        return await future

    def resume(self) -> None:
        """Hold again what earlier sessions left in open batches, and carry each batch on (gateway.start)."""
        for batch in open_batches(self.gateway.store):
            self._resume(batch)
        if self.chunks:
            self.say(f"resuming {len(self.chunks)} batch(es) left open by an earlier session: "
                     f"{sum(len(c.items) for c in self.chunks.values()):,} requests")

    def stop_waiting(self) -> None:
        """The run is stopping: callers stop waiting; submitted batches stay open (durable), to be
        collected by the next session; requests not yet in a batch are dropped and their holds freed."""
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
        for item in self._waiting + self._blocked:
            if item.reservation is not None:
                self.gateway.budget.unhold(item.reservation)
            self._items.pop(item.request.key, None)
        self._waiting, self._blocked = [], []
        error = self._stop_error()
        for item in list(self._items.values()):
            _fail(item, error)

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for api in self.apis.values():
            await api.aclose()

    def _stop_error(self) -> Exception:
        return SendingStopped("the run is stopping: open batches are collected by the next run")

    # ---- collecting requests into chunks ----------------------------------------------------------
    def _schedule_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        limit = self.settings.max_requests or 50_000
        if len(self._waiting) >= limit:
            self._timer = None
            self._flush()
            return
        self._timer = asyncio.get_running_loop().call_later(self.settings.collect_s, self._flush)

    def _flush(self) -> None:
        """Waiting requests, grouped by provider and model (a batch file holds one model), into chunks
        within the provider's limits; each request's worst case is held before its chunk starts."""
        self._timer = None
        items = self._blocked + self._waiting
        self._waiting, self._blocked = [], []
        groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
        for item in items:
            groups[(item.request.provider, item.request.model)].append(item)
        for (provider, model), group in groups.items():
            api = self.apis[provider]
            max_n = min(self.settings.max_requests or api.limits.requests, api.limits.requests)
            # 1% under the byte limit: the agentkd id in a custom_id may grow by a digit within a chunk.
            max_bytes = int(min(self.settings.max_bytes or api.limits.bytes, api.limits.bytes) * 0.99)
            chunk: Chunk | None = None
            size = 0
            for item in group:
                if chunk is None:
                    chunk, size = self._new_chunk(provider, model), 0
                custom_id = f"{chunk.batch_id}-{len(chunk.items):06d}"
                entry_size = len(api.entry(custom_id, item.request))
                if chunk.items and (len(chunk.items) >= max_n or size + entry_size > max_bytes):
                    self._start(chunk)
                    chunk, size = self._new_chunk(provider, model), 0
                    custom_id = f"{chunk.batch_id}-{0:06d}"
                reservation = self.gateway.budget.hold(item.request.key, model, item.estimate.tokens,
                                                       item.request.max_tokens, reservation_id=custom_id,
                                                       cache_writes=item.request.prompt_cache)
                if reservation is None:
                    self._blocked.append(item)
                    continue
                item.reservation, item.custom_id = reservation, custom_id
                chunk.items.append(item)
                size += entry_size
            if chunk is not None and chunk.items:
                self._start(chunk)
        if self._blocked and not self.chunks:
            # Nothing in flight will settle and free budget: these requests cannot be bought.
            budget = self.gateway.budget
            error = BudgetExhausted(
                f"budget exhausted: {len(self._blocked)} batch request(s) do not fit (spent "
                f"${budget.settled_usd:.4f}, ${budget.held_usd:.4f} held; caps: ${budget.cap_usd}, "
                f"{budget.cap_tokens} tokens)")
            for item in self._blocked:
                self._items.pop(item.request.key, None)
                _fail(item, error)
            self._blocked = []

    def _new_chunk(self, provider: str, model: str) -> Chunk:
        return Chunk(f"akd-{self.gateway.session}-{next(self._serial)}", provider, model, [])

    def _start(self, chunk: Chunk) -> None:
        self.chunks[chunk.batch_id] = chunk
        task = asyncio.create_task(self._run(chunk), name=f"agentkd-batch-{chunk.batch_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- one batch, from the durable record to its last result -------------------------------------
    async def _run(self, chunk: Chunk) -> None:
        api = self.apis[chunk.provider]
        entries = [api.entry(item.custom_id or "", item.request) for item in chunk.items]
        try:
            if chunk.prepared_at is None:
                await self._prepare(chunk)
            if chunk.provider_batch_id is None:
                await self._submit(chunk, api, entries)
            if not self.settings.wait and not chunk.resumed:
                self._release_if_all_submitted()
            state = await self._poll(chunk, api)
            outcomes = await self._retrying(lambda: api.results(chunk.provider_batch_id or ""))
            await self._collect(chunk, state, outcomes)
        except asyncio.CancelledError:
            raise  # the session is closing: what is durable stays, the next session carries on
        except TeacherError as err:
            if err.fatal or chunk.provider_batch_id is not None:
                # Auth or quota (the run stops), or a batch that exists and may yet run: left open,
                # the next session carries it on.
                for item in chunk.items:
                    _fail(item, err)
            else:
                # The provider refused the batch (e.g. too large): nothing was bought.
                failures = [(item, self._refused(chunk, item, err)) for item in chunk.items]
                await self._event(chunk, "ended", status="not submitted", detail=str(err)[:300])
                self._resolve(failures)
        except (StoreError, BudgetExhausted) as err:
            for item in chunk.items:
                _fail(item, err)
        finally:
            self.chunks.pop(chunk.batch_id, None)
        if self._waiting or self._blocked:
            self._flush()

    async def _prepare(self, chunk: Chunk) -> None:
        store = self.gateway.store
        store.enqueue("batch_requests", [
            {"batch_id": chunk.batch_id, "custom_id": item.custom_id, "key": item.request.key, "event": "queued",
             "role": item.request.role, "reserved_usd": item.reservation.usd if item.reservation else 0.0,
             "reserved_tokens": item.reservation.tokens if item.reservation else 0,
             "request_json": item.request.canonical_json,
             "detail": "prompt_cache" if item.request.prompt_cache else None} for item in chunk.items])
        await self._event(chunk, "prepared", requests=len(chunk.items))
        chunk.prepared_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        _test_kill("prepared")

    async def _submit(self, chunk: Chunk, api: BatchAPI, entries: list[bytes]) -> None:
        """Create the batch once: after an ambiguous failure (or on resume) look for it first."""
        since = chunk.prepared_at or dt.datetime.now(dt.UTC).replace(tzinfo=None)
        if chunk.resumed:
            chunk.provider_batch_id = await self._find(chunk, api, len(entries), since)
            if chunk.provider_batch_id is not None:
                await self._event(chunk, "submitted", provider_batch_id=chunk.provider_batch_id,
                                  detail="found at the provider after a restart")
                self.say(f"batch {chunk.batch_id}: found at {chunk.provider} as {chunk.provider_batch_id} "
                         f"after a restart ({len(chunk.items):,} requests)")
                return
        if chunk.file_id is None:
            chunk.file_id = await self._retrying(lambda: api.upload(chunk.batch_id, entries))
            if chunk.file_id is not None:
                await self._event(chunk, "uploaded", file_id=chunk.file_id)
                _test_kill("uploaded")
        for attempt in range(1, SUBMIT_ATTEMPTS + 1):
            try:
                chunk.provider_batch_id = await api.create(chunk.batch_id, chunk.file_id, entries)
                break
            except TeacherError as err:
                if err.fatal or not err.retryable or attempt == SUBMIT_ATTEMPTS:
                    raise
                if not isinstance(err, ConnectFailed):
                    # The create may have reached the provider: find it rather than create another.
                    found = await self._find(chunk, api, len(entries), since)
                    if found is not None:
                        chunk.provider_batch_id = found
                        break
                await self._sleep(min(self.settings.poll_s * 2 ** (attempt - 1), self.settings.poll_max_s))
        _test_kill("created")
        await self._event(chunk, "submitted", provider_batch_id=chunk.provider_batch_id)
        self.say(f"batch {chunk.batch_id}: submitted to {chunk.provider} as {chunk.provider_batch_id} "
                 f"({len(chunk.items):,} requests)")
        _test_kill("submitted")

    async def _find(self, chunk: Chunk, api: BatchAPI, requests: int, since: dt.datetime) -> str | None:
        """This chunk's batch at the provider, if a create reached it. While candidates that may be it are
        still running (Anthropic tells only by their results), wait for them as for any pending batch:
        polls back off, their status and counts are said when they change, and a candidate seen ended and
        not ours is not looked at again."""
        wait = self.settings.poll_s
        not_ours: set[str] = set()
        said = None
        while True:
            lookup = await self._retrying(
                lambda: api.find(chunk.batch_id, requests, since, self._claimed(chunk) | not_ours))
            if lookup.found is not None or not lookup.running:
                return lookup.found
            not_ours |= lookup.not_ours
            running = "; ".join(f"{pid}: {describe(state)}" for pid, state in sorted(lookup.running.items()))
            if running != said:
                self.say(f"batch {chunk.batch_id}: looking for it at {chunk.provider}: {len(lookup.running)} "
                         f"batch(es) of {requests:,} requests that may be it still running ({running}); "
                         f"waiting for them to end, their results tell")
                said = running
            await self._sleep(wait)
            wait = min(wait * 1.5, self.settings.poll_max_s)

    def _claimed(self, chunk: Chunk) -> set[str]:
        """Provider batches other agentkd batches of this run are known to own."""
        rows = self.gateway.store.query(
            "SELECT DISTINCT provider_batch_id FROM batches WHERE provider_batch_id IS NOT NULL AND batch_id <> ?",
            [chunk.batch_id])
        return {r[0] for r in rows} | {c.provider_batch_id for c in self.chunks.values()
                                       if c.provider_batch_id and c is not chunk}

    async def _poll(self, chunk: Chunk, api: BatchAPI) -> BatchState:
        wait = self.settings.poll_s
        while True:
            state = await self._retrying(lambda: api.state(chunk.provider_batch_id or ""))
            if state.status != chunk.status or state.counts != chunk.counts:
                chunk.status, chunk.counts = state.status, state.counts
                await self._event(chunk, "status", status=state.status, counts=state.counts, detail=state.detail)
                self.say(f"batch {chunk.batch_id}: {describe(state)}")
            if state.ended:
                return state
            await self._sleep(wait)
            wait = min(wait * 1.5, self.settings.poll_max_s)

    async def _collect(self, chunk: Chunk, state: BatchState, outcomes: list[Outcome]) -> None:
        """Every result stored once: settle row, then calls row, then the request's final row (FIFO)."""
        by_id = {o.custom_id: o for o in outcomes}
        resolved: list[tuple[Item, Any]] = []
        requeued = 0
        for item in chunk.items:
            outcome = by_id.get(item.custom_id or "")
            if outcome is None:
                detail = f"no result (batch {state.status})"
                outcome = Outcome(item.custom_id or "", error=TeacherError(detail), retry=True)
            if outcome.reply is not None:
                resolved.append((item, self._answered(chunk, item, outcome.reply)))
            elif outcome.retry and item.resubmits < self.settings.max_resubmits:
                self._requeue(chunk, item, outcome.error)
                requeued += 1
            else:
                resolved.append((item, self._refused(chunk, item, outcome.error)))
        await self._event(chunk, "ended", status=state.status, counts=state.counts)
        answered = sum(1 for _, result in resolved if not isinstance(result, BaseException))
        self.say(f"batch {chunk.batch_id}: {state.status}: {answered:,} answered and stored, "
                 f"{len(resolved) - answered:,} refused, {requeued:,} not run and asked again in a new batch")
        self._resolve(resolved)
        self.gateway.on_budget_freed()

    def _resolve(self, resolved: list[tuple[Item, Any]]) -> None:
        """After the commit that holds their rows: callers get the answer (or the refusal)."""
        for item, result in resolved:
            self._items.pop(item.request.key, None)
            if not isinstance(result, BaseException):
                self.gateway.mark_stored(item.request.key)
            for future in item.waiters:
                if not future.done():
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    def _answered(self, chunk: Chunk, item: Item, reply: TeacherReply) -> Completion:
        gateway, budget = self.gateway, self.gateway.budget
        usage = Usage(reply.input_tokens, reply.output_tokens, reply.cached_tokens, reply.cache_write_tokens)
        if item.settled or item.reservation is None:
            cost = budget.cost(chunk.model, usage, batch=True)
        else:
            cost, tokens = budget.settle_held(item.reservation, usage)
            self._record(item, "settle", cost, tokens, 200, None)
        if not item.stored:
            row = gateway.call_row(item.request, item.request.key, item.estimate.estimator, 1, 0.0, reply=reply,
                                   cost=cost)
            row.update(batch_id=chunk.batch_id, mode="batch")
            gateway.store.enqueue("calls", [row])
        self._final(chunk, item, "done")
        return Completion(key=item.request.key, text=reply.text, finish_reason=reply.finish_reason,
                          input_tokens=reply.input_tokens, output_tokens=reply.output_tokens, cost_usd=cost,
                          attempts=1, logprobs=reply.logprobs)

    def _requeue(self, chunk: Chunk, item: Item, error: TeacherError | None) -> None:
        if item.reservation is not None and not item.settled:
            self.gateway.budget.unhold(item.reservation)
            self._record(item, "release", 0.0, 0, None, error.error_class if error else None)
        self._final(chunk, item, "requeued", detail=str(error) if error else None)
        item.reservation, item.custom_id, item.settled, item.stored = None, None, False, False
        item.resubmits += 1
        self._waiting.append(item)

    def _refused(self, chunk: Chunk, item: Item, error: TeacherError | None) -> Exception:
        error = error or TeacherError("no result")
        if item.reservation is not None and not item.settled:
            if error.maybe_billed:  # answered but unreadable: billed, counted at its hold
                usd, tokens = self.gateway.budget.settle_held(item.reservation, None)
                self._record(item, "settle", usd, tokens, 200, error.error_class)
            else:
                self.gateway.budget.unhold(item.reservation)
                self._record(item, "release", 0.0, 0, None, error.error_class)
        row = self.gateway.call_row(item.request, item.request.key, item.estimate.estimator, 1, 0.0, error=error)
        row.update(batch_id=chunk.batch_id, mode="batch")
        self.gateway.store.enqueue("calls", [row])
        self._final(chunk, item, "failed", detail=str(error))
        return CallFailed(item.request.key, error, 1)

    def _record(self, item: Item, event: str, usd: float, tokens: int, status: int | None,
                error_class: str | None) -> None:
        """The request's ledger row. Not through the session's spend cover: that covers online calls, and a
        batch request's worst case is durable in its `queued` row until this row settles or frees it, so
        a settled result leaves no room behind it to count after a crash (ledger.py)."""
        assert item.reservation is not None
        self.gateway.store.enqueue("reservations", [{
            "reservation_id": item.reservation.id, "key": item.request.key, "event": event, "usd": usd,
            "tokens": tokens, "session": self.gateway.session, "reserved_usd": item.reservation.usd,
            "reserved_tokens": item.reservation.tokens, "attempt": item.resubmits + 1, "status_code": status,
            "error_class": error_class, "latency_s": None, "in_flight": self.gateway.budget.reserved_calls}])

    def _final(self, chunk: Chunk, item: Item, event: str, detail: str | None = None) -> None:
        self.gateway.store.enqueue("batch_requests", [{
            "batch_id": chunk.batch_id, "custom_id": item.custom_id, "key": item.request.key, "event": event,
            "role": item.request.role, "detail": detail}])

    async def _event(self, chunk: Chunk, event: str, *, status: str | None = None, requests: int | None = None,
                     counts: dict[str, int] | None = None, provider_batch_id: str | None = None,
                     file_id: str | None = None, detail: str | None = None) -> None:
        await self.gateway.store.write("batches", {
            "batch_id": chunk.batch_id, "provider": chunk.provider, "model": chunk.model, "event": event,
            "provider_batch_id": provider_batch_id, "file_id": file_id, "status": status, "requests": requests,
            "counts_json": json.dumps(counts) if counts is not None else None, "detail": detail,
            "session": self.gateway.session})

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """A status, list or download call: retried on the provider's transient errors (they buy nothing)."""
        for attempt in range(1, SUBMIT_ATTEMPTS + 1):
            try:
                return await call()
            except TeacherError as err:
                if err.fatal or not err.retryable or attempt == SUBMIT_ATTEMPTS:
                    raise
                await self._sleep(min(self.settings.poll_s * 2 ** (attempt - 1), self.settings.poll_max_s))
        raise AssertionError("unreachable")

    def _release_if_all_submitted(self) -> None:
        """batch.wait = false: once nothing is waiting to be submitted, callers are let go."""
        if self._waiting or self._blocked or any(c.provider_batch_id is None for c in self.chunks.values()):
            return
        error = BatchesPending("batches submitted; re-run the same command to collect their results")
        for item in self._items.values():
            _fail(item, error)

    # ---- resume --------------------------------------------------------------------------------
    def _resume(self, batch: OpenBatch) -> None:
        budget = self.gateway.budget
        chunk = Chunk(batch.batch_id, batch.provider, batch.model, [], prepared_at=batch.prepared_at,
                      file_id=batch.file_id, provider_batch_id=batch.provider_batch_id, status=batch.status,
                      resumed=True)
        for queued in batch.requests:
            item = self._items.get(queued.key)
            if item is not None:  # the same request in two open batches: the first one answers it
                continue
            request = queued.request()
            item = Item(request, estimate_prompt(request.messages, request.provider),
                        custom_id=queued.custom_id, settled=queued.settled, stored=queued.stored)
            if not queued.settled:
                item.reservation = Reservation(queued.custom_id, queued.key, request.model, queued.reserved_usd,
                                               queued.reserved_tokens)
                budget.adopt(item.reservation)
            self._items[queued.key] = item
            chunk.items.append(item)
        if batch.prepared_at is None:
            # Its requests were recorded, the batch never was: nothing was uploaded. Ask them again.
            for item in chunk.items:
                self._requeue_unsubmitted(chunk, item)
            return
        if chunk.items:
            self._start(chunk)

    def _requeue_unsubmitted(self, chunk: Chunk, item: Item) -> None:
        if item.reservation is not None:
            self.gateway.budget.unhold(item.reservation)
        self.gateway.store.enqueue("batch_requests", [{
            "batch_id": chunk.batch_id, "custom_id": item.custom_id, "key": item.request.key, "event": "requeued",
            "role": item.request.role, "detail": "never submitted"}])
        item.reservation, item.custom_id = None, None
        self._waiting.append(item)
        self._schedule_flush()


def describe(state: BatchState) -> str:
    counts = ", ".join(f"{k} {v:,}" for k, v in state.counts.items() if v)
    return f"{state.status}" + (f" ({counts})" if counts else "") + (f": {state.detail}" if state.detail else "")


def _fail(item: Item, error: BaseException) -> None:
    for future in item.waiters:
        if not future.done():
            future.set_exception(error)
    item.waiters.clear()


def _test_kill(step: str) -> None:
    if _KILL_AT == step:
        os.kill(os.getpid(), signal.SIGKILL)
