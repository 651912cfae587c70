"""The retry policy: pure functions of the failed attempt, assembled into one tenacity loop.

Retried: 408/409/429/5xx/529, connection failures, timeouts, broken bodies (RELIABILITY.md 1-13).
Never retried: quota or spend-limit errors, auth, 400/404/422, x-should-retry: false, 200s without
usage. The wait honours retry-after-ms, Retry-After (seconds or an HTTP date) and the providers'
reset headers when they are sane, and is full-jitter exponential backoff otherwise.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from agentkd.config import LimitsSection
from agentkd.teachers.base import RateLimited, TeacherError

MAX_SANE_WAIT_S = 24 * 3600.0
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$")


class Deferred(Exception):
    """The provider asked for a wait longer than limits.max_wait_s: put the item back, free the slot."""

    def __init__(self, wait_s: float, cause: TeacherError) -> None:
        super().__init__(f"provider asked to wait {wait_s:.0f} s; item deferred ({cause.error_class})")
        self.wait_s = wait_s
        self.cause = cause


def _sane(seconds: float) -> float | None:
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0 or seconds > MAX_SANE_WAIT_S:
        return None
    return seconds


def parse_duration(value: str) -> float | None:
    """OpenAI reset headers: "1s", "120ms", "6m0s", "1h2m3.5s"; also a bare number of seconds."""
    value = value.strip()
    try:
        return _sane(float(value))
    except ValueError:
        pass
    match = _DURATION.match(value)
    if not value or not match or not any(match.groups()):
        return None
    h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
    return _sane(h * 3600 + m * 60 + s + ms / 1000)


def retry_after_seconds(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The wait a provider asked for, or None when it asked for nothing sane (junk, inf, nan, -10)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            wait = _sane(float(raw_ms) / 1000)
        except ValueError:
            wait = None
        if wait is not None:
            return wait
    raw = headers.get("retry-after")
    if raw is not None:
        try:
            return _sane(float(raw))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None and when.tzinfo is not None:
            return _sane(max(0.0, when.timestamp() - (time.time() if now is None else now)))
    resets = [parse_duration(headers[h]) for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
              if h in headers]
    resets = [r for r in resets if r is not None]
    return max(resets) if resets else None


def full_jitter(attempt: int, limits: LimitsSection, rng: random.Random) -> float:
    """AWS 'full jitter': uniform(0, min(cap, base * 2**(attempt-1)))."""
    return rng.uniform(0.0, min(limits.backoff_max_s, limits.backoff_base_s * 2 ** (attempt - 1)))


def wait_before_retry(error: TeacherError, attempt: int, limits: LimitsSection, rng: random.Random) -> float:
    """Seconds to wait after `attempt` failed with `error`; raises Deferred when that is too long."""
    asked = retry_after_seconds(error.headers)
    wait = asked if asked is not None else full_jitter(attempt, limits, rng)
    if isinstance(error, RateLimited) and asked is None:
        wait = max(wait, limits.backoff_base_s)  # a 429 with no hint still needs a real pause
    if wait > limits.max_wait_s:
        raise Deferred(wait, error)
    return wait


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, TeacherError) and error.retryable


def retrying(limits: LimitsSection, *, sleep: Callable[[float], Awaitable[None]], rng: random.Random,
             on_wait: Callable[[TeacherError, float], None] | None = None) -> AsyncRetrying:
    """One tenacity loop per request, built from [limits]; `sleep` is injected (tests record it)."""

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        assert isinstance(error, TeacherError)
        seconds = wait_before_retry(error, state.attempt_number, limits, rng)
        if on_wait is not None:
            on_wait(error, seconds)
        return seconds

    return AsyncRetrying(
        stop=stop_after_attempt(limits.max_attempts),
        wait=wait,
        retry=retry_if_exception(is_retryable),
        sleep=sleep,
        reraise=True,
    )
