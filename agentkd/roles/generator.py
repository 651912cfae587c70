"""Generator role (Lion, arXiv 2305.12870): parse one new instruction and apply Lion's filters.

Accepted reply shapes, in order: a JSON object {"instruction": str} (bare, in ``` fences, or inside
prose); else, when the reply holds no JSON at all, the bare text itself (fences and surrounding quotes
removed), since some providers ignore the format request. A reply that looks like JSON but does not
decode is rejected, never taken as bare text. Filters (each rejection is data with a reason, never an
exception): truncated (finish_reason "length"), empty, not a string, a list or an object of the wrong
shape, over MAX_INSTRUCTION_CHARS, <= 3 words, starting with punctuation, or echoing the prompt's own
headers and data blocks. The ROUGE-L near-duplicate filter lives in agentkd/lion/dedup.py.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from agentkd.roles.json_reply import MAX_REPLY_CHARS, find_json, strip_fences
from agentkd.roles.lookalikes import folded

MAX_INSTRUCTION_CHARS = 2_000
MIN_WORDS_EXCLUSIVE = 3  # Lion drops instructions of 3 words or fewer

# Openings that copy the prompt's labels instead of writing a request.
_ECHO_START = re.compile(
    r"^(?:(?:new|seed|the)\s+)?instruction\b|^(?:here\s+is|here's)\s+(?:a|an|the|my|one)\s+(?:new\s+)?instruction"
    r"|^##\s*(?:system|user)\b|^(?:seed_instruction|failed_answer|referee_comparison)\b",
    re.IGNORECASE,
)
_ECHO_ANYWHERE = re.compile(
    r"<\s*/?\s*\\?data\b|\bseed_instruction\b|\bhere(?:'s|\s+is)\s+(?:a|an|the|my|one)\s+(?:new\s+)?instruction\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Generated:
    instruction: str | None
    ok: bool
    reason: str | None  # why rejected


def parse_generated(text: Any, finish_reason: str | None = None) -> Generated:
    """One new instruction from a generator reply, or a rejection with its reason."""
    if finish_reason == "length":
        return _rejected("truncated (finish_reason=length)")
    if not isinstance(text, str):
        return _rejected(f"reply is not text: {type(text).__name__}")
    if not text.strip():
        return _rejected("empty reply")
    if len(text) > MAX_REPLY_CHARS:
        return _rejected(f"reply too long ({len(text)} chars)")
    found, value = find_json(text)
    if found:
        if isinstance(value, list):
            return _rejected(f"expected one JSON object, got a list of {len(value)} items")
        keys = {k.strip().lower(): v for k, v in value.items() if isinstance(k, str)}
        if "instruction" not in keys:
            return _rejected("JSON object without an 'instruction' field")
        candidate = keys["instruction"]
        if not isinstance(candidate, str):
            return _rejected(f"'instruction' is not a string: {type(candidate).__name__}")
        return check_instruction(candidate)
    bare = strip_fences(text)
    if bare[:1] in ("{", "["):
        return _rejected("reply looks like JSON but does not decode")
    if len(bare) >= 2 and bare[0] == bare[-1] and bare[0] in "\"'":
        bare = bare[1:-1]
    return check_instruction(bare)


def check_instruction(text: str) -> Generated:
    """Lion's content filters on an instruction string (size, length in words, punctuation, echoes)."""
    instruction = text.strip()
    if not instruction:
        return _rejected("empty instruction")
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        return _rejected(f"instruction too long ({len(instruction)} chars > {MAX_INSTRUCTION_CHARS})")
    if "\x00" in instruction:
        return _rejected("instruction contains a NUL character")
    if len(instruction.split()) <= MIN_WORDS_EXCLUSIVE:
        return _rejected(f"instruction of {MIN_WORDS_EXCLUSIVE} words or fewer")
    if unicodedata.category(instruction[0])[0] in ("P", "S"):
        return _rejected(f"instruction starts with punctuation: {instruction[0]!r}")
    # Lookalike delimiters count (lookalikes.py); the instruction is kept as written.
    if _ECHO_START.search(instruction) or _ECHO_ANYWHERE.search(folded(instruction)):
        return _rejected("instruction echoes the prompt's labels or data blocks")
    return Generated(instruction, True, None)


def generated_schema() -> dict[str, Any]:
    """JSON schema for structured generator output, strict-mode shaped."""
    return {
        "type": "object",
        "properties": {"instruction": {"type": "string"}},
        "required": ["instruction"],
        "additionalProperties": False,
    }


def _rejected(reason: str) -> Generated:
    return Generated(None, False, reason)
