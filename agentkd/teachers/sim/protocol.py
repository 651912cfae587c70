"""Wire formats of the simulated teacher: parse OpenAI / Anthropic request bodies, build reply bodies."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any

from agentkd.teachers.sim import roles

MODEL_IDS = ("sim-teacher-1",)
# Output cap (and rate-limit cost) when an OpenAI request names no max_tokens.
DEFAULT_MAX_TOKENS = 1024
# Header a client may send with its own request key (agentkd's gateway does); it then keys the ledger.
CLIENT_KEY_HEADER = "x-agentkd-request-key"
# Fields of the request body that make up request_key (ledger of repeated, i.e. paid-twice, requests).
KEY_FIELDS = ("model", "messages", "system", "temperature", "max_tokens", "max_completion_tokens",
              "response_format", "top_logprobs")
_ALTERNATIVES = (" the", " a", ".", " is", " =", " and", "\n", " so", " then", " answer", " +", " -",
                 *(f" {d}" for d in range(10)), " of", ",")


def request_key(body: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the KEY_FIELDS present in the request body."""
    picked = {name: body[name] for name in KEY_FIELDS if name in body}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class ModelRequest:
    """What the sim needs from either wire format."""

    api: str  # "openai" or "anthropic"
    model: str
    system: str
    user: str
    prompt_tokens: int
    max_tokens: int
    temperature: float
    json_mode: bool
    top_logprobs: int | None  # None: no logprobs asked
    key: str
    cache_marked: bool = False  # Anthropic: the system prompt carries cache_control
    cached_tokens: int = 0  # prompt-cache reads and writes of this request (the server's prompt cache)
    cache_write_tokens: int = 0


class BadRequest(Exception):
    """The body does not describe a valid request; the message goes back in a 400."""


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def parse_request(api: str, body: Any) -> ModelRequest:
    """Validate a chat-completions or messages body into a ModelRequest; raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: a model name is required.")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages: a non-empty list of messages is required.")
    texts = [_text(m.get("content")) for m in messages]
    if api == "anthropic":
        system = _text(body.get("system"))
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            raise BadRequest("max_tokens: Field required (a positive integer).")
        max_tokens = body["max_tokens"]
    else:
        system = "\n".join(t for m, t in zip(messages, texts) if m.get("role") in ("system", "developer"))
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("max_tokens: must be a positive integer.")
    users = [t for m, t in zip(messages, texts) if m.get("role") == "user"]
    if not users:
        raise BadRequest("messages: no user message.")
    temperature = body.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise BadRequest("temperature: must be a number in [0, 2].")
    top = None
    if api == "openai" and body.get("logprobs"):
        top = body.get("top_logprobs") or 0
        if not isinstance(top, int) or not 0 <= top <= 20:
            raise BadRequest("top_logprobs: must be an integer in [0, 20].")
    fmt = body.get("response_format")
    json_mode = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
    prompt_tokens = roles.count_tokens(system) + sum(roles.count_tokens(t) + 3 for t in texts) + 3
    marked = api == "anthropic" and isinstance(body.get("system"), list) and any(
        isinstance(b, dict) and isinstance(b.get("cache_control"), dict) for b in body["system"])
    return ModelRequest(api, model, system, users[-1], prompt_tokens, max_tokens, float(temperature),
                        json_mode, top, request_key(body), cache_marked=marked)


def response_body(req: ModelRequest, text: str, cut: bool, output_tokens: int, rng: random.Random,
                  kind: str | None, serial: int, *, tokens: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The 200 body in the request's wire format; kind no_choices/no_usage leaves those parts out.
    `tokens`: a model's own logprobs content (cut to req.top_logprobs alternatives); None: synthetic."""
    if req.api == "anthropic":
        body: dict[str, Any] = {
            "id": f"msg_sim{serial:012d}", "type": "message", "role": "assistant",
            "content": [] if kind == "no_choices" else [{"type": "text", "text": text}],
            "model": req.model, "stop_reason": "max_tokens" if cut else "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": req.prompt_tokens - req.cached_tokens - req.cache_write_tokens,
                      "output_tokens": output_tokens, "cache_creation_input_tokens": req.cache_write_tokens,
                      "cache_read_input_tokens": req.cached_tokens},
        }
    else:
        choice = {
            "index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None if req.top_logprobs is None else {
                "content": logprobs_content(text, req.top_logprobs, rng) if tokens is None
                else [{**t, "top_logprobs": t["top_logprobs"][: req.top_logprobs]} for t in tokens],
                "refusal": None},
            "finish_reason": "length" if cut else "stop",
        }
        body = {
            "id": f"chatcmpl-sim{serial:012d}", "object": "chat.completion", "created": int(time.time()),
            "model": req.model, "system_fingerprint": "fp_sim", "choices": [] if kind == "no_choices" else [choice],
            "usage": {"prompt_tokens": req.prompt_tokens, "completion_tokens": output_tokens,
                      "total_tokens": req.prompt_tokens + output_tokens,
                      "prompt_tokens_details": {"cached_tokens": req.cached_tokens}},
        }
    if kind == "no_usage":
        del body["usage"]
    return body


def logprobs_content(text: str, top: int, rng: random.Random) -> list[dict[str, Any]]:
    """Per output token: the sampled token (most likely) and top-1 alternatives with a valid distribution."""
    out = []
    for piece in roles.token_pieces(text):
        logprob = -rng.uniform(0.0005, 0.3)
        rest = 1.0 - math.exp(logprob)
        alternatives = [a for a in _ALTERNATIVES if a != piece][: max(0, top - 1)]
        ranked = [{"token": piece, "logprob": logprob, "bytes": list(piece.encode())}] if top else []
        for index, alt in enumerate(alternatives):
            # Halving shares of the remaining mass keep the probabilities summing below one.
            ranked.append({"token": alt, "logprob": math.log(rest * 0.5 ** (index + 1)), "bytes": list(alt.encode())})
        out.append({"token": piece, "logprob": logprob, "bytes": list(piece.encode()), "top_logprobs": ranked})
    return out
