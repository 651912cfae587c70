"""Provider-style rate limits for the simulated teacher: continuously refilled token buckets and their headers.

Each limit (requests/min, tokens/min) is a bucket refilled at limit/60 per second whose capacity is about
one second of the limit, so no client beats the ceiling over any window longer than a few seconds. Two
floors keep it from deadlocking: capacity is at least one request, and a request whose token cost is
above the capacity is admitted once the bucket is full, leaving it in debt (so the long-run rate still
holds). A request costing more than the whole per-minute limit can never fit and is refused with a 400.
A rejected request takes nothing from either bucket.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

# Header value for a limit that is not configured: a nominal ceiling nobody reaches.
UNLIMITED = 1_000_000_000


class TokenBucket:
    """One limit; `per_minute` None means unlimited."""

    def __init__(self, per_minute: int | None, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self.rate = per_minute / 60.0 if per_minute else math.inf
        self.capacity = max(self.rate, 1.0) if per_minute else math.inf
        self.level = self.capacity
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        if self.per_minute:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, cost: float) -> float:
        """Seconds until cost can be admitted (0.0: now)."""
        self._refill()
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, cost: float) -> None:
        if self.per_minute:
            self.level -= cost

    def remaining(self) -> int:
        return UNLIMITED if not self.per_minute else max(0, int(self.level))

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return 0.0 if not self.per_minute else max(0.0, (self.capacity - self.level) / self.rate)


@dataclass
class Admission:
    ok: bool
    retry_after_s: float = 0.0
    limited: str = ""  # "requests" or "tokens" when refused
    too_large: bool = False


class RateLimiter:
    """The sim's requests/min and tokens/min buckets, checked together, debited only on admission."""

    def __init__(self, rpm: int | None, tpm: int | None, clock: Callable[[], float] = time.monotonic):
        self.requests = TokenBucket(rpm, clock)
        self.tokens = TokenBucket(tpm, clock)

    def admit(self, token_cost: int) -> Admission:
        if self.tokens.per_minute and token_cost > self.tokens.per_minute:
            return Admission(False, limited="tokens", too_large=True)
        wait_requests = self.requests.wait_for(1)
        wait_tokens = self.tokens.wait_for(token_cost)
        if wait_requests or wait_tokens:
            limited = "requests" if wait_requests >= wait_tokens else "tokens"
            return Admission(False, max(wait_requests, wait_tokens), limited)
        self.requests.take(1)
        self.tokens.take(token_cost)
        return Admission(True)

    def headers(self) -> dict[str, str]:
        """OpenAI x-ratelimit-* and Anthropic anthropic-ratelimit-* headers for the current state."""
        req, tok = self.requests, self.tokens
        req_limit = str(req.per_minute or UNLIMITED)
        tok_limit = str(tok.per_minute or UNLIMITED)
        req_left, tok_left = str(req.remaining()), str(tok.remaining())
        req_reset, tok_reset = req.reset_s(), tok.reset_s()
        now = datetime.now(UTC)
        req_at, tok_at = _rfc3339(now, req_reset), _rfc3339(now, tok_reset)
        headers = {
            "x-ratelimit-limit-requests": req_limit,
            "x-ratelimit-remaining-requests": req_left,
            "x-ratelimit-reset-requests": duration(req_reset),
            "x-ratelimit-limit-tokens": tok_limit,
            "x-ratelimit-remaining-tokens": tok_left,
            "x-ratelimit-reset-tokens": duration(tok_reset),
            "anthropic-ratelimit-requests-limit": req_limit,
            "anthropic-ratelimit-requests-remaining": req_left,
            "anthropic-ratelimit-requests-reset": req_at,
        }
        # The sim has one combined token bucket; the input/output headers mirror it.
        for name in ("tokens", "input-tokens", "output-tokens"):
            headers[f"anthropic-ratelimit-{name}-limit"] = tok_limit
            headers[f"anthropic-ratelimit-{name}-remaining"] = tok_left
            headers[f"anthropic-ratelimit-{name}-reset"] = tok_at
        return headers


def duration(seconds: float) -> str:
    """OpenAI reset style: "120ms", "1s", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"


def _rfc3339(now: datetime, seconds: float) -> str:
    return _format_second(math.ceil((now + timedelta(seconds=seconds)).timestamp()))


@functools.lru_cache(maxsize=64)
def _format_second(epoch: int) -> str:
    # strftime costs more than the rest of the headers; within one second the value repeats.
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def retry_after_headers(seconds: float) -> dict[str, str]:
    return {"retry-after": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, math.ceil(seconds * 1000)))}
