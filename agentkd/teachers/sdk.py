"""Adapters over the official SDKs (`teacher.transport = "sdk"`), for users who want the vendor's client.

SDK retries are off (max_retries=0): the gateway is the one retry loop. Requests and replies go through
the same body builders and parsers as the aiohttp transport, so both transports behave alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import openai
import pydantic

from agentkd.teachers.base import (
    ConnectFailed,
    MalformedResponse,
    ReadTimeout,
    TeacherReply,
    TeacherRequest,
    error_for_status,
    key_redacted,
    rate_limit_headers,
)
from agentkd.teachers.wire import (
    REQUEST_KEY_HEADER,
    anthropic_body,
    openai_body,
    parse_anthropic,
    parse_openai,
)


def openai_client(base_url: str, api_key: str | None) -> openai.AsyncOpenAI:
    """The SDK client this transport uses: the SDK's own default HTTP client (httpx2), so the SDK's
    usual fakes (pytest-httpx2) work on it; no SDK retries (the gateway retries). The SDK insists on a
    key; local servers (vLLM, Ollama, the sim) accept any."""
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=0)


class OpenAISDKTeacher:
    def __init__(self, *, provider: str, base_url: str, api_key: str | None) -> None:
        self.provider = provider
        self._client = openai_client(base_url, api_key)
        self._api_key = api_key  # only to cut it out of error text (key_redacted)

    async def complete(self, request: TeacherRequest, *, timeout_s: float) -> TeacherReply:
        body = openai_body(request, self.provider)
        with key_redacted(self._api_key):
            with _mapped_errors(openai, timeout_s):
                raw = await self._client.chat.completions.with_raw_response.create(
                    **body, timeout=timeout_s, extra_headers={REQUEST_KEY_HEADER: request.key})
                data = _as_dict(_parsed(raw, raw.parse), raw.headers)
            reply = parse_openai(data, "")
        reply.headers = rate_limit_headers(raw.headers)
        reply.request_id = raw.headers.get("x-request-id") or data.get("id")
        return reply

    async def aclose(self) -> None:
        await self._client.close()


class AnthropicSDKTeacher:
    def __init__(self, *, base_url: str, api_key: str | None) -> None:
        self.provider = "anthropic"
        self._client = anthropic.AsyncAnthropic(base_url=base_url, api_key=api_key or "unused", max_retries=0)
        self._api_key = api_key  # only to cut it out of error text (key_redacted)

    async def complete(self, request: TeacherRequest, *, timeout_s: float) -> TeacherReply:
        body = anthropic_body(request)
        # anthropic 2.x has no temperature parameter on messages.create; the API still takes it.
        extra_body = {"temperature": body.pop("temperature")}
        with key_redacted(self._api_key):
            with _mapped_errors(anthropic, timeout_s):
                raw = await self._client.messages.with_raw_response.create(
                    **body, extra_body=extra_body, timeout=timeout_s,
                    extra_headers={REQUEST_KEY_HEADER: request.key})
                data = _as_dict(await _parsed_async(raw), raw.headers)
            reply = parse_anthropic(data, "")
        reply.headers = rate_limit_headers(raw.headers)
        reply.request_id = raw.headers.get("request-id") or data.get("id")
        return reply

    async def aclose(self) -> None:
        await self._client.close()


@contextmanager
def _mapped_errors(sdk: Any, timeout_s: float) -> Iterator[None]:
    """Both SDKs share one exception tree shape: map it onto ours, once."""
    try:
        yield
    except sdk.APIStatusError as err:
        raise error_for_status(err.status_code, err.response.text, rate_limit_headers(err.response.headers)) from None
    except sdk.APITimeoutError:
        raise ReadTimeout(f"no complete answer within {timeout_s:g} s") from None
    except sdk.APIConnectionError as err:
        raise _connection_error(err) from None
    except (sdk.APIResponseValidationError, ValueError) as err:
        raise MalformedResponse(f"unreadable response: {type(err).__name__}") from None


def _parsed(raw: Any, parse: Any) -> object:
    try:
        return parse()
    except ValueError as err:  # truncated JSON: keep the first bytes, as the aiohttp transport does
        raise _unreadable(raw, err) from None


async def _parsed_async(raw: Any) -> object:
    try:
        return await raw.parse()
    except ValueError as err:
        raise _unreadable(raw, err) from None


def _unreadable(raw: Any, err: ValueError) -> MalformedResponse:
    return MalformedResponse(f"200 with a body that is not JSON ({type(err).__name__})", status=200,
                             headers=rate_limit_headers(raw.headers), snippet=raw.http_response.text[:500])


def _as_dict(parsed: object, headers: Any) -> dict[str, Any]:
    """The SDK's parsed model as a dict; a 200 that was not JSON (a proxy's HTML page) comes back as str."""
    if isinstance(parsed, pydantic.BaseModel):
        return parsed.model_dump()
    raise MalformedResponse("200 with a body that is not JSON", status=200, headers=rate_limit_headers(headers),
                            snippet=str(parsed)[:500])


def _connection_error(err: Exception) -> ConnectFailed | MalformedResponse:
    """Refused before sending vs broken after: only the first is surely unbilled."""
    cause = err.__cause__
    name = type(cause).__name__ if cause is not None else ""
    if "Connect" in name:
        return ConnectFailed(f"cannot connect: {name}")
    return MalformedResponse(f"connection broke: {name or type(err).__name__}")
