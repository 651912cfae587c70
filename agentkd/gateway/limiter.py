"""Client-side rate limits: requests/min, tokens/min (total, input, output) and max concurrency.

Seeded from [limits]; when a provider's headers announce its limits (x-ratelimit-limit-*,
anthropic-ratelimit-*-limit) the limiter follows the lower of the two. Buckets refill continuously and
hold about one second of the rate, like the providers' own, so pacing is smooth rather than bursty.
After a 429 the whole gateway pauses for what the provider asked and slows a little, instead of each
task guessing a fixed pause. Clock and sleep are injected: tests never wait on the wall clock.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

from agentkd.config import LimitsSection

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Pace a little under the announced ceiling: arrival jitter at the provider would otherwise turn the
# last percent of throughput into 429s.
SAFETY = 0.985
SLOWDOWN = 0.9  # rate factor applied per 429 (at most once per second)
RECOVERY = 0.002  # rate factor regained per success, up to 1
MIN_FACTOR = 0.5


class TokenBucket:
    """Continuous refill at `rate`/s, capacity about one second of rate; may go into debt."""

    __slots__ = ("per_minute", "rate", "capacity", "level", "stamp")

    def __init__(self, per_minute: float | None, now: float) -> None:
        self.set_pace(per_minute)
        self.level = self.capacity
        self.stamp = now

    def set_pace(self, per_minute: float | None) -> None:
        self.per_minute = per_minute
        self.rate = (per_minute or 0.0) / 60.0
        self.capacity = max(self.rate, 1.0)

    def refill(self, now: float, factor: float) -> None:
        if self.per_minute is not None:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate * factor)
        self.stamp = now

    def wait(self, amount: float, factor: float) -> float:
        """Seconds until `amount` may be taken (an amount above capacity waits for a full bucket)."""
        if self.per_minute is None:
            return 0.0
        need = min(amount, self.capacity) - self.level
        # Below a microsecond's refill, float rounding could otherwise spin the loop forever.
        return 0.0 if need <= 1e-6 * self.rate else need / (self.rate * factor)

    def take(self, amount: float) -> None:
        if self.per_minute is not None:
            self.level -= amount


class Slots:
    """Concurrency slots, FIFO: a release hands its slot straight to the first waiter.

    asyncio.Semaphore (3.11) leaves a woken waiter in its queue until that task runs, so every release
    scans past the ones woken earlier in the same loop turn: with 4 items per slot waiting and dozens of
    replies arriving per turn, ~35 futures checked per release (benchmarks/gateway_overhead.py). Here a
    woken waiter leaves the queue as it is woken.
    """

    __slots__ = ("free", "_waiters")

    def __init__(self, count: int) -> None:
        self.free = count
        self._waiters: deque[asyncio.Future] = deque()

    async def acquire(self) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, then cancelled before it ran: pass the slot on
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled waiter is skipped
                waiter.set_result(None)
                return
        self.free += 1


class Limiter:
    def __init__(self, limits: LimitsSection, *, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self._configured = {
            "requests": limits.rpm, "tokens": limits.tpm,
            "input_tokens": limits.input_tpm, "output_tokens": limits.output_tpm,
        }
        self.buckets = {name: TokenBucket(_paced(value), now) for name, value in self._configured.items()}
        self._limited: list[tuple[int, TokenBucket]] = []  # (index into _costs, bucket) with a rate to keep
        self._find_limited()
        self._slots = Slots(limits.max_concurrency)
        self.in_flight = 0  # slots held: requests being sent or answered
        self.max_in_flight = 0
        self._order = asyncio.Lock()  # FIFO: waiters are admitted in arrival order
        self._queued = 0  # tasks in or waiting for `_order`: while any are, nobody takes the fast path
        self.paused_until = 0.0
        self.factor = 1.0
        self._last_slowdown = -1e9
        self.rate_limited = 0
        self._announced_raw: tuple[str | None, ...] = (None,) * len(ANNOUNCING_HEADERS)
        self.input_ratio = 1.0  # provider-counted / estimated input tokens, learned from usage
        # With no limit configured, the first request goes alone: its reply's headers announce the
        # limits, and a blind burst of max_concurrency requests would be answered with 429s.
        self._probing = not any(v is not None for v in self._configured.values())
        self._probe_sent = False
        self._probe_done = asyncio.Event()

    async def acquire(self, input_tokens: int, output_tokens: int) -> None:
        """Wait for a concurrency slot and room in every bucket, then take it."""
        await self._slots.acquire()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self._probing:
                if self._probe_sent:
                    await self._probe_done.wait()
                else:
                    self._probe_sent = True
            # Nobody waiting and no pause: take room now if every bucket has it, without the queue.
            if not self._queued and self.paused_until <= (now := self._clock()):
                if self._unlimited or self._take_if_room(now, self._costs(input_tokens, output_tokens)):
                    return
            self._queued += 1
            try:
                async with self._order:
                    costs = self._costs(input_tokens, output_tokens)
                    while True:
                        now = self._clock()
                        wait = max(self.paused_until - now, self._refill_and_wait(now, costs))
                        if wait <= 0:
                            self._take(costs)
                            return
                        await self._sleep(wait)
            finally:
                self._queued -= 1
        except BaseException:
            self.in_flight -= 1
            self._slots.release()
            raise

    def _take_if_room(self, now: float, costs: tuple[float, ...]) -> bool:
        if self._refill_and_wait(now, costs) > 0:
            return False
        self._take(costs)
        return True

    def _refill_and_wait(self, now: float, costs: tuple[float, ...]) -> float:
        """Refill every bucket; the longest any of them needs before `costs` may be taken."""
        wait = 0.0
        for index, bucket in self._limited:
            bucket.refill(now, self.factor)
            wait = max(wait, bucket.wait(costs[index], self.factor))
        return wait

    def _take(self, costs: tuple[float, ...]) -> None:
        for index, bucket in self._limited:
            bucket.take(costs[index])

    def _find_limited(self) -> None:
        self._limited = [(index, bucket) for index, bucket in enumerate(self.buckets.values())
                         if bucket.per_minute is not None]
        self._unlimited = not self._limited  # no rate to keep: only the concurrency slot matters

    def release(self) -> None:
        self.in_flight -= 1
        self._slots.release()
        if self._probing:  # the probe's attempt is over (headers or not): everyone may go
            self._probing = False
            self._probe_done.set()

    def _costs(self, input_tokens: int, output_tokens: int) -> tuple[float, ...]:
        """What one request takes from each bucket, in the order of `buckets`."""
        scaled_input = input_tokens * self.input_ratio
        return 1.0, scaled_input + output_tokens, scaled_input, float(output_tokens)

    def observe(self, headers: Mapping[str, str], *, estimated_input: int | None = None,
                actual_input: int | None = None) -> None:
        """Follow the limits a provider announces; learn how our input estimate compares to its count."""
        announced_raw = tuple(headers.get(name) for name in ANNOUNCING_HEADERS)
        if announced_raw != self._announced_raw:  # providers repeat the same limits on every reply
            self._announced_raw = announced_raw
            self._follow_announced(headers)
        if estimated_input and actual_input:
            self.input_ratio = 0.9 * self.input_ratio + 0.1 * (actual_input / estimated_input)
        if self.factor < 1.0:
            self.factor = min(1.0, self.factor + RECOVERY)

    def _follow_announced(self, headers: Mapping[str, str]) -> None:
        for name, header_names in LIMIT_HEADERS.items():
            announced = _first_number(headers, header_names)
            if announced is None or announced <= 0:
                continue
            configured = self._configured[name]
            ceiling = announced if configured is None else min(configured, announced)
            bucket = self.buckets[name]
            if bucket.per_minute != _paced(ceiling):
                bucket.set_pace(_paced(ceiling))
                self._find_limited()

    def on_rate_limited(self, wait_s: float) -> None:
        """A 429: hold every task for wait_s and slow the pace a little."""
        now = self._clock()
        self.rate_limited += 1
        self.paused_until = max(self.paused_until, now + wait_s)
        if now - self._last_slowdown >= 1.0:
            self.factor = max(MIN_FACTOR, self.factor * SLOWDOWN)
            self._last_slowdown = now
        for bucket in self.buckets.values():
            bucket.level = min(bucket.level, 0.0)


def _paced(per_minute: float | None) -> float | None:
    return None if per_minute is None else per_minute * SAFETY


# Limits are announced per minute by OpenAI (x-ratelimit-limit-*) and Anthropic (anthropic-ratelimit-*).
LIMIT_HEADERS: dict[str, tuple[str, ...]] = {
    "requests": ("x-ratelimit-limit-requests", "anthropic-ratelimit-requests-limit"),
    "tokens": ("x-ratelimit-limit-tokens", "anthropic-ratelimit-tokens-limit"),
    "input_tokens": ("anthropic-ratelimit-input-tokens-limit",),
    "output_tokens": ("anthropic-ratelimit-output-tokens-limit",),
}

ANNOUNCING_HEADERS = tuple(name for names in LIMIT_HEADERS.values() for name in names)


def _first_number(headers: Mapping[str, str], names: tuple[str, ...]) -> float | None:
    for name in names:
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        if value == value and value not in (float("inf"), float("-inf")):
            return value
    return None
