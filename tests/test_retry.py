"""Retry decisions are pure functions of the failed attempt (RELIABILITY.md 1-3, 7)."""

from __future__ import annotations

import email.utils
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentkd.config import LimitsSection
from agentkd.retry import Deferred, is_retryable, parse_duration, retry_after_seconds, wait_before_retry
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
