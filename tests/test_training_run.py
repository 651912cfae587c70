"""`agentkd train` on what `agentkd teach` stored: the tiny student learns the sim's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agentkd.cli import main
from agentkd.config import load_config
from agentkd.store.writer import Store
from agentkd.training.students import build_student, load_checkpoint, load_spec
from agentkd.teachers.sim.world import final_number, sample_problems
from agentkd.training.train import generate_answers
from agentkd.training.run import examples_from_store, tokenizer_corpus

ROOT = Path(__file__).resolve().parents[1]


def accuracy(student, problems) -> float:
    answers = generate_answers(student, [p.text for p in problems], max_new_tokens=28)
    return sum(final_number(a) == p.answer for a, p in zip(answers, problems, strict=True)) / len(problems)


def test_examples_come_from_stored_teacher_answers(tmp_path):
    store = Store(tmp_path / "run.duckdb")
    store.append_now("instructions", [
        {"id": "a", "text": "q1", "source": "seed", "iteration": 1, "pool": "train"},
        {"id": "b", "text": "q2", "source": "hard", "iteration": 2, "pool": "train"},
        {"id": "h", "text": "q3", "source": "heldout", "iteration": 0, "pool": "heldout"},
        {"id": "r", "text": "q4", "source": "easy", "iteration": 2, "pool": "rejected", "rejected_reason": "dup"},
    ])
    store.append_now("responses", [
        {"instruction_id": i, "actor": "teacher", "iteration": 1, "text": f"answer {i}"} for i in "abhr"])
    store.append_now("rationales", [{"example_id": "a", "label": "7", "rationale": "because x", "parsed_ok": True}])
    assert [e.instruction for e in examples_from_store(store)] == ["q1", "q2"]  # never held-out or rejected
    assert [e.instruction for e in examples_from_store(store, iteration=2)] == ["q2"]
    first = examples_from_store(store, iteration=1)[0]
    assert (first.response, first.label, first.rationale) == ("answer a", "7", "because x")
    store.close_sync()


def test_a_short_rationale_keeps_its_row_for_the_label_task_only(tmp_path):
    """RELIABILITY 23 downstream: explainer reply -> stored row -> training example -> training rows. A
    rationale under min_rationale_words trains the label task and adds no rationale row; a reply
    without a label trains on the teacher's answer alone."""
    from agentkd.config import TaskSection
    from agentkd.roles.explainer import parse_explanation, task_definition
    from agentkd.training.students import build_student, load_spec
    from agentkd.training.train import rationale_rows
    from agentkd.training.train_data import format_prompt

    task = task_definition(TaskSection(kind="arithmetic"))
    replies = {"full": "Label: 7\nReason: three apples plus four apples make seven apples.",
               "short": "Label: 7\nReason: three plus four.", "unlabelled": "I cannot tell."}
    store = Store(tmp_path / "run.duckdb")
    store.append_now("instructions", [{"id": k, "text": f"q {k}", "source": "seed", "iteration": 1, "pool": "train"}
                                      for k in replies])
    store.append_now("responses", [{"instruction_id": k, "actor": "teacher", "iteration": 1,
                                    "text": f"answer {k}"} for k in replies])
    for k, reply in replies.items():  # stored as the loop's answer stage stores an explanation
        e = parse_explanation(reply, task)
        store.append_now("rationales", [{"example_id": k, "label": e.label, "rationale": e.rationale,
                                         "parsed_ok": e.label is not None, "reason": e.reason}])
    examples = {e.instruction: e for e in examples_from_store(store)}
    store.close_sync()
    assert (examples["q full"].label, examples["q full"].rationale) == ("7", "three apples plus four apples make seven apples.")
    assert (examples["q short"].label, examples["q short"].rationale) == ("7", None)
    assert (examples["q unlabelled"].label, examples["q unlabelled"].rationale) == (None, None)

    tok = build_student(load_spec(ROOT / "students" / "tiny.toml"),
                        corpus=[format_prompt(e.instruction) + e.response for e in examples.values()]).tokenizer
    rows = dict(zip(examples, rationale_rows(tok, list(examples.values()), 96), strict=True))

    def target(row) -> str:
        return tok.decode([t for t in row.labels if t >= 0 and t != tok.eos_token_id])

    label_row, why_row = rows["q full"]
    assert target(label_row) == "7" and target(why_row) == "three apples plus four apples make seven apples."
    label_row, why_row = rows["q short"]
    assert target(label_row) == "7" and why_row is None  # the label task only
    label_row, why_row = rows["q unlabelled"]
    assert target(label_row) == "answer unlabelled" and why_row is None


@pytest.mark.slow
def test_agentkd_train_on_stored_sim_data_beats_the_untrained_student(tmp_path, capsys):
    problems = sample_problems(2200, seed=11, steps=(1, 1), digits=(1, 1))
    train_set, heldout = problems[:2000], problems[2000:]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": p.text}) + "\n" for p in train_set))
    config = tmp_path / "run.toml"
    # One thread: a tiny model on 2 threads runs ~5x slower whenever another process shares the cores.
    # A step budget, not a time budget: the same training on a loaded machine (max_seconds is only a safety net).
    config.write_text(f'[run]\nname = "t"\ndir = "{tmp_path / "runs"}"\n[teacher]\nprovider = "sim"\n'
                      "[sim]\nerror_rate = 0.02\n[budget]\nusd = 1\n"
                      "[train]\nlr = 1e-3\nbatch_size = 32\nepochs = 50\nmax_steps = 1000\nmax_seconds = 400\nmax_len = 96\n"
                      "cpu_threads = 1\n")
    assert main(["teach", str(config), "--role", "answerer", "--input", str(data), "--output",
                 str(tmp_path / "answers.jsonl"), "--no-progress"]) == 0
    run = load_config(config)
    store = Store(run.run_dir / "agentkd.duckdb", read_only=True)
    spec = load_spec(ROOT / run.student.spec)
    untrained_student = build_student(spec, corpus=tokenizer_corpus(store), seed=run.run.seed)
    store.close_sync()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        untrained = accuracy(untrained_student, heldout)
        assert main(["train", str(config)]) == 0
        assert "trained 2000 examples" in capsys.readouterr().out
        trained = accuracy(load_checkpoint(run.run_dir / "checkpoints" / "1", spec=spec), heldout)
    finally:
        torch.set_num_threads(threads)
    print(f"held-out accuracy: untrained {untrained:.1%} -> after `agentkd train` {trained:.1%}")
    assert trained >= untrained + 0.20


def test_stored_logprobs_put_the_sampled_token_first_even_when_the_provider_ranked_it_lower(tmp_path):
    # OpenAI and vLLM rank top_logprobs by probability: at temperature 0.7 the sampled token is often
    # second, or missing. Evidence alignment reads position[0] as the emitted token.
    store = Store(tmp_path / "run.duckdb")
    logprobs = [{"token": " 7", "logprob": -1.2, "top": [[" 8", -0.4], [" 7", -1.2], [" 9", -2.0]]},
                {"token": ".", "logprob": -0.01, "top": [[" and", -5.0]]}]
    store.append_now("instructions", [{"id": "a", "text": "q1", "source": "seed", "iteration": 1, "pool": "train"}])
    store.append_now("responses", [{"instruction_id": "a", "actor": "teacher", "iteration": 1, "text": " 7.",
                                    "call_key": "k"}])
    store.append_now("calls", [{"key": "k", "role": "answerer", "status": "ok", "response_text": " 7.",
                                "logprobs_json": json.dumps(logprobs)}])
    (example,) = examples_from_store(store)
    store.close_sync()
    assert example.teacher_top_logprobs == [[(" 7", -1.2), (" 8", -0.4), (" 9", -2.0)], [(".", -0.01), (" and", -5.0)]]
