"""The gateway: cache, single flight, budget, retry policy and what each fault leaves in the store."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkd.gateway.budget import Budget, BudgetExhausted
from agentkd.config import LimitsSection, PriceSection
from agentkd.gateway.core import CallFailed, Gateway, SendingStopped
from agentkd.gateway.ledger import spent_in_store
from agentkd.gateway.retry import Deferred
from agentkd.store.writer import Store
from agentkd.teachers.base import (
    AuthError, BadRequest, ConnectFailed, IncompleteResponse, MalformedResponse, Overloaded,
    QuotaExceeded, RateLimited, ReadTimeout, ServerError, TeacherReply, TeacherRequest,
)
from tests.gateway_fakes import FakeClock, ScriptedTeacher

PRICE = PriceSection(input_per_mtok=1_000.0, output_per_mtok=2_000.0)  # $0.001/token in, $0.002 out


def request(text: str = "What is 2 + 2?", max_tokens: int = 10) -> TeacherRequest:
    return TeacherRequest(role="answerer", provider="sim", model="m",
                          messages=({"role": "user", "content": text},), temperature=0.0,
                          max_tokens=max_tokens, prompt_version="v1")


async def make_gateway(tmp_path, teacher, *, usd=None, tokens=None, clock=None, **limits):
    clock = clock or FakeClock()
    store = Store(tmp_path / "run.duckdb")
    budget = Budget(usd=usd, tokens=tokens, price_of=lambda model: PRICE)
    gateway = Gateway(teachers={"sim": teacher}, store=store, budget=budget,
                      limits=LimitsSection(**{"max_attempts": 4, **limits}), clock=clock, sleep=clock.sleep)
    await gateway.start()
    return gateway, store, clock


def test_request_key_is_the_one_earlier_versions_stored():
    # A run resumed by a newer agentkd finds its stored answers only if the key of a request is unchanged.
    pinned = TeacherRequest(
        role="answerer", provider="openai", model="gpt-x",
        messages=({"role": "system", "content": "Réponds — briefly."}, {"role": "user", "content": '2+2=? "quoted"\n'}),
        temperature=0.7, max_tokens=64, prompt_version="v3", top_logprobs=5,
        response_format={"name": "a", "schema": {"type": "object", "b": 1, "a": [1.5, None]}}, sample=2)
    assert pinned.canonical_json == (
        '{"max_tokens":64,"messages":[{"content":"Réponds — briefly.","role":"system"},{"content":"2+2=? '
        '\\"quoted\\"\\n","role":"user"}],"model":"gpt-x","prompt_version":"v3","provider":"openai",'
        '"response_format":{"name":"a","schema":{"a":[1.5,null],"b":1,"type":"object"}},"sample":2,'
        '"temperature":0.7,"top_logprobs":5}')
    assert pinned.key == "5ebb7c67c7f508fab172216d594d79be4b92f61c55ae45d90748b99bd321457e"


async def test_stored_answer_is_never_requested_again(tmp_path):
    teacher = ScriptedTeacher()
    gateway, store, _ = await make_gateway(tmp_path, teacher)
    first = await gateway.complete(request())
    second = await gateway.complete(request())
    assert len(teacher.calls) == 1 and second.from_cache and second.text == first.text
    await store.close()
    # A resumed process re-pays nothing stored.
    teacher2 = ScriptedTeacher()
    gateway2, store2, _ = await make_gateway(tmp_path, teacher2)
    assert (await gateway2.complete(request())).from_cache
    assert teacher2.calls == []
    await store2.close()


async def test_concurrent_identical_requests_share_one_call(tmp_path):
    teacher = ScriptedTeacher(delay=lambda: 0.01)
    gateway, store, _ = await make_gateway(tmp_path, teacher)
    results = await asyncio.gather(*(gateway.complete(request()) for _ in range(20)))
    assert len(teacher.calls) == 1
    assert len({r.text for r in results}) == 1
    assert store.query("SELECT count(*) FROM calls")[0][0] == 1
    await store.close()


async def test_500_500_200_is_one_row_with_three_attempts(tmp_path):
    teacher = ScriptedTeacher([ServerError("HTTP 500", status=500), ServerError("HTTP 500", status=500)])
    gateway, store, clock = await make_gateway(tmp_path, teacher)
    result = await gateway.complete(request())
    await store.close()
    store = Store(tmp_path / "run.duckdb", read_only=True)
    rows = store.query_dicts("SELECT status, attempts FROM calls")
    assert rows == [{"status": "ok", "attempts": 3}] and result.attempts == 3
    assert store.query("SELECT count(*) FROM attempts")[0][0] == 3
    assert len(clock.sleeps) == 2 and all(0 <= s <= 1.0 for s in clock.sleeps)  # full jitter, base 0.5
    store.close_sync()


async def test_retry_after_is_honoured(tmp_path):
    limited = RateLimited("HTTP 429", status=429, headers={"retry-after": "3"})
    gateway, store, clock = await make_gateway(tmp_path, ScriptedTeacher([limited]))
    await gateway.complete(request())
    assert sum(clock.sleeps) >= 3.0
    assert gateway.stats.rate_limited == 1
    await store.close()


@pytest.mark.parametrize("error_class, status", [(QuotaExceeded, 429), (AuthError, 401)])
async def test_fatal_errors_are_not_retried_and_stop_the_run(tmp_path, error_class, status):
    # A fresh exception per test: a shared one would keep each raise's frames (and stores) alive.
    error = error_class(f"HTTP {status}", status=status)
    teacher = ScriptedTeacher([error])
    gateway, store, clock = await make_gateway(tmp_path, teacher)
    with pytest.raises(type(error)):
        await gateway.complete(request())
    assert len(teacher.calls) == 1 and clock.sleeps == []
    assert store.query("SELECT status, error_class FROM calls") == [("error", type(error).__name__)]
    await store.close()


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_bad_requests_are_skipped_without_retry(tmp_path, status):
    teacher = ScriptedTeacher([BadRequest(f"HTTP {status}", status=status)])
    gateway, store, _ = await make_gateway(tmp_path, teacher)
    with pytest.raises(CallFailed) as failed:
        await gateway.complete(request())
    assert failed.value.attempts == 1 and len(teacher.calls) == 1
    await store.close()


async def test_overload_past_max_attempts_skips_the_item(tmp_path):
    teacher = ScriptedTeacher([Overloaded("HTTP 529", status=529)] * 10)
    gateway, store, _ = await make_gateway(tmp_path, teacher, max_attempts=3)
    with pytest.raises(CallFailed, match="Overloaded after 3"):
        await gateway.complete(request())
    assert len(teacher.calls) == 3
    assert gateway.budget.settled_usd == 0.0  # overloaded answers were never billed
    await store.close()


async def test_long_retry_after_defers_the_item(tmp_path):
    limited = RateLimited("HTTP 429", status=429, headers={"retry-after": "3600"})
    gateway, store, clock = await make_gateway(tmp_path, ScriptedTeacher([limited]), max_wait_s=60)
    with pytest.raises(Deferred):
        await gateway.complete(request())
    assert clock.sleeps == []
    # The deferral is on record (the attempt and why it waits), and is not an answer the cache serves.
    assert store.query("SELECT status, error_class, attempts FROM calls") == [("deferred", "RateLimited", 1)]
    assert store.query("SELECT error_detail FROM calls")[0][0].startswith("provider asked to wait 3600 s")
    assert await gateway.complete(request()) and store.query(
        "SELECT status FROM calls ORDER BY created_at") == [("deferred",), ("ok",)]
    await store.close()


async def test_connect_failure_releases_and_timeout_settles_at_the_reservation(tmp_path):
    teacher = ScriptedTeacher([ConnectFailed("refused"), ReadTimeout("timeout")])
    gateway, store, _ = await make_gateway(tmp_path, teacher, usd=100.0)
    result = await gateway.complete(request(max_tokens=10))
    worst, _ = gateway.budget.worst_case("m", *_estimate_and_max(request(max_tokens=10)))
    # Refused: nothing billed. Timed out after sending: the whole reservation. Success: actual usage.
    assert gateway.budget.settled_usd == pytest.approx(worst + result.cost_usd)
    assert gateway.budget.reserved_usd == pytest.approx(0.0)
    await store.close()


@pytest.mark.parametrize("room_for", [1.5, 2.5])
async def test_a_read_timeout_is_retried_only_if_the_budget_allows(tmp_path, room_for):
    """RELIABILITY 10: the timed-out attempt is charged its whole reservation, so the retry must fit
    beside it: with room for 1.5 worst cases it does not (the run stops, nothing more is sent), with
    room for 2.5 it is sent and answered."""
    req = request(max_tokens=10)
    worst, _ = Budget(usd=None, tokens=None, price_of=lambda model: PRICE).worst_case("m", *_estimate_and_max(req))
    teacher = ScriptedTeacher([ReadTimeout("timeout")])
    gateway, store, _ = await make_gateway(tmp_path, teacher, usd=room_for * worst)
    if room_for < 2:
        with pytest.raises(BudgetExhausted):
            await gateway.complete(req)
        assert len(teacher.calls) == 1 and gateway.budget.settled_usd == pytest.approx(worst)
    else:
        assert (await gateway.complete(req)).attempts == 2 and len(teacher.calls) == 2
    await gateway.aclose()
    await store.close()
    store = Store(tmp_path / "run.duckdb", read_only=True)
    first = store.query("SELECT event, usd, reserved_usd FROM reservations WHERE attempt = 1")
    assert first == [("settle", pytest.approx(worst), pytest.approx(worst))]
    store.close_sync()


def _estimate_and_max(req):
    from agentkd.gateway.tokens import estimate_prompt
    return estimate_prompt(req.messages, req.provider).tokens, req.max_tokens


async def test_200_without_usage_is_charged_and_skipped(tmp_path):
    teacher = ScriptedTeacher([IncompleteResponse("no usage")])
    gateway, store, _ = await make_gateway(tmp_path, teacher, usd=100.0)
    with pytest.raises(CallFailed):
        await gateway.complete(request())
    assert len(teacher.calls) == 1 and gateway.budget.settled_usd > 0
    await store.close()


async def test_garbled_body_is_retried_and_its_snippet_stored(tmp_path):
    teacher = ScriptedTeacher([MalformedResponse("not JSON", snippet="<html>bad gateway</html>")] * 4)
    gateway, store, _ = await make_gateway(tmp_path, teacher)
    with pytest.raises(CallFailed):
        await gateway.complete(request())
    detail = store.query("SELECT error_detail FROM calls")[0][0]
    assert "<html>bad gateway</html>" in detail and len(teacher.calls) == 4
    await store.close()


async def test_truncated_answer_is_stored_as_truncated(tmp_path):
    reply = TeacherReply(text="2 + 2 =", finish_reason="length", input_tokens=5, output_tokens=10)
    gateway, store, _ = await make_gateway(tmp_path, ScriptedTeacher([reply]))
    result = await gateway.complete(request())
    assert result.truncated and store.query("SELECT truncated FROM calls") == [(True,)]
    await store.close()


async def test_cancellation_mid_call_settles_the_reservation(tmp_path):
    teacher = ScriptedTeacher(delay=lambda: 10.0)
    gateway, store, _ = await make_gateway(tmp_path, teacher, usd=100.0)
    task = asyncio.create_task(gateway.complete(request()))
    await teacher.sent()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gateway.budget.reserved_usd == pytest.approx(0.0)
    assert gateway.budget.settled_usd > 0  # it was sent: the provider may have billed it
    await gateway.aclose()  # a clean end: the settled rows are the session's spend
    await store.close()
    store = Store(tmp_path / "run.duckdb", read_only=True)
    assert spent_in_store(store)[0] == pytest.approx(gateway.budget.settled_usd)
    assert store.query("SELECT event, error_class FROM reservations WHERE event IN ('settle', 'release')") == [
        ("settle", "CancelledError")]
    store.close_sync()


async def test_a_stopping_run_sends_nothing_new_but_lets_calls_in_flight_finish(tmp_path):
    """Ctrl-C or a budget stop: a call holding a slot is answered and stored; one queued behind the
    concurrency limit is dropped unsent, having reserved nothing."""
    teacher = ScriptedTeacher(delay=lambda: 0.5)
    gateway, store, _ = await make_gateway(tmp_path, teacher, usd=100.0, max_concurrency=1)
    in_flight = asyncio.create_task(gateway.complete(request("first")))
    queued = asyncio.create_task(gateway.complete(request("second")))
    await teacher.sent()
    assert len(teacher.calls) == 1 and gateway.budget.reserved_usd > 0
    gateway.stop_sending()
    assert (await in_flight).text == "answer to first"
    with pytest.raises(SendingStopped, match="^the run is stopping: not sent$"):  # stopped while it waited
        await queued
    with pytest.raises(SendingStopped, match="^the run is stopping: not sent$"):  # asked after the stop
        await gateway.complete(request("third"))
    assert len(teacher.calls) == 1 and gateway.budget.reserved_usd == pytest.approx(0.0)
    assert store.query("SELECT key FROM calls") == [(request("first").key,)]
    assert store.query("SELECT count(*) FROM reservations WHERE key = ?", [request("second").key]) == [(0,)]
    gateway.resume_sending()
    assert (await gateway.complete(request("second"))).text == "answer to second"
    await gateway.aclose()
    await store.close()


async def test_a_session_that_never_closed_counts_at_its_last_cover_level(tmp_path):
    """A crash can hide no spend: the level committed before the call was sent counts on resume."""
    teacher = ScriptedTeacher(delay=lambda: 10.0)
    gateway, store, _ = await make_gateway(tmp_path, teacher, usd=100.0)
    task = asyncio.create_task(gateway.complete(request()))
    await teacher.sent()
    assert len(teacher.calls) == 1  # in flight: the provider is working on it
    level = store.query("SELECT arg_max(usd, created_at), arg_max(tokens, created_at) FROM reservations "
                        "WHERE event = 'cover'")[0]
    assert level[0] >= gateway.budget.reserved_usd > 0 and level[1] >= gateway.budget.reserved_tokens
    task.cancel()  # stands in for the crash: no close row is written
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.close()
    store = Store(tmp_path / "run.duckdb", read_only=True)
    usd, tokens = spent_in_store(store)
    assert usd >= gateway.budget.settled_usd and usd == pytest.approx(max(level[0], gateway.budget.settled_usd))
    store.close_sync()
    # Never past the cap: levels are cut to what the cap leaves.
    gateway, store, _ = await make_gateway(tmp_path / "capped", ScriptedTeacher(), usd=0.05)
    await gateway.complete(request())
    assert store.query("SELECT max(usd) FROM reservations WHERE event = 'cover'")[0][0] <= 0.05 + 1e-12
    await store.close()


async def test_unsettled_reservations_count_as_spent_on_resume(tmp_path):
    store = Store(tmp_path / "run.duckdb")
    store.append_now("reservations", [
        {"reservation_id": "a", "key": "k1", "event": "reserve", "usd": 0.5, "tokens": 100},
        {"reservation_id": "a", "key": "k1", "event": "settle", "usd": 0.2, "tokens": 40},
        {"reservation_id": "b", "key": "k2", "event": "reserve", "usd": 0.3, "tokens": 60},  # crashed
        {"reservation_id": "c", "key": "k3", "event": "reserve", "usd": 0.4, "tokens": 80},
        {"reservation_id": "c", "key": "k3", "event": "release", "usd": 0.0, "tokens": 0},
    ])
    assert spent_in_store(store) == (pytest.approx(0.5), 100)
    store.close_sync()


async def test_budget_exhaustion_stops_before_sending(tmp_path):
    teacher = ScriptedTeacher()
    gateway, store, _ = await make_gateway(tmp_path, teacher, usd=0.001)
    with pytest.raises(BudgetExhausted, match="budget exhausted"):
        await gateway.complete(request())
    assert teacher.calls == []
    await store.close()


@settings(max_examples=25, deadline=None)
@given(n_tasks=st.integers(20, 200), fits=st.integers(1, 15), seed=st.integers(0, 10_000))
def test_concurrent_admission_never_passes_the_cap(tmp_path_factory, n_tasks, fits, seed):
    """RELIABILITY 19: N concurrent tasks, a budget fitting `fits` worst-case calls: at most `fits` sent."""
    rng = random.Random(seed)
    tmp = tmp_path_factory.mktemp("prop")

    async def scenario():
        # Usage equals the worst case, so the budget admits exactly `fits` calls however they interleave.
        req0 = request("q0000")
        est, max_tokens = _estimate_and_max(req0)
        teacher = ScriptedTeacher(delay=lambda: rng.uniform(0, 0.002), usage=(est, max_tokens))
        per_call = (est * PRICE.input_per_mtok + max_tokens * PRICE.output_per_mtok) / 1e6
        gateway, store, _ = await make_gateway(tmp, teacher, usd=per_call * fits + per_call / 2,
                                               clock=FakeClock())
        outcomes = await asyncio.gather(*(gateway.complete(request(f"q{i:04d}")) for i in range(n_tasks)),
                                        return_exceptions=True)
        budget = gateway.budget
        await store.close()
        return outcomes, budget, len(teacher.calls)

    outcomes, budget, sent = asyncio.run(scenario())
    assert sent <= fits
    assert budget.settled_usd <= budget.cap_usd + 1e-12
    assert budget.reserved_usd == pytest.approx(0.0, abs=1e-12)


async def test_a_failed_store_write_stops_paid_calls(tmp_path):
    """RELIABILITY 18: once the database cannot be written, no further paid call is sent."""
    from agentkd.store.writer import StoreError

    teacher = ScriptedTeacher()
    gateway, store, _ = await make_gateway(tmp_path, teacher)
    await gateway.complete(request("first"))
    store.query("DROP TABLE calls")  # the file breaks under the running writer
    with pytest.raises(StoreError):
        await gateway.complete(request("second"))
    sent = len(teacher.calls)
    with pytest.raises(StoreError, match="^not sending paid calls: "):
        await gateway.complete(request("third"))
    assert len(teacher.calls) == sent  # refused before sending
    await store.close()


async def test_each_attempt_is_on_record_with_its_reservation_outcome_and_latency(tmp_path):
    """The closing ledger row of every attempt: who, which attempt, what it reserved and was charged, the
    HTTP status and error class, how long it took (on the injected clock) and the calls then in flight."""
    clock = FakeClock()

    class SlowTeacher(ScriptedTeacher):
        timeouts: list[float] = []

        async def complete(self, request, *, timeout_s):
            self.timeouts.append(timeout_s)
            clock.now += 2.5  # the provider takes 2.5 s of (injected) time
            return await super().complete(request, timeout_s=timeout_s)

    teacher = SlowTeacher([ServerError("HTTP 500", status=500)])
    gateway, store, _ = await make_gateway(tmp_path, teacher, usd=100.0, clock=clock)
    req = request()
    result = await gateway.complete(req)
    assert gateway.stats.sent == 2 and gateway.stats.ok == 1 and gateway.stats.failed == 0
    assert teacher.timeouts == [gateway.limits.timeout_s] * 2
    # The limiter learns how the provider's input count (20) compares to our estimate, from the answer.
    estimate = _estimate_and_max(req)[0]
    assert gateway.limiter.input_ratio == pytest.approx(0.9 + 0.1 * 20 / estimate)
    await gateway.aclose()
    await store.close()
    store = Store(tmp_path / "run.duckdb", read_only=True)
    worst, worst_tokens = gateway.budget.worst_case("m", *_estimate_and_max(req))
    rows = store.query_dicts("SELECT reservation_id, key, event, usd, tokens, session, reserved_usd, reserved_tokens, "
                             "attempt, status_code, error_class, latency_s, in_flight FROM reservations "
                             "WHERE event IN ('settle', 'release') ORDER BY attempt")
    session = gateway._session
    assert rows == [
        {"reservation_id": f"{session}-0", "key": req.key, "event": "release", "usd": 0.0, "tokens": 0,
         "session": session, "reserved_usd": pytest.approx(worst), "reserved_tokens": worst_tokens, "attempt": 1,
         "status_code": 500, "error_class": "ServerError", "latency_s": 2.5, "in_flight": 0},
        {"reservation_id": f"{session}-1", "key": req.key, "event": "settle", "usd": pytest.approx(result.cost_usd),
         "tokens": 30, "session": session, "reserved_usd": pytest.approx(worst), "reserved_tokens": worst_tokens,
         "attempt": 2, "status_code": 200, "error_class": None, "latency_s": 2.5, "in_flight": 0},
    ]
    assert result.cost_usd == pytest.approx((20 * 1_000 + 10 * 2_000) / 1e6)
    store.close_sync()


async def test_reservation_and_cost_use_the_request_models_own_price_and_cached_tokens(tmp_path):
    cached = PriceSection(input_per_mtok=10_000.0, output_per_mtok=20_000.0, cached_input_per_mtok=1_000.0)
    reply = TeacherReply(text="4", finish_reason="stop", input_tokens=20, output_tokens=10, cached_tokens=15)
    clock = FakeClock()
    store = Store(tmp_path / "run.duckdb")
    budget = Budget(usd=100.0, tokens=None, price_of=lambda model: cached if model == "big" else PRICE)
    gateway = Gateway(teachers={"sim": ScriptedTeacher([reply])}, store=store, budget=budget,
                      limits=LimitsSection(max_attempts=4), clock=clock, sleep=clock.sleep)
    await gateway.start()
    req = TeacherRequest(role="answerer", provider="sim", model="big", messages=({"role": "user", "content": "2+2?"},),
                         temperature=0.0, max_tokens=10, prompt_version="v1")
    result = await gateway.complete(req)
    assert result.cost_usd == pytest.approx((5 * 10_000 + 15 * 1_000 + 10 * 20_000) / 1e6)
    await gateway.aclose()
    await store.close()
    store = Store(tmp_path / "run.duckdb", read_only=True)
    estimate = _estimate_and_max(req)[0]
    assert store.query("SELECT reserved_usd, usd FROM reservations WHERE event = 'settle'") == [
        (pytest.approx((estimate * 10_000 + 10 * 20_000) / 1e6), pytest.approx(result.cost_usd))]
    store.close_sync()


async def test_a_cached_prompt_reserves_and_pays_the_cache_write_premium(tmp_path):
    """prompt_cache on, cache writes at 1.25x input: the worst case counts every prompt token as written
    (so a cap that only fits the plain worst case is not passed), and the settled cost prices the writes
    the provider reports at the premium."""
    caching = PriceSection(input_per_mtok=10_000.0, output_per_mtok=20_000.0, cached_input_per_mtok=1_000.0,
                           cache_write_per_mtok=12_500.0)
    req = TeacherRequest(role="answerer", provider="sim", model="m", messages=({"role": "user", "content": "2+2?"},),
                         temperature=0.0, max_tokens=10, prompt_version="v1", prompt_cache=True)
    estimate = _estimate_and_max(req)[0]
    plain, cached = (estimate * 10_000 + 10 * 20_000) / 1e6, (estimate * 12_500 + 10 * 20_000) / 1e6

    def gateway_with(folder, teacher, cap):
        clock = FakeClock()
        store = Store(folder / "run.duckdb")
        budget = Budget(usd=cap, tokens=None, price_of=lambda model: caching)
        return Gateway(teachers={"sim": teacher}, store=store, budget=budget,
                       limits=LimitsSection(max_attempts=4), clock=clock, sleep=clock.sleep), store

    (tmp_path / "tight").mkdir()
    teacher = ScriptedTeacher()
    gateway, store = gateway_with(tmp_path / "tight", teacher, (plain + cached) / 2)
    await gateway.start()
    with pytest.raises(BudgetExhausted):
        await gateway.complete(req)
    assert teacher.calls == [] and gateway.budget.settled_usd == 0.0
    await gateway.aclose()
    await store.close()

    reply = TeacherReply(text="4", finish_reason="stop", input_tokens=20, output_tokens=10, cached_tokens=5,
                         cache_write_tokens=12)
    gateway, store = gateway_with(tmp_path, ScriptedTeacher([reply]), 100.0)
    await gateway.start()
    result = await gateway.complete(req)
    assert result.cost_usd == pytest.approx((3 * 10_000 + 5 * 1_000 + 12 * 12_500 + 10 * 20_000) / 1e6)
    await gateway.aclose()
    assert store.query("SELECT reserved_usd, usd FROM reservations WHERE event = 'settle'") == [
        (pytest.approx(cached), pytest.approx(result.cost_usd))]
    assert gateway.budget.settled_usd == pytest.approx(result.cost_usd)
    await store.close()


async def test_a_call_whose_cover_cannot_be_written_is_not_sent_and_its_reservation_released(tmp_path):
    teacher = ScriptedTeacher()
    gateway, store, _ = await make_gateway(tmp_path, teacher, usd=100.0)
    store.before_commit.append(lambda: 1 / 0)  # the first commit (the call's cover) fails
    from agentkd.store.writer import StoreError

    with pytest.raises(StoreError):
        await gateway.complete(request())
    assert teacher.calls == [] and gateway.stats.sent == 0
    assert gateway.budget.settled_usd == 0.0 and gateway.budget.reserved_usd == pytest.approx(0.0)
    assert gateway.budget.reserved_calls == 0
    store.before_commit.clear()
    await store.close()


async def test_a_call_cancelled_while_its_cover_commits_is_released_not_charged(tmp_path):
    teacher = ScriptedTeacher(delay=lambda: 10.0)
    gateway, store, _ = await make_gateway(tmp_path, teacher, usd=100.0)
    # A large batch ahead in the writer's queue: the call's cover commits after it, so the call waits.
    store.enqueue("metrics", [{"iteration": 0, "name": "m", "value": float(i)} for i in range(20_000)])
    task = asyncio.create_task(gateway.complete(request()))
    while gateway.budget.reserved_calls == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await gateway.aclose()
    await store.close()
    store = Store(tmp_path / "run.duckdb", read_only=True)
    closes = store.query("SELECT event, usd, error_class FROM reservations WHERE event IN ('settle', 'release')")
    if teacher.calls:  # the cover committed first after all: sent, so possibly billed
        assert closes == [("settle", pytest.approx(gateway.budget.settled_usd), "CancelledError")]
    else:
        assert closes == [("release", 0.0, "CancelledError")] and gateway.budget.settled_usd == 0.0
    store.close_sync()


async def test_calls_waiting_for_budget_are_all_woken_whatever_order_they_fit_in(tmp_path):
    """A large call in flight; a small, a large and a small one wait for budget. When the first settles,
    the small ones fit and the large one waits again: it must still be woken when they settle."""
    release = asyncio.Event()

    class GatedTeacher(ScriptedTeacher):
        async def complete(self, request, *, timeout_s):
            self.calls.append(request)
            if not release.is_set():
                await release.wait()
            return TeacherReply(text="4", finish_reason="stop", input_tokens=2, output_tokens=2)

    teacher = GatedTeacher()
    est = _estimate_and_max(request("A", max_tokens=60))[0]
    small, large = (est * 1_000 + 10 * 2_000) / 1e6, (est * 1_000 + 60 * 2_000) / 1e6
    gateway, store, _ = await make_gateway(tmp_path, teacher, usd=large + small / 2)
    first = asyncio.create_task(gateway.complete(request("A", max_tokens=60)))
    await teacher.sent()
    waiting = [asyncio.create_task(gateway.complete(request(t, max_tokens=m))) for t, m in
               [("B", 10), ("C", 60), ("D", 10)]]
    for _ in range(100):  # all three wait for the budget
        await asyncio.sleep(0)
    assert len(teacher.calls) == 1
    release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *waiting, return_exceptions=True), timeout=10)
    assert all(not isinstance(r, BaseException) for r in results), results
    assert len(teacher.calls) == 4
    await store.close()
