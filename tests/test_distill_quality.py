"""The distillation quality lab (benchmarks/distill_quality.py): its teacher server, its figures' arithmetic,
and one --quick run for the output's structure and sanity (never its figures)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality.lion import lion_vs_random, usd_to_reach  # noqa: E402
from quality.table import paired_vs_sft  # noqa: E402
from quality.teacher import LMResponder, sample, teacher_prompt  # noqa: E402

from agentkd.config import SimSection  # noqa: E402
from agentkd.training.students import StudentSpec, build_student, train_bpe_tokenizer  # noqa: E402
from agentkd.teachers.sim import sim_in_thread  # noqa: E402
from agentkd.teachers.sim.world import sample_problems, worked_answer  # noqa: E402

PROBLEMS = sample_problems(40, seed=3, steps=(1, 2), digits=(1, 1))


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    tok = train_bpe_tokenizer([p.text for p in PROBLEMS] + [worked_answer(p) for p in PROBLEMS], 300)
    return build_student(StudentSpec(tokenizer="shared", hidden_size=32, intermediate_size=64, num_layers=2,
                                     num_heads=2), tokenizer=tok, seed=0)


def test_a_sample_depends_on_its_seed_not_on_its_batch(lm):
    prompts = [teacher_prompt(p.text, "answer") for p in PROBLEMS[:6]]
    alone = sample(lm, prompts[2:3], [12], temperature=0.7, max_new_tokens=[8])[0]
    batched = sample(lm, prompts, [10, 11, 12, 13, 14, 15], temperature=0.7, max_new_tokens=[8, 3, 8, 8, 8, 8])
    assert batched[2].ids == alone.ids and len(batched[1].ids) <= 3
    assert torch.allclose(batched[2].logprobs, alone.logprobs, atol=1e-4)
    assert torch.allclose(alone.logprobs.exp().sum(-1), torch.ones(alone.logprobs.size(0)), atol=1e-4)


def test_lm_teacher_serves_real_top_logprobs_of_student_tokens_over_http(lm):
    responder = LMResponder(lm, seed=0, max_new_tokens=12)
    with sim_in_thread(SimSection(), responder=responder) as handle:
        client = openai.OpenAI(base_url=handle.base_url + "/v1", api_key="x", max_retries=0)
        block = f'<data name="instruction">\n{PROBLEMS[0].text}\n</data>'
        reply = client.chat.completions.create(model="lab", messages=[{"role": "user", "content": block}],
                                               temperature=0.7, logprobs=True, top_logprobs=5, max_tokens=12)
        with pytest.raises(openai.BadRequestError):  # a role the lab teacher does not play
            client.chat.completions.create(model="lab", messages=[{"role": "user", "content": '<data name="answer_a">'
                                           '\nx\n</data><data name="answer_b">\ny\n</data>'}])
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    assert reply.usage.completion_tokens == len(content) <= 12
    vocab = lm.tokenizer
    for t in content:
        assert len(t.top_logprobs) == 5
        # every listed token is one student token (an untrained model also ranks lone UTF-8 bytes, shown as
        # U+FFFD with their bytes, as providers do)
        assert all(len(vocab(a.token, add_special_tokens=False).input_ids) == 1 for a in t.top_logprobs
                   if "\ufffd" not in a.token)
        ranked = [a.logprob for a in t.top_logprobs]
        assert ranked == sorted(ranked, reverse=True) and sum(math.exp(x) for x in ranked) <= 1 + 1e-6
        assert t.logprob <= 0


def test_usd_to_reach_interpolates_the_first_crossing():
    curve = [(0.0, 0.0), (1.0, 0.2), (2.0, 0.6), (3.0, 0.5)]
    assert usd_to_reach(curve, 0.4) == pytest.approx(1.5)
    assert usd_to_reach(curve, 0.0) == 0.0
    assert usd_to_reach(curve, 0.7) is None


def _run(selection, seed, points):
    return {"selection": selection, "seed": seed, "curve": [{"iteration": i, "usd": u, "accuracy": a}
                                                           for i, (u, a) in enumerate(points)]}


def test_lion_over_random_is_the_usd_share_lion_needs_and_none_when_random_learned_nothing():
    runs = [_run("random", 0, [(0, 0.0), (1, 0.2), (2, 0.4)]), _run("lion", 0, [(0, 0.0), (1.5, 0.4), (3, 0.8)])]
    assert lion_vs_random(runs)["lion_usd_over_random"] == pytest.approx(0.75)
    flat = [_run("random", 0, [(0, 0.0), (1, 0.0)]), _run("lion", 0, [(0, 0.0), (2, 0.0)])]
    assert lion_vs_random(flat)["lion_usd_over_random"] is None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_lab_writes_every_figure(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "distill_quality.py"), "--quick", "--work", str(tmp_path / "work"),
         "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=880, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures == json.loads((tmp_path / "out" / "quality.json").read_text())
    assert (tmp_path / "out" / "quality_lion_vs_random.png").stat().st_size > 0
    table = (tmp_path / "out" / "quality.md").read_text()
    assert "--quick" in table and "lion_usd_over_random" in table
    methods = figures["methods"]
    assert set(methods) == {"sft", "posterior_kd", "posterior_kd_evidence", "proxy_kd", "rationale"}
    for name, row in methods.items():
        assert {"accuracy_mean", "accuracy_sd", "kl_mean", "kl_sd", "teacher_tokens", "usd"} <= set(row)
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["teacher_tokens"] > 0 and row["usd"] > 0
        assert name == "rationale" or row["kl_mean"] >= 0.0
    shared = {methods[m]["teacher_tokens"] for m in ("sft", "posterior_kd", "posterior_kd_evidence", "proxy_kd")}
    assert len(shared) == 1  # one set of teacher answers for every answer-based method
    assert set(figures["kl_over_sft"]) >= {"posterior_kd", "proxy_kd"} and "lion_usd_over_random" in figures
    assert figures["teacher"]["accuracy_greedy"] > figures["untrained_student"]["accuracy"]
    assert 0.0 <= figures["proxy"]["accuracy_mean"] <= 1.0 and figures["proxy"]["kl_mean"] >= 0.0
    kshot = figures["explainer_prompts"]
    assert kshot["six_shot"]["billed_input_tokens_per_row"] > kshot["zero_shot"]["billed_input_tokens_per_row"]


def test_accuracy_against_sft_is_paired_by_seed_with_a_t_interval():
    sft = [{"seed": s, "accuracy": a} for s, a in ((0, 0.50), (1, 0.30), (2, 0.40))]
    # the same +0.05 on every seed: resolved, although the seeds spread far more than 0.05
    steady = paired_vs_sft([{"seed": s, "accuracy": r["accuracy"] + 0.05} for s, r in enumerate(sft)], sft)
    assert steady["mean"] == pytest.approx(0.05) and steady["low"] == pytest.approx(0.05) and steady["resolved"]
    # +0.15, -0.05, +0.05: mean +0.05, sd 0.1, half-width 4.303 x 0.1 / sqrt(3)
    mixed = paired_vs_sft([{"seed": 0, "accuracy": 0.65}, {"seed": 1, "accuracy": 0.25},
                           {"seed": 2, "accuracy": 0.45}], sft)
    assert mixed["mean"] == pytest.approx(0.05) and mixed["high"] - mixed["mean"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    assert not mixed["resolved"]
    # seeds without a partner are left out; one pair gives no interval
    one = paired_vs_sft([{"seed": 2, "accuracy": 0.1}, {"seed": 9, "accuracy": 0.9}], sft)
    assert one["seeds"] == 1 and one["mean"] == pytest.approx(-0.3) and one["low"] is None and not one["resolved"]
