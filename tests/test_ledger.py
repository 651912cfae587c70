"""The spend cover (ledger.py): what a crash leaves counted follows the calls in flight, not max_concurrency."""

from __future__ import annotations

import asyncio

import pytest

from agentkd.budget import Budget
from agentkd.config import LimitsSection, PriceSection
from agentkd.gateway import Gateway
from agentkd.ledger import PriorSpend, prior_spend, resume_note, spend_text, spent_in_store
from agentkd.store import Store
from agentkd.teachers.base import TeacherReply, TeacherRequest
from agentkd.tokens import estimate_prompt
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
