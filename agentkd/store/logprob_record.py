"""The logprob record: what the teacher's logprobs are, so the trainer can tell whether they fit its student.

Where logprobs were asked for and returned, the call row says how many alternatives each position
lists, that they are "raw" (stored as the provider sent them: log-probabilities of its own tokens,
not renormalised or cut by agentkd), the sampling temperature, and, when the config names it
(teacher.tokenizer_hash, e.g. a vocab hash of a local teacher's tokenizer), the tokenizer the tokens
belong to. A provider's tokenizer is usually unknown: the evidence is then matched to the student by
token strings only (evidence.py), never by ids.
"""

from __future__ import annotations

from typing import Any

from agentkd.store.writer import Store


def record_columns(temperature: float, logprobs: list[dict[str, Any]], tokenizer_hash: str | None) -> dict[str, Any]:
    return {"logprobs_top": max((len(p.get("top") or ()) for p in logprobs), default=0), "logprobs_kind": "raw",
            "logprobs_temperature": temperature, "tokenizer_hash": tokenizer_hash}


def evidence_fit(store: Store, student_hash: str) -> str | None:
    """One line on how the stored logprobs fit a student with this vocab hash, or None if none are stored."""
    rows = store.query(
        "SELECT tokenizer_hash, count(*), min(logprobs_top), max(logprobs_temperature) FROM calls "
        "WHERE status = 'ok' AND logprobs_json IS NOT NULL GROUP BY tokenizer_hash")
    if not rows:
        return None
    known = {h: n for h, n, _, _ in rows if h is not None}
    unknown = sum(n for h, n, _, _ in rows if h is None)
    fitting = known.get(student_hash, 0)
    other = sum(n for h, n in known.items() if h != student_hash)
    top = min(r[2] for r in rows if r[2] is not None) if any(r[2] is not None for r in rows) else None
    parts = [f"teacher logprobs: {fitting:,} calls on the student's tokenizer"]
    if other:
        parts.append(f"{other:,} on another tokenizer (they do not fit this student: matched by token strings only)")
    if unknown:
        parts.append(f"{unknown:,} on a tokenizer not known (matched by token strings only)")
    if top is not None:
        parts.append(f"at least {top} alternatives per position")
    return ", ".join(parts)
