"""RELIABILITY.md faults 1-17 and 20 over real HTTP: the loopback sim, the real Gateway and a real Store.

Each case runs through the default aiohttp transport and the official SDK adapters, in the OpenAI
chat-completions and the Anthropic messages wire formats, and checks three things besides the answer:
what the store holds (calls, attempts, the reservations ledger), what the sim billed (no key twice) and
that the budget's in-memory ledger agrees with the stored one. Waits go through a FakeClock: no test
waits on the wall clock for a Retry-After.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path

import pytest

from agentkd.gateway.budget import Budget, BudgetExhausted
from agentkd.config import (
    SIM_PRICE,
    LimitsSection,
    PriceSection,
    SimSection,
    resolve_api_key,
)
from agentkd.gateway.core import CallFailed, Gateway
from agentkd.gateway.ledger import spent_in_store
from agentkd.gateway.retry import Deferred
from agentkd.store.writer import Store
from agentkd.teachers.base import AuthError, QuotaExceeded, TeacherRequest
from agentkd.teachers.sdk import AnthropicSDKTeacher, OpenAISDKTeacher
from agentkd.teachers.sim import SimTeacher, sim_in_thread
from agentkd.teachers.wire import WireTeacher
from tests.gateway_fakes import FakeClock

TRANSPORTS = ["wire-openai", "wire-anthropic", "sdk-openai", "sdk-anthropic"]
_texts = itertools.count()


def make_teacher(kind: str, base_url: str, api_key: str | None = None):
    transport, wire = kind.split("-")
    if wire == "openai":
        url = base_url + "/v1"
        if transport == "wire":
            return WireTeacher(provider="sim", wire="openai", base_url=url, api_key=api_key)
        return OpenAISDKTeacher(provider="sim", base_url=url, api_key=api_key)
    if transport == "wire":
        return WireTeacher(provider="anthropic", wire="anthropic", base_url=base_url, api_key=api_key)
    return AnthropicSDKTeacher(base_url=base_url, api_key=api_key)


def make_request(provider: str, text: str | None = None, max_tokens: int = 64) -> TeacherRequest:
    text = text or f"Tom has {next(_texts) + 3} apples and buys 4 more. How many apples does he have?"
    return TeacherRequest(role="answerer", provider=provider, model="sim-teacher-1",
                          messages=({"role": "user", "content": text},), temperature=0.0,
                          max_tokens=max_tokens, prompt_version="v1")


class Rig:
    """A sim on this event loop, one teacher, a gateway over a tmp DuckDB file, a fake clock."""

    def __init__(self, tmp_path, kind: str, *, sim: dict | None = None, usd: float | None = None,
                 tokens: int | None = None, price: PriceSection = SIM_PRICE, api_key: str | None = None,
                 **limits) -> None:
        self.tmp_path, self.kind, self.path = tmp_path, kind, tmp_path / "run.duckdb"
        self.sim = SimTeacher(SimSection(error_rate=0.0, **(sim or {})), seed=1)
        self.clock = FakeClock()
        self.usd, self.tokens, self.price, self.api_key = usd, tokens, price, api_key
        self.limits = LimitsSection(**{"max_attempts": 4, "timeout_s": 5.0, **limits})

    async def start(self, base_url: str | None = None) -> Rig:
        url = await self.sim.start() if base_url is None else base_url
        self.teacher = make_teacher(self.kind, url, self.api_key)
        self.provider = self.teacher.provider
        self.store = Store(self.path)
        self.budget = Budget(usd=self.usd, tokens=self.tokens, price_of=lambda model: self.price)
        self.gateway = Gateway(teachers={self.provider: self.teacher}, store=self.store, budget=self.budget,
                               limits=self.limits, clock=self.clock, sleep=self.clock.sleep)
        await self.gateway.start()
        return self

    def request(self, text: str | None = None, max_tokens: int = 64) -> TeacherRequest:
        return make_request(self.provider, text, max_tokens)

    async def finish(self, *, within_cap: bool = True) -> Store:
        """Close everything, check the ledgers, and reopen the file read-only for the test's queries."""
        await self.gateway.aclose()
        await self.store.close()
        await self.sim.stop()
        store = Store(self.path, read_only=True)
        check_ledger(store, self.budget, within_cap=within_cap)
        return store


def check_ledger(store: Store, budget: Budget, *, within_cap: bool = True) -> None:
    """Every reservation is opened once and closed once, and the stored ledger matches the budget."""
    per_id = store.query(
        "SELECT reservation_id, count(*), count(*) FILTER (event IN ('settle', 'release') AND reserved_usd "
        "IS NOT NULL) FROM reservations WHERE event NOT IN ('cover', 'close') GROUP BY reservation_id"
    )
    assert all(rows == 1 and closed == 1 for _, rows, closed in per_id), per_id  # closed once, with its worst case
    # Spend was covered by durable levels before it happened, and every session ended cleanly.
    levels = store.query(
        "SELECT arg_max(usd, created_at) FILTER (event = 'cover'), coalesce(sum(usd) FILTER (event = 'settle'), 0), "
        "bool_or(event = 'close') FROM reservations GROUP BY session HAVING bool_or(event = 'cover')")
    assert all(closed for _, _, closed in levels), levels
    if within_cap:  # a provider counting more than the reservation overshoots cover and cap alike
        assert all(last >= settled - 1e-12 for last, settled, _ in levels), levels
    assert abs(budget.reserved_usd) < 1e-12 and budget.reserved_tokens == 0
    usd, tokens = spent_in_store(store)
    assert usd == pytest.approx(budget.settled_usd, abs=1e-12) and tokens == budget.settled_tokens
    if budget.cap_usd is not None and within_cap:
        assert budget.settled_usd <= budget.cap_usd + 1e-12


def billed_twice(sim: SimTeacher) -> list[str]:
    return [key for key, n in sim.billed_by_key.items() if n > 1]


def calls(store: Store) -> list[dict]:
    return store.query_dicts("SELECT * FROM calls ORDER BY created_at")


def attempts(store: Store) -> list[tuple]:
    return store.query("SELECT attempt, status_code, error_class FROM attempts ORDER BY attempt")


def ledger(store: Store) -> list[tuple]:
    return store.query("SELECT event, usd, tokens FROM reservations WHERE event IN ('settle', 'release') "
                       "ORDER BY created_at, reservation_id")


@pytest.fixture
async def rigs():
    made: list[Rig] = []

    async def make(tmp_path, kind, **kw) -> Rig:
        rig = await Rig(tmp_path, kind, **kw).start()
        made.append(rig)
        return rig

    yield make
    for rig in made:  # a failed test still stops its server
        await rig.sim.stop()


# ---- 1, 2, 3: rate limits and Retry-After ---------------------------------------------------------
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_429_retry_after_3_is_waited_on_the_injected_clock(tmp_path, rigs, kind):
    rig = await rigs(tmp_path, kind)
    rig.sim.script([{"status": 429, "headers": {"retry-after": "3"}}])
    result = await rig.gateway.complete(rig.request())
    assert result.attempts == 2 and result.text
    assert rig.clock.sleeps and max(rig.clock.sleeps) >= 3.0 and sum(rig.clock.sleeps) >= 3.0
    store = await rig.finish()
    assert [(c["status"], c["attempts"]) for c in calls(store)] == [("ok", 2)]
    assert attempts(store) == [(1, 429, "RateLimited"), (2, 200, None)]
    assert [e for e, _, _ in ledger(store)] == ["release", "settle"]  # a 429 is not billed
    assert rig.sim.status_counts["429"] == 1 and billed_twice(rig.sim) == []


def _http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize("headers, low, high", [
    ({"retry-after-ms": "1500"}, 1.5, 1.5),
    ({"retry-after": "2", "retry-after-ms": "junk"}, 2.0, 2.0),
    ({"retry-after": "__date__"}, 3.0, 5.0),
    ({"retry-after": "inf"}, 0.5, 1.0),
    ({"retry-after": "nan"}, 0.5, 1.0),
    ({"retry-after": "-10"}, 0.5, 1.0),
    ({"retry-after": "soon", "retry-after-ms": "-5"}, 0.5, 1.0),
])
async def test_retry_after_header_if_sane_else_backoff(tmp_path, rigs, headers, low, high):
    headers = {k: (_http_date(5) if v == "__date__" else v) for k, v in headers.items()}
    rig = await rigs(tmp_path, "wire-openai")
    rig.sim.script([{"status": 429, "headers": headers}])
    result = await rig.gateway.complete(rig.request())
    assert result.attempts == 2
    retry_wait = rig.clock.sleeps[0]  # the limiter's pause after the 429 is the retry's wait
    assert low - 1e-9 <= retry_wait <= high + 1e-9
    await rig.finish()


@pytest.mark.parametrize("kind", ["wire-openai", "sdk-anthropic"])
async def test_retry_after_past_max_wait_defers_the_item_and_frees_the_slot(tmp_path, rigs, kind):
    rig = await rigs(tmp_path, kind, max_wait_s=60.0, max_concurrency=1)
    rig.sim.script([{"status": 429, "headers": {"retry-after": "3600"}}])
    with pytest.raises(Deferred) as info:
        await rig.gateway.complete(rig.request())
    assert info.value.wait_s == 3600 and rig.clock.sleeps == []
    # The one concurrency slot is free again: another item goes through at once.
    assert (await asyncio.wait_for(rig.gateway.complete(rig.request()), 5)).attempts == 1
    store = await rig.finish()
    # The deferral is on record, not stored as a failure; the cache serves only the ok row.
    assert sorted((c["status"], c["error_class"]) for c in calls(store)) == [("deferred", "RateLimited"), ("ok", None)]
    assert sorted(e for e, _, _ in ledger(store)) == ["release", "settle"]


# ---- 4: quota is not a rate limit ---------------------------------------------------------------
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_insufficient_quota_stops_at_once_with_zero_retries(tmp_path, rigs, kind):
    rig = await rigs(tmp_path, kind)
    rig.sim.script([{"status": 429, "code": "insufficient_quota"}])
    with pytest.raises(QuotaExceeded) as info:
        await rig.gateway.complete(rig.request())
    assert info.value.fatal and rig.sim.requests == 1 and rig.clock.sleeps == []
    store = await rig.finish()
    rows = calls(store)
    assert [(c["status"], c["attempts"], c["error_class"]) for c in rows] == [("error", 1, "QuotaExceeded")]
    assert [e for e, _, _ in ledger(store)] == ["release"]


# ---- 5, 6, 7: server errors, overload, bad requests ------------------------------------------------
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_500_500_200_is_one_stored_row_with_three_attempts(tmp_path, rigs, kind):
    rig = await rigs(tmp_path, kind)
    rig.sim.script([{"status": 500}, {"status": 500}])
    result = await rig.gateway.complete(rig.request())
    assert result.attempts == 3
    store = await rig.finish()
    assert [(c["status"], c["attempts"]) for c in calls(store)] == [("ok", 3)]
    assert attempts(store) == [(1, 500, "ServerError"), (2, 500, "ServerError"), (3, 200, None)]
    assert [e for e, _, _ in ledger(store)] == ["release", "release", "settle"]
    assert rig.sim.billed_requests == 1 and billed_twice(rig.sim) == []


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("status", [503, 529])
async def test_overload_past_max_attempts_skips_the_item_and_the_run_goes_on(tmp_path, rigs, kind, status):
    rig = await rigs(tmp_path, kind, max_attempts=3)
    rig.sim.script([{"status": status}] * 3)
    with pytest.raises(CallFailed) as info:
        await rig.gateway.complete(rig.request())
    assert info.value.error.error_class == "Overloaded" and info.value.attempts == 3
    assert (await rig.gateway.complete(rig.request())).attempts == 1
    store = await rig.finish()
    rows = calls(store)
    assert [(c["status"], c["attempts"], c["error_class"]) for c in rows] == [
        ("error", 3, "Overloaded"), ("ok", 1, None)]


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("fault", [
    {"status": 400}, {"status": 404}, {"status": 422},
    {"status": 500, "headers": {"x-should-retry": "false"}},
    {"status": 429, "headers": {"x-should-retry": "false"}},
])
async def test_bad_request_is_skipped_without_retry(tmp_path, rigs, kind, fault):
    rig = await rigs(tmp_path, kind)
    rig.sim.script([fault])
    with pytest.raises(CallFailed) as info:
        await rig.gateway.complete(rig.request())
    assert info.value.error.error_class == "BadRequest" and not info.value.error.fatal
    assert rig.sim.requests == 1 and rig.clock.sleeps == []
    store = await rig.finish()
    assert [(c["status"], c["attempts"]) for c in calls(store)] == [("error", 1)]


# ---- 8: auth --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_wrong_key_is_a_fatal_auth_error_that_never_shows_the_key(tmp_path, rigs, kind):
    sent = "sk-wrong-0123456789abcdef"
    rig = await rigs(tmp_path, kind, sim={"require_api_key": "sk-right-key"}, api_key=sent)
    with pytest.raises(AuthError) as info:
        await rig.gateway.complete(rig.request())
    assert info.value.fatal and info.value.status == 401 and rig.sim.requests == 1
    for text in (str(info.value), repr(info.value), info.value.snippet or ""):
        assert sent not in text and "sk-right-key" not in text
    store = await rig.finish()
    assert [(c["error_class"], c["attempts"]) for c in calls(store)] == [("AuthError", 1)]
    assert sent not in str(store.query("SELECT * FROM calls"))


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_403_is_fatal(tmp_path, rigs, kind):
    rig = await rigs(tmp_path, kind)
    rig.sim.script([{"status": 403}])
    with pytest.raises(AuthError):
        await rig.gateway.complete(rig.request())
    assert rig.sim.requests == 1
    await rig.finish()


# ---- 9, 10: connection refused, read timeout --------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_connection_refused_is_retried_and_its_reservation_released(tmp_path, kind):
    port = _free_port()
    rig = Rig(tmp_path, kind, sim={"port": port})
    await rig.start(base_url=f"http://127.0.0.1:{port}")  # nothing listens there yet
    started = []

    async def sleep_then_start_server(seconds: float) -> None:
        await FakeClock.sleep(rig.clock, seconds)
        if not started:
            started.append(await rig.sim.start())

    rig.gateway._sleep = sleep_then_start_server  # the retry's wait is when the server comes up
    rig.gateway.limiter._sleep = sleep_then_start_server
    try:
        result = await rig.gateway.complete(rig.request())
    finally:
        await rig.sim.stop()
    assert result.attempts == 2 and started
    store = await rig.finish()
    assert attempts(store) == [(1, None, "ConnectFailed"), (2, 200, None)]
    assert [e for e, _, _ in ledger(store)] == ["release", "settle"]


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_read_timeout_settles_at_the_reservation_then_retries(tmp_path, rigs, kind):
    # 1.5 s leaves a loaded 2-core CI machine room to answer the second attempt in time.
    rig = await rigs(tmp_path, kind, timeout_s=1.5)
    rig.sim.script([{"kind": "slow", "seconds": 3.0}])
    result = await rig.gateway.complete(rig.request())
    assert result.attempts == 2
    store = await rig.finish()
    reserved = store.query("SELECT reserved_usd, reserved_tokens FROM reservations WHERE event = 'settle' "
                           "ORDER BY created_at LIMIT 1")[0]
    first, second = ledger(store)
    assert first == ("settle", reserved[0], reserved[1])  # may have been billed: charged in full
    assert second[0] == "settle" and second[1] < reserved[0]
    assert attempts(store)[0] == (1, None, "ReadTimeout")


# ---- the ledger agrees with the calls table: only ambiguous attempts are charged beyond their cost -----
def settled_vs_calls(store: Store) -> tuple[float, float, float]:
    """(ledger's settled spend, sum of calls.cost_usd, reservations of the ambiguous attempts)."""
    return store.query(
        "SELECT (SELECT coalesce(sum(usd), 0) FROM reservations WHERE event = 'settle'), "
        "(SELECT coalesce(sum(cost_usd), 0) FROM calls), "
        "(SELECT coalesce(sum(reserved_usd), 0) FROM reservations WHERE event = 'settle' "
        " AND error_class = 'MalformedResponse')")[0]


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_a_fault_free_run_settles_exactly_what_the_calls_cost(tmp_path, rigs, kind):
    rig = await rigs(tmp_path, kind, usd=1.0)
    await asyncio.gather(*(rig.gateway.complete(rig.request()) for _ in range(6)))
    store = await rig.finish()
    settled, cost, ambiguous = settled_vs_calls(store)
    assert cost > 0 and ambiguous == 0 and settled == pytest.approx(cost, abs=1e-12)
    store.close_sync()


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_complete_error_responses_settle_at_zero_and_truncated_bodies_at_the_reservation(tmp_path, rigs,
                                                                                           kind):
    """500 and 429 with a body were not billed: 0. A truncated body may have been: its reservation. The
    ledger exceeds the calls table by exactly the truncated attempts' reservations."""
    rig = await rigs(tmp_path, kind, usd=1.0, max_attempts=8)
    rig.sim.script([{"status": 500}, {"status": 429, "headers": {"retry-after": "1"}}, {"kind": "truncated"},
                    {"status": 500}, {"kind": "truncated"}, {"status": 429, "headers": {"retry-after": "1"}}])
    for _ in range(3):
        await rig.gateway.complete(rig.request())
    store = await rig.finish()
    closes = store.query("SELECT status_code, error_class, event, usd, reserved_usd FROM reservations "
                         "WHERE event IN ('settle', 'release') ORDER BY created_at")
    errors = [(status, event, usd) for status, _, event, usd, _ in closes if status in (429, 500)]
    assert sorted(errors) == [(429, "release", 0.0)] * 2 + [(500, "release", 0.0)] * 2
    truncated = [(event, usd, reserved) for _, cls, event, usd, reserved in closes if cls == "MalformedResponse"]
    assert len(truncated) == 2 and all(event == "settle" and usd == reserved > 0 for event, usd, reserved in truncated)
    settled, cost, ambiguous = settled_vs_calls(store)
    assert ambiguous == pytest.approx(sum(usd for _, usd, _ in truncated))
    assert settled - cost == pytest.approx(ambiguous, abs=1e-12)
    store.close_sync()


# ---- 11, 13: broken bodies -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("fault", ["drop", "truncated", "html"])
async def test_broken_body_is_retried_and_never_stored_as_complete(tmp_path, rigs, kind, fault):
    rig = await rigs(tmp_path, kind)
    rig.sim.script([{"kind": fault}])
    result = await rig.gateway.complete(rig.request())
    assert result.attempts == 2 and result.text
    store = await rig.finish()
    assert [(c["status"], c["attempts"]) for c in calls(store)] == [("ok", 2)]
    assert attempts(store)[0][2] == "MalformedResponse"
    first_close = store.query("SELECT event, usd, tokens, reserved_usd, reserved_tokens FROM reservations "
                              "WHERE attempt = 1 AND event IN ('settle', 'release')")
    # drop and truncated were billed by the provider: the whole reservation is charged, not the usage a
    # complete body would have shown; html was not sent by the model, but we cannot know that, so it is
    # charged too.
    (event, usd, tokens, reserved_usd, reserved_tokens), = first_close
    assert event == "settle" and usd == reserved_usd > 0 and tokens == reserved_tokens > 0


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("fault, body_start", [("truncated", '{"id":'), ("html", "<html><head><title>502 Bad Gateway")])
async def test_broken_body_past_max_attempts_stores_a_raw_snippet(tmp_path, rigs, kind, fault, body_start):
    """Both transports keep the first bytes of a body they could not read (the SDKs' parsers drop them)."""
    rig = await rigs(tmp_path, kind, max_attempts=2)
    rig.sim.script([{"kind": "drop"}, {"kind": fault}])
    with pytest.raises(CallFailed):
        await rig.gateway.complete(rig.request())
    store = await rig.finish()
    (row,) = calls(store)
    assert row["status"] == "error" and row["error_class"] == "MalformedResponse" and row["attempts"] == 2
    assert f"; body: {body_start}" in row["error_detail"]


# ---- 12, 14: incomplete and truncated replies ---------------------------------------------------------
@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("fault", ["no_usage", "no_choices"])
async def test_200_without_usage_or_content_is_charged_and_skipped(tmp_path, rigs, kind, fault):
    rig = await rigs(tmp_path, kind)
    rig.sim.script([{"kind": fault}])
    with pytest.raises(CallFailed) as info:
        await rig.gateway.complete(rig.request())
    assert info.value.error.error_class == "IncompleteResponse" and rig.sim.requests == 1
    store = await rig.finish()
    reserve = store.query("SELECT reserved_usd FROM reservations WHERE event = 'settle'")[0][0]
    assert ledger(store) == [("settle", reserve, pytest.approx(ledger(store)[0][2]))]
    assert [(c["status"], c["attempts"], c["error_class"]) for c in calls(store)] == [
        ("error", 1, "IncompleteResponse")]


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_length_stop_is_stored_as_truncated(tmp_path, rigs, kind):
    rig = await rigs(tmp_path, kind)
    rig.sim.script([{"kind": "length"}])
    result = await rig.gateway.complete(rig.request())
    assert result.truncated and result.finish_reason == "length"
    store = await rig.finish()
    assert [(c["status"], c["truncated"], c["finish_reason"]) for c in calls(store)] == [("ok", True, "length")]


# ---- 15, 16: single flight, cancellation ------------------------------------------------------------
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_concurrent_identical_requests_make_one_upstream_call(tmp_path, rigs, kind):
    rig = await rigs(tmp_path, kind, sim={"latency_ms": 50.0})
    request = rig.request()
    results = await asyncio.gather(*(rig.gateway.complete(request) for _ in range(25)))
    assert rig.sim.requests == 1 and len({r.text for r in results}) == 1
    assert (await rig.gateway.complete(request)).from_cache and rig.sim.requests == 1
    store = await rig.finish()
    assert len(calls(store)) == 1


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_cancel_mid_call_settles_the_reservation_and_resumes_cleanly(tmp_path, rigs, kind):
    rig = await rigs(tmp_path, kind)
    rig.sim.script([{"kind": "slow", "seconds": 0.5}])
    request = rig.request()
    task = asyncio.create_task(rig.gateway.complete(request))
    while rig.sim.requests == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rig.budget.reserved_usd == pytest.approx(0.0, abs=1e-12) and rig.budget.settled_usd > 0
    store = await rig.finish()  # closes cleanly; ledger checked
    assert calls(store) == [] and [e for e, _, _ in ledger(store)] == ["settle"]
    store.close_sync()
    # Resume: a new process on the same file answers the item, counting what the cancelled call may cost.
    rig2 = await Rig(tmp_path, kind).start()
    try:
        assert rig2.budget.settled_usd == pytest.approx(rig.budget.settled_usd)
        assert (await rig2.gateway.complete(request)).attempts == 1
    finally:
        await rig2.finish()


# ---- 20: usage above the reservation -----------------------------------------------------------------
DENSE_PRICE = PriceSection(input_per_mtok=1_000.0, output_per_mtok=1_000.0)  # $0.001 per token


def dense_requests(rig: Rig) -> list[TeacherRequest]:
    # Dense punctuation: the sim counts every symbol as a token, the estimate is far lower, so each
    # call's usage exceeds its reservation. All alike in size: two-digit suffixes.
    return [rig.request("+-*/" * 60 + f" {i}?", max_tokens=16) for i in range(10, 50)]


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_usage_above_reservation_overshoots_by_the_estimate_error_and_stops_admission(tmp_path, rigs,
                                                                                            concurrency):
    probe = await rigs(tmp_path / "probe", "wire-openai", price=DENSE_PRICE)
    await probe.gateway.complete(dense_requests(probe)[0])
    (reserve, cost), = (await probe.finish()).query(
        "SELECT reserved_usd, usd FROM reservations WHERE event = 'settle'")
    assert cost > reserve  # what this test is about
    # A cap that three calls' cost leave less than one reservation of: a fourth never fits.
    cap = 3 * cost + reserve / 2
    rig = await rigs(tmp_path, "wire-openai", usd=cap, price=DENSE_PRICE, max_concurrency=concurrency)
    dense = dense_requests(rig)
    results = await asyncio.gather(*(rig.gateway.complete(r) for r in dense), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BudgetExhausted)]
    assert ok and refused and len(ok) + len(refused) == len(dense)
    store = await rig.finish(within_cap=False)
    pairs = store.query("SELECT reserved_usd, usd FROM reservations WHERE event = 'settle'")
    assert len(pairs) == len(ok) == rig.sim.requests  # nothing was sent without a reservation
    assert all(settled == pytest.approx(cost) and reserved == pytest.approx(reserve) for reserved, settled in pairs)
    # Only estimate errors can carry the spend past the cap (admission counted every worst case), and
    # once it is past, admission stops: the overshoot is at most the errors of the calls in flight when
    # the last one was admitted, that one included.
    overshoot = rig.budget.settled_usd - cap
    assert overshoot <= min(len(ok), concurrency) * (cost - reserve) + 1e-9
    if concurrency == 1:  # one at a time: a call is admitted only if its reservation fits beside the spend
        assert len(ok) == 3 and overshoot < 0
    else:
        assert 0 < overshoot


# ---- the SDK transport at the HTTP layer (how users fake the SDKs: pytest-httpx2) --------------------
FAKE_API = "https://api.teacher.test/v1"


async def sdk_gateway(tmp_path) -> tuple[Gateway, Store, FakeClock]:
    clock = FakeClock()
    store = Store(tmp_path / "run.duckdb")
    teacher = OpenAISDKTeacher(provider="openai", base_url=FAKE_API, api_key="sk-test")
    gateway = Gateway(teachers={"openai": teacher}, store=store,
                      budget=Budget(usd=10.0, tokens=None, price_of=lambda model: SIM_PRICE),
                      limits=LimitsSection(max_attempts=4), clock=clock, sleep=clock.sleep)
    await gateway.start()
    return gateway, store, clock


async def test_sdk_quota_429_is_not_retried_at_the_http_layer(tmp_path, httpx2_mock):
    route = httpx2_mock.post(f"{FAKE_API}/chat/completions").respond(429, json={"error": {
        "message": "You exceeded your current quota.", "type": "insufficient_quota",
        "code": "insufficient_quota", "param": None}})
    gateway, store, clock = await sdk_gateway(tmp_path)
    with pytest.raises(QuotaExceeded):
        await gateway.complete(make_request("openai"))
    assert route.call_count == 1 and clock.sleeps == []
    await gateway.aclose()
    await store.close()


async def test_sdk_200_without_usage_is_charged_and_skipped_at_the_http_layer(tmp_path, httpx2_mock):
    route = httpx2_mock.post(f"{FAKE_API}/chat/completions").respond(200, json={
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "4"}}]})
    gateway, store, _ = await sdk_gateway(tmp_path)
    with pytest.raises(CallFailed) as info:
        await gateway.complete(make_request("openai"))
    assert info.value.error.error_class == "IncompleteResponse" and route.call_count == 1
    reserved = gateway.budget.settled_usd
    await gateway.aclose()
    await store.close()
    store = Store(tmp_path / "run.duckdb", read_only=True)
    check_ledger(store, gateway.budget)
    assert reserved > 0 and ledger(store) == [("settle", reserved, pytest.approx(ledger(store)[0][2]))]


# ---- the API key never leaks ---------------------------------------------------------------------------
LIBRARY_LOGGERS = ("", "openai", "anthropic", "httpx", "httpx2", "httpcore", "httpcore2", "aiohttp",
                   "aiohttp.client", "aiohttp.access", "aiohttp.server", "asyncio", "agentkd", "duckdb")


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        # The formatted line (with any traceback) and the raw args, as any handler could render them.
        self.texts.append(self.format(record))
        self.texts.append(repr(record.args) + repr(record.__dict__.get("headers")))


@pytest.fixture
def debug_logs():
    capture = Capture()
    saved = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    root = logging.getLogger()
    root.addHandler(capture)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield capture
    root.removeHandler(capture)
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


async def test_canary_key_appears_in_no_log_row_file_error_or_export(tmp_path, monkeypatch, debug_logs):
    canary = "sk-canary-" + uuid.uuid4().hex
    monkeypatch.setenv("AGENTKD_CANARY_KEY", f"  {canary}\n")  # stripped at load (RELIABILITY.md 27)
    key = resolve_api_key("AGENTKD_CANARY_KEY", provider="openai")
    assert key == canary
    errors: list[BaseException] = []
    for index, kind in enumerate(TRANSPORTS):
        path = tmp_path / kind
        # The key is refused (401 with a key the server does not know)...
        rig = await Rig(path, kind, sim={"require_api_key": "sk-the-other-key"}, api_key=key).start()
        with pytest.raises(AuthError) as info:
            await rig.gateway.complete(rig.request())
        errors.append(info.value)
        await rig.finish()
        # ...and accepted, through a 429, a 500 and a success; then a bad request that is stored.
        rig = await Rig(path, kind, sim={"require_api_key": canary}, api_key=key).start()
        rig.sim.script([{"status": 429, "headers": {"retry-after": "1"}}, {"status": 500}])
        assert (await rig.gateway.complete(rig.request())).attempts == 3
        rig.sim.script([{"status": 400}, {"kind": "truncated"}, {"kind": "truncated"}, {"kind": "truncated"},
                        {"kind": "truncated"}])
        for _ in range(2):
            with pytest.raises(CallFailed) as failed:
                await rig.gateway.complete(rig.request())
            errors.append(failed.value)
        store = await rig.finish()
        export = "\n".join(json.dumps(row, default=str) for table in ("calls", "attempts", "reservations")
                           for row in store.query_dicts(f'SELECT * FROM "{table}"'))
        store.close_sync()
        assert canary not in export and index >= 0
        for file in path.iterdir():  # the database and its WAL, byte for byte
            assert canary.encode() not in file.read_bytes(), file
    assert debug_logs.texts, "DEBUG logging captured nothing: the check would be vacuous"
    leaks = [text for text in debug_logs.texts if canary in text]
    assert leaks == []
    for error in errors:
        chain = [error, error.__cause__, error.__context__, getattr(error, "error", None)]
        for item in filter(None, chain):
            assert canary not in str(item) and canary not in repr(item)
            assert canary not in "".join(traceback.format_exception(item))


# ---- 17: kill -9 mid-run, then resume on the same file --------------------------------------------------
KILL_N, KILL_CONCURRENCY = 300, 8

CHILD = """
import asyncio, sys
from agentkd.gateway.budget import Budget
from agentkd.config import SIM_PRICE, LimitsSection
from agentkd.gateway.core import Gateway
from agentkd.store.writer import Store
from agentkd.teachers.wire import WireTeacher
from tests.test_gateway_http import KILL_CONCURRENCY, kill_workload

async def main(path, base_url):
    store = Store(path)
    teacher = WireTeacher(provider="sim", wire="openai", base_url=base_url + "/v1", api_key=None)
    gateway = Gateway(teachers={"sim": teacher}, store=store,
                      budget=Budget(usd=100.0, tokens=None, price_of=lambda model: SIM_PRICE),
                      limits=LimitsSection(max_concurrency=KILL_CONCURRENCY))
    await gateway.start()
    slots = asyncio.Semaphore(KILL_CONCURRENCY)

    async def one(request):
        async with slots:
            result = await gateway.complete(request)
            print("ok", result.key, int(result.from_cache), flush=True)  # acknowledged: the row is durable

    await asyncio.gather(*(one(r) for r in kill_workload()))
    await gateway.aclose()
    await store.close()
    print("done", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def kill_workload() -> list[TeacherRequest]:
    return [make_request("sim", f"Kill test {i}: Ann has {i} pens and finds 3 more. How many pens?", 32)
            for i in range(KILL_N)]


def run_child(path, base_url: str, kill_after: int | None) -> list[str]:
    """Run the workload in a child process; SIGKILL it after `kill_after` acknowledged answers."""
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), base_url], cwd=root,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acknowledged: list[str] = []
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("ok "):
            acknowledged.append(line.split()[1])
            if kill_after is not None and len(acknowledged) >= kill_after:
                os.kill(child.pid, signal.SIGKILL)
                break
    child.wait(60)
    if kill_after is None:
        assert child.returncode == 0, child.stderr.read() if child.stderr else ""
    else:
        assert child.returncode == -signal.SIGKILL
    return acknowledged


def test_kill_9_mid_run_loses_no_acknowledged_row_and_resume_repays_nothing_stored(tmp_path):
    path = tmp_path / "run.duckdb"
    requests = kill_workload()
    sim_key = {r.key: r.key for r in requests}  # the gateway sends its request key; the sim bills by it
    with sim_in_thread(SimSection(error_rate=0.0, latency_ms=20.0), seed=1) as sim:
        first = run_child(path, sim.base_url, kill_after=KILL_N // 3)
        store = Store(path, read_only=True)  # DuckDB reopens after kill -9 (WAL replay)
        stored_by_first = {row[0] for row in store.query("SELECT key FROM calls WHERE status = 'ok'")}
        store.close_sync()
        assert set(first) <= stored_by_first  # every acknowledged row survived
        assert len(stored_by_first) < KILL_N  # the kill really was mid-run
        second = run_child(path, sim.base_url, kill_after=None)
        billed = sim.stats()["billed_by_key"]
    assert set(first) | set(second) == set(sim_key)
    store = Store(path, read_only=True)
    ok_rows = dict(store.query("SELECT key, count(*) FROM calls WHERE status = 'ok' GROUP BY key"))
    sessions = store.query(
        "SELECT bool_or(event = 'close'), arg_max(usd, created_at) FILTER (event = 'cover'), "
        "coalesce(sum(usd) FILTER (event = 'settle'), 0) FROM reservations GROUP BY session ORDER BY 1")
    spent = spent_in_store(store)[0]
    store.close_sync()
    # The killed session wrote no close row: on resume it counted at its last committed cover level,
    # which covers the calls it had in flight, and by at most 1% of the cap more. The resumed session
    # closed cleanly and counts what it settled.
    (killed_closed, killed_cover, killed_settled), (resumed_closed, _, resumed_settled) = sessions
    assert not killed_closed and resumed_closed and killed_cover >= killed_settled > 0
    assert killed_cover - killed_settled <= 0.01 * 100.0 + KILL_CONCURRENCY * 0.001  # a call here: < $0.001
    assert spent == pytest.approx(killed_cover + resumed_settled)
    assert set(ok_rows) == set(sim_key) and set(ok_rows.values()) == {1}  # one ok row per request
    # Nothing stored by the killed process was paid again; only calls in flight at the kill (billed
    # but never acknowledged) may have been paid twice, and their reservations stay charged.
    assert all(billed[sim_key[key]] == 1 for key in stored_by_first)
    twice = [key for key, k in sim_key.items() if billed.get(k, 0) > 1]
    assert len(twice) <= KILL_CONCURRENCY
    assert all(billed.get(k, 0) >= 1 for k in sim_key.values())
