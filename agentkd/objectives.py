"""Training objectives as plain functions on tensors (METHODS.md).

Conventions, shared by every loss here:
- `logits` (B, T, V) come from the model on `input_ids` (B, T); `labels` (B, T) are the input ids
  with -100 wherever no loss is taken (prompt, padding). Like transformers, the functions shift
  internally: logits at position t predict labels at t + 1.
- Sparse targets (`ids`, `probs` (B, T, k) and `tail` (B, T)) are aligned with `labels`: row t
  describes the distribution of token t. Positions whose label is -100 are ignored.
- Token-level terms are averaged over the labelled tokens of the batch, so a KD weight lambda
  weighs the KL per token against the CE per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits[:, :-1].float(), labels[:, 1:]  # (B, T-1, V), (B, T-1)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t | prefix) per position, 0 where the label is -100. Returns (B, T-1)."""
    logits, labels = _shift(logits, labels)
    mask = labels != IGNORE  # (B, T-1)
    logp = torch.log_softmax(logits, dim=-1)  # (B, T-1, V)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return picked * mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, *, mean: bool = False) -> torch.Tensor:
    """Sum (or per-token mean) of log p(y|x) over each row's labelled tokens: (B,). DPO and proxy weights."""
    total = token_logprobs(logits, labels).sum(-1)  # (B,)
    if not mean:
        return total
    count = (labels[:, 1:] != IGNORE).sum(-1).clamp_min(1)  # (B,)
    return total / count


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on response tokens only (Lion imitation step, arXiv 2305.12870 §3.1); mean per token."""
    logits, labels = _shift(logits, labels)
    if not (labels != IGNORE).any():
        return logits.sum() * 0.0  # no labelled token: a zero that still has a graph
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE)


def rationale_loss(
    label_logits: torch.Tensor,
    label_labels: torch.Tensor,
    rationale_logits: torch.Tensor,
    rationale_labels: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Multi-task distilling step-by-step (arXiv 2305.02301 eq. 3; zero-shot variant arXiv 2403.15886):
    L = a * CE(label | "predict: " x) + (1 - a) * CE(rationale | "explain: " x).

    Rows without a rationale carry only -100 in `rationale_labels` and so add nothing to the second
    term (agentkd: masked, not an empty target); if no row has one, the second term is 0.
    """
    return alpha * sft_loss(label_logits, label_labels) + (1.0 - alpha) * sft_loss(
        rationale_logits, rationale_labels
    )


# ---------------------------------------------------------------- sparse KL (posterior and proxy KD)


def sparse_kl(
    logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor
) -> torch.Tensor:
    """Forward KL(p || p_student) per position, 0 where the label is -100. Returns (B, T-1).

    p is known only on its top-k ids plus a tail mass (everything else). Exactly what is computed:
    the KL between the two distributions coarsened to k + 1 outcomes — the k ids and one "tail"
    bucket — i.e. sum_i p_i log(p_i / s_i) + tail * log(tail / S_tail), where s = softmax(logits)
    and S_tail = 1 - sum_i s_i (the student's mass off the k ids). It equals the full KL when
    tail = 0 and otherwise is a lower bound of it (coarsening never increases KL).
    Computed only at the positions that carry target mass (response positions of rows with targets; the
    rest are 0): the V-wide work is what a KD step adds to an sft step, and prompt, padding and rows
    outside the KD role would only add zeros to it.
    """
    logits, labels = _shift(logits, labels)  # (B, T-1, V)
    ids, probs, tail = ids[:, 1:].long(), probs[:, 1:].float(), tail[:, 1:].float()  # (B, T-1, k), (B, T-1)
    live = (labels != IGNORE) & (probs.sum(-1) + tail > 0)  # (B, T-1)
    at = live.nonzero(as_tuple=True)
    x, ids, probs, tail = logits[at], ids[at], probs[at], tail[at]  # (P, V), (P, k), (P, k), (P,)
    lse = torch.logsumexp(x, dim=-1)  # (P,)
    log_s = x.gather(-1, ids) - lse.unsqueeze(-1)  # (P, k)
    kl = (torch.xlogy(probs, probs) - probs * log_s).sum(-1)  # (P,)
    if ids.size(-1) < x.size(-1):  # with k = V there is no tail bucket
        rest = x.scatter(-1, ids, float("-inf"))  # (P, V): logits off the k ids
        log_s_tail = torch.logsumexp(rest, dim=-1) - lse  # (P,)
        kl = kl + torch.xlogy(tail, tail) - tail * log_s_tail
    return torch.zeros(labels.shape, dtype=kl.dtype, device=kl.device).index_put(at, kl)


def _mean_over_tokens(per_position: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return per_position.sum() / (labels[:, 1:] != IGNORE).sum().clamp_min(1)


def posterior_kd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    tail: torch.Tensor,
    kd_lambda: float,
) -> torch.Tensor:
    """agentkd formulation of Bayesian KD (arXiv 2401.07013 v1; METHODS.md §3):
    L = CE(y) + lambda * sum_t KL(p_post,t || p_student,t), the KL summed over response positions and,
    like the CE, divided by the number of response tokens in the batch. See `sparse_kl`.
    """
    kl = sparse_kl(logits, labels, ids, probs, tail)  # (B, T-1)
    return sft_loss(logits, labels) + kd_lambda * _mean_over_tokens(kl, labels)


def proxy_kd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    tail: torch.Tensor,
    weights: torch.Tensor,
    kd_lambda: float,
) -> torch.Tensor:
    """Proxy-KD student loss (arXiv 2401.07013 v2, step e, reconstructed from prose):
    L = NLL(y) + lambda * w * sum_t KL(p_proxy,t || p_student,t) with p_proxy the proxy's top-k (+ tail)
    and w (B,) the per-sample weight, a constant. Both terms are averaged per response token.
    """
    kl = sparse_kl(logits, labels, ids, probs, tail) * weights.detach().unsqueeze(-1)  # (B, T-1)
    return sft_loss(logits, labels) + kd_lambda * _mean_over_tokens(kl, labels)


# ---------------------------------------------------------------- proxy KD (v2) pieces


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), used in Proxy-KD alignment (arXiv 2401.07013 v2 step b):
    -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]), batch mean.
    Inputs are sequence log-probs (B,)."""
    margin = (policy_chosen_logp - ref_chosen_logp) - (policy_rejected_logp - ref_rejected_logp)  # (B,)
    return -F.logsigmoid(beta * margin).mean()


def proxy_sample_weights(mean_logp: torch.Tensor) -> torch.Tensor:
    """Proxy-KD sample weights (arXiv 2401.07013 v2 step d): w = sigmoid((logp - mean) / std) over the KD
    split, logp = mean per-token log p_proxy(y|x) (agentkd choice). Constants: no gradient."""
    x = mean_logp.detach().float()  # (N,)
    std = x.std() if x.numel() > 1 else x.new_tensor(0.0)
    z = (x - x.mean()) / std if std > 0 else torch.zeros_like(x)
    return torch.sigmoid(z)


# ---------------------------------------------------------------- sparse targets (posterior.py, proxy.py)


@dataclass(frozen=True)
class SparseTargets:
    """One sequence's sparse target distribution: per position k ids (a top-k, or posterior.py's support;
    a repeated id carries 0), their probabilities and the mass left off them. O(k) per position, not O(V)."""

    ids: torch.Tensor  # (T, k) int32
    probs: torch.Tensor  # (T, k) float32
    tail: torch.Tensor  # (T,) float32

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ids, self.probs, self.tail))


def sparsify(dist: torch.Tensor, k: int) -> SparseTargets:
    """Dense (T, V) distributions -> top-k ids/probs + tail (mass off the top k, summed exactly)."""
    k = min(k, dist.size(-1))
    probs, ids = dist.topk(k, dim=-1)  # (T, k)
    tail = dist.scatter(-1, ids, 0.0).sum(-1)  # (T,): 0 exactly when k = V
    return SparseTargets(ids=ids.to(torch.int32), probs=probs.float().contiguous(), tail=tail.float())
