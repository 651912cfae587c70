"""The one path every teacher call takes (DESIGN.md, "The gateway").

    request -> cache (stored answer? a concurrent identical call in flight? share it)
            -> per attempt: limiter.acquire -> budget.reserve -> covered by a durable level in the
                            store (ledger.py) -> teacher.complete -> settle (finally, always): at the
                            usage, at 0 for a complete error response, at the reservation when ambiguous
            -> retry policy (tenacity; waits from the provider's headers or full jitter)
            -> the call row is committed before the result is returned

A stored successful answer is never requested again, by this process or a resumed one.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agentkd.gateway.budget import Budget, BudgetExhausted, Reservation, Usage
from agentkd.config import LimitsSection
from agentkd.gateway.ledger import PriorSpend, SpendCover, prior_spend
from agentkd.gateway.limiter import Limiter
from agentkd.store.logprob_record import record_columns
from agentkd.gateway.retry import Deferred, retrying
from agentkd.store.writer import Store, StoreError
from agentkd.teachers.base import RateLimited, Teacher, TeacherError, TeacherReply, TeacherRequest
from agentkd.gateway.tokens import estimate_prompt


@dataclass
class Completion:
    key: str
    text: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    attempts: int
    from_cache: bool = False
    logprobs: list[dict[str, Any]] | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class CallFailed(Exception):
    """The item could not be answered (S in RELIABILITY.md); the failure is stored with its class."""

    def __init__(self, key: str, error: TeacherError, attempts: int) -> None:
        super().__init__(f"{error.error_class} after {attempts} attempt(s): {error}")
        self.key = key
        self.error = error
        self.attempts = attempts


class SendingStopped(Exception):
    """The run is stopping (Ctrl-C, budget, a fatal error): a call not yet sent is not sent."""


@dataclass
class GatewayStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    cache_hits: int = 0
    shared_in_flight: int = 0
    rate_limited: int = 0
    deferred: int = 0
    started: float = field(default_factory=time.monotonic)


class Gateway:
    def __init__(
        self,
        *,
        teachers: dict[str, Teacher],
        store: Store,
        budget: Budget,
        limits: LimitsSection,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        seed: int = 0,
    ) -> None:
        self.teachers = teachers  # provider name -> adapter
        self.store = store
        self.budget = budget
        self.limits = limits
        self.limiter = Limiter(limits, clock=clock, sleep=sleep)
        self._clock = clock
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._stored_keys: set[str] = set()
        self._in_flight: dict[str, asyncio.Future | None] = {}
        # Calls waiting for budget wait on this; made by the first such call, set (and dropped) whenever
        # a reservation closes. None while nobody waits: most settles have no one to wake.
        self._budget_freed: asyncio.Event | None = None
        self._session = uuid.uuid4().hex[:8]
        self.sending = True  # False: calls still waiting for a slot are dropped, not sent
        self.cover = SpendCover(store, budget, session=self._session, max_concurrency=limits.max_concurrency)
        self.prior = PriorSpend()  # what earlier sessions of this run spent, or may have (start())
        self.stats = GatewayStats()
        # replies.ReplyCheck, set by the session: the role calls (roles/calls.py) report each result to
        # it, and it stops a role whose results are unusable. None: no check.
        self.reply_check = None
        # Batch mode (batches/runner.py), set by the session: requests whose mode is "batch", and any
        # whose key is in a batch an earlier session left open, are answered by a provider batch.
        self.batches: Any = None
        self.tokenizer_hash: str | None = None  # the teacher's tokenizer, when the config names it (logprob record)

    @property
    def session(self) -> str:
        return self._session

    async def start(self) -> None:
        """Load what earlier processes stored: answered keys and everything they spent or reserved."""
        await self.store.start()
        self._stored_keys = self.store.ok_call_keys()
        self.prior = prior_spend(self.store)
        self.budget.restore(usd=self.prior.usd, tokens=self.prior.tokens, run_id=f"{self._session}-")
        if self.batches is not None:
            self.batches.resume()  # open batches' requests move from the restored spend to held

    def stop_sending(self) -> None:
        """Calls in flight finish; calls still waiting for budget cover or a limiter slot are dropped
        with SendingStopped and their reservations released, so a stopping run buys nothing new."""
        self.sending = False
        if self.batches is not None:
            self.batches.stop_waiting()

    def resume_sending(self) -> None:
        self.sending = True
        if self.batches is not None:
            self.batches.stopped = False

    def mark_stored(self, key: str) -> None:
        """A batch result's call row has committed: from now on the store answers this key."""
        self._stored_keys.add(key)
        self.stats.ok += 1

    def on_budget_freed(self) -> None:
        """A reservation closed, or batch results settled below their holds: online calls waiting for
        budget look again (they retry their reservation)."""
        if self._budget_freed is not None:
            self._budget_freed.set()
            self._budget_freed = None

    async def aclose(self) -> None:
        if self.batches is not None:
            await self.batches.aclose()  # open batches stay open at the provider and in the store
        try:
            await self.cover.close()
        except StoreError:
            pass  # unclosed, the session counts at its last cover on resume: the safe side
        for teacher in self.teachers.values():
            await teacher.aclose()

    # ---- the public call ------------------------------------------------------------------------
    async def complete(self, request: TeacherRequest) -> Completion:
        """Answer one request: from the store, from an identical call in flight, or from the teacher."""
        key = request.key
        if key in self._stored_keys:
            stored = self.store.call_by_key(key)
            if stored is not None:
                self.stats.cache_hits += 1
                return _completion_from_row(stored)
        if key in self._in_flight:
            self.stats.shared_in_flight += 1
            shared = self._in_flight[key]
            if shared is None:
                shared = self._in_flight[key] = asyncio.get_running_loop().create_future()
                shared.add_done_callback(_consume_exception)
            return await asyncio.shield(shared)
        self._in_flight[key] = None  # the future is made only if an identical request arrives meanwhile
        try:
            result = await self._call_teacher(request, key)
        except BaseException as err:
            shared = self._in_flight.pop(key)
            if shared is not None:
                if isinstance(err, Exception):
                    shared.set_exception(err)
                else:  # cancelled (Ctrl-C): callers sharing this call are cancelled too
                    shared.cancel()
            raise
        shared = self._in_flight.pop(key)
        if shared is not None:
            shared.set_result(result)
        return result

    async def _call_teacher(self, request: TeacherRequest, key: str) -> Completion:
        if self.batches is not None and (request.mode == "batch" or self.batches.has(key)):
            return await self.batches.complete(request)
        teacher = self.teachers[request.provider]
        estimate = estimate_prompt(request.messages, request.provider)
        attempts = 0
        started = self._clock()
        last_error: TeacherError | None = None
        try:
            try:
                # The first attempt goes straight out: most calls succeed at once, and building the
                # tenacity loop costs more than the rest of the gateway's bookkeeping together.
                attempts = 1
                reply, cost = await self._attempt(teacher, request, key, estimate.tokens, attempts)
            except TeacherError as first:
                # From here on, the one retry loop: tenacity sees the first failure as its attempt 1,
                # so waits, stops and Deferred are exactly those of a loop that made every attempt.
                failed: TeacherError | None = first
                async for attempt in retrying(self.limits, sleep=self._sleep, rng=self._rng,
                                              on_wait=self._on_wait):
                    with attempt:
                        if failed is not None:
                            error, failed = failed, None
                            raise error
                        attempts += 1
                        reply, cost = await self._attempt(teacher, request, key, estimate.tokens, attempts)
        except Deferred as deferred:
            # Recorded, so the attempts it made and why it waits are in the run database; an ok row
            # follows when the item comes back and succeeds.
            self.stats.deferred += 1
            await self.store.write("calls", self.call_row(request, key, estimate.estimator, attempts,
                                                           self._clock() - started, deferred=deferred))
            raise
        except TeacherError as err:
            last_error = err
        latency = self._clock() - started
        if last_error is not None:
            self.stats.failed += 1
            await self.store.write("calls", self.call_row(request, key, estimate.estimator, attempts, latency,
                                                           error=last_error))
            if last_error.fatal:
                raise last_error
            raise CallFailed(key, last_error, attempts)
        completion = Completion(key=key, text=reply.text, finish_reason=reply.finish_reason,
                                input_tokens=reply.input_tokens, output_tokens=reply.output_tokens,
                                cost_usd=cost, attempts=attempts, logprobs=reply.logprobs)
        await self.store.write("calls", self.call_row(request, key, estimate.estimator, attempts, latency,
                                                       reply=reply, cost=cost))
        self._stored_keys.add(key)
        self.stats.ok += 1
        return completion

    async def _attempt(self, teacher: Teacher, request: TeacherRequest, key: str, estimate: int,
                       attempt: int) -> tuple[TeacherReply, float]:
        """One HTTP attempt: a limiter slot, then a reservation (durably covered) and its settlement.

        The slot comes first, so only calls about to be sent hold budget: items queued behind the
        concurrency or rate limit reserve nothing while they wait.
        """
        if self.store.failure is not None:
            raise StoreError(f"not sending paid calls: {self.store.failure}")
        if not self.sending:
            raise SendingStopped("the run is stopping: not sent")
        await self.limiter.acquire(estimate, request.max_tokens)
        try:
            if not self.sending:  # stopped while this call waited for its slot
                raise SendingStopped("the run is stopping: not sent")
            return await self._reserved_attempt(teacher, request, key, estimate, attempt)
        finally:
            self.limiter.release()

    async def _reserved_attempt(self, teacher: Teacher, request: TeacherRequest, key: str, estimate: int,
                                attempt: int) -> tuple[TeacherReply, float]:
        reservation = await self._reserve(key, request.model, estimate, request.max_tokens, request.prompt_cache)
        sent = False
        usage: Usage | None = None
        outcome = "release"
        t0 = self._clock()
        status: int | None = None
        error_class: str | None = None
        try:
            # Durable before sending: usually at once, under a level committed earlier.
            await self.cover.cover(reservation.usd, reservation.tokens)
            sent = True
            self.stats.sent += 1
            reply = await teacher.complete(request, timeout_s=self.limits.timeout_s)
            status = 200
            usage = Usage(reply.input_tokens, reply.output_tokens, reply.cached_tokens, reply.cache_write_tokens)
            outcome = "settle"
            self.limiter.observe(reply.headers, estimated_input=estimate, actual_input=reply.input_tokens)
        except TeacherError as err:
            status, error_class = err.status, err.error_class
            self.limiter.observe(err.headers)
            outcome = "settle" if err.maybe_billed else "release"
            raise
        except BaseException as err:
            # Cancelled (Ctrl-C) or an unexpected fault after sending: the provider may have done the work.
            error_class = type(err).__name__
            outcome = "settle" if sent else "release"
            raise
        finally:
            if outcome == "settle":
                usd, tokens = self.budget.settle(reservation, usage)
            else:
                self.budget.release(reservation)
                usd, tokens = 0.0, 0
            self.on_budget_freed()
            # Queued, not awaited: the final call row is awaited after it, and the writer is FIFO. The
            # closing ledger row is also the attempt's record (the `attempts` view); a cover level it
            # leaves out of its band is rewritten in the same commit.
            try:
                self.cover.record({"reservation_id": reservation.id, "key": reservation.key, "event": outcome,
                                   "usd": usd, "tokens": tokens, "session": self._session,
                                   "reserved_usd": reservation.usd, "reserved_tokens": reservation.tokens,
                                   "attempt": attempt, "status_code": status, "error_class": error_class,
                                   "latency_s": self._clock() - t0})
            except StoreError:
                pass  # the store's failure is raised before the next paid call
        # Only a reply gets here (every failure re-raised above): its cost is what the settle charged.
        return reply, usd

    async def _reserve(self, key: str, model: str, estimate: int, max_tokens: int,
                       cache_writes: bool = False) -> Reservation:
        """Reserve the worst case; while other calls are in flight, wait for them to settle first.

        Reservations are worst cases (max_tokens) and usage is usually far lower, so "does not fit now"
        with calls in flight is not "exhausted": those calls give most of their reservation back when
        they settle. Only with nothing in flight is a call that does not fit BudgetExhausted.
        """
        while True:
            try:
                return self.budget.reserve(key, model, estimate, max_tokens, cache_writes=cache_writes)
            except BudgetExhausted:
                if self.budget.reserved_tokens <= 0:
                    raise
                if self._budget_freed is None:
                    self._budget_freed = asyncio.Event()
                await self._budget_freed.wait()

    def _on_wait(self, error: TeacherError, seconds: float) -> None:
        if isinstance(error, RateLimited):
            self.stats.rate_limited += 1
            self.limiter.on_rate_limited(seconds)

    def call_row(self, request: TeacherRequest, key: str, estimator: str, attempts: int, latency: float, *,
                  reply: TeacherReply | None = None, cost: float = 0.0,
                  error: TeacherError | None = None, deferred: Deferred | None = None) -> dict[str, Any]:
        row: dict[str, Any] = {
            "key": key, "role": request.role, "provider": request.provider, "model": request.model,
            "prompt_version": request.prompt_version,
            "request_json": request.canonical_json,
            "attempts": attempts, "latency_s": latency, "estimator": estimator, "batch_id": self._session,
            "mode": "online",
        }
        if reply is not None:
            row.update(status="ok", response_text=reply.text, finish_reason=reply.finish_reason,
                       truncated=reply.truncated, input_tokens=reply.input_tokens,
                       output_tokens=reply.output_tokens, cached_tokens=reply.cached_tokens, cost_usd=cost,
                       cache_write_tokens=reply.cache_write_tokens,
                       request_id=reply.request_id,
                       logprobs_json=json.dumps(reply.logprobs) if reply.logprobs is not None else None)
            if reply.logprobs is not None:
                row.update(record_columns(request.temperature, reply.logprobs, self.tokenizer_hash))
        if error is not None:
            detail = str(error) if error.snippet is None else f"{error}; body: {error.snippet[:300]}"
            row.update(status="error", error_class=error.error_class, error_detail=detail, cost_usd=0.0)
        if deferred is not None:
            row.update(status="deferred", error_class=deferred.cause.error_class, error_detail=str(deferred),
                       cost_usd=0.0)
        return row


def _consume_exception(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _completion_from_row(row: dict[str, Any]) -> Completion:
    logprobs = json.loads(row["logprobs_json"]) if row.get("logprobs_json") else None
    return Completion(key=row["key"], text=row["response_text"], finish_reason=row["finish_reason"] or "stop",
                      input_tokens=row["input_tokens"] or 0, output_tokens=row["output_tokens"] or 0,
                      cost_usd=0.0, attempts=0, from_cache=True, logprobs=logprobs)
