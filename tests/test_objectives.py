"""Each loss against a reference computed another way, on seeded tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from agentkd.training import objectives as obj

IGN = obj.IGNORE


def seeded(seed: int = 0, B: int = 3, T: int = 7, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = IGN  # prompt
    labels[1, 5:] = IGN  # padding
    return logits, labels


def manual_ce(logits, labels):
    total, n = 0.0, 0
    for b in range(logits.size(0)):
        for t in range(1, logits.size(1)):
            if labels[b, t] != IGN:
                total -= torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                n += 1
    return total / n


def test_sft_loss_is_mean_ce_over_response_tokens_only():
    logits, labels = seeded()
    assert obj.sft_loss(logits, labels).item() == pytest.approx(manual_ce(logits, labels), rel=1e-5)
    changed = logits.clone()
    changed[:, 0] += 5.0  # position 0 predicts token 1, a prompt token: no loss there
    assert obj.sft_loss(changed, labels).item() == pytest.approx(obj.sft_loss(logits, labels).item(), rel=1e-6)


def test_rationale_loss_masks_rows_without_rationale():
    label_logits, label_labels = seeded(1)
    why_logits, why_labels = seeded(2)
    why_labels[2, :] = IGN  # row 2 has no rationale
    a = 0.3
    got = obj.rationale_loss(label_logits, label_labels, why_logits, why_labels, a).item()
    ref = a * manual_ce(label_logits, label_labels) + (1 - a) * manual_ce(why_logits[:2], why_labels[:2])
    assert got == pytest.approx(ref, rel=1e-5)
    none = torch.full_like(why_labels, IGN)
    got_none = obj.rationale_loss(label_logits, label_labels, why_logits, none, a).item()
    assert got_none == pytest.approx(a * manual_ce(label_logits, label_labels), rel=1e-5)


def random_sparse(B, T, V, k, seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.softmax(torch.randn(B, T, V, generator=g) * 2, -1)
    s = [obj.sparsify(dense[b], k) for b in range(B)]
    return dense, torch.stack([x.ids for x in s]), torch.stack([x.probs for x in s]), torch.stack([x.tail for x in s])


def test_sparse_kl_with_full_width_equals_dense_kl_div():
    logits, labels = seeded(3)
    V = logits.size(-1)
    dense, ids, probs, tail = random_sparse(3, 7, V, V, seed=4)
    assert tail.abs().max().item() == 0.0
    got = obj.sparse_kl(logits, labels, ids, probs, tail)  # (B, T-1)
    ref = F.kl_div(torch.log_softmax(logits[:, :-1], -1), dense[:, 1:], reduction="none").sum(-1)
    mask = labels[:, 1:] != IGN
    torch.testing.assert_close(got, ref * mask, rtol=1e-4, atol=1e-5)


def test_sparse_kl_equals_kl_of_coarsened_distributions_and_bounds_full_kl():
    logits, labels = seeded(5)
    V, k = logits.size(-1), 4
    dense, ids, probs, tail = random_sparse(3, 7, V, k, seed=6)
    got = obj.sparse_kl(logits, labels, ids, probs, tail)
    s = torch.softmax(logits, -1)
    for b in range(3):
        for t in range(1, 7):
            if labels[b, t] == IGN:
                assert got[b, t - 1].item() == 0.0
                continue
            top = ids[b, t].tolist()
            p = [dense[b, t, i].item() for i in top] + [1 - sum(dense[b, t, i].item() for i in top)]
            q = [s[b, t - 1, i].item() for i in top] + [1 - sum(s[b, t - 1, i].item() for i in top)]
            ref = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
            assert got[b, t - 1].item() == pytest.approx(ref, rel=1e-4, abs=1e-5)
            full = F.kl_div(torch.log_softmax(logits[b, t - 1], -1), dense[b, t], reduction="sum").item()
            assert got[b, t - 1].item() <= full + 1e-5


def test_sparse_kl_rows_without_targets_add_nothing_and_leave_the_gradient_of_the_others_alone():
    logits, labels = seeded(9)
    V, k = logits.size(-1), 4
    _, ids, probs, tail = random_sparse(3, 7, V, k, seed=10)
    dropped = probs.clone(), tail.clone()
    dropped[0][1], dropped[1][1] = 0.0, 0.0  # row 1 outside the KD role: zero mass (collate_targets' fill)
    a = logits.clone().requires_grad_()
    full = obj.sparse_kl(a, labels, ids, probs, tail)
    full[[0, 2]].sum().backward()
    b = logits.clone().requires_grad_()
    got = obj.sparse_kl(b, labels, ids, *dropped)
    got.sum().backward()
    assert got[1].abs().max().item() == 0.0 and b.grad[1].abs().max().item() == 0.0
    torch.testing.assert_close(got[[0, 2]], full[[0, 2]])
    torch.testing.assert_close(b.grad, a.grad)


def test_posterior_kd_loss_is_ce_plus_lambda_mean_kl():
    logits, labels = seeded(7)
    _, ids, probs, tail = random_sparse(3, 7, logits.size(-1), 5, seed=8)
    n = (labels[:, 1:] != IGN).sum()
    ref = manual_ce(logits, labels) + 2.0 * (obj.sparse_kl(logits, labels, ids, probs, tail).sum() / n).item()
    assert obj.posterior_kd_loss(logits, labels, ids, probs, tail, 2.0).item() == pytest.approx(ref, rel=1e-5)


def test_dpo_loss_matches_formula_and_prefers_chosen():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(5, generator=g) * 3 for _ in range(4))
    beta = 0.1
    ref = sum(math.log(1 + math.exp(-beta * ((a - c) - (b - d)))) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())) / 5
    assert obj.dpo_loss(pc, pr, rc, rr, beta).item() == pytest.approx(ref, rel=1e-5)
    assert obj.dpo_loss(pc + 1, pr, rc, rr, beta) < obj.dpo_loss(pc, pr, rc, rr, beta)


def test_sequence_logprob_sums_token_logprobs():
    logits, labels = seeded(9)
    got = obj.sequence_logprob(logits, labels)
    n = (labels[:, 1:] != IGN).sum(-1)
    torch.testing.assert_close(obj.sequence_logprob(logits, labels, mean=True), got / n)
    assert got[0].item() == pytest.approx(-manual_ce(logits[:1], labels[:1]) * n[0].item(), rel=1e-5)


def test_proxy_weights_are_sigmoid_zscores_without_grad():
    logp = torch.tensor([-1.0, -2.0, -3.0, -0.5], requires_grad=True)
    w = obj.proxy_sample_weights(logp)
    assert not w.requires_grad
    x = [-1.0, -2.0, -3.0, -0.5]
    mean = sum(x) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / 3)
    ref = [1 / (1 + math.exp(-(v - mean) / std)) for v in x]
    assert w.tolist() == pytest.approx(ref, rel=1e-5)


def test_proxy_kd_loss_weights_each_row_and_takes_no_weight_grad():
    logits, labels = seeded(10)
    logits.requires_grad_(True)
    _, ids, probs, tail = random_sparse(3, 7, logits.size(-1), 4, seed=11)
    w = torch.tensor([0.2, 0.9, 0.5], requires_grad=True)
    loss = obj.proxy_kd_loss(logits, labels, ids, probs, tail, w, 1.5)
    kl_rows = obj.sparse_kl(logits, labels, ids, probs, tail).sum(-1)  # (B,)
    n = (labels[:, 1:] != IGN).sum()
    ref = manual_ce(logits.detach(), labels) + 1.5 * ((w.detach() * kl_rows).sum() / n).item()
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert w.grad is None and logits.grad is not None


def dense_ce_plus_kl(logits, labels, ids, probs, tail, kl_scale):
    """The fused loss the obvious way, in float64 with autograd: per labelled position, the CE from a full
    log-softmax and the KL between target and student coarsened to (distinct support ids + one tail bucket)
    with the student's tail mass summed over an explicit mask of the ids off the support."""
    x = logits.double()
    B, T, V = x.shape
    total, n = x.sum() * 0.0, 0
    for b in range(B):
        for t in range(1, T):
            if labels[b, t] == IGN:
                continue
            n += 1
            logp = torch.log_softmax(x[b, t - 1], -1)  # (V,)
            total = total - logp[labels[b, t]]
            p, p_tail = probs[b, t].double(), tail[b, t].double()
            if p.sum() + p_tail <= 0:
                continue  # no target here: CE only
            support = torch.zeros(V, dtype=torch.bool)
            support[ids[b, t].long()] = True
            kl = sum(pi * (math.log(pi) - logp[i]) for i, pi in zip(ids[b, t].tolist(), p.tolist()) if pi > 0)
            if not support.all():
                s_tail = torch.logsumexp(logp[~support], -1)  # log of the student's mass off the support
                kl = kl + (p_tail * (torch.log(p_tail) - s_tail) if p_tail > 0 else 0.0)
            total = total + kl_scale[b] * kl
    return total / max(n, 1)


def kd_case(seed, B=4, T=9, V=13, k=5):
    """Random logits and sparse targets with what collate_targets and posterior.py produce: a row without
    targets (zero mass), an id repeated in a support with 0 on the repeat, a position whose tail is 0."""
    logits, labels = seeded(seed, B, T, V)
    _, ids, probs, tail = random_sparse(B, T, V, k, seed + 100)
    probs, tail = probs.clone(), tail.clone()
    probs[2], tail[2] = 0.0, 0.0  # row 2 outside the KD role
    if 3 < k < V:
        ids[0, 4, 3] = ids[0, 4, 1]  # a repeated id: its mass sits at the first column
        probs[0, 4, 3] = 0.0
    tail[1, 3] = 0.0
    return logits, labels, ids, probs, tail


@pytest.mark.parametrize("k", [1, 5, 13])  # 13 = V: no tail bucket
def test_ce_plus_sparse_kl_matches_a_dense_reference_in_value_and_gradient(k):
    logits, labels, ids, probs, tail = kd_case(12, k=k)
    scale = torch.tensor([0.7, 1.3, 2.0, 0.0])
    a = logits.clone().requires_grad_()
    got = obj.ce_plus_sparse_kl(a, labels, ids, probs, tail, scale)
    got.backward()
    b = logits.clone().requires_grad_()
    ref = dense_ce_plus_kl(b, labels, ids, probs, tail, scale)
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-4, atol=1e-6)
    assert a.grad[:, -1].abs().max().item() == 0.0  # the last position predicts nothing
    assert a.grad[:, :2].abs().max().item() == 0.0  # positions before the labels (prompt) take no gradient


def test_ce_plus_sparse_kl_equals_sft_loss_plus_scaled_sparse_kl_even_with_a_tiny_student_tail():
    logits, labels, ids, probs, tail = kd_case(13)
    # the student puts nearly all its mass on the support at one position: S_tail ~ e^-60
    off = torch.ones(logits.size(-1), dtype=torch.bool)
    off[ids[3, 6]] = False
    logits[3, 5, off] -= 60.0
    scale = torch.tensor([1.0, 0.5, 3.0, 2.0])
    a = logits.clone().requires_grad_()
    got = obj.ce_plus_sparse_kl(a, labels, ids, probs, tail, scale)
    got.backward()
    b = logits.clone().requires_grad_()
    n = (labels[:, 1:] != IGN).sum()
    ref = obj.sft_loss(b, labels) + (obj.sparse_kl(b, labels, ids, probs, tail) * scale[:, None]).sum() / n
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_ce_plus_sparse_kl_backward_twice_and_in_bf16():
    logits, labels, ids, probs, tail = kd_case(14)
    scale = torch.ones(4)
    a = logits.clone().requires_grad_()
    loss = obj.ce_plus_sparse_kl(a, labels, ids, probs, tail, scale)
    loss.backward(retain_graph=True)
    first = a.grad.clone()
    loss.backward()  # the saved softmax is not overwritten by the first backward
    torch.testing.assert_close(a.grad, 2 * first)
    h = logits.bfloat16().requires_grad_()
    low = obj.ce_plus_sparse_kl(h, labels, ids, probs, tail, scale)
    low.backward()
    assert h.grad.dtype == torch.bfloat16
    ref = obj.ce_plus_sparse_kl(logits.bfloat16().float(), labels, ids, probs, tail, scale)
    assert low.item() == pytest.approx(ref.item(), rel=1e-5)  # computed in fp32 from the bf16 logits


def test_ce_plus_sparse_kl_without_labelled_tokens_is_a_zero_with_a_graph():
    logits, labels, ids, probs, tail = kd_case(15)
    a = logits.clone().requires_grad_()
    loss = obj.ce_plus_sparse_kl(a, torch.full_like(labels, IGN), ids, probs, tail, torch.ones(4))
    loss.backward()
    assert loss.item() == 0.0 and a.grad.abs().max().item() == 0.0
