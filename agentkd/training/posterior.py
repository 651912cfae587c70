"""Posterior KD targets (agentkd formulation of arXiv 2401.07013 v1, METHODS.md §3), sparse by construction.

Per response position t with observed teacher token y_t, on the support
    S_t = {y_t} u top-k(q_t) u top-k(prior_t) u evidence ids,   plus one tail bucket for every other id:
    p0(v)     = (1 - eps) [v = y_t] + eps ngram(v | y_{t-n+1..t-1})
    p_post(v) = (alpha p0(v) + beta q(v) [+ gamma e(v)]) / (alpha + beta [+ gamma])
    e(v)      = exp(provider logprob) on the provider's top ids; the rest of its mass spread like q off them
    tail      = 1 - sum over S_t of p_post (exact: p_post sums to 1 over the vocabulary).
The q model's V-wide logits exist only on its device, a chunk of positions at a time (cfg.target_chunk_logits
logits); only (positions, |S|) gathered values reach the host. Column 0 of every target is y_t; an id
repeated in the support keeps its probability at its first column and 0 at the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agentkd.config import TrainSection
from agentkd.training.evidence import aligned_evidence, evidence_width
from agentkd.training.ngram import NGramPrior, contexts
from agentkd.training.objectives import SparseTargets
from agentkd.training.optimise import pad_id_of
from agentkd.training.train_data import EncodedRow, TrainingExample, collate


@dataclass(frozen=True)
class EvidenceCounts:
    """Response positions of rows with provider logprobs: where they entered the target, and where not."""

    used: int = 0
    unused: int = 0


def fit_prior(tokenizer: Any, corpus_texts: Sequence[str], cfg: TrainSection, vocab_size: int) -> NGramPrior:
    """The n-gram prior from ALL stored teacher answers, each tokenised as a training target (+ eos)."""
    texts = list(corpus_texts)
    ids = tokenizer(texts, add_special_tokens=False).input_ids if texts else []
    eos = [tokenizer.eos_token_id]
    return NGramPrior.fit((s + eos for s in ids), n=cfg.ngram_n, vocab_size=vocab_size, add_k=cfg.ngram_add_k,
                          top_k=cfg.prior_top_k)


@torch.no_grad()
def posterior_targets(
    q_model: Any,
    tokenizer: Any,
    examples: Sequence[TrainingExample],
    encoded: Sequence[EncodedRow],
    prior: NGramPrior,
    cfg: TrainSection,
    device: torch.device,
    *,
    batch_size: int = 32,
) -> tuple[list[SparseTargets], EvidenceCounts]:
    """Sparse p_post per example and response position (row t = response token t, as `encode_pair` truncated
    it), and how many positions took the provider's logprobs. `batch_size` sequences share one q forward."""
    if cfg.dirichlet_alpha + cfg.dirichlet_beta <= 0:
        raise ValueError("train.dirichlet_alpha + train.dirichlet_beta must be > 0")
    V = q_model.config.vocab_size
    E = evidence_width(examples) if cfg.logprob_gamma > 0 else 0
    if any(p.device != device for p in q_model.parameters()):  # .to() walks every module: only when needed
        q_model.to(device)
    q_model.eval()
    cache: dict[str, int | None] = {}  # provider token string -> its one student id (None: not one token)
    out: list[SparseTargets] = []
    used = unused = 0
    for lo in range(0, len(encoded), batch_size):
        rows, exs = encoded[lo : lo + batch_size], examples[lo : lo + batch_size]
        ys = [r.labels[r.start : len(r.input_ids)] for r in rows]  # response tokens (+ eos) as truncated
        y = np.asarray([v for s in ys for v in s], dtype=np.int64)  # (P,) every response position of the batch
        length, number = prior.locate(contexts(ys, prior.n)[0])  # the prior's context at each position
        prior_top = prior.top(length, number)  # (P, Kp), -1 padded
        ev_ids, ev_lp, ev_mask = np.tile(y[:, None], (1, E)), np.zeros((len(y), E)), np.zeros((len(y), E), bool)
        at = 0
        for row_y, ex in zip(ys, exs, strict=True):
            if ex.teacher_top_logprobs:  # offered; with gamma = 0 (E = 0) every position counts as unused
                ids, lps, mask, offered = aligned_evidence(tokenizer, ex, row_y, E, cache)
                sl = slice(at, at + len(row_y))
                ev_ids[sl], ev_lp[sl], ev_mask[sl] = ids, lps, mask  # (T_r, E) each
                n_used = int(mask.any(-1).sum())
                used, unused = used + n_used, unused + offered - n_used
            at += len(row_y)
        fixed = np.concatenate([np.where(prior_top >= 0, prior_top, y[:, None]), ev_ids], axis=1)  # (P, Kp+E)
        support, logq = _q_on_support(q_model, rows, y, fixed, min(cfg.top_k, V), cfg.target_chunk_logits, device)
        p_ngram = prior.prob(length, number, support)  # (P, S)
        probs, tail = mix_posterior(support, y, p_ngram, logq, ev_ids, ev_lp, ev_mask, cfg)
        at = 0
        for row_y in ys:
            sl = slice(at, at + len(row_y))
            out.append(SparseTargets(ids=torch.from_numpy(support[sl]).to(torch.int32),
                                     probs=torch.from_numpy(probs[sl]).float(), tail=torch.from_numpy(tail[sl]).float()))
            at += len(row_y)
    return out, EvidenceCounts(used=used, unused=unused)


def mix_posterior(
    support: np.ndarray,
    y: np.ndarray,
    p_ngram: np.ndarray,
    logq: np.ndarray,
    ev_ids: np.ndarray,
    ev_lp: np.ndarray,
    ev_mask: np.ndarray,
    cfg: TrainSection,
) -> tuple[np.ndarray, np.ndarray]:
    """p_post on the support (P, S) and the tail (P,), in float64: the Dirichlet-multinomial posterior mean
    (alpha p0 + beta q + gamma e) / (alpha + beta + gamma), the gamma term only where evidence is present
    (ev_mask (P, E) marks the provider's distinct top ids ev_ids with logprobs ev_lp)."""
    alpha, beta, gamma, eps = cfg.dirichlet_alpha, cfg.dirichlet_beta, cfg.logprob_gamma, cfg.prior_eps
    q = np.exp(logq.astype(np.float64))  # (P, S)
    p0 = (1 - eps) * (support == y[:, None]) + eps * p_ngram  # (P, S)
    num, den = alpha * p0 + beta * q, np.full(len(y), alpha + beta)  # (P, S), (P,)
    has = ev_mask.any(-1)  # (P,) positions with evidence
    if ev_mask.shape[1] and has.any() and gamma > 0:
        match = (support[:, :, None] == ev_ids[:, None, :]) & ev_mask[:, None, :]  # (P, S, E)
        top = np.exp(ev_lp) * ev_mask  # (P, E) provider probs on its ids
        rest = np.clip(1.0 - top.sum(-1), 0.0, None)  # (P,) provider mass off its ids
        q_ev = (match.any(-1) * q * _first(support)).sum(-1)  # (P,) q on the (distinct) evidence ids
        spread = rest / np.clip(1.0 - q_ev, 1e-12, None)  # (P,)
        e = np.where(match.any(-1), (match * top[:, None, :]).sum(-1), spread[:, None] * q)  # (P, S)
        num, den = num + gamma * e * has[:, None], den + gamma * has
    post = num / den[:, None] * _first(support)  # (P, S): a repeated id counts once
    return post, np.clip(1.0 - post.sum(-1), 0.0, None)


def _first(support: np.ndarray) -> np.ndarray:
    """(P, S) 1 at the first column holding each id of a row, 0 at its repeats."""
    order = np.argsort(support, axis=1, kind="stable")  # equal ids keep column order
    ranked = np.take_along_axis(support, order, axis=1)
    repeat = np.zeros_like(ranked, dtype=bool)
    repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    first = np.empty_like(repeat)
    np.put_along_axis(first, order, ~repeat, axis=1)
    return first


def _q_on_support(
    q_model: Any, rows: Sequence[EncodedRow], y: np.ndarray, fixed: np.ndarray, k: int, chunk_logits: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """The support [y_t, top-k(q_t), fixed ids] (P, S) and log q on it (P, S). The body runs once per batch;
    the LM head, log-normaliser and top-k run on chunks of positions (chunk x V logits, on the device)."""
    batch = collate(rows, pad_id_of(q_model))
    # the last token of a row predicts nothing here, and attention is causal: the longest row's last column
    # changes no hidden state that is used, so it is not computed
    width = max(1, batch["input_ids"].size(1) - 1)
    body, head = q_model.get_decoder(), q_model.get_output_embeddings()
    hidden = body(input_ids=batch["input_ids"][:, :width].to(device),
                  attention_mask=batch["attention_mask"][:, :width].to(device)).last_hidden_state  # (B, T-1, H)
    T = hidden.size(1)
    where = []  # hidden state at t - 1 predicts response token t
    for i, r in enumerate(rows):
        if r.start < 1:
            raise ValueError("posterior targets need at least one prompt token before the response")
        where.append(torch.arange(r.start - 1, len(r.input_ids) - 1) + i * T)
    h = hidden.reshape(-1, hidden.size(-1))[torch.cat(where).to(device)]  # (P, H)
    y_dev, fixed_dev = torch.from_numpy(y).to(device), torch.from_numpy(fixed).to(device)
    step = max(1, chunk_logits // q_model.config.vocab_size)
    support, logq = [], []
    for a in range(0, h.size(0), step):
        logits = head(h[a : a + step]).float()  # (C, V), on the device only
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (C, 1)
        ids = torch.cat([y_dev[a : a + step, None], logits.topk(k, dim=-1).indices, fixed_dev[a : a + step]], 1)
        support.append(ids.cpu())  # (C, S)
        logq.append((logits.gather(-1, ids) - lse).cpu())  # (C, S)
        del logits
    if not support:
        width = 1 + k + fixed.shape[1]
        return np.zeros((0, width), np.int64), np.zeros((0, width), np.float32)
    return torch.cat(support).numpy(), torch.cat(logq).numpy()
