"""The provider's top-k logprobs as posterior KD evidence, only where its token IS the student's token.

A provider position and a student position are the same token when they cover exactly the same characters
of the response (the provider's token strings, concatenated, must reproduce the response text; the student's
spans come from its tokenizer's offsets, or from decoding piece by piece) and the provider's sampled token
string encodes to exactly y_t. Each alternative must encode to exactly one student id, else it is dropped.
Everything else is "unused" and counted: a mismatch never becomes evidence for the wrong token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agentkd.training.train_data import TrainingExample


def evidence_width(examples: Sequence[TrainingExample]) -> int:
    """The most alternatives any provider position lists: the evidence columns of a call's support."""
    return max((len(p) for e in examples for p in e.teacher_top_logprobs or ()), default=0)


def aligned_evidence(
    tokenizer: Any, example: TrainingExample, ys: Sequence[int], width: int, cache: dict[str, int | None]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per response position (ys: response ids + eos as truncated): the provider's distinct top ids (T, width)
    (filled with y_t), their logprobs (T, width), which are real (T, width) bool — the sampled token first,
    none where unused — and how many positions were offered (every response token; never the eos)."""
    T = len(ys)
    ids, lps, mask = np.tile(np.asarray(ys, np.int64)[:, None], (1, width)), np.zeros((T, width)), np.zeros((T, width), bool)
    text, top = example.response, example.teacher_top_logprobs or []
    body = tokenizer(text, add_special_tokens=False).input_ids
    n_body = min(len(body), T)  # response tokens that survived truncation; the eos follows them
    if list(ys[:n_body]) != body[:n_body] or any(not p for p in top) or "".join(p[0][0] for p in top) != text:
        return ids, lps, mask, n_body
    spans = student_spans(tokenizer, text, body)
    if spans is None:
        return ids, lps, mask, n_body
    provider: dict[tuple[int, int], int] = {}
    end = 0
    for j, position in enumerate(top):
        provider[(end, end + len(position[0][0]))] = j
        end += len(position[0][0])
    _encode_missing(tokenizer, [tok for p in top for tok, _ in p], cache)
    for t in range(n_body):
        j = provider.get(spans[t])
        if j is None or cache[top[j][0][0]] != ys[t]:  # another token boundary, or not the student's token
            continue
        kept: dict[int, float] = {}
        for token, logprob in top[j]:
            v = cache[token]
            if v is not None and v not in kept:
                kept[v] = logprob
        for c, (v, logprob) in enumerate(list(kept.items())[:width]):
            ids[t, c], lps[t, c], mask[t, c] = v, logprob, True
    return ids, lps, mask, n_body


def student_spans(tokenizer: Any, text: str, body: Sequence[int]) -> list[tuple[int, int]] | None:
    """Character span of each student token of `text` (tokenised as `encode_pair` does), or None when the
    tokenizer gives no trustworthy spans. Offsets first (a trimmed leading space is given back: each span
    starts where the previous one ended); else single-token decodes, if they concatenate to the text."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc.input_ids) == list(body):
            spans, end = [], 0
            for _, e in enc.offset_mapping:
                spans.append((end, e))
                end = max(end, e)
            if end == len(text):
                return spans
    pieces = tokenizer.batch_decode([[v] for v in body])
    if "".join(pieces) != text:
        return None
    bounds = np.cumsum([0] + [len(p) for p in pieces])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))


def _encode_missing(tokenizer: Any, tokens: Sequence[str], cache: dict[str, int | None]) -> None:
    """Fill `cache` with each new token string's one student id (None when it is not exactly one token)."""
    new = sorted({t for t in tokens if t not in cache})
    if new:
        for token, enc in zip(new, tokenizer(new, add_special_tokens=False).input_ids, strict=True):
            cache[token] = enc[0] if len(enc) == 1 else None
