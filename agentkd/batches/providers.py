"""The two batch APIs over the official SDKs: OpenAI files + batches, Anthropic message batches.

Each adapter turns TeacherRequests into the provider's batch entries (bodies built by the same
functions as online calls), submits them, polls, finds a batch again from its agentkd id, and reads
results into TeacherReplies or a verdict per request: answered, to be asked again (expired, cancelled,
an error the provider may not repeat), or refused. Errors map onto the one error tree (teachers/base.py).

Provider facts (SDK source and docs, December 2026): OpenAI takes a JSONL file of at most 50,000
requests / 200 MB, `completion_window="24h"`, and up to 16 metadata pairs on the batch; on expiry or
cancellation the finished answers are still in the output file, the rest in the error file. Anthropic
takes at most 100,000 requests / 256 MB per batch, each with a custom_id (^[A-Za-z0-9_-]{1,64}$), has
no metadata, and gives results only once the whole batch has ended.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import anthropic
import openai

from agentkd.teachers.base import (
    BadRequest,
    IncompleteResponse,
    MalformedResponse,
    TeacherError,
    TeacherReply,
    TeacherRequest,
    error_for_status,
    key_redacted,
)
from agentkd.teachers.sdk import _mapped_errors
from agentkd.teachers.wire import anthropic_body, openai_body, parse_anthropic, parse_openai

METADATA_KEY = "agentkd_batch_id"
OPENAI_ENDPOINT = "/v1/chat/completions"
TIMEOUT_S = 120.0
LIST_PAGES = 10  # batches looked through (x100) when finding one again
FIND_SKEW_S = 600  # a batch created up to this long before its `prepared` row (clock skew) may be ours


@dataclass(frozen=True)
class Limits:
    requests: int
    bytes: int


@dataclass
class BatchState:
    status: str  # the provider's word
    ended: bool
    counts: dict[str, int] = field(default_factory=dict)
    detail: str | None = None  # why a batch failed, if it did


@dataclass
class Lookup:
    """What one find() saw: our batch, or else the candidates that may be ours but are still running
    (Anthropic can tell only from results, which exist once a batch has ended) and those that ended and
    are not ours (the caller leaves them out of its next look)."""

    found: str | None = None
    running: dict[str, BatchState] = field(default_factory=dict)  # provider batch id -> its state
    not_ours: set[str] = field(default_factory=set)


@dataclass
class Outcome:
    """One request's result: `reply` (answered), or `retry` True (not run, ask again) / False (refused)."""

    custom_id: str
    reply: TeacherReply | None = None
    error: TeacherError | None = None
    retry: bool = False


class BatchAPI(Protocol):
    provider: str
    limits: Limits

    def entry(self, custom_id: str, request: TeacherRequest) -> bytes: ...
    async def upload(self, batch_id: str, entries: list[bytes]) -> str | None: ...
    async def create(self, batch_id: str, file_id: str | None, entries: list[bytes]) -> str: ...
    async def find(self, batch_id: str, requests: int, since: dt.datetime, exclude: set[str]) -> Lookup: ...
    async def state(self, provider_batch_id: str) -> BatchState: ...
    async def results(self, provider_batch_id: str) -> list[Outcome]: ...
    async def aclose(self) -> None: ...


class OpenAIBatches:
    limits = Limits(requests=50_000, bytes=200 * 1024 * 1024)

    def __init__(self, *, provider: str, base_url: str, api_key: str | None) -> None:
        self.provider = provider
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=0)
        self._api_key = api_key

    def entry(self, custom_id: str, request: TeacherRequest) -> bytes:
        line = {"custom_id": custom_id, "method": "POST", "url": OPENAI_ENDPOINT,
                "body": openai_body(request, self.provider)}
        return json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n"

    async def upload(self, batch_id: str, entries: list[bytes]) -> str | None:
        with key_redacted(self._api_key), _mapped_errors(openai, TIMEOUT_S):
            uploaded = await self._client.files.create(file=(f"{batch_id}.jsonl", b"".join(entries)),
                                                       purpose="batch", timeout=TIMEOUT_S)
        return uploaded.id

    async def create(self, batch_id: str, file_id: str | None, entries: list[bytes]) -> str:
        assert file_id is not None
        with key_redacted(self._api_key), _mapped_errors(openai, TIMEOUT_S):
            batch = await self._client.batches.create(input_file_id=file_id, endpoint=OPENAI_ENDPOINT,
                                                      completion_window="24h",
                                                      metadata={METADATA_KEY: batch_id}, timeout=TIMEOUT_S)
        return batch.id

    async def find(self, batch_id: str, requests: int, since: dt.datetime, exclude: set[str]) -> Lookup:
        """The batch whose metadata carries this agentkd id (newest first, back to `since`), running or not."""
        oldest = since.replace(tzinfo=dt.UTC).timestamp() - FIND_SKEW_S
        with key_redacted(self._api_key), _mapped_errors(openai, TIMEOUT_S):
            seen = 0
            async for batch in self._client.batches.list(limit=100, timeout=TIMEOUT_S):
                if (batch.metadata or {}).get(METADATA_KEY) == batch_id:
                    return Lookup(found=batch.id)
                seen += 1
                if batch.created_at < oldest or seen >= LIST_PAGES * 100:
                    break
        return Lookup()

    async def state(self, provider_batch_id: str) -> BatchState:
        with key_redacted(self._api_key), _mapped_errors(openai, TIMEOUT_S):
            batch = await self._client.batches.retrieve(provider_batch_id, timeout=TIMEOUT_S)
        counts = batch.request_counts.model_dump() if batch.request_counts is not None else {}
        detail = None
        if batch.errors is not None and batch.errors.data:
            detail = "; ".join(f"{e.code}: {e.message}" for e in batch.errors.data)[:500]
        ended = batch.status in ("completed", "failed", "expired", "cancelled")
        return BatchState(batch.status, ended, counts, detail)

    async def results(self, provider_batch_id: str) -> list[Outcome]:
        with key_redacted(self._api_key), _mapped_errors(openai, TIMEOUT_S):
            batch = await self._client.batches.retrieve(provider_batch_id, timeout=TIMEOUT_S)
            outcomes: list[Outcome] = []
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id:
                    content = await self._client.files.content(file_id, timeout=TIMEOUT_S)
                    outcomes += [_openai_outcome(line) for line in content.text.splitlines() if line.strip()]
        return [o for o in outcomes if o is not None]

    async def aclose(self) -> None:
        await self._client.close()


def _openai_outcome(line: str) -> Outcome | None:
    """One output- or error-file line; teacher output is untrusted, so a bad line is data, not a crash."""
    try:
        item = json.loads(line)
    except ValueError:
        return None
    if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
        return None
    custom_id = item["custom_id"]
    response, error = item.get("response"), item.get("error")
    if isinstance(response, dict) and isinstance(response.get("body"), dict):
        status = response.get("status_code")
        body = response["body"]
        if status == 200:
            return _parsed(custom_id, lambda: parse_openai(body, json.dumps(body)[:500]))
        err = error_for_status(status if isinstance(status, int) else 500, json.dumps(body), {})
        return Outcome(custom_id, error=err, retry=err.retryable)
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    # batch_expired / batch_cancelled: never run, nothing billed; anything else here is the provider's.
    return Outcome(custom_id, error=TeacherError(f"{code}: {message}"[:300]), retry=True)


class AnthropicBatches:
    limits = Limits(requests=100_000, bytes=256 * 1024 * 1024)

    def __init__(self, *, base_url: str, api_key: str | None) -> None:
        self.provider = "anthropic"
        self._client = anthropic.AsyncAnthropic(base_url=base_url, api_key=api_key or "unused", max_retries=0)
        self._api_key = api_key

    def entry(self, custom_id: str, request: TeacherRequest) -> bytes:
        return json.dumps({"custom_id": custom_id, "params": anthropic_body(request)},
                          ensure_ascii=False).encode("utf-8")

    async def upload(self, batch_id: str, entries: list[bytes]) -> str | None:
        return None  # the requests go in the create call itself

    async def create(self, batch_id: str, file_id: str | None, entries: list[bytes]) -> str:
        requests = [json.loads(e) for e in entries]
        with key_redacted(self._api_key), _mapped_errors(anthropic, TIMEOUT_S):
            batch = await self._client.messages.batches.create(requests=requests, timeout=TIMEOUT_S)
        return batch.id

    async def find(self, batch_id: str, requests: int, since: dt.datetime, exclude: set[str]) -> Lookup:
        """Anthropic batches carry no metadata: a candidate is a batch created since the `prepared` row with
        as many requests, not in `exclude` (claimed by another agentkd batch, or seen not to be ours), and
        it is ours only if its results carry our custom_ids (which start with the agentkd id). Results
        exist once a batch has ended, so a candidate still running is reported, not waited for here: the
        caller waits (runner._find), saying what runs, and looks again."""
        oldest = since.replace(tzinfo=dt.UTC) - dt.timedelta(seconds=FIND_SKEW_S)
        lookup = Lookup()
        with key_redacted(self._api_key), _mapped_errors(anthropic, TIMEOUT_S):
            candidates = []
            seen = 0
            async for batch in self._client.messages.batches.list(limit=100, timeout=TIMEOUT_S):
                created = batch.created_at if batch.created_at.tzinfo else batch.created_at.replace(tzinfo=dt.UTC)
                if created < oldest or seen >= LIST_PAGES * 100:
                    break
                seen += 1
                counts = batch.request_counts
                total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
                if total == requests and batch.id not in exclude:
                    candidates.append(batch)
            for batch in candidates:
                if batch.processing_status != "ended":
                    lookup.running[batch.id] = BatchState(batch.processing_status, False,
                                                          batch.request_counts.model_dump())
                    continue
                async for item in await self._client.messages.batches.results(batch.id, timeout=TIMEOUT_S):
                    if item.custom_id.startswith(batch_id + "-"):
                        return Lookup(found=batch.id)
                    break
                lookup.not_ours.add(batch.id)
        return lookup

    async def state(self, provider_batch_id: str) -> BatchState:
        with key_redacted(self._api_key), _mapped_errors(anthropic, TIMEOUT_S):
            batch = await self._client.messages.batches.retrieve(provider_batch_id, timeout=TIMEOUT_S)
        status = batch.processing_status
        return BatchState(status, status == "ended", batch.request_counts.model_dump())

    async def results(self, provider_batch_id: str) -> list[Outcome]:
        outcomes = []
        with key_redacted(self._api_key), _mapped_errors(anthropic, TIMEOUT_S):
            async for item in await self._client.messages.batches.results(provider_batch_id, timeout=TIMEOUT_S):
                outcomes.append(_anthropic_outcome(item.custom_id, item.result.model_dump()))
        return outcomes

    async def aclose(self) -> None:
        await self._client.close()


# Anthropic error types a batch request may be asked again after (the provider's side, not the request).
_ANTHROPIC_TRANSIENT = {"api_error", "overloaded_error", "rate_limit_error", "timeout_error"}


def _anthropic_outcome(custom_id: str, result: dict[str, Any]) -> Outcome:
    kind = result.get("type")
    if kind == "succeeded" and isinstance(result.get("message"), dict):
        message = result["message"]
        return _parsed(custom_id, lambda: parse_anthropic(message, json.dumps(message, default=str)[:500]))
    if kind == "errored":
        inner = (result.get("error") or {}).get("error") or {}
        error_type = inner.get("type") if isinstance(inner, dict) else None
        message = f"{error_type}: {inner.get('message') if isinstance(inner, dict) else ''}"[:300]
        if error_type in _ANTHROPIC_TRANSIENT:
            return Outcome(custom_id, error=TeacherError(message), retry=True)
        return Outcome(custom_id, error=BadRequest(message), retry=False)
    return Outcome(custom_id, error=TeacherError(f"{kind}: not run"), retry=True)  # expired | canceled


def _parsed(custom_id: str, parse) -> Outcome:
    try:
        return Outcome(custom_id, reply=parse())
    except (IncompleteResponse, MalformedResponse) as err:
        return Outcome(custom_id, error=err, retry=False)


def batch_api(provider: str, base_url: str, api_key: str | None) -> BatchAPI:
    """The batch adapter for a provider; the sim and OpenAI-compatible servers speak OpenAI's."""
    if provider == "anthropic":
        return AnthropicBatches(base_url=base_url, api_key=api_key)
    return OpenAIBatches(provider=provider, base_url=base_url, api_key=api_key)
