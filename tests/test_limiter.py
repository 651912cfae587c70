"""The limiter paces to the ceiling, follows announced limits and pauses everyone after a 429."""

from __future__ import annotations

import asyncio

from agentkd.config import LimitsSection
from agentkd.gateway.limiter import SAFETY, Limiter, Slots
from tests.gateway_fakes import FakeClock


async def run_requests(limiter: Limiter, clock: FakeClock, n: int, tokens=(10, 10)) -> list[float]:
    admitted = []

    async def one():
        await limiter.acquire(*tokens)
        admitted.append(clock())
        limiter.release()

    await asyncio.gather(*(one() for _ in range(n)))
    return admitted


async def test_requests_per_minute_are_paced_to_the_ceiling():
    clock = FakeClock()
    limiter = Limiter(LimitsSection(rpm=600), clock=clock, sleep=clock.sleep)
    times = await run_requests(limiter, clock, 310)
    elapsed = times[-1] - times[0]
    # 10/s with about one second of burst up front: 310 requests take ~30 s.
    rate = (len(times) - 10 * SAFETY) / elapsed
    assert 10 * SAFETY * 0.99 <= rate <= 10 * 1.001


async def test_token_limit_binds_when_requests_are_large():
    clock = FakeClock()
    limiter = Limiter(LimitsSection(rpm=6000, tpm=60_000), clock=clock, sleep=clock.sleep)
    times = await run_requests(limiter, clock, 101, tokens=(400, 600))  # 1,000 tokens each: 1/s
    assert 95 <= times[-1] - times[0] <= 102


async def test_announced_limits_are_followed_when_lower():
    clock = FakeClock()
    limiter = Limiter(LimitsSection(rpm=6000), clock=clock, sleep=clock.sleep)
    limiter.observe({"x-ratelimit-limit-requests": "60"})
    times = await run_requests(limiter, clock, 31)
    assert times[-1] - times[0] >= 29


async def test_rate_limit_pauses_every_task():
    clock = FakeClock()
    limiter = Limiter(LimitsSection(), clock=clock, sleep=clock.sleep)
    start = clock()
    limiter.on_rate_limited(5.0)
    times = await run_requests(limiter, clock, 3)
    assert all(t >= start + 5.0 for t in times)
    assert limiter.factor < 1.0


async def test_concurrency_is_capped():
    limiter = Limiter(LimitsSection(max_concurrency=3))
    active = peak = 0

    async def one():
        nonlocal active, peak
        await limiter.acquire(1, 1)
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.001)
        active -= 1
        limiter.release()

    await asyncio.gather(*(one() for _ in range(20)))
    assert peak == 3


async def test_slots_are_handed_over_in_arrival_order_and_a_cancelled_waiter_loses_none():
    slots = Slots(2)
    order: list[int] = []
    held = peak = 0

    async def one(i: int, hold: float) -> None:
        nonlocal held, peak
        await slots.acquire()
        held += 1
        peak = max(peak, held)
        order.append(i)
        await asyncio.sleep(hold)
        held -= 1
        slots.release()

    tasks = [asyncio.create_task(one(i, 0.002)) for i in range(8)]
    await asyncio.sleep(0)  # 0 and 1 hold the slots; 2..7 wait in arrival order
    tasks[3].cancel()  # a waiter leaves the queue before its turn
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 2, 4, 5, 6, 7] and peak == 2
    assert slots.free == 2  # every slot came back, none lost to the cancelled waiter
    await slots.acquire()
    await slots.acquire()
    assert slots.free == 0


async def test_a_waiter_cancelled_after_being_handed_a_slot_passes_it_on():
    slots = Slots(1)
    await slots.acquire()
    first = asyncio.create_task(slots.acquire())
    second = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)  # both wait
    slots.release()  # the slot goes to `first`, which has not run yet ...
    first.cancel()  # ... and is cancelled before it does: `second` gets the slot
    await asyncio.sleep(0)
    await asyncio.wait_for(second, 1.0)
    assert first.cancelled() and slots.free == 0
    slots.release()
    assert slots.free == 1


async def test_without_configured_limits_the_first_request_goes_alone():
    limiter = Limiter(LimitsSection(max_concurrency=8))
    order: list[str] = []

    async def one(name: str, first: bool = False):
        await limiter.acquire(1, 1)
        order.append(f"start {name}")
        await asyncio.sleep(0.01 if first else 0)
        if first:
            limiter.release()
            limiter.observe({"x-ratelimit-limit-requests": "6000"})
        else:
            limiter.release()
        order.append(f"end {name}")

    await asyncio.gather(one("probe", first=True), *(one(str(i)) for i in range(3)))
    assert order[:2] == ["start probe", "end probe"]  # nobody else was admitted while the probe flew
    assert limiter.buckets["requests"].per_minute is not None  # and its headers set the pace
