"""What a teacher call is: the request, the reply, the Teacher protocol, and one error tree.

Adapters translate a TeacherRequest into one provider's wire format and map every failure onto the
errors below exactly once; the gateway decides on retries, billing and storage from these types alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


# json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False), built once: json.dumps with
# arguments builds a fresh JSONEncoder on every call. The same encoder, so the same text and the same keys.
_canonical_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


class computed_once:
    """functools.cached_property without the lock Python 3.11 takes on every first access
    (gh-87634); the gateway reads a fresh request's key on every call."""

    def __init__(self, compute: Callable[[Any], Any]) -> None:
        self.compute = compute
        self.name = compute.__name__
        self.__doc__ = compute.__doc__

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.compute(instance)  # later reads skip the descriptor
        return value


@dataclass(frozen=True)
class TeacherRequest:
    role: str
    provider: str
    model: str
    messages: tuple[dict[str, str], ...]  # [{"role": "system"|"user"|"assistant", "content": str}]
    temperature: float
    max_tokens: int
    prompt_version: str = ""
    top_logprobs: int = 0
    response_format: dict[str, Any] | None = None  # {"name", "schema"}, where the provider supports it
    sample: int = 0  # a fresh draw of the same prompt (e.g. re-asking after an unparseable reply)
    # How it is bought, not what it asks: outside canonical(), so an answer bought online serves a batch
    # request for the same prompt and the other way round.
    mode: str = "online"  # "online" | "batch"
    prompt_cache: bool = False  # ask the provider to cache the fixed prefix (the system prompt)

    def canonical(self) -> dict[str, Any]:
        """What identifies the request: never the API key or the base URL."""
        return {
            "provider": self.provider,
            "model": self.model,
            "messages": [dict(m) for m in self.messages],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_logprobs": self.top_logprobs,
            "response_format": self.response_format,
            "prompt_version": self.prompt_version,
            "sample": self.sample,
        }

    @computed_once
    def canonical_json(self) -> str:
        """The canonical request as compact JSON with sorted keys: what the key hashes and the store keeps."""
        return _canonical_encode(self.canonical())

    @computed_once
    def key(self) -> str:
        """sha256 of the canonical request: the cache and never-pay-twice key."""
        return hashlib.sha256(self.canonical_json.encode("utf-8")).hexdigest()

    def text(self) -> str:
        return "\n".join(m["content"] for m in self.messages)


@dataclass
class TeacherReply:
    text: str
    finish_reason: str  # normalised: "stop" | "length" | provider's own word otherwise
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # Anthropic cache_creation_input_tokens (part of input_tokens)
    request_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # rate-limit headers only
    logprobs: list[dict[str, Any]] | None = None  # [{"token", "logprob", "top": [[token, logprob]...]}]

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class Teacher(Protocol):
    """One provider endpoint. `complete` makes exactly one HTTP attempt: no retries inside."""

    provider: str

    async def complete(self, request: TeacherRequest, *, timeout_s: float) -> TeacherReply: ...

    async def aclose(self) -> None: ...


# ---- the error tree -------------------------------------------------------------------------------
class TeacherError(Exception):
    """A failed attempt. `retryable` decides the retry loop; `maybe_billed` decides settlement."""

    retryable = False
    maybe_billed = False  # True when the provider may have done (and billed) the work
    fatal = False  # True stops the whole run (auth, quota): retrying or skipping cannot help

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        snippet: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.snippet = snippet  # the first bytes of a bad body, stored for diagnosis

    @property
    def error_class(self) -> str:
        return type(self).__name__


class RateLimited(TeacherError):
    retryable = True


class Overloaded(TeacherError):
    """503/529: the provider is busy; nothing was billed."""

    retryable = True


class ServerError(TeacherError):
    retryable = True


class QuotaExceeded(TeacherError):
    """insufficient_quota / spend limit reached: not a rate limit, never retried."""

    fatal = True


class AuthError(TeacherError):
    fatal = True


class BadRequest(TeacherError):
    """400/404/422 or x-should-retry: false: this item cannot succeed as sent."""


class ConnectFailed(TeacherError):
    """Nothing reached the provider (refused, DNS): retry, release the reservation."""

    retryable = True


class ReadTimeout(TeacherError):
    """Sent, then no complete answer in time: the provider may have billed it."""

    retryable = True
    maybe_billed = True


class MalformedResponse(TeacherError):
    """Reset mid-body, truncated JSON, an HTML page: possibly billed, worth another attempt."""

    retryable = True
    maybe_billed = True


class IncompleteResponse(TeacherError):
    """200 without usage or choices: billed, but unusable; retrying would pay again."""

    maybe_billed = True


STATUS_ERRORS: dict[int, type[TeacherError]] = {
    400: BadRequest, 401: AuthError, 403: AuthError, 404: BadRequest, 408: ServerError,
    409: ServerError, 413: BadRequest, 422: BadRequest, 429: RateLimited, 500: ServerError,
    502: ServerError, 503: Overloaded, 504: ServerError, 529: Overloaded,
}

QUOTA_MARKERS = ("insufficient_quota", "billing_hard_limit", "spend limit", "credit balance",
                 "quota", "billing")


def error_for_status(status: int, body: str, headers: dict[str, str]) -> TeacherError:
    """Map an HTTP error status (+ body, headers) onto the error tree: the single place this happens."""
    snippet = body[:500]
    lowered = snippet.lower()
    if status in (400, 403, 429) and any(marker in lowered for marker in QUOTA_MARKERS):
        return QuotaExceeded(f"HTTP {status}: quota or spend limit reached", status=status,
                             headers=headers, snippet=snippet)
    if headers.get("x-should-retry", "").lower() == "false":
        return BadRequest(f"HTTP {status}: provider says x-should-retry: false", status=status,
                          headers=headers, snippet=snippet)
    if headers.get("x-should-retry", "").lower() == "true" and status not in STATUS_ERRORS:
        return ServerError(f"HTTP {status}", status=status, headers=headers, snippet=snippet)
    if status in (401, 403):
        # Providers echo part of a rejected key in the message ("Incorrect API key provided: sk-ab***"):
        # keep none of the body.
        return AuthError(f"HTTP {status}: the provider refused the API key", status=status, headers=headers)
    cls = STATUS_ERRORS.get(status, ServerError if status >= 500 else BadRequest)
    return cls(f"HTTP {status}: {_error_message(snippet)}", status=status, headers=headers, snippet=snippet)


def _error_message(body: str) -> str:
    """The provider's error message, if the body is the usual JSON; a short snippet otherwise."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:120].replace("\n", " ")
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:300]
    return body[:120].replace("\n", " ")


REDACTED = "[redacted key]"
MIN_SECRET_LENGTH = 8  # a placeholder such as "unused" or "x" is no secret, and replacing it would garble text


class key_redacted:
    """An adapter's errors leave with the key cut out of their message and body snippet: providers quote a
    rejected key ("Incorrect API key provided: sk-...") and some proxies' error pages echo request headers,
    and the gateway stores both. The library exception an error was mapped from (hidden already by
    `raise ... from None`) is dropped too: the SDKs put the whole error body into their messages.

    A class rather than a @contextmanager generator: every teacher call enters one, and the generator
    costs ~1.5 us more per call."""

    __slots__ = ("api_key",)

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: Any) -> bool:
        if isinstance(err, TeacherError):
            if err.__suppress_context__:
                err.__context__ = None
            api_key = self.api_key
            if api_key and len(api_key) >= MIN_SECRET_LENGTH:
                err.args = tuple(a.replace(api_key, REDACTED) if isinstance(a, str) else a for a in err.args)
                if err.snippet is not None:
                    err.snippet = err.snippet.replace(api_key, REDACTED)
        return False  # the error goes on, redacted


RATE_LIMIT_HEADER_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "retry-after", "x-should-retry")


def rate_limit_headers(headers: Any) -> dict[str, str]:
    """Keep only the headers the limiter and retry policy read (never auth or cookies)."""
    return {lowered: v for k, v in headers.items()
            if (lowered := k.lower()).startswith(RATE_LIMIT_HEADER_PREFIXES)}
