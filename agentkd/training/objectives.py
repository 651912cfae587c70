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
    like the CE, divided by the number of response tokens in the batch. The KL is `sparse_kl`'s; both terms
    are computed in one pass (`ce_plus_sparse_kl`), equal to sft_loss + lambda * mean sparse_kl.
    """
    return ce_plus_sparse_kl(logits, labels, ids, probs, tail, logits.new_full((logits.size(0),), kd_lambda))


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
    return ce_plus_sparse_kl(logits, labels, ids, probs, tail, kd_lambda * weights.detach())


def ce_plus_sparse_kl(
    logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor,
    kl_scale: torch.Tensor,
) -> torch.Tensor:
    """sft_loss + sum over positions of kl_scale[row] * sparse_kl, divided by the batch's labelled tokens.

    The same values and gradients as those two functions (tests compare them on random inputs), in one pass
    over the labelled positions only: one softmax per position serves the CE and the KL, and the gradient
    is written in closed form. Autograd through sft_loss + sparse_kl made a KD step pay for a second
    log-normaliser, gathers, a scatter and their backward copies over (B, T, V) — as much again as the CE.
    kl_scale (B,): the KL's weight per row (kd_lambda, times proxy_kd's sample weight), a constant.
    """
    B, T, V = logits.shape
    shifted = labels[:, 1:]  # (B, T-1): logits at t predict labels at t + 1
    row, col = (shifted != IGNORE).nonzero(as_tuple=True)  # (N,) each: the labelled positions
    if row.numel() == 0:
        return logits.sum() * 0.0  # no labelled token: a zero that still has a graph (as sft_loss)
    probs_n, tail_n = probs[:, 1:][row, col].float(), tail[:, 1:][row, col].float()  # (N, k), (N,)
    live = ((probs_n.sum(-1) + tail_n) > 0).nonzero().squeeze(-1)  # (P,) positions with target mass
    return _CEPlusSparseKL.apply(
        logits, row * T + col, shifted[row, col], live, ids[:, 1:][row, col][live].long(), probs_n[live],
        tail_n[live], kl_scale.detach().float()[row[live]],
    )


class _CEPlusSparseKL(torch.autograd.Function):
    """The loss of `ce_plus_sparse_kl` from the labelled positions' logits, with its gradient in closed form.
    Per labelled position (softmax s, log-normaliser lse) the CE is lse - x_y, gradient s - onehot(y); per live
    position the KL of `sparse_kl`, sum_i p_i log(p_i / s_i) + tail log(tail / S_tail), has gradient
    (sum_i p_i + tail) s - scatter(p) - tail s_rest, s_rest the softmax over the ids off the support (exact
    with its own log-normaliser, as sparse_kl's logsumexp, even when S_tail is tiny)."""

    @staticmethod
    def forward(ctx, logits, flat, label, live, ids, probs, tail, scale):
        # flat (N,): rows of logits.view(-1, V) that predict a label; label (N,); live (P,) indices into N;
        # ids, probs (P, k), tail (P,), scale (P,): the live positions' targets and KL weights
        V, n = logits.size(-1), flat.numel()
        x = logits.reshape(-1, V).index_select(0, flat).float()  # (N, V)
        top = x.amax(-1, keepdim=True)  # (N, 1)
        s = (x - top).exp_()  # (N, V), softmax once normalised
        z = s.sum(-1, keepdim=True)  # (N, 1)
        s.div_(z)
        lse = (top + z.log()).squeeze(-1)  # (N,)
        total = (lse - x.gather(-1, label.unsqueeze(-1)).squeeze(-1)).sum()  # CE summed
        has_tail = ids.size(-1) < V  # with k = V there is no tail bucket
        s_rest = x.new_zeros(0)
        if live.numel():
            x_live, lse_live = x.index_select(0, live), lse.index_select(0, live)  # (P, V), (P,)
            log_s = x_live.gather(-1, ids) - lse_live.unsqueeze(-1)  # (P, k)
            kl = (torch.xlogy(probs, probs) - probs * log_s).sum(-1)  # (P,)
            if has_tail:
                rest = x_live.scatter_(-1, ids, float("-inf"))  # (P, V): logits off the k ids (in place)
                lse_rest = torch.logsumexp(rest, dim=-1)  # (P,)
                kl = kl + torch.xlogy(tail, tail) - tail * (lse_rest - lse_live)
                s_rest = rest.sub_(lse_rest.unsqueeze(-1)).exp_()  # (P, V), 0 on the k ids
            total = total + (scale * kl).sum()
        ctx.save_for_backward(s, s_rest, flat, label, live, ids, probs, tail, scale)
        ctx.shape, ctx.dtype, ctx.n, ctx.has_tail = logits.shape, logits.dtype, n, has_tail
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        s, s_rest, flat, label, live, ids, probs, tail, scale = ctx.saved_tensors
        c = grad_out / ctx.n  # both terms are divided by the labelled tokens
        grad = s * c  # (N, V): CE's s - onehot(y), the onehot next; a new tensor, so a second backward works
        grad.scatter_add_(-1, label.unsqueeze(-1), (-c).expand(label.size(0), 1).to(grad.dtype))
        if live.numel():
            w = scale * c  # (P,)
            mass = probs.sum(-1) + (tail if ctx.has_tail else 0.0)  # (P,)
            g_live = s.index_select(0, live) * (w * mass).unsqueeze(-1)  # (P, V)
            if ctx.has_tail:
                g_live.sub_(s_rest * (w * tail).unsqueeze(-1))
            g_live.scatter_add_(-1, ids, -(w.unsqueeze(-1) * probs))  # a repeated id carries p = 0: adds 0
            grad.index_add_(0, live, g_live)
        B, T, V = ctx.shape
        out = grad.new_zeros(B * T, V, dtype=ctx.dtype).index_copy_(0, flat, grad.to(ctx.dtype))
        return out.view(B, T, V), None, None, None, None, None, None, None


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
