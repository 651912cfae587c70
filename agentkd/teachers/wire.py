"""The default transport: OpenAI chat-completions and Anthropic messages spoken over one aiohttp session.

Why not the official SDKs by default: on this class of machine they top out at ~200-450 requests/s per
process, a raw aiohttp client at ~3,000 (ENVIRONMENT.md). The SDK adapters (teachers/sdk.py) stay
available as `teacher.transport = "sdk"` and are tested against the same simulated teacher.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from agentkd.teachers.base import (
    ConnectFailed,
    IncompleteResponse,
    MalformedResponse,
    ReadTimeout,
    TeacherReply,
    TeacherRequest,
    error_for_status,
    key_redacted,
    rate_limit_headers,
)

ANTHROPIC_VERSION = "2023-06-01"
REQUEST_KEY_HEADER = "x-agentkd-request-key"
_encode_body = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(..., ensure_ascii=False), built once
_STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "stop": "stop"}


class WireTeacher:
    """One endpoint in one wire format (`openai` chat-completions or `anthropic` messages)."""

    def __init__(self, *, provider: str, wire: str, base_url: str, api_key: str | None,
                 max_connections: int = 256) -> None:
        self.provider = provider
        self.wire = wire
        self._url = base_url.rstrip("/") + ("/chat/completions" if wire == "openai" else "/v1/messages")
        self._headers = {"content-type": "application/json"}
        if wire == "openai":
            if api_key:
                self._headers["authorization"] = f"Bearer {api_key}"
        else:
            self._headers["anthropic-version"] = ANTHROPIC_VERSION
            if api_key:
                self._headers["x-api-key"] = api_key
        self._api_key = api_key  # only to cut it out of error text (key_redacted); it is sent in the headers
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def body(self, request: TeacherRequest) -> dict[str, Any]:
        if self.wire == "openai":
            return openai_body(request, self.provider)
        return anthropic_body(request)

    async def complete(self, request: TeacherRequest, *, timeout_s: float) -> TeacherReply:
        with key_redacted(self._api_key):
            return await self._complete(request, timeout_s)

    async def _complete(self, request: TeacherRequest, timeout_s: float) -> TeacherReply:
        payload = _encode_body(self.body(request)).encode("utf-8")
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            timeout = self._timeouts[timeout_s] = aiohttp.ClientTimeout(total=timeout_s,
                                                                        sock_connect=min(timeout_s, 10.0))
        try:
            # The request key (a hash; no secret) lets provider-side logs and the sim's ledger tell a
            # deliberate second sample of a prompt from a retry of the same request.
            key_header = {REQUEST_KEY_HEADER: request.key}
            async with self._client().post(self._url, data=payload, timeout=timeout, headers=key_header) as response:
                headers = rate_limit_headers(response.headers)
                request_id = response.headers.get("x-request-id") or response.headers.get("request-id")
                raw = await response.read()
                status = response.status
        except aiohttp.ConnectionTimeoutError as err:
            raise ConnectFailed(f"connect timeout: {type(err).__name__}") from None
        except aiohttp.ClientConnectorError as err:
            raise ConnectFailed(f"cannot connect: {err.os_error.__class__.__name__}") from None
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise ReadTimeout(f"no complete answer within {timeout_s:g} s") from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as err:
            raise MalformedResponse(f"connection broke mid-response: {type(err).__name__}") from None
        text = raw.decode("utf-8", errors="replace")
        if status != 200:
            raise error_for_status(status, text, headers)
        try:
            data = json.loads(text)
        except ValueError:
            raise MalformedResponse("200 with a body that is not JSON", status=status, headers=headers,
                                    snippet=text[:500]) from None
        if not isinstance(data, dict):
            raise MalformedResponse("200 with a JSON body that is not an object", snippet=text[:500])
        parse = parse_openai if self.wire == "openai" else parse_anthropic
        reply = parse(data, text)
        reply.headers = headers
        reply.request_id = request_id or data.get("id")
        return reply


def openai_body(request: TeacherRequest, provider: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [dict(m) for m in request.messages],
        "temperature": request.temperature,
    }
    # OpenAI's own API wants max_completion_tokens (reasoning models reject max_tokens); vLLM, Ollama
    # and older compatible servers know only max_tokens.
    body["max_completion_tokens" if provider == "openai" else "max_tokens"] = request.max_tokens
    if request.top_logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = request.top_logprobs
    if request.response_format is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": request.response_format}
    if request.prompt_cache and provider in ("openai", "sim"):
        # OpenAI caches prefixes of >= 1,024 tokens by itself; the key routes one template's requests
        # (whose system prompt and instructions come first) to the same cache.
        body["prompt_cache_key"] = f"agentkd-{request.prompt_version}"[:64]
    return body


def anthropic_body(request: TeacherRequest) -> dict[str, Any]:
    system = "\n\n".join(m["content"] for m in request.messages if m["role"] == "system")
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "messages": [dict(m) for m in request.messages if m["role"] != "system"],
        "temperature": request.temperature,
    }
    if system and request.prompt_cache:
        # One breakpoint (of Anthropic's four) after the system prompt, the part every role prompt keeps
        # fixed; below the model's minimum length nothing is cached and nothing extra is billed.
        body["system"] = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
    elif system:
        body["system"] = system
    return body


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def parse_openai(data: dict[str, Any], raw: str) -> TeacherReply:
    choices = data.get("choices")
    usage = data.get("usage")
    if not isinstance(choices, list) or not choices or not isinstance(usage, dict):
        raise IncompleteResponse("200 without choices or usage", snippet=raw[:500])
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content = message.get("content")
    prompt_tokens, completion_tokens = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    if not isinstance(content, str) or prompt_tokens is None or completion_tokens is None:
        raise IncompleteResponse("200 without message content or token counts", snippet=raw[:500])
    details = usage.get("prompt_tokens_details") or {}
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
    return TeacherReply(
        text=content,
        finish_reason=str(choice.get("finish_reason") or "stop"),
        input_tokens=prompt_tokens,
        output_tokens=completion_tokens,
        cached_tokens=cached or 0,
        logprobs=_openai_logprobs(choice.get("logprobs")),
    )


def _openai_logprobs(block: Any) -> list[dict[str, Any]] | None:
    if not isinstance(block, dict) or not isinstance(block.get("content"), list):
        return None
    out = []
    for item in block["content"]:
        if not isinstance(item, dict):
            return None
        top = [[t.get("token"), t.get("logprob")] for t in item.get("top_logprobs") or [] if isinstance(t, dict)]
        out.append({"token": item.get("token"), "logprob": item.get("logprob"), "top": top})
    return out


def parse_anthropic(data: dict[str, Any], raw: str) -> TeacherReply:
    content = data.get("content")
    usage = data.get("usage")
    if not isinstance(content, list) or not isinstance(usage, dict):
        raise IncompleteResponse("200 without content or usage", snippet=raw[:500])
    input_tokens, output_tokens = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
    if input_tokens is None or output_tokens is None:
        raise IncompleteResponse("200 without token counts", snippet=raw[:500])
    texts = [b.get("text") for b in content if isinstance(b, dict) and b.get("type") == "text"]
    if not texts or not all(isinstance(t, str) for t in texts):
        # The messages analogue of "200 without choices": billed, nothing to store (RELIABILITY.md 12).
        raise IncompleteResponse("200 without a text content block", snippet=raw[:500])
    text = "".join(texts)
    cached = _int(usage.get("cache_read_input_tokens")) or 0
    created = _int(usage.get("cache_creation_input_tokens")) or 0
    stop = str(data.get("stop_reason") or "stop")
    return TeacherReply(
        text=text,
        finish_reason=_STOP_REASONS.get(stop, stop),
        # Anthropic counts cache reads and writes apart from input_tokens; we bill all input together
        # and price the cached part separately.
        input_tokens=input_tokens + cached + created,
        output_tokens=output_tokens,
        cached_tokens=cached,
        cache_write_tokens=created,
    )
