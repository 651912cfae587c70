"""The run's proxy (proxy.py): stable data roles, DPO done right, persistence across iterations, and a
learning test — a trained proxy predicts held-out teacher answers far better than an untrained one."""

from __future__ import annotations

import copy
import math
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from accelerate import Accelerator  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from agentkd.training import objectives as obj  # noqa: E402
from agentkd.config import ConfigError, TrainSection, config_from_dict  # noqa: E402
from agentkd.training.proxy import (  # noqa: E402
    MARKER,
    build_proxy_model,
    example_role,
    preference_pairs,
    reference_logprobs,
    split_by_role,
    train_proxy,
    vocab_hash,
)
from agentkd.store.writer import Store  # noqa: E402
from agentkd.training.students import build_student, load_spec  # noqa: E402
from agentkd.teachers.sim.world import sample_problems, worked_answer  # noqa: E402
from agentkd.training.train import train  # noqa: E402
from agentkd.training.train_data import IGNORE, TrainingExample, format_prompt  # noqa: E402
from agentkd.training.run import proxy_stage  # noqa: E402

STUDENTS = Path(__file__).resolve().parent.parent / "students"
CPU = Accelerator(cpu=True)
FAST = dict(lr=3e-3, warmup_steps=0, batch_size=8, max_len=96, log_every=1, proxy_epochs=1.0,
            align_rounds=1, max_new_tokens=8, proxy_split=[0.3, 0.4, 0.3])


def sim_examples(n: int, seed: int = 0) -> list[TrainingExample]:
    """Teacher answers as the sim gives them: worked, with varied phrasing."""
    phrasing = random.Random(seed)
    return [TrainingExample(p.text, worked_answer(p, phrasing))
            for p in sample_problems(n, seed=seed, steps=(1, 1), digits=(1, 2))]


def student_for(exs, seed=0):
    corpus = [format_prompt(e.instruction) + e.response for e in exs]
    return build_student(load_spec(STUDENTS / "tiny.toml"), corpus=corpus, seed=seed)


def proxy_for(student, seed=1):
    return build_proxy_model(load_spec(STUDENTS / "tiny-proxy.toml"), student, seed=seed)


# ---------------------------------------------------------------- data roles


def test_roles_are_stable_per_instruction_whatever_else_is_in_the_batch():
    exs = sim_examples(400)
    split = [0.1, 0.45, 0.45]
    whole = {e.instruction: role for role, part in split_by_role(exs, split).items() for e in part}
    subset = exs[::3][::-1]  # another iteration: fewer examples, another order
    again = {e.instruction: role for role, part in split_by_role(subset, split).items() for e in part}
    assert all(whole[x] == role for x, role in again.items())


def test_role_shares_follow_the_split_knob():
    texts = [f"instruction number {i}" for i in range(4000)]
    for split in ([0.1, 0.45, 0.45], [0.5, 0.0, 0.5]):
        roles = [example_role(t, split) for t in texts]
        for role, fraction in zip(("warmup", "align", "kd"), split, strict=True):
            assert abs(roles.count(role) / len(texts) - fraction) < 0.03
    with pytest.raises(ConfigError, match="train.proxy_split"):
        example_role("x", [0.5, 0.5])


# ---------------------------------------------------------------- DPO


def test_dpo_loss_matches_a_hand_computed_value():
    pc, pr, rc, rr, beta = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -5.5]), torch.tensor([-3.0, -2.5]), 0.1
    margins = [((-3.0) - (-3.5)) - ((-4.0) - (-3.0)), ((-5.0) - (-5.5)) - ((-2.0) - (-2.5))]  # 1.5, 0.0
    expected = sum(-math.log(1 / (1 + math.exp(-beta * m))) for m in margins) / 2
    assert obj.dpo_loss(pc, pr, rc, rr, beta).item() == pytest.approx(expected, rel=1e-6)


def test_reference_equals_the_policy_at_the_start_so_the_margin_is_zero():
    exs = sim_examples(12)
    student = student_for(exs)
    proxy = proxy_for(student)
    cfg = TrainSection(objective="proxy_kd", proxy_spec="x", **FAST)
    pairs = preference_pairs(proxy, exs, cfg, seed=3)
    ref = torch.tensor(reference_logprobs(proxy.model, pairs, CPU, student.tokenizer.pad_token_id))  # (N, 2)
    from agentkd.training.train_data import collate

    batch = collate([p[0] for p in pairs] + [p[1] for p in pairs], student.tokenizer.pad_token_id)
    with torch.no_grad():
        logp = obj.sequence_logprob(proxy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])
    n = len(pairs)
    assert obj.dpo_loss(logp[:n], logp[n:], ref[:, 0], ref[:, 1], 0.1).item() == pytest.approx(math.log(2), abs=1e-5)


def test_chosen_and_rejected_are_capped_alike_and_end_in_eos_only_if_they_ended():
    exs = sim_examples(10)
    student = student_for(exs)
    tok = student.tokenizer
    cfg = TrainSection(objective="proxy_kd", proxy_spec="x", **{**FAST, "max_new_tokens": 5})
    for chosen, rejected in preference_pairs(proxy_for(student), exs, cfg, seed=0):
        for row in (chosen, rejected):
            response = [t for t in row.labels if t != IGNORE]
            assert len(response) <= 5
            assert tok.eos_token_id not in response[:-1]
        # every sim answer is longer than 5 tokens: the teacher's is cut and carries no eos, like a capped sample
        assert [t for t in chosen.labels if t != IGNORE][-1] != tok.eos_token_id


def test_round_two_uses_the_proxy_as_round_one_left_it_as_reference():
    exs = sim_examples(40)
    student = student_for(exs)
    cfg2 = TrainSection(objective="proxy_kd", proxy_spec="x", **{**FAST, "align_rounds": 2})
    cfg1 = cfg2.model_copy(update={"align_rounds": 1})
    cfg0 = cfg2.model_copy(update={"align_rounds": 0})
    two, one, none = proxy_for(student), proxy_for(student), proxy_for(student)
    stages = train_proxy(two, exs, cfg2, seed=5)
    train_proxy(one, exs, cfg1, seed=5)  # same seeds: the same weights as `two` after its round 1
    train_proxy(none, exs, cfg0, seed=5)  # after the warm-up only: round 1's reference
    assert [s.stage for s in stages] == ["before", "warmup", "align1", "align2"]
    round2 = stages[-1]
    pad = student.tokenizer.pad_token_id
    expected = reference_logprobs(one.model, round2.pairs, CPU, pad)
    torch.testing.assert_close(torch.tensor(round2.reference), torch.tensor(expected), atol=1e-4, rtol=0)
    stale = reference_logprobs(none.model, round2.pairs, CPU, pad)
    assert max(abs(a[0] - b[0]) for a, b in zip(round2.reference, stale, strict=True)) > 1e-3
    assert two.trained_examples == sum(len(v) for k, v in split_by_role(exs, cfg2.proxy_split).items() if k != "kd")


# ---------------------------------------------------------------- using the proxy


def test_posterior_kd_with_an_untrained_proxy_is_a_config_error(tmp_path):
    exs = sim_examples(12)
    student = student_for(exs)
    cfg = TrainSection(objective="posterior_kd", proxy_spec="students/tiny-proxy.toml", **FAST)
    with pytest.raises(ConfigError, match="train.proxy_spec: the proxy has not been trained"):
        train(student, exs, cfg, out_dir=tmp_path, proxy=proxy_for(student), progress=False)


def test_posterior_kd_without_a_proxy_spec_is_refused_at_config_load_unless_self_is_asked():
    with pytest.raises(ConfigError, match="train.proxy_spec"):
        config_from_dict({"train": {"objective": "posterior_kd"}})
    with pytest.raises(ConfigError, match="train.proxy_spec"):
        config_from_dict({"train": {"objective": "proxy_kd"}})
    assert config_from_dict({"train": {"objective": "posterior_kd", "posterior_q": "self"}}).train.posterior_q == "self"


def test_a_proxy_on_another_tokenizer_is_refused_by_vocabulary_hash():
    exs = sim_examples(12)
    student = student_for(exs)
    # same vocabulary size, other merges: a size check would pass this
    other = build_student(load_spec(STUDENTS / "tiny.toml"), corpus=[e.response for e in sim_examples(50, seed=9)])
    assert vocab_hash(other.tokenizer) != vocab_hash(student.tokenizer)
    from agentkd.training.proxy import check_same_tokenizer

    with pytest.raises(ConfigError, match="tokenizer"):
        check_same_tokenizer(student, other)


def test_kd_term_only_on_the_kd_role_and_nll_on_every_example(tmp_path):
    exs = sim_examples(40)
    student = student_for(exs)
    cfg = TrainSection(objective="proxy_kd", proxy_spec="x", epochs=1, **FAST)
    proxy = proxy_for(student)
    train_proxy(proxy, exs, cfg, seed=0)
    result = train(student, exs, cfg, out_dir=tmp_path / "ck", proxy=proxy, progress=False)
    assert result.examples == len(exs)  # NLL rows: every example
    assert result.kd_examples == len(split_by_role(exs, cfg.proxy_split)["kd"]) > 0


# ---------------------------------------------------------------- persistence across iterations


def run_config(tmp_path, **train):
    return config_from_dict({"run": {"name": "p", "dir": str(tmp_path / "runs")},
                             "train": {"objective": "proxy_kd", "proxy_spec": str(STUDENTS / "tiny-proxy.toml"),
                                       **FAST, **train}})


def test_iteration_two_continues_iteration_ones_proxy_and_a_resumed_run_loads_it(tmp_path):
    config = run_config(tmp_path)
    config.run_dir.mkdir(parents=True)
    store = Store(config.run_dir / "agentkd.duckdb")
    try:
        exs = sim_examples(60)
        student = student_for(exs)
        first = proxy_stage(config, store, student, exs[:30], 1, progress=False)
        saved = config.run_dir / "proxy" / "1"
        assert (saved / MARKER).exists()
        plain = AutoModelForCausalLM.from_pretrained(saved)  # reloads with transformers alone
        ids = torch.tensor([[1, 5, 6, 7]])
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=ids).logits, first.model(input_ids=ids).logits)

        second = proxy_stage(config, store, student, exs, 2, progress=False)
        assert second.trained_examples > first.trained_examples  # continued: counts add up
        rows = store.query("SELECT iteration, stage, proxy_logp FROM proxy_stages ORDER BY created_at")
        before2 = [r for r in rows if r[0] == 2 and r[1] == "before"][0][2]
        after1 = [r for r in rows if r[0] == 1][-1][2]
        # iteration 2 starts from iteration 1's weights (its "before" is iteration 1's end on that
        # iteration's held-out answers, far better than a fresh proxy's)
        fresh = proxy_for(student)
        from agentkd.training.proxy import mean_logprob
        from agentkd.training.train_data import encode_pair

        kd = split_by_role(exs, config.train.proxy_split)["kd"]
        held = [encode_pair(student.tokenizer, format_prompt(e.instruction), e.response, 96) for e in kd]
        assert before2 > mean_logprob(fresh.model, held, CPU, 0) + 0.5
        assert after1 is not None

        count = len(rows)
        resumed = proxy_stage(config, store, student, exs, 2, progress=False)  # a resumed run: loads, no training
        assert len(store.query("SELECT * FROM proxy_stages")) == count
        with torch.no_grad():
            torch.testing.assert_close(resumed.model(input_ids=ids).logits, second.model(input_ids=ids).logits)
    finally:
        store.close_sync()


# ---------------------------------------------------------------- learning test


@pytest.mark.slow
def test_proxy_stage_on_2000_sim_answers_predicts_held_out_teacher_answers_far_better():
    torch.set_num_threads(1)
    exs = sim_examples(2000, seed=3)
    student = student_for(exs)
    proxy = proxy_for(student)
    untrained = copy.deepcopy(proxy)
    cfg = TrainSection(objective="proxy_kd", proxy_spec="x", lr=2e-3, warmup_steps=10, batch_size=32, max_len=96,
                       proxy_epochs=1.0, proxy_max_steps=60, align_rounds=1, max_new_tokens=32)
    stages = train_proxy(proxy, exs, cfg, seed=0, student=student)
    before, after = stages[0].proxy_logp, stages[-1].proxy_logp
    # uniform over ~500 ids is log p = -6.2 per token; chance leaves an untrained proxy there
    assert before < -5.0
    assert after > before + 2.5, (before, after)
    assert stages[0].student_logp < -5.0  # the untrained student, scored on the same answers
    kd = split_by_role(exs, cfg.proxy_split)["kd"]
    assert 0 < len(kd) and stages[-1].examples == len(split_by_role(exs, cfg.proxy_split)["align"])
    del untrained


def test_proxy_targets_are_top_k_of_the_proxy_with_exact_tail_and_zscore_weights():
    exs = sim_examples(10)
    student = student_for(exs)
    proxy = proxy_for(student)
    tok = student.tokenizer
    from agentkd.training.proxy import proxy_targets
    from agentkd.training.train_data import collate, encode_pair

    cfg = TrainSection(objective="proxy_kd", proxy_spec="x", proxy_top_k=4, **FAST)
    rows = [encode_pair(tok, format_prompt(e.instruction), e.response, 96) for e in exs]
    targets, weights = proxy_targets(proxy.model, rows, cfg, torch.device("cpu"), pad_id=tok.pad_token_id, batch_size=3)
    with torch.no_grad():
        batch = collate(rows[:1], tok.pad_token_id)
        dense = torch.softmax(proxy.model(input_ids=batch["input_ids"]).logits[0].float(), -1)  # (T, V)
    row, tgt = rows[0], targets[0]
    n = len(row.input_ids) - row.start
    expected = dense[row.start - 1 : row.start - 1 + n].topk(4, dim=-1)
    torch.testing.assert_close(tgt.probs, expected.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(tgt.probs.sum(-1) + tgt.tail, torch.ones(n), atol=1e-5, rtol=0)
    assert weights.shape == (len(exs),) and ((weights > 0) & (weights < 1)).all()
    assert abs(float(torch.logit(weights).mean())) < 1e-4  # sigmoid of z-scores: centred at 0.5
