"""The spend cover (ledger.py): what a crash leaves counted follows the calls in flight, not max_concurrency."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

from agentkd.gateway.budget import Budget, BudgetExhausted
from agentkd.config import LimitsSection, PriceSection
from agentkd.gateway.core import Gateway
from agentkd.gateway.ledger import PriorSpend, prior_spend, resume_note, spend_text, spent_in_store
from agentkd.store.writer import Store
from agentkd.teachers.base import TeacherReply, TeacherRequest
from agentkd.gateway.tokens import estimate_prompt
from tests.gateway_fakes import FakeClock

PRICE = PriceSection(input_per_mtok=1_000.0, output_per_mtok=2_000.0)  # $0.001/token in, $0.002 out


def request(i: int, max_tokens: int = 10) -> TeacherRequest:
    return TeacherRequest(role="answerer", provider="sim", model="m",
                          messages=({"role": "user", "content": f"What is {i} + 2?"},), temperature=0.0,
                          max_tokens=max_tokens, prompt_version="v1")


def worst_case(i: int = 0) -> float:
    r = request(i)
    return (estimate_prompt(r.messages, r.provider).tokens * 1_000.0 + r.max_tokens * 2_000.0) / 1e6


class HeldTeacher:
    """Every call waits until the test answers it: the calls in flight are exactly those not answered."""

    provider = "sim"

    def __init__(self) -> None:
        self.started: list[TeacherRequest] = []
        self._answer: dict[str, asyncio.Event] = {}

    async def complete(self, request: TeacherRequest, *, timeout_s: float) -> TeacherReply:
        self.started.append(request)
        event = self._answer.setdefault(request.key, asyncio.Event())
        await event.wait()
        return TeacherReply(text="4", finish_reason="stop", input_tokens=3, output_tokens=2)

    def answer(self, request: TeacherRequest) -> None:
        self._answer.setdefault(request.key, asyncio.Event()).set()

    async def wait_started(self, n: int) -> None:
        for _ in range(1000):
            if len(self.started) >= n:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"{len(self.started)} of {n} calls started")

    async def aclose(self) -> None:
        pass


async def make_gateway(tmp_path, teacher, *, usd=None, tokens=None, max_concurrency=64):
    clock = FakeClock()
    store = Store(tmp_path / "run.duckdb")
    gateway = Gateway(teachers={"sim": teacher}, store=store,
                      budget=Budget(usd=usd, tokens=tokens, price_of=lambda model: PRICE),
                      # A known rpm: with none, the limiter sends one probe call alone first.
                      limits=LimitsSection(max_concurrency=max_concurrency, rpm=1_000_000), clock=clock,
                      sleep=clock.sleep)
    await gateway.start()
    return gateway, store


async def barrier(store: Store) -> None:
    """Everything queued before this returns is committed (the writer is FIFO)."""
    await store.write("metrics", {"iteration": 0, "name": "barrier", "value": 0.0})


async def test_crash_exposure_follows_the_calls_in_flight_not_max_concurrency(tmp_path):
    """64 slots, a cap of 20 worst-case calls: with 12 calls in flight a crash counts about 12 of them;
    once 10 are answered it counts the 2 still in flight plus at most max(2 worst cases, 1% of the cap)."""
    worst = worst_case()
    cap = 20 * worst
    teacher = HeldTeacher()
    gateway, store = await make_gateway(tmp_path, teacher, usd=cap)
    requests = [request(i) for i in range(12)]
    tasks = [asyncio.create_task(gateway.complete(r)) for r in requests]
    await teacher.wait_started(12)
    await barrier(store)
    margin = max(2 * worst, 0.01 * cap)
    # What a resumed run would count if this process died now (this session has no close row yet).
    crashed = prior_spend(store)
    assert crashed.interrupted == 1 and crashed.settled_usd == 0.0
    assert 12 * worst <= crashed.unsettled_usd + 1e-12 <= 12 * worst + margin + 1e-12
    assert crashed.in_flight == 12
    for r in requests[:10]:
        teacher.answer(r)
    await asyncio.gather(*tasks[:10])
    await barrier(store)
    crashed = prior_spend(store)
    settled = store.query("SELECT sum(usd) FROM reservations WHERE event = 'settle'")[0][0]
    assert crashed.settled_usd == pytest.approx(settled) and settled < 10 * worst
    assert 2 * worst - 1e-12 <= crashed.unsettled_usd <= 2 * worst + margin + 1e-12
    assert crashed.in_flight == 2
    for r in requests[10:]:
        teacher.answer(r)
    await asyncio.gather(*tasks)
    await gateway.aclose()
    clean = prior_spend(store)
    assert clean.interrupted == 0 and clean.unsettled_usd == 0.0
    assert clean.settled_usd == pytest.approx(gateway.budget.settled_usd)
    await store.close()


async def test_the_cover_never_passes_the_cap_and_a_full_cap_still_sends(tmp_path):
    worst = worst_case()
    teacher = HeldTeacher()
    gateway, store = await make_gateway(tmp_path, teacher, usd=2.5 * worst)
    requests = [request(i) for i in range(3)]
    tasks = [asyncio.create_task(gateway.complete(r)) for r in requests]
    await teacher.wait_started(2)  # the third does not fit until one settles
    await barrier(store)
    assert len(teacher.started) == 2
    levels = [row[0] for row in store.query("SELECT usd FROM reservations WHERE event = 'cover'")]
    assert levels and max(levels) <= 2.5 * worst + 1e-12
    for r in requests:
        teacher.answer(r)
    await asyncio.gather(*tasks)
    await gateway.aclose()
    levels = [row[0] for row in store.query("SELECT usd FROM reservations WHERE event = 'cover'")]
    assert max(levels) <= 2.5 * worst + 1e-12
    await store.close()


async def test_a_resumed_budget_starts_from_the_settled_rows_and_the_interrupted_cover(tmp_path):
    worst = worst_case()
    teacher = HeldTeacher()
    gateway, store = await make_gateway(tmp_path, teacher, usd=20 * worst)
    first, second = request(1), request(2)
    done = asyncio.create_task(gateway.complete(first))
    hanging = asyncio.create_task(gateway.complete(second))
    await teacher.wait_started(2)
    teacher.answer(first)
    await done
    await barrier(store)
    crashed = prior_spend(store)
    assert crashed.in_flight == 1 and crashed.unsettled_usd <= worst + 2 * worst + 1e-12
    hanging.cancel()  # settled at its reservation (it was sent); no close row: the session was interrupted
    with pytest.raises(asyncio.CancelledError):
        await hanging
    await store.close()
    store = Store(tmp_path / "run.duckdb")
    gateway = Gateway(teachers={"sim": teacher}, store=store,
                      budget=Budget(usd=20 * worst, tokens=None, price_of=lambda model: PRICE),
                      limits=LimitsSection(max_concurrency=64, rpm=1_000_000))
    await gateway.start()
    prior = gateway.prior
    assert prior == prior_spend(store) and prior.interrupted == 1 and prior.in_flight == 0
    assert gateway.budget.settled_usd == pytest.approx(prior.settled_usd + prior.unsettled_usd)
    assert prior.settled_usd == pytest.approx(crashed.settled_usd + worst)  # the cancelled call, at its worst case
    text = spend_text(gateway.budget, prior)
    assert f"${prior.settled_usd:.4f} settled + ${prior.unsettled_usd:.4f} possibly billed by an interrupted " \
           f"session (0 calls in flight) of ${20 * worst:g}" == text
    note = resume_note(prior)
    assert note is not None and note.startswith("resuming after an interrupted session (0 calls in flight)")
    await gateway.aclose()
    await store.close()


def test_spend_text_without_an_interruption_is_spend_of_cap():
    budget = Budget(usd=2.0, tokens=None, price_of=lambda model: PRICE)
    budget.restore(usd=0.25, tokens=100)
    assert spend_text(budget, PriorSpend(settled_usd=0.25, settled_tokens=100)) == "$0.2500 of $2"
    assert resume_note(PriorSpend(settled_usd=0.25)) is None


def test_spend_text_never_shows_a_negative_settled_spend():
    """Nothing settled yet: settled_usd restored as 0 + 0.7 + 0.1 less those parts is -2.8e-17 in floats."""
    prior = PriorSpend(unsettled_usd=0.7, interrupted=1, in_flight=0, batch_usd=0.1, batch_requests=1)
    budget = Budget(usd=2.0, tokens=None, price_of=lambda model: PRICE)
    budget.restore(usd=prior.usd, tokens=0)
    assert budget.settled_usd - prior.unsettled_usd - prior.batch_usd < 0  # the float case this is about
    assert spend_text(budget, prior).startswith("$0.0000 settled + $0.7000 possibly billed")
    assert spend_text(budget, prior, short=True) == "$0.0000 +$0.7000 interrupted +$0.1000 batch/$2"


def test_sessions_of_older_files_count_as_they_did(tmp_path):
    """A block session that never closed counts its blocks (its calls in flight are unknown); per-call
    reserve rows without a session count those never settled; a closed session counts its settles."""
    store = Store(tmp_path / "run.duckdb")
    store.append_now("reservations", [
        {"reservation_id": "a", "key": "k1", "event": "reserve", "usd": 0.5, "tokens": 100},
        {"reservation_id": "a", "key": "k1", "event": "settle", "usd": 0.2, "tokens": 40},
        {"reservation_id": "b", "key": "k2", "event": "reserve", "usd": 0.3, "tokens": 60},  # crashed
        {"reservation_id": "s1-block1", "event": "block", "usd": 1.0, "tokens": 500, "session": "s1"},
        {"reservation_id": "s1-0", "key": "k3", "event": "settle", "usd": 0.1, "tokens": 20, "session": "s1"},
        {"reservation_id": "s2-block1", "event": "block", "usd": 1.0, "tokens": 500, "session": "s2"},
        {"reservation_id": "s2-0", "key": "k4", "event": "settle", "usd": 0.1, "tokens": 20, "session": "s2"},
        {"reservation_id": "s2-close", "event": "close", "usd": 0.1, "tokens": 20, "session": "s2"},
    ])
    prior = prior_spend(store)
    assert prior.settled_usd == pytest.approx(0.4) and prior.settled_tokens == 80
    assert prior.unsettled_usd == pytest.approx(0.3 + 0.9) and prior.unsettled_tokens == 60 + 480
    assert prior.interrupted == 2 and prior.in_flight is None
    assert spent_in_store(store) == (pytest.approx(1.6), 620)
    assert "calls in flight unknown" in prior.interruption()
    store.close_sync()


def test_the_band_of_unused_room_per_dimension():
    from agentkd.gateway.ledger import _band

    # Capped: M = max(2 worst, 1% of the cap); high = M - worst, target = high / 2, low = high / 4.
    assert _band(1.0, 0.1, 8) == pytest.approx((0.025, 0.05, 0.1))  # 2 worst cases rule
    assert _band(100.0, 0.1, 8) == pytest.approx((0.225, 0.45, 0.9))  # 1% of the cap rules
    # Uncapped: target = max_concurrency x worst, rewritten rarely.
    assert _band(None, 0.1, 8) == pytest.approx((0.4, 0.8, 1.6))


def test_interruption_and_spend_texts():
    one = PriorSpend(settled_usd=0.25, unsettled_usd=0.05, interrupted=1, in_flight=1)
    two = PriorSpend(settled_usd=0.25, unsettled_usd=0.05, interrupted=2, in_flight=3)
    assert one.interruption() == "an interrupted session (1 call in flight)"
    assert two.interruption() == "2 interrupted sessions (3 calls in flight)"
    assert one.usd == pytest.approx(0.3) and PriorSpend(settled_tokens=5, unsettled_tokens=7).tokens == 12
    assert resume_note(two) == ("resuming after 2 interrupted sessions (3 calls in flight): the run has settled "
                                "$0.2500, and $0.0500 more may have been billed for the calls in flight; both "
                                "count against the cap")
    budget = Budget(usd=2.0, tokens=1_000_000, price_of=lambda model: PRICE)
    budget.restore(usd=one.usd, tokens=1_234)
    assert spend_text(budget, one) == ("$0.2500 settled + $0.0500 possibly billed by an interrupted session "
                                       "(1 call in flight) of $2, 1,234 of 1,000,000 tokens")
    assert spend_text(budget, one, short=True) == "$0.2500 +$0.0500 interrupted/$2"
    uncapped = Budget(usd=None, tokens=None, price_of=lambda model: PRICE)
    uncapped.restore(usd=0.25, tokens=0)
    assert spend_text(uncapped, PriorSpend(settled_usd=0.25), short=True) == "$0.2500"
    assert spend_text(uncapped, PriorSpend(settled_usd=0.25)) == "$0.2500"


def worst_tokens(i: int = 0) -> int:
    r = request(i)
    return estimate_prompt(r.messages, r.provider).tokens + r.max_tokens


async def test_a_token_cap_is_covered_like_a_usd_cap(tmp_path):
    """The same bounds in tokens, with USD uncapped: its level follows max_concurrency x worst instead."""
    worst = worst_tokens()
    cap = 400 * worst  # 1% of the cap (4 worst cases) rules the margin
    teacher = HeldTeacher()
    gateway, store = await make_gateway(tmp_path, teacher, tokens=cap, max_concurrency=16)
    requests = [request(i) for i in range(12)]
    tasks = [asyncio.create_task(gateway.complete(r)) for r in requests]
    await teacher.wait_started(12)
    await barrier(store)
    margin = max(2 * worst, cap // 100)
    crashed = prior_spend(store)
    assert crashed.interrupted == 1 and crashed.in_flight == 12
    assert 12 * worst <= crashed.unsettled_tokens <= 12 * worst + margin
    # USD has no cap: its level is the exposure plus max_concurrency worst cases, at most twice that.
    level_usd = store.query("SELECT arg_max(usd, created_at) FROM reservations WHERE event = 'cover'")[0][0]
    assert 12 * worst_case() <= level_usd <= 12 * worst_case() + 2 * 16 * worst_case() + 1e-12
    for r in requests[:10]:
        teacher.answer(r)
    await asyncio.gather(*tasks[:10])
    await barrier(store)
    crashed = prior_spend(store)
    settled = store.query("SELECT sum(tokens) FROM reservations WHERE event = 'settle'")[0][0]
    assert crashed.settled_tokens == settled == 10 * 5  # HeldTeacher's usage: 3 + 2 tokens a call
    assert 2 * worst <= crashed.unsettled_tokens <= 2 * worst + margin
    for r in requests[10:]:
        teacher.answer(r)
    await asyncio.gather(*tasks)
    await gateway.aclose()
    clean = prior_spend(store)
    assert clean.interrupted == 0 and clean.unsettled_tokens == 0 and clean.settled_tokens == 12 * 5
    levels = [row[0] for row in store.query("SELECT tokens FROM reservations WHERE event = 'cover'")]
    assert max(levels) <= cap
    await store.close()


# ---- SpendCover on its own: a real Store, a Budget, reservations made and closed by hand ------------------
def each_call(b: Budget, i: int):
    """A call whose worst case is 6 prompt + 2 output tokens: $0.01, 8 tokens at PRICE."""
    return b.reserve(f"k{i}", "m", 6, 2)


def closing_row(r, event: str, usd: float = 0.0, tokens: int = 0) -> dict:
    return {"reservation_id": r.id, "key": r.key, "event": event, "usd": usd, "tokens": tokens, "session": "s"}


async def test_the_level_is_raised_and_lowered_only_when_it_leaves_its_band(tmp_path):
    """Cap $10, worst case $0.01: M = $0.1, so high = 0.09, target = 0.045, low = 0.0225 (tokens: uncapped,
    max_concurrency 1000 x 8 tokens). Raised to exposure + target when less than `low` is left, lowered to
    exposure + target when more than `high` is unused, nothing written in between."""
    from agentkd.gateway.ledger import SpendCover

    store = Store(tmp_path / "run.duckdb")
    await store.start()
    b = Budget(usd=10.0, tokens=None, price_of=lambda model: PRICE)
    cover = SpendCover(store, b, session="s", max_concurrency=1000)
    reservations, levels = [], []
    for i in range(10):
        r = each_call(b, i)
        reservations.append(r)
        await cover.cover(r.usd, r.tokens)
        levels.append(cover.level)
    usd_levels = [round(u, 9) for u, _ in levels]
    assert usd_levels == [0.055] * 3 + [0.085] * 3 + [0.115] * 3 + [0.145]
    assert [t for _, t in levels] == [8008] * 3 + [8032] * 3 + [8056] * 3 + [8080]
    assert cover.writes == 4
    lowered = []
    for r in reservations:  # nothing was sent: each is released, and its row may carry a lower level
        b.release(r)
        cover.record(closing_row(r, "release"))
        lowered.append(round(cover.level[0], 9))
    assert lowered == [0.145] * 4 + [0.095] * 5 + [0.045] and cover.writes == 6
    await cover.close()  # the last lowering is still on its way: close waits for it, then writes `close`
    rows = store.query("SELECT event, usd, tokens, in_flight FROM reservations WHERE event IN ('cover', 'close') "
                       "ORDER BY created_at")
    assert [(e, round(u, 9)) for e, u, _, _ in rows] == [
        ("cover", 0.055), ("cover", 0.085), ("cover", 0.115), ("cover", 0.145), ("cover", 0.095),
        ("cover", 0.045), ("close", 0.0)]
    assert rows[-1][2:] == (0, 0)
    ids = store.query("SELECT reservation_id FROM reservations WHERE event = 'cover' ORDER BY created_at")
    assert [i for (i,) in ids] == [f"s-cover{n}" for n in range(1, 7)]
    assert store.query("SELECT reservation_id FROM reservations WHERE event = 'close'") == [("s-close",)]
    await store.close()


async def test_batch_requests_stay_outside_the_level(tmp_path):
    """Cap $1, a batch request held at $0.988, one online call of $0.01 (M = $0.02: high 0.01, target
    0.005). The level leaves the batch hold its share of the cap (0.012, not 0.015), and the batch result
    settling at $0.1 moves no level: once the online call is released, the level is lowered to the
    target above the online exposure (0), with nothing of the batch result behind it."""
    from agentkd.gateway.budget import Usage
    from agentkd.gateway.ledger import SpendCover

    store = Store(tmp_path / "run.duckdb")
    await store.start()
    b = Budget(usd=1.0, tokens=None, price_of=lambda model: PRICE)
    cover = SpendCover(store, b, session="s", max_concurrency=4)
    held = b.hold("kb", "m", 0, 988, reservation_id="akd-s-1-000000")
    assert held is not None and held.usd == pytest.approx(0.988)
    r = each_call(b, 0)
    await cover.cover(r.usd, r.tokens)
    assert cover.level[0] == pytest.approx(0.012) and b.held_usd + cover.level[0] <= 1.0 + 1e-12
    assert b.settle_held(held, Usage(0, 100))[0] == pytest.approx(0.1)
    b.release(r)
    cover.record(closing_row(r, "release"))
    assert cover.level[0] == pytest.approx(0.005) and cover.writes == 2
    await cover.close()
    await store.close()


def test_batch_settles_are_settled_spend_and_not_part_of_a_cover(tmp_path):
    """Session m: a cover of $1 for online calls (2 in flight), an online settle of $0.2 and a batch
    result's settle of $0.5: the batch settle does not use up the cover ($0.8 possibly billed, not $0.3).
    Session b settled only batch results: it covered nothing, so it is not counted as interrupted. Its
    pending request counts at its worst case."""
    store = Store(tmp_path / "run.duckdb")
    store.append_now("batch_requests", [
        {"batch_id": f"akd-{s}-1", "custom_id": f"akd-{s}-1-00000{i}", "key": f"q{s}{i}", "event": "queued",
         "reserved_usd": 0.4, "reserved_tokens": 40} for s, i in (("m", 0), ("b", 0), ("b", 1))])
    store.append_now("reservations", [
        {"reservation_id": "m-cover1", "event": "cover", "usd": 1.0, "tokens": 100, "session": "m", "in_flight": 2},
        {"reservation_id": "m-0", "key": "k0", "event": "settle", "usd": 0.2, "tokens": 20, "session": "m",
         "in_flight": 2},
        {"reservation_id": "akd-m-1-000000", "key": "qm0", "event": "settle", "usd": 0.5, "tokens": 50,
         "session": "m", "in_flight": 2},
        {"reservation_id": "akd-b-1-000000", "key": "qb0", "event": "settle", "usd": 0.3, "tokens": 30,
         "session": "b", "in_flight": 0},
    ])
    prior = prior_spend(store)
    assert prior.settled_usd == pytest.approx(1.0) and prior.settled_tokens == 100
    assert prior.unsettled_usd == pytest.approx(0.8) and prior.unsettled_tokens == 80
    assert prior.interrupted == 1 and prior.in_flight == 2
    assert prior.batch_requests == 1 and prior.batch_usd == pytest.approx(0.4)  # akd-b-1-000001
    assert prior.batch_tokens == 40  # its worst case in tokens, not the count of pending requests
    store.close_sync()


async def test_close_writes_nothing_while_a_call_is_in_flight_or_when_nothing_was_covered(tmp_path):
    from agentkd.gateway.ledger import SpendCover

    store = Store(tmp_path / "run.duckdb")
    await store.start()
    b = Budget(usd=10.0, tokens=None, price_of=lambda model: PRICE)
    cover = SpendCover(store, b, session="s", max_concurrency=4)
    await cover.close()
    assert store.count("reservations") == 0  # a session that covered nothing leaves no rows
    r = each_call(b, 0)
    await cover.cover(r.usd, r.tokens)
    await cover.close()  # one call in flight: not a clean end, so no close row
    assert store.query("SELECT count(*) FROM reservations WHERE event = 'close'") == [(0,)]
    b.settle(r, None)
    cover.record(closing_row(r, "settle", r.usd, r.tokens))
    await cover.close()
    assert store.query("SELECT usd, tokens, in_flight FROM reservations WHERE event = 'close'") == [
        (pytest.approx(0.01), 8, 0)]
    await store.close()


async def test_a_resumed_session_covers_only_its_own_spend_and_never_past_what_the_cap_leaves(tmp_path):
    from agentkd.gateway.ledger import SpendCover

    store = Store(tmp_path / "run.duckdb")
    await store.start()
    b = Budget(usd=1.0, tokens=10_000, price_of=lambda model: PRICE)
    b.restore(usd=0.5, tokens=5_000)  # earlier sessions: counted in the cap, not in this session's cover
    cover = SpendCover(store, b, session="s", max_concurrency=4)
    r = each_call(b, 0)
    await cover.cover(r.usd, r.tokens)
    # USD: M = max(0.02, 0.01) -> target 0.005; tokens: M = max(16, 100) -> high 92, target 46.
    assert cover.level == (pytest.approx(0.015), 8 + 46)
    b.settle(r, None)
    cover.record(closing_row(r, "settle", r.usd, r.tokens))
    await cover.close()
    # Near the cap the level stops at what the cap leaves this session, but never below its exposure.
    b = Budget(usd=1.0, tokens=10_000, price_of=lambda model: PRICE)
    b.restore(usd=0.988, tokens=9_950)
    cover = SpendCover(store, b, session="t", max_concurrency=4)
    r = each_call(b, 1)
    await cover.cover(r.usd, r.tokens)
    assert cover.level == (pytest.approx(0.012), 50)
    await store.close()


class CheckingTeacher(HeldTeacher):
    """Answers at once, but first checks the crash promise at the moment the request goes on the wire:
    what a resumed run would count if this process died now covers every call on the wire at its worst
    case, plus what has settled; and again once everything queued meanwhile has committed."""

    def __init__(self, store: Store, budget: Budget, worst: tuple[float, int]) -> None:
        super().__init__()
        self.store, self.budget, self.worst = store, budget, worst
        self.on_wire = 0
        self.checked = 0
        self.shortfalls: list[tuple] = []

    async def complete(self, request: TeacherRequest, *, timeout_s: float) -> TeacherReply:
        self.on_wire += 1
        try:
            self.check()
            # Everything queued so far commits (a lower level on its way, say) while this call is still
            # on the wire; meanwhile other calls reserve, cover and settle.
            await barrier(self.store)
            self.check()
            self.checked += 1
            return TeacherReply(text="4", finish_reason="stop", input_tokens=3, output_tokens=2)
        finally:
            self.on_wire -= 1

    def check(self) -> None:
        crash = prior_spend(self.store)
        need_usd = self.on_wire * self.worst[0] + crash.settled_usd
        need_tokens = self.on_wire * self.worst[1] + crash.settled_tokens
        if crash.usd + 1e-9 < need_usd or crash.tokens < need_tokens:
            self.shortfalls.append((self.on_wire, crash, need_usd, need_tokens))


@pytest.mark.parametrize("caps", [
    {"usd": 3},  # in worst cases: tight, the level is rewritten about once per call and calls wait for commits
    {"usd": 2},  # exactly two worst cases: at times the level equals the exposure
    {"tokens": 3},
    {"tokens": 2},
    {"usd": 100},  # far from the cap: each dimension covered by its own level
    {"tokens": 100},  # far from the cap: tokens are covered by their own level, USD by its uncapped one
    {"usd": 100, "tokens": 100},
])
async def test_every_request_on_the_wire_is_covered_by_what_a_crash_would_count(tmp_path, caps):
    worst = (worst_case(), worst_tokens())
    store = Store(tmp_path / "run.duckdb")
    budget = Budget(usd=caps["usd"] * worst[0] if "usd" in caps else None,
                    tokens=caps["tokens"] * worst[1] if "tokens" in caps else None, price_of=lambda model: PRICE)
    teacher = CheckingTeacher(store, budget, worst)
    gateway = Gateway(teachers={"sim": teacher}, store=store, budget=budget,
                      limits=LimitsSection(max_concurrency=8, rpm=1_000_000), clock=FakeClock(),
                      sleep=FakeClock().sleep)
    await gateway.start()
    results = await asyncio.gather(*(gateway.complete(request(i)) for i in range(10)), return_exceptions=True)
    await gateway.aclose()
    await store.close()
    answered = [r for r in results if not isinstance(r, BaseException)]
    assert all(isinstance(r, BudgetExhausted) for r in results if isinstance(r, BaseException)), results
    assert len(answered) >= 5 and teacher.checked == len(answered) and teacher.shortfalls == []


async def test_the_band_follows_the_largest_worst_case_in_each_dimension(tmp_path):
    """Caps $1 and 1,000 tokens (1% = $0.01, 10 tokens): M = max(2 worst, 1%) per dimension, from the
    largest worst case seen in that dimension, even when another call was larger in the other one."""
    from agentkd.gateway.ledger import SpendCover

    store = Store(tmp_path / "run.duckdb")
    await store.start()
    b = Budget(usd=1.0, tokens=1_000, price_of=lambda model: PRICE)
    cover = SpendCover(store, b, session="s", max_concurrency=4)
    levels = []
    for prompt, max_tokens in [(6, 2), (10, 0), (2, 5)]:  # ($0.01, 8), ($0.01, 10), ($0.012, 7)
        r = b.reserve(f"k{prompt}", "m", prompt, max_tokens)
        await cover.cover(r.usd, r.tokens)
        levels.append((round(cover.level[0], 9), cover.level[1]))
    # 1st: targets $0.005 and 4 tokens. 2nd: the token worst case grows to 10 (target 5). 3rd: the USD one
    # grows to $0.012 (target 0.006) while the token one stays 10.
    assert levels == [(0.015, 12), (0.025, 23), (0.038, 30)]
    await store.close()


async def test_reservations_made_while_a_lower_level_is_on_its_way_are_covered_by_the_next_one(tmp_path):
    """Two levels on their way at once (a lowering queued with a settle row, then a raise): when the first
    commits, the floor is the lower of what is committed and what is still on its way."""
    from agentkd.gateway.ledger import SpendCover

    store = Store(tmp_path / "run.duckdb")
    await store.start()
    b = Budget(usd=10.0, tokens=None, price_of=lambda model: PRICE)  # band as above: low 0.0225, high 0.09
    cover = SpendCover(store, b, session="s", max_concurrency=1000)
    held = [each_call(b, i) for i in range(10)]
    await cover.cover(*held[-1][3:5])  # one level for all ten: 0.1 + 0.045
    assert round(cover.level[0], 9) == 0.145
    for r in held[:5]:
        b.release(r)
        cover.record(closing_row(r, "release"))  # the 5th leaves 0.095 unused: lowered to 0.095, on its way
    assert round(cover.level[0], 9) == 0.095 and len(cover._pending) == 1
    more = [each_call(b, 10 + i) for i in range(3)]  # exposure 0.08: less than `low` left, raise to 0.125
    tasks = [asyncio.create_task(cover.cover(r.usd, r.tokens)) for r in more]
    await asyncio.sleep(0)
    assert round(cover.level[0], 9) == 0.125 and len(cover._pending) == 2
    assert round(cover.floor[0], 9) == 0.095  # what a crash could show until the raise commits
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)  # covered at once: 0.095 >= 0.08
    await barrier(store)  # both levels commit; the done-callbacks move the floor up
    assert round(cover.floor[0], 9) == 0.125 and cover._pending == deque()
    r = each_call(b, 20)  # exposure 0.09: covered by the committed 0.125
    await cover.cover(r.usd, r.tokens)
    assert cover.writes == 3
    await store.close()


async def test_the_token_level_is_raised_and_lowered_only_when_it_leaves_its_band(tmp_path):
    """The same in tokens: cap 10,000 (1% = 100 = M), worst case 8: high 92, target 46, low 23."""
    from agentkd.gateway.ledger import SpendCover

    store = Store(tmp_path / "run.duckdb")
    await store.start()
    b = Budget(usd=None, tokens=10_000, price_of=lambda model: PRICE)
    cover = SpendCover(store, b, session="s", max_concurrency=1000)
    held, raised = [], []
    for i in range(10):
        r = each_call(b, i)
        held.append(r)
        await cover.cover(r.usd, r.tokens)
        raised.append(cover.level[1])
    assert raised == [54] * 3 + [78] * 3 + [102] * 3 + [126]
    lowered = []
    for r in held:
        b.release(r)
        cover.record(closing_row(r, "release"))
        lowered.append(cover.level[1])
    assert lowered == [126] * 5 + [78] * 5 and cover.writes == 5
    await cover.close()
    await store.close()


async def test_when_one_of_two_levels_on_their_way_commits_the_floor_is_the_lower_of_both(tmp_path, caplog):
    """A lowering's batch is being committed when a raise is queued behind it: once the lowering is
    durable, the floor is the lower of it and the raise still on its way."""
    from agentkd.gateway.ledger import SpendCover

    store = Store(tmp_path / "run.duckdb")
    await store.start()
    b = Budget(usd=10.0, tokens=None, price_of=lambda model: PRICE)
    cover = SpendCover(store, b, session="s", max_concurrency=1000)
    held = [each_call(b, i) for i in range(10)]
    await cover.cover(*held[-1][3:5])
    for r in held[:5]:
        b.release(r)
        cover.record(closing_row(r, "release"))
    lowering, lowered = cover._pending[-1][0], cover.level
    await asyncio.sleep(0)  # the writer takes the lowering's batch to its thread
    more = [each_call(b, 10 + i) for i in range(3)]
    tasks = [asyncio.create_task(cover.cover(r.usd, r.tokens)) for r in more]
    await asyncio.shield(lowering)  # meanwhile the raise is queued: a batch of its own
    raised = cover.level
    assert raised[0] > lowered[0] and len(cover._pending) == 1
    assert cover.floor == (pytest.approx(min(lowered[0], raised[0])), min(lowered[1], raised[1]))
    # The commit callback ran cleanly (asyncio logs, and otherwise swallows, an exception raised in one).
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    await asyncio.gather(*tasks)
    await barrier(store)
    assert cover.floor == (pytest.approx(raised[0]), raised[1])
    await store.close()


def test_max_concurrency_below_one_counts_as_one(tmp_path):
    from agentkd.gateway.ledger import SpendCover

    store = Store(tmp_path / "run.duckdb")
    b = Budget(usd=None, tokens=None, price_of=lambda model: PRICE)
    assert SpendCover(store, b, session="s", max_concurrency=0).max_concurrency == 1
    assert SpendCover(store, b, session="s", max_concurrency=1).max_concurrency == 1
    store.close_sync()


def test_every_session_counts_whatever_order_the_database_returns_them_in(tmp_path):
    """Three closed sessions and two interrupted ones (3 and 2 calls in flight; one whose settles passed
    its last cover, which then adds nothing)."""
    store = Store(tmp_path / "run.duckdb")
    rows = []
    for s in ("a", "b", "c"):
        rows += [{"reservation_id": f"{s}-cover1", "event": "cover", "usd": 1.0, "tokens": 100, "session": s},
                 {"reservation_id": f"{s}-0", "event": "settle", "usd": 0.1, "tokens": 10, "session": s},
                 {"reservation_id": f"{s}-close", "event": "close", "usd": 0.1, "tokens": 10, "session": s}]
    rows += [{"reservation_id": "d-cover1", "event": "cover", "usd": 1.0, "tokens": 100, "session": "d",
              "in_flight": 3},
             {"reservation_id": "d-0", "event": "settle", "usd": 0.2, "tokens": 20, "session": "d", "in_flight": 3},
             {"reservation_id": "e-cover1", "event": "cover", "usd": 0.1, "tokens": 10, "session": "e",
              "in_flight": 2},
             {"reservation_id": "e-0", "event": "settle", "usd": 0.3, "tokens": 30, "session": "e", "in_flight": 2}]
    store.append_now("reservations", rows)
    prior = prior_spend(store)
    assert prior.settled_usd == pytest.approx(0.8) and prior.settled_tokens == 80
    assert prior.unsettled_usd == pytest.approx(0.8) and prior.unsettled_tokens == 80  # d only: e's settles passed its cover
    assert prior.interrupted == 2 and prior.in_flight == 5
    store.close_sync()


@pytest.mark.parametrize("caps", [{"tokens": 16}, {"usd": 0.02}])
async def test_a_level_exactly_at_the_exposure_covers_it(tmp_path, caps):
    """A cap of exactly two worst cases: with both calls reserved the level is the exposure (no more fits
    under the cap), and that covers it: no waiting for a higher level that the cap forbids."""
    from agentkd.gateway.ledger import SpendCover

    store = Store(tmp_path / "run.duckdb")
    await store.start()
    b = Budget(usd=caps.get("usd"), tokens=caps.get("tokens"), price_of=lambda model: PRICE)
    cover = SpendCover(store, b, session="s", max_concurrency=4)
    for i in range(2):
        r = each_call(b, i)
        await asyncio.wait_for(cover.cover(r.usd, r.tokens), timeout=10)
    if "tokens" in caps:
        assert cover.level[1] == 16 == b.reserved_tokens
    else:
        assert cover.level[0] == b.reserved_usd
    await store.close()


async def test_the_level_leaves_room_for_settled_and_held_batch_requests_in_both_caps(tmp_path):
    """Caps $1 and 996 tokens. Batch request A (worst case $0.6, 600 tokens at the batch price) settles at
    its worst case; B ($0.386, 386 tokens) is still held. One online call ($0.01, 8 tokens) then gets a
    level of its exposure + target (USD 0.005, tokens 4) clamped to what the cap leaves online calls:
    $1 - 0.6 - 0.386 = $0.014 and 996 - 600 - 386 = 10 tokens. Exactly that is what a crash now counts."""
    from agentkd.gateway.budget import Usage
    from agentkd.gateway.ledger import SpendCover

    store = Store(tmp_path / "run.duckdb")
    await store.start()
    b = Budget(usd=1.0, tokens=996, price_of=lambda model: PRICE)
    cover = SpendCover(store, b, session="s", max_concurrency=4)
    a = b.hold("qa", "m", 0, 600, reservation_id="akd-s-1-000000")
    held = b.hold("qb", "m", 0, 386, reservation_id="akd-s-1-000001")
    assert a is not None and held is not None
    assert b.settle_held(a, Usage(0, 600)) == (pytest.approx(0.6), 600)
    r = each_call(b, 0)
    await cover.cover(r.usd, r.tokens)
    assert cover.level == (pytest.approx(0.014), 10)
    assert store.query("SELECT usd, tokens FROM reservations WHERE event = 'cover'") == [(pytest.approx(0.014), 10)]
    crashed = prior_spend(store)
    assert crashed.interrupted == 1
    assert (crashed.unsettled_usd, crashed.unsettled_tokens) == (pytest.approx(0.014), 10)
    await store.close()


def test_spend_text_counts_each_pending_batch_request_once_whether_adopted_or_not(tmp_path):
    """Three requests pending from an earlier session ($0.1, $0.1, $0.2; $0.3 settled before): a resumed
    session that holds one of them again (Budget.adopt) still shows $0.3 settled and all three held."""
    from agentkd.gateway.budget import Reservation

    store = Store(tmp_path / "run.duckdb")
    store.append_now("batch_requests", [
        {"batch_id": "akd-a-1", "custom_id": f"akd-a-1-00000{i}", "key": f"q{i}", "event": "queued",
         "reserved_usd": usd, "reserved_tokens": 10} for i, usd in enumerate((0.1, 0.1, 0.2))])
    store.append_now("reservations", [
        {"reservation_id": "a-0", "key": "k0", "event": "settle", "usd": 0.3, "tokens": 30, "session": "a"},
        {"reservation_id": "a-close", "event": "close", "usd": 0.3, "tokens": 30, "session": "a"}])
    prior = prior_spend(store)
    assert (prior.batch_usd, prior.batch_tokens, prior.batch_requests) == (pytest.approx(0.4), 30, 3)
    budget = Budget(usd=2.0, tokens=None, price_of=lambda model: PRICE)
    budget.restore(usd=prior.usd, tokens=prior.tokens)
    assert spend_text(budget, prior) == "$0.3000 + $0.4000 held for 3 batch requests of $2"
    budget.adopt(Reservation("akd-a-1-000000", "q0", "m", 0.1, 10))
    assert spend_text(budget, prior) == "$0.3000 + $0.4000 held for 3 batch requests of $2"
    assert spend_text(budget, prior, short=True) == "$0.3000 +$0.4000 batch/$2"
    store.close_sync()


def test_spend_text_names_one_held_batch_request_in_the_singular():
    budget = Budget(usd=None, tokens=None, price_of=lambda model: PRICE)
    held = budget.hold("q", "m", 0, 100, reservation_id="akd-s-1-000000")  # $0.1 at the batch price
    assert held is not None
    assert spend_text(budget, PriorSpend()) == "$0.0000 + $0.1000 held for 1 batch request"
    budget.hold("q2", "m", 0, 100, reservation_id="akd-s-1-000001")
    assert spend_text(budget, PriorSpend()) == "$0.0000 + $0.2000 held for 2 batch requests"
