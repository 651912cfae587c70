"""Retry decisions are pure functions of the failed attempt (RELIABILITY.md 1-3, 7)."""

from __future__ import annotations

import email.utils
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentkd.config import LimitsSection
from agentkd.gateway.retry import Deferred, is_retryable, parse_duration, retry_after_seconds, wait_before_retry
from agentkd.teachers.base import (
    AuthError, BadRequest, ConnectFailed, IncompleteResponse, MalformedResponse, Overloaded,
    QuotaExceeded, RateLimited, ReadTimeout, ServerError, error_for_status,
)

LIMITS = LimitsSection(backoff_base_s=0.5, backoff_max_s=30, max_wait_s=120)


@pytest.mark.parametrize("headers, expected", [
    ({"retry-after": "3"}, 3.0),
    ({"retry-after-ms": "1500"}, 1.5),
    ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer header wins
    ({"retry-after": "inf"}, None),
    ({"retry-after": "nan"}, None),
    ({"retry-after": "-10"}, None),
    ({"retry-after": "soon, maybe"}, None),
    ({"retry-after-ms": "junk", "retry-after": "2"}, 2.0),
    ({"x-ratelimit-reset-requests": "6m0s"}, 360.0),
    ({"x-ratelimit-reset-tokens": "120ms", "x-ratelimit-reset-requests": "1s"}, 1.0),
    ({}, None),
])
def test_retry_after_headers(headers, expected):
    assert retry_after_seconds(headers) == expected


def test_retry_after_http_date():
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 7, usegmt=True)
    assert retry_after_seconds({"retry-after": header}, now=now) == pytest.approx(7.0, abs=1.0)


@given(st.text(max_size=30))
def test_duration_parser_never_raises(value):
    result = parse_duration(value)
    assert result is None or 0 <= result <= 24 * 3600


def test_sane_header_sets_the_wait_and_insane_falls_back_to_jitter():
    rng = random.Random(0)
    assert wait_before_retry(RateLimited("429", headers={"retry-after": "3"}), 1, LIMITS, rng) == 3.0
    for attempt in range(1, 8):
        wait = wait_before_retry(ServerError("500", headers={"retry-after": "nan"}), attempt, LIMITS, rng)
        assert 0 <= wait <= min(30, 0.5 * 2 ** (attempt - 1))


def test_a_wait_longer_than_max_wait_defers():
    with pytest.raises(Deferred) as deferred:
        wait_before_retry(RateLimited("429", headers={"retry-after": "600"}), 1, LIMITS, random.Random(0))
    assert deferred.value.wait_s == 600


@pytest.mark.parametrize("status, body, headers, cls", [
    (429, '{"error": {"type": "insufficient_quota", "code": "insufficient_quota"}}', {}, QuotaExceeded),
    (429, '{"error": {"message": "Rate limit reached"}}', {}, RateLimited),
    (400, '{"error": {"message": "Your credit balance is too low"}}', {}, QuotaExceeded),
    (401, "{}", {}, AuthError), (403, "{}", {}, AuthError),
    (400, "{}", {}, BadRequest), (404, "{}", {}, BadRequest), (422, "{}", {}, BadRequest),
    (500, "{}", {}, ServerError), (503, "{}", {}, Overloaded), (529, "{}", {}, Overloaded),
    (408, "{}", {}, ServerError), (409, "{}", {}, ServerError),
    (500, "{}", {"x-should-retry": "false"}, BadRequest),
])
def test_status_mapping(status, body, headers, cls):
    assert type(error_for_status(status, body, headers)) is cls


def test_what_is_retried():
    retried = [RateLimited("x"), Overloaded("x"), ServerError("x"), ConnectFailed("x"), ReadTimeout("x"),
               MalformedResponse("x")]
    never = [QuotaExceeded("x"), AuthError("x"), BadRequest("x"), IncompleteResponse("x"), ValueError("x")]
    assert all(is_retryable(e) for e in retried)
    assert not any(is_retryable(e) for e in never)


@pytest.mark.parametrize("value, expected", [
    ("1h2m3.5s", 3723.5), ("6m0s", 360.0), ("250ms", 0.25), ("1m250ms", 60.25), ("2", 2.0), (" 1.5 ", 1.5),
    ("0", 0.0), ("86400", 86400.0), ("86401", None), ("24h0m1s", None), ("", None), ("m", None), ("1x", None),
])
def test_reset_durations(value, expected):
    assert parse_duration(value) == expected


@pytest.mark.parametrize("headers, expected", [
    ({"retry-after": "0"}, 0.0),  # "now" is a sane wait
    ({"retry-after": "86400"}, 86400.0), ({"retry-after": "86400.5"}, None),  # a day at most
    ({"retry-after-ms": "0"}, 0.0), ({"retry-after-ms": "-1", "retry-after": "4"}, 4.0),
    ({"retry-after": "junk", "x-ratelimit-reset-requests": "2s"}, 2.0),
    ({"x-ratelimit-reset-tokens": "junk"}, None), ({"x-ratelimit-reset-tokens": "3s"}, 3.0),
])
def test_retry_after_bounds_and_fallbacks(headers, expected):
    assert retry_after_seconds(headers) == expected


def test_retry_after_http_date_in_the_past_is_now_and_without_a_zone_is_ignored():
    now = 1_700_000_000.0
    assert retry_after_seconds({"retry-after": email.utils.formatdate(now - 60, usegmt=True)}, now=now) == 0.0
    assert retry_after_seconds({"retry-after": "Tue, 14 Nov 2023 22:13:20 -0000"}, now=now) is None  # naive
    # Without an injected now, the wall clock is the reference.
    import time

    wait = retry_after_seconds({"retry-after": email.utils.formatdate(time.time() + 100, usegmt=True)})
    assert 95 <= wait <= 101


def test_full_jitter_draws_uniformly_below_the_capped_exponential():
    from agentkd.gateway.retry import full_jitter

    limits = LimitsSection(backoff_base_s=0.5, backoff_max_s=3.0, max_wait_s=120)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        assert full_jitter(attempt, limits, random.Random(attempt)) == random.Random(attempt).uniform(0.0, ceiling)


def test_a_429_without_a_hint_waits_at_least_the_base_and_other_errors_the_jitter():
    limits = LimitsSection(backoff_base_s=0.5, backoff_max_s=30, max_wait_s=120)
    jitter = random.Random(3).uniform(0.0, 0.5)
    assert wait_before_retry(RateLimited("429"), 1, limits, random.Random(3)) == 0.5
    assert wait_before_retry(ServerError("500"), 1, limits, random.Random(3)) == jitter < 0.5
    # A 429 that names its wait gets exactly that, even below the base.
    assert wait_before_retry(RateLimited("429", headers={"retry-after-ms": "100"}), 1, limits, random.Random(3)) == 0.1


def test_a_wait_of_exactly_max_wait_is_waited_and_one_past_it_defers():
    limits = LimitsSection(backoff_base_s=0.5, backoff_max_s=30, max_wait_s=120)
    assert wait_before_retry(ServerError("503", headers={"retry-after": "120"}), 1, limits, random.Random(0)) == 120
    with pytest.raises(Deferred) as deferred:
        wait_before_retry(ServerError("503", headers={"retry-after": "121"}), 1, limits, random.Random(0))
    assert deferred.value.wait_s == 121 and deferred.value.cause.status is None
    assert str(deferred.value) == "provider asked to wait 121 s; item deferred (ServerError)"
