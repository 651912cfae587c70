"""Posterior KD targets (METHODS.md §3): the vectorised prior and the sparse posterior against dense
references written here, provider evidence alignment, and memory at a large vocabulary."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from agentkd.config import TrainSection
from agentkd.training.ngram import START, NGramPrior, contexts
from agentkd.training.posterior import fit_prior, mix_posterior, posterior_targets
from agentkd.training.students import build_student, load_spec
from agentkd.training.train_data import EncodedRow, TrainingExample, encode_pair, format_prompt

STUDENTS = Path(__file__).resolve().parent.parent / "students"
CPU = torch.device("cpu")


# ---------------------------------------------------------------- dense references (dicts, (T, V) tensors)


class DictNGram:
    """The dict-based add-k n-gram with longest-context backoff the vectorised prior must reproduce."""

    def __init__(self, sequences, n, vocab_size, add_k):
        self.n, self.V, self.k = n, vocab_size, add_k
        self.counts = defaultdict(Counter)
        for seq in sequences:
            padded = [START] * (n - 1) + list(seq)
            for i in range(n - 1, len(padded)):
                for order in range(n):
                    self.counts[tuple(padded[i - order : i])][padded[i]] += 1

    def dense(self, context):
        context = ([START] * (self.n - 1) + list(context))[-(self.n - 1) :] if self.n > 1 else []
        for order in range(len(context), -1, -1):
            seen = self.counts.get(tuple(context[len(context) - order :]))
            if seen:
                out = torch.full((self.V,), self.k, dtype=torch.float64)
                for v, c in seen.items():
                    out[v] += c
                return out / (sum(seen.values()) + self.k * self.V), seen
        return torch.full((self.V,), 1.0 / self.V, dtype=torch.float64), Counter()


def dense_posterior(ng, ys, q, cfg, evidence=None):
    """(T, V) p_post: p0 = (1-eps) onehot + eps ngram; evidence (ids, logprobs) per position or None."""
    T, V = q.shape
    p0 = torch.stack([ng.dense(ys[max(0, t - ng.n + 1) : t])[0] for t in range(T)]) * cfg.prior_eps
    p0[torch.arange(T), torch.tensor(ys)] += 1 - cfg.prior_eps
    post = (cfg.dirichlet_alpha * p0 + cfg.dirichlet_beta * q) / (cfg.dirichlet_alpha + cfg.dirichlet_beta)
    for t, found in enumerate(evidence or []):
        if found is None:
            continue
        ids, lps = torch.tensor(found[0]), torch.tensor(found[1], dtype=torch.float64).exp()
        e = torch.zeros(V, dtype=torch.float64).scatter(0, ids, lps)
        q_off = q[t].clone().scatter(0, ids, 0.0)
        e += (1 - lps.sum()) * q_off / q_off.sum()
        g = cfg.logprob_gamma
        post[t] = (cfg.dirichlet_alpha * p0[t] + cfg.dirichlet_beta * q[t] + g * e) / (
            cfg.dirichlet_alpha + cfg.dirichlet_beta + g)
    return post


def dense_q(model, row):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row.input_ids])).logits[0].double()  # (T, V)
    return torch.softmax(logits, -1)[row.start - 1 : len(row.input_ids) - 1]


def first_columns(ids):
    """{id: column} at each id's first column of a target row."""
    out = {}
    for c, v in enumerate(ids.tolist()):
        out.setdefault(v, c)
    return out


# ---------------------------------------------------------------- fixtures


ANSWERS = [f"{a} + {b} = {a + b}. The answer is {a + b}." for a, b in [(3, 4), (2, 5), (6, 1), (4, 4), (3, 3)]]


@pytest.fixture(scope="module")
def tiny():
    corpus = [format_prompt("How many pens?") + a for a in ANSWERS]
    student = build_student(load_spec(STUDENTS / "tiny.toml"), corpus=corpus)
    proxy = build_student(load_spec(STUDENTS / "tiny-proxy.toml"), tokenizer=student.tokenizer, seed=3)
    return student.tokenizer, proxy.model


def provider_tokens(tok, text, alternatives):
    """The provider's per-token list for `text` cut exactly like the student: (piece, logprob) + alternatives."""
    pieces = [tok.decode([v]) for v in tok(text, add_special_tokens=False).input_ids]
    assert "".join(pieces) == text
    return [[(p, -0.7)] + alternatives(p) for p in pieces]


# ---------------------------------------------------------------- the prior


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_vectorised_prior_equals_the_dict_reference_with_backoff_and_unseen_contexts(n):
    rng = random.Random(n)
    V = 40
    corpus = [[rng.randrange(30) for _ in range(rng.randint(1, 12))] for _ in range(30)]  # ids 30..39 unseen
    queries = [[rng.randrange(V) for _ in range(rng.randint(1, 10))] for _ in range(20)] + corpus[:5]
    prior = NGramPrior.fit(corpus, n=n, vocab_size=V, add_k=0.1, top_k=5)
    ref = DictNGram(corpus, n, V, 0.1)
    length, number = prior.locate(contexts(queries, n)[0])
    probs = prior.prob(length, number, np.tile(np.arange(V), (len(length), 1)))  # (P, V)
    tops = prior.top(length, number)
    at = 0
    for q in queries:
        for t in range(len(q)):
            dense, seen = ref.dense(q[max(0, t - n + 1) : t])
            np.testing.assert_allclose(probs[at], dense.numpy(), rtol=1e-12)
            ranked = sorted(seen, key=lambda v: (-seen[v], v))[:5]
            assert tops[at].tolist() == ranked + [-1] * (5 - len(ranked))
            at += 1
    assert at == len(length)
    if n > 1:  # the queries exercise backoff: some contexts are seen only at a shorter length
        assert (length < n - 1).any() and (length == n - 1).any()


def test_prior_counts_and_smoothing_by_hand():
    prior = NGramPrior.fit([[3, 4, 5], [3, 4, 6], [3, 7]], n=3, vocab_size=10, add_k=0.5, top_k=2)
    length, number = prior.locate(np.array([[3, 4], [9, 9]]))
    p = prior.prob(length, number, np.array([[5, 0], [3, 0]]))
    # (3, 4) seen twice, 5 once: (1 + 0.5) / (2 + 0.5 * 10); the floor 0.5 / 7
    assert p[0].tolist() == pytest.approx([1.5 / 7, 0.5 / 7])
    # (9, 9) and (9,) unseen: back off to the empty context, 8 tokens, 3 of them 3
    assert length.tolist() == [2, 0] and p[1].tolist() == pytest.approx([3.5 / 13, 0.5 / 13])


def test_an_empty_corpus_gives_a_uniform_prior():
    prior = NGramPrior.fit([], n=3, vocab_size=10, add_k=0.1, top_k=2)
    length, number = prior.locate(np.array([[START, 1]]))
    assert prior.prob(length, number, np.array([[1, 2]])).tolist() == [[0.1, 0.1]]
    assert prior.top(length, number).tolist() == [[-1, -1]]


# ---------------------------------------------------------------- the sparse posterior


def test_sparse_posterior_equals_the_dense_reference_on_its_support_and_in_the_tail(tiny):
    tok, q_model = tiny
    cfg = TrainSection(top_k=4, prior_top_k=3, prior_eps=0.2, dirichlet_beta=0.7, logprob_gamma=0.5)
    seven, eight = (tok(d, add_special_tokens=False).input_ids[0] for d in "78")

    def alts(p):
        return [("8" if p == "7" else "7", -1.6), ("zzqx answer", -2.0)]  # the second is no single token

    exs = [TrainingExample("How many pens?", a, teacher_top_logprobs=provider_tokens(tok, a, alts) if i % 2 else None)
           for i, a in enumerate(ANSWERS)]
    rows = [encode_pair(tok, format_prompt(e.instruction), e.response, 128) for e in exs]
    prior = fit_prior(tok, ANSWERS, cfg, q_model.config.vocab_size)
    targets, counts = posterior_targets(q_model, tok, exs, rows, prior, cfg, CPU, batch_size=2)
    ng = DictNGram([tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id] for a in ANSWERS], cfg.ngram_n,
                   q_model.config.vocab_size, cfg.ngram_add_k)
    repeats = 0
    for ex, row, tgt in zip(exs, rows, targets, strict=True):
        ys = row.labels[row.start :]
        evidence = None
        if ex.teacher_top_logprobs:  # every response token offered; the eos position never has evidence
            evidence = [([y, eight if y == seven else seven], [-0.7, -1.6]) for y in ys[:-1]] + [None]
        dense = dense_posterior(ng, ys, dense_q(q_model, row), cfg, evidence)  # (T, V)
        assert tgt.ids.shape == (len(ys), 1 + 4 + 3 + 3) and tgt.ids[:, 0].tolist() == ys
        for t in range(len(ys)):
            firsts = first_columns(tgt.ids[t])
            ids = list(firsts)
            got = tgt.probs[t, list(firsts.values())].double()
            torch.testing.assert_close(got, dense[t, ids], rtol=1e-5, atol=1e-7)
            assert tgt.tail[t].item() == pytest.approx(1 - dense[t, ids].sum().item(), abs=1e-6)
            assert tgt.probs[t].sum().item() + tgt.tail[t].item() == pytest.approx(1.0, abs=1e-6)
            repeated = [c for c in range(tgt.ids.size(1)) if c not in firsts.values()]
            assert all(tgt.probs[t, c].item() == 0.0 for c in repeated)
            repeats += len(repeated)
    assert repeats > 0  # y_t, the prior's and q's top ids do overlap: the no-double-count rule was exercised
    assert counts.used == sum(len(r.labels) - r.start - 1 for r, e in zip(rows, exs) if e.teacher_top_logprobs)
    assert counts.unused == 0


def test_a_repeated_support_id_counts_once():
    cfg = TrainSection(prior_eps=0.3, dirichlet_beta=2.0)
    y = np.array([5])
    support, distinct = np.array([[5, 5, 9, 9, 2]]), np.array([[5, 9, 2]])
    logq = np.log(np.array([[0.5, 0.5, 0.2, 0.2, 0.1]]))
    p_ng = np.array([[0.3, 0.3, 0.1, 0.1, 0.05]])
    no_ev = (np.zeros((1, 0), np.int64), np.zeros((1, 0)), np.zeros((1, 0), bool))
    probs, tail = mix_posterior(support, y, p_ng, logq, *no_ev, cfg)
    ref, ref_tail = mix_posterior(distinct, y, p_ng[:, [0, 2, 4]], logq[:, [0, 2, 4]], *no_ev, cfg)
    np.testing.assert_allclose(probs[0, [0, 2, 4]], ref[0])
    assert probs[0, 1] == 0.0 and probs[0, 3] == 0.0
    assert tail[0] == pytest.approx(ref_tail[0]) and tail[0] == pytest.approx(1 - ref[0].sum())
    # by hand: y gets (alpha (1 - eps + eps p_ng) + beta q) / (alpha + beta)
    assert probs[0, 0] == pytest.approx((0.7 + 0.3 * 0.3 + 2.0 * 0.5) / 3.0)


def test_posterior_is_one_hot_when_eps_and_beta_are_zero():
    cfg = TrainSection(prior_eps=0.0, dirichlet_beta=0.0)
    support = np.array([[1, 4, 2], [2, 2, 0]])
    no_ev = (np.zeros((2, 0), np.int64), np.zeros((2, 0)), np.zeros((2, 0), bool))
    probs, tail = mix_posterior(support, np.array([1, 2]), np.full((2, 3), 0.2), np.log(np.full((2, 3), 0.3)),
                                *no_ev, cfg)
    assert probs.tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]] and tail.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- provider evidence alignment


def _prob(tgt, t, v):
    c = first_columns(tgt.ids[t]).get(v)
    return 0.0 if c is None else tgt.probs[t, c].item()


def test_provider_logprobs_enter_only_where_the_provider_token_is_the_students_token(tiny):
    tok, q_model = tiny
    cfg = TrainSection(top_k=3, prior_top_k=2)
    text = ANSWERS[0]  # "3 + 4 = 7. The answer is 7."
    ys_body = tok(text, add_special_tokens=False).input_ids
    pieces = [tok.decode([v]) for v in ys_body]
    eight = tok("8", add_special_tokens=False).input_ids[0]
    seven_at = pieces.index("7")  # the first "7": provider's sampled token there, with "8" close behind
    plus_at, the_at, answer_at = pieces.index(" +"), pieces.index(" The"), pieces.index(" answer")
    provider = []  # two splits and one merge: the provider's positions drift from the student's by one
    for t, p in enumerate(pieces):
        if t == answer_at + 1:
            continue  # merged into the previous provider token
        if t == answer_at:  # " answer" + " is" as one provider token: both student positions are unused
            provider.append([(p + pieces[t + 1], -0.1), ("8", -3.0)])
        elif t in (plus_at, the_at):  # " +" and " The" each split in two provider tokens: unused
            provider += [[(p[:-1], -0.1)], [(p[-1], -0.1)]] if t == plus_at else [[(" T", -0.1)], [("he", -0.1)]]
        elif t == seven_at:
            provider.append([(p, np.log(0.3)), ("8", np.log(0.6)), ("zzqx answer", -1.0)])
        else:
            provider.append([(p, -0.05)])
    unused = {plus_at, the_at, answer_at, answer_at + 1}
    with_ev = TrainingExample("How many pens?", text, teacher_top_logprobs=provider)
    plain = TrainingExample("How many pens?", text)
    row = encode_pair(tok, format_prompt(plain.instruction), text, 128)
    prior = fit_prior(tok, ANSWERS, cfg, q_model.config.vocab_size)
    (got,), counts = posterior_targets(q_model, tok, [with_ev], [row], prior, cfg, CPU)
    (base,), none = posterior_targets(q_model, tok, [plain], [row], prior, cfg, CPU)
    assert (counts.used, counts.unused) == (len(pieces) - 4, 4) and (none.used, none.unused) == (0, 0)
    # used: the provider's 0.6 on "8" pulls the target toward "8", its 0.3 on "7" away from the one-hot
    assert _prob(got, seven_at, eight) > _prob(base, seven_at, eight) + 0.05
    assert _prob(got, seven_at, ys_body[seven_at]) < _prob(base, seven_at, ys_body[seven_at])
    for t in sorted(set(range(len(ys_body))) - unused):  # used: the evidence moved every target
        assert got.probs[t, 0].item() != pytest.approx(base.probs[t, 0].item(), abs=1e-4)
    for t in sorted(unused) + [len(ys_body)]:  # unused positions and the eos: unchanged
        v_ids = set(base.ids[t].tolist()) | set(got.ids[t].tolist())
        assert all(_prob(got, t, v) == pytest.approx(_prob(base, t, v), abs=1e-7) for v in v_ids)
        assert got.tail[t].item() == pytest.approx(base.tail[t].item(), abs=1e-7)


def test_a_provider_token_that_is_not_one_student_token_is_unused(tiny):
    tok, q_model = tiny
    cfg = TrainSection(top_k=3, prior_top_k=2)
    text = "7 = 7é."  # "é" is two byte tokens for the student, one token for the provider
    ids = tok(text, add_special_tokens=False).input_ids
    pieces = [tok.decode([v]) for v in ids]
    byte_at = pieces.index("\ufffd")  # the first byte of "é": the provider's "é" has its span and text, not its token
    assert pieces[byte_at + 1] == "\ufffd" and byte_at + 2 == len(ids) - 1
    provider = [[(p, -0.1), ("8", -1.0)] for p in pieces[:byte_at]] + [[("é", -0.1), ("e", -1.0)], [(".", -0.1)]]
    with_ev = TrainingExample("q", text, teacher_top_logprobs=provider)
    row = encode_pair(tok, format_prompt("q"), text, 128)
    prior = fit_prior(tok, ANSWERS, cfg, q_model.config.vocab_size)
    (got,), counts = posterior_targets(q_model, tok, [with_ev], [row], prior, cfg, CPU)
    (base,), _ = posterior_targets(q_model, tok, [TrainingExample("q", text)], [row], prior, cfg, CPU)
    assert (counts.used, counts.unused) == (len(ids) - 2, 2)
    for t in (byte_at, byte_at + 1):
        assert _prob(got, t, ids[t]) == pytest.approx(_prob(base, t, ids[t]), abs=1e-7)
        assert got.tail[t].item() == pytest.approx(base.tail[t].item(), abs=1e-7)


def test_provider_text_that_is_not_the_response_is_never_used(tiny):
    tok, q_model = tiny
    cfg = TrainSection()
    other = provider_tokens(tok, ANSWERS[1], lambda p: [])  # the logprobs of another answer
    ex = TrainingExample("How many pens?", ANSWERS[0], teacher_top_logprobs=other)
    row = encode_pair(tok, format_prompt(ex.instruction), ex.response, 128)
    prior = fit_prior(tok, ANSWERS, cfg, q_model.config.vocab_size)
    _, counts = posterior_targets(q_model, tok, [ex], [row], prior, cfg, CPU)
    assert (counts.used, counts.unused) == (0, len(row.labels) - row.start - 1)


# ---------------------------------------------------------------- a large vocabulary


def test_targets_at_a_50k_vocabulary_hold_at_most_one_chunk_of_V_wide_logits(monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    V, chunk = 50_000, 64
    torch.manual_seed(0)
    q_model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
    )).eval()
    g = np.random.default_rng(0)
    responses = [g.zipf(1.3, 300).clip(max=V - 1).tolist() for _ in range(4)]
    rows = [EncodedRow(input_ids=[7] * 8 + r + [2], labels=[-100] * 8 + r + [2], start=8) for r in responses]
    cfg = TrainSection(target_chunk_logits=chunk * V)
    prior = NGramPrior.fit([r + [2] for r in responses], n=cfg.ngram_n, vocab_size=V, add_k=cfg.ngram_add_k,
                           top_k=cfg.prior_top_k)
    widest: list[int] = []
    q_model.get_output_embeddings().register_forward_hook(lambda m, i, out: widest.append(out.shape[0]))

    def full_logits(*args, **kwargs):
        raise AssertionError("the full (B, T, V) logits were computed")

    monkeypatch.setattr(q_model, "forward", full_logits)
    exs = [TrainingExample("x", "y")] * len(rows)
    targets, _ = posterior_targets(q_model, None, exs, rows, prior, cfg, CPU, batch_size=2)
    assert [t.ids.shape for t in targets] == [(301, 1 + cfg.top_k + cfg.prior_top_k)] * 4
    assert max(widest) <= chunk and sum(widest) == 4 * 301  # every V-wide tensor is one chunk of positions
    assert all(t.ids.max().item() < V and t.probs.dtype == torch.float32 for t in targets)
    for t in targets:
        torch.testing.assert_close(t.probs.sum(-1) + t.tail, torch.ones(301), atol=1e-5, rtol=0)
