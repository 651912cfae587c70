"""The n-gram prior of posterior KD (METHODS.md §3), fitted once and looked up for every position at once.

p(v | ctx) = (c(ctx, v) + k) / (c(ctx) + k V) at the longest context of length n-1, n-2, .., 0 that
occurs in the corpus (agentkd's backoff choice); sequences are padded on the left with START so the
first tokens have contexts too. Counts are exact, never hashed: a context of length o is numbered by
the pair (number of its length o-1 suffix, the token before it), so keys are collision-free int64 at
any n and V; (context, id) pairs are keyed number * V + id. Sorted key arrays + searchsorted make a
lookup one vectorised pass per context length, whatever the number of positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

START = -1  # context padding before the first token (no real token id is negative)


def contexts(sequences: Iterable[Sequence[int]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every position of every sequence: its previous n-1 tokens, START-padded (N, n-1), and its token (N,)."""
    parts = [np.asarray(s, dtype=np.int64) for s in sequences]
    pad = np.full(n - 1, START, dtype=np.int64)
    flat = np.concatenate([x for s in parts for x in (pad, s)]) if parts else np.zeros(0, np.int64)
    real = np.concatenate([x for s in parts for x in (np.zeros(n - 1, bool), np.ones(len(s), bool))]) if parts \
        else np.zeros(0, bool)
    at = np.flatnonzero(real)  # (N,) index of each real token in `flat`
    ctx = flat[at[:, None] - (n - 1) + np.arange(n - 1)]  # (N, n-1), last column = the previous token
    return ctx, flat[at]


@dataclass(frozen=True)
class NGramPrior:
    """Add-k smoothed n-gram over token ids with longest-context backoff. Per context length o = 0..n-1:
    sorted context keys (C_o,) and counts c(ctx), sorted pair keys (P_o,) and counts c(ctx, v), and the
    `top_k` most frequent successors of each context (C_o, top_k), -1 where it has fewer."""

    n: int
    vocab_size: int
    add_k: float
    context_keys: tuple[np.ndarray, ...]
    context_counts: tuple[np.ndarray, ...]
    pair_keys: tuple[np.ndarray, ...]
    pair_counts: tuple[np.ndarray, ...]
    top_ids: tuple[np.ndarray, ...]

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], *, n: int, vocab_size: int, add_k: float, top_k: int) -> NGramPrior:
        V = vocab_size
        ctx, y = contexts(sequences, n)  # (N, n-1), (N,)
        number = np.zeros(len(y), np.int64)  # (N,) each position's context number at the current length
        keys_o, counts_o, pairs_o, pair_counts_o, tops_o = [], [], [], [], []
        for o in range(n):
            keys = number * (V + 1) + ctx[:, n - 1 - o] + 1 if o else np.zeros(len(y), np.int64)  # START -> 0
            uniq, number, counts = np.unique(keys, return_inverse=True, return_counts=True)
            number = number.reshape(-1)
            pairs, pair_counts = np.unique(number * V + y, return_counts=True)  # sorted (P_o,)
            keys_o.append(uniq), counts_o.append(counts), pairs_o.append(pairs), pair_counts_o.append(pair_counts)
            tops_o.append(_top_successors(pairs, pair_counts, len(uniq), V, top_k))
        return cls(n, V, add_k, tuple(keys_o), tuple(counts_o), tuple(pairs_o), tuple(pair_counts_o), tuple(tops_o))

    def locate(self, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The longest seen context of each query (N, n-1): its length (N,) and number (N,); length -1 where
        nothing was seen (an empty corpus: the prior is uniform)."""
        N, V = ctx.shape[0], self.vocab_size
        seen = np.full(N, len(self.context_keys[0]) > 0)
        length = np.where(seen, 0, -1)  # (N,)
        number = np.zeros(N, np.int64)  # (N,)
        for o in range(1, self.n):
            keys = number * (V + 1) + ctx[:, self.n - 1 - o] + 1
            table = self.context_keys[o]
            if len(table) == 0:
                break
            at = np.minimum(np.searchsorted(table, keys), len(table) - 1)
            seen = seen & (table[at] == keys)  # a longer context is seen only where its suffix is
            length, number = np.where(seen, o, length), np.where(seen, at, number)
        return length, number

    def top(self, length: np.ndarray, number: np.ndarray) -> np.ndarray:
        """The prior's most frequent successors at each located context: (N, top_k) ids, -1 padded."""
        K = self.top_ids[0].shape[1]
        out = np.full((len(length), K), -1, np.int64)
        for o in range(self.n):
            m = length == o
            out[m] = self.top_ids[o][number[m]]
        return out

    def prob(self, length: np.ndarray, number: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """p(v | ctx) at the given ids (N, S) of each located context: (N, S) float64; ids never seen after
        that context get the floor k / (c(ctx) + k V)."""
        V, k = self.vocab_size, self.add_k
        out = np.full(ids.shape, 1.0 / V)  # length -1: nothing seen, uniform
        for o in range(self.n):
            m = length == o
            if not m.any():
                continue
            keys = number[m, None] * V + ids[m]  # (N_o, S)
            table = self.pair_keys[o]
            at = np.minimum(np.searchsorted(table, keys), len(table) - 1)
            count = np.where(table[at] == keys, self.pair_counts[o][at], 0)  # (N_o, S) c(ctx, v)
            out[m] = (count + k) / (self.context_counts[o][number[m]] + k * V)[:, None]
        return out


def _top_successors(pairs: np.ndarray, counts: np.ndarray, n_contexts: int, V: int, top_k: int) -> np.ndarray:
    """(C, top_k) the most frequent ids after each context (ties: the smaller id), -1 padded."""
    number, ids = pairs // V, pairs % V
    order = np.lexsort((ids, -counts, number))  # by context, then count descending, then id
    number, ids = number[order], ids[order]
    rank = np.arange(len(order)) - np.searchsorted(number, number)  # place within its context's run
    keep = rank < top_k
    table = np.full((n_contexts, top_k), -1, np.int64)
    table[number[keep], rank[keep]] = ids[keep]
    return table
