"""Near-duplicate filter for instructions (Lion: drop a new instruction with ROUGE-L F > 0.7 to any known one).

ROUGE-L F over lowercased word tokens: F = 2 * LCS / (len_a + len_b) (beta = 1). Tokens are `\\w+` runs of
the casefolded text; unlike the rouge_score package this keeps non-ASCII words instead of dropping them.

Search cost stays low as the pool grows, with no false negatives:
1. exact: a dict from the token tuple to its text (identical token sequences score 1.0);
2. prefilter: an inverted index gives, for every pool instruction sharing a token with the query, the
   multiset token overlap `ov`; since LCS <= ov, F <= 2 * ov / (la + lb), and candidates whose bound
   cannot exceed the threshold are skipped (numpy over the postings, no Python loop per candidate);
3. ROUGE-L on the survivors only, best bound first, with a bit-parallel LCS (Allison-Dix / Hyyro 2004):
   one pass over the candidate's tokens with a few big-int operations each, instead of an O(la * lb) table.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"\w+")
_BOUND_SLACK = 1e-9  # keep float rounding from pruning a candidate that sits exactly on the bound


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.casefold())


def normalise(text: str) -> str:
    """Lowercase and collapse whitespace: the form instruction ids are computed on."""
    return " ".join(text.casefold().split())


def instruction_id(text: str) -> str:
    """Stable id of an instruction in the store: sha256 of its normalised text, first 16 hex chars."""
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:16]


def lcs_length(a: Sequence[object], b: Sequence[object]) -> int:
    """Length of the longest common subsequence, bit-parallel: O(len(b)) big-int steps of len(a) bits."""
    if not a or not b:
        return 0
    masks: dict[object, int] = {}
    for i, item in enumerate(a):
        masks[item] = masks.get(item, 0) | (1 << i)
    return _lcs_with_masks(masks, (1 << len(a)) - 1, len(a), b)


def _lcs_with_masks(masks: dict[object, int], full: int, la: int, b: Sequence[object]) -> int:
    # v keeps a 1 in every row not yet "used" by the LCS; each matching column consumes the lowest
    # available match below a carry chain. LCS = rows consumed = zero bits of v.
    v = full
    for item in b:
        m = masks.get(item)
        if m:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return la - v.bit_count()


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure between two texts over lowercased word tokens."""
    ta, tb = tokens(a), tokens(b)
    if not ta or not tb:
        return 0.0
    return 2.0 * lcs_length(ta, tb) / (len(ta) + len(tb))


class _GrowingArray:
    """An int32 array with amortised O(1) append, viewed without copying."""

    __slots__ = ("data", "size")

    def __init__(self, capacity: int = 4) -> None:
        self.data = np.empty(capacity, dtype=np.int32)
        self.size = 0

    def append(self, value: int) -> None:
        if self.size == len(self.data):
            grown = np.empty(2 * len(self.data), dtype=np.int32)
            grown[: self.size] = self.data
            self.data = grown
        self.data[self.size] = value
        self.size += 1

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class InstructionIndex:
    """Pool of instructions answering "is this new one a near-duplicate (ROUGE-L F > threshold)?"."""

    def __init__(self, threshold: float = 0.7, texts: Sequence[str] = ()) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self._texts: list[str] = []
        self._docs: list[tuple[int, ...]] = []  # token ids per instruction
        self._lengths = _GrowingArray()
        self._vocab: dict[str, int] = {}
        self._postings: list[tuple[_GrowingArray, _GrowingArray]] = []  # per token: (doc ids, counts)
        self._exact: dict[tuple[int, ...], int] = {}
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self._texts)

    def add(self, text: str) -> int:
        """Add an instruction (duplicates included: the caller decides); returns its index."""
        doc_id = len(self._texts)
        ids = tuple(self._token_id(t) for t in tokens(text))
        self._texts.append(text)
        self._docs.append(ids)
        self._lengths.append(len(ids))
        self._exact.setdefault(ids, doc_id)
        for token, count in Counter(ids).items():
            docs, counts = self._postings[token]
            docs.append(doc_id)
            counts.append(count)
        return doc_id

    def nearest(self, text: str) -> tuple[float, str | None]:
        """(best ROUGE-L F, that instruction) among candidates that could exceed the threshold.

        Exact whenever the best score exceeds the threshold; below it, the score returned is a lower
        bound (pruned instructions are known to score no more than the threshold). (0.0, None) when none.
        """
        return self._search(text, first_hit=False)

    def is_duplicate(self, text: str) -> tuple[bool, float]:
        """(True, score) as soon as one instruction scores above the threshold, else (False, best seen)."""
        score, _ = self._search(text, first_hit=True)
        return score > self.threshold, score

    def add_if_new(self, text: str) -> tuple[bool, float]:
        """Add the instruction unless it is a near-duplicate; (added, score) — Lion's accept step."""
        duplicate, score = self.is_duplicate(text)
        if not duplicate:
            self.add(text)
        return not duplicate, score

    def _token_id(self, token: str) -> int:
        token_id = self._vocab.get(token)
        if token_id is None:
            token_id = self._vocab[token] = len(self._vocab)
            self._postings.append((_GrowingArray(), _GrowingArray()))
        return token_id

    def _search(self, text: str, *, first_hit: bool) -> tuple[float, str | None]:
        query_tokens = tokens(text)
        if not query_tokens or not self._texts:
            return 0.0, None
        known = [self._vocab.get(t, -1) for t in query_tokens]
        exact = self._exact.get(tuple(known)) if -1 not in known else None
        if exact is not None:
            return 1.0, self._texts[exact]
        query_counts = Counter(t for t in known if t >= 0)
        if not query_counts:
            return 0.0, None
        lq = len(query_tokens)

        # Multiset overlap with every instruction that shares a token: ov[d] = sum_t min(cq(t), cd(t)).
        # A doc id is listed once per k <= cq(t) with cd(t) >= k, so one unweighted bincount counts it.
        doc_parts = []
        for token, cq in query_counts.items():
            docs, counts = self._postings[token]
            doc_parts.append(docs.view())
            for k in range(2, cq + 1):
                doc_parts.append(docs.view()[counts.view() >= k])
        overlap = np.bincount(np.concatenate(doc_parts), minlength=len(self._texts))
        # Upper bound on F from LCS <= ov; keep only instructions whose bound can pass the threshold.
        candidates = np.flatnonzero(overlap)
        bound = 2.0 * overlap[candidates] / (lq + self._lengths.view()[candidates])
        keep = bound > self.threshold - _BOUND_SLACK
        survivors, bound = candidates[keep], bound[keep]
        if survivors.size == 0:
            return 0.0, None
        order = np.argsort(-bound, kind="stable")
        survivors, bound = survivors[order], bound[order]

        masks: dict[int, int] = {}
        for i, token in enumerate(known):
            if token >= 0:
                masks[token] = masks.get(token, 0) | (1 << i)
        full = (1 << lq) - 1
        best, best_doc = 0.0, -1
        for doc_id, doc_bound in zip(survivors.tolist(), bound.tolist()):
            if doc_bound <= best:
                break  # sorted by bound: nobody left can beat the best
            doc = self._docs[doc_id]
            score = 2.0 * _lcs_with_masks(masks, full, lq, doc) / (lq + len(doc))
            if score > best:
                best, best_doc = score, doc_id
                if first_hit and best > self.threshold:
                    break
        return best, (self._texts[best_doc] if best_doc >= 0 else None)
