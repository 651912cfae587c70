"""Faults of the simulated teacher: error bodies in each wire format, scripted faults and random ones.

Script items (POST /_script {"faults": [...]}, applied in order to the next model requests):
  {"status": 400|401|403|404|422|429|500|503|529, "headers": {...}, "code": "insufficient_quota"}
      an error reply at once (headers copied verbatim; "code" only matters for 429);
  {"kind": "slow", "seconds": s}  reply normally after s seconds;
  {"kind": "drop"}       send headers and part of the body, then abort the connection;
  {"kind": "truncated"}  200 whose JSON body is cut off;
  {"kind": "html"}       200 text/html page (a proxy in the way), not billed;
  {"kind": "no_usage"} / {"kind": "no_choices"}  200 JSON without usage / without choices (content);
  {"kind": "length"}     the reply cut at half its tokens, finish_reason length / stop_reason max_tokens.
A 429 with code insufficient_quota is OpenAI's quota error; Anthropic signals an exhausted balance with
a 400 invalid_request_error about the credit balance, which is what the sim sends on /v1/messages.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from agentkd.config import SimSection

STATUSES = (400, 401, 403, 404, 422, 429, 500, 503, 529)
KINDS = ("slow", "drop", "truncated", "html", "no_usage", "no_choices", "length")

_OPENAI_TYPES = {
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"), 422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"), 500: ("server_error", None), 503: ("server_error", None),
    529: ("overloaded_error", "overloaded"),
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error", 500: "api_error",
    503: "api_error", 529: "overloaded_error",
}
_MESSAGES = {
    400: "The request is invalid.", 401: "Incorrect API key provided.", 403: "Access denied.",
    404: "The model does not exist.", 413: "Request too large.", 422: "The request could not be processed.",
    429: "Rate limit reached for requests.", 500: "The simulated teacher had an internal error.",
    503: "The simulated teacher is temporarily unavailable.", 529: "The simulated teacher is overloaded.",
}
HTML_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"


def error_body(api: str, status: int, message: str | None = None, *, code: str | None = None,
               error_type: str | None = None) -> dict[str, Any]:
    """An error body in the endpoint's format: api is "openai" or "anthropic"."""
    message = message or _MESSAGES.get(status, "Error.")
    if api == "anthropic":
        return {"type": "error", "error": {"type": error_type or _ANTHROPIC_TYPES.get(status, "api_error"),
                                           "message": message}}
    default_type, default_code = _OPENAI_TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": error_type or default_type, "code": code or default_code,
                      "param": None}}


def quota_error(api: str) -> tuple[int, dict[str, Any]]:
    """The provider's "out of money" error: never a rate limit, never worth retrying."""
    if api == "anthropic":
        message = "Your credit balance is too low to access the Anthropic API (simulated teacher)."
        return 400, error_body(api, 400, message, error_type="invalid_request_error")
    message = "You exceeded your current quota, please check your plan and billing details (simulated teacher)."
    return 429, error_body(api, 429, message, code="insufficient_quota", error_type="insufficient_quota")


@dataclass(frozen=True)
class Fault:
    """One fault: an error status, or a kind applied to an otherwise normal reply."""

    status: int | None = None
    kind: str | None = None
    seconds: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    code: str | None = None


def parse_script(items: Any) -> list[Fault]:
    """Validate a /_script body's "faults" list; raises ValueError naming the bad item."""
    if not isinstance(items, list):
        raise ValueError('"faults" must be a list')
    faults = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"faults[{index}]: must be an object")
        status, kind = item.get("status"), item.get("kind")
        headers = item.get("headers") or {}
        if not isinstance(headers, dict):
            raise ValueError(f"faults[{index}].headers: must be an object")
        if status is not None and status not in STATUSES:
            raise ValueError(f"faults[{index}].status: one of {STATUSES}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"faults[{index}].kind: one of {KINDS}")
        if (status is None) == (kind is None):
            raise ValueError(f"faults[{index}]: give exactly one of status or kind")
        seconds = float(item.get("seconds", 0.0))
        faults.append(Fault(status, kind, seconds, {str(k): str(v) for k, v in headers.items()},
                            item.get("code")))
    return faults


def random_fault(settings: SimSection, rng: random.Random) -> Fault | None:
    """Draw at most one fault by the rates in settings (one uniform draw over the cumulative rates)."""
    draw = rng.random()
    for rate, fault in (
        (settings.fault_500, Fault(status=500)),
        (settings.fault_503, Fault(status=503)),
        (settings.fault_529, Fault(status=529)),
        (settings.fault_slow_read, Fault(kind="slow", seconds=settings.slow_read_s)),
        (settings.fault_drop, Fault(kind="drop")),
        (settings.fault_truncated, Fault(kind="truncated")),
    ):
        if draw < rate:
            return fault
        draw -= rate
    return None


def dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
