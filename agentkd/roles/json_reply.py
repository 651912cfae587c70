"""Find a JSON value in a teacher reply: bare, inside ``` fences, or inside prose. Never raises."""

from __future__ import annotations

import json
import re
from typing import Any

# Replies longer than this are not searched (and the role parsers reject them): a teacher asked for a
# sentence or a small object that answers with 100k characters has failed, and scanning costs time.
MAX_REPLY_CHARS = 100_000
# Start positions tried when the JSON sits inside prose; bounds the work on adversarial text.
MAX_STARTS = 64

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)```", re.DOTALL)
_NOT_FOUND = object()


def fenced_blocks(text: str) -> list[str]:
    return [m.group(1) for m in _FENCE.finditer(text)]


def strip_fences(text: str) -> str:
    """The inside of a reply that is one fenced block, else the text unchanged (both stripped)."""
    stripped = text.strip()
    match = _FENCE.fullmatch(stripped)
    return (match.group(1) if match else stripped).strip()


def _decode_at(text: str, start: int) -> Any:
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        return _NOT_FOUND
    return value


def find_json(text: str) -> tuple[bool, Any]:
    """(True, value) for the first JSON object or array found, else (False, None).

    Order: the whole reply, each fenced block, then every `{` or `[` in the prose (first MAX_STARTS).
    Bare scalars ("8") are not returned: a number or string alone is prose to the role parsers.
    """
    if len(text) > MAX_REPLY_CHARS:
        return False, None
    for candidate in [text.strip(), *(block.strip() for block in fenced_blocks(text))]:
        if candidate[:1] in ("{", "["):
            value = _decode_at(candidate, 0)
            if isinstance(value, (dict, list)):
                return True, value
    starts = [m.start() for m in re.finditer(r"[{\[]", text)][:MAX_STARTS]
    for start in starts:
        value = _decode_at(text, start)
        if isinstance(value, (dict, list)):
            return True, value
    return False, None
