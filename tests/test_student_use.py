"""Issue 16, problem 6: the student is usable without reading the source.

`agentkd eval` and `agentkd chat` on real checkpoints, and the checkpoint's chat template: transformers
alone (no agentkd import) prompts it exactly as it was trained and gets the same answers.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from agentkd.cli import main  # noqa: E402
from agentkd.training.decode import generate_answers  # noqa: E402
from agentkd.training.students import build_student, load_spec, save_checkpoint  # noqa: E402
from agentkd.training.train_data import format_prompt, prompt_ids  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [f"What is {a} + {b}?\nAnswer: {a} + {b} = {a + b}. The answer is {a + b}."
          for a in range(2, 9) for b in range(3, 7)]
QUESTIONS = ["What is 3 + 4?", "What is 12 + 7?", "What is [red]2[/red] + {x}?", "What is 8 + 5?"]


def varied(student):
    """Large seeded random weights: an untrained student answers every prompt alike (blanks), which
    would let a wrong prompt format pass unseen; these answers differ by prompt and by task."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in student.model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return student


@pytest.fixture(scope="module")
def student():
    return varied(build_student(load_spec(ROOT / "students" / "tiny.toml"), corpus=CORPUS, seed=5))


def rows_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_eval(target: Path, data: Path, out: Path, capsys) -> tuple[list[dict], dict]:
    assert main(["eval", str(target), "--input", str(data), "--output", str(out), "--batch-size", "1",
                 "--max-new-tokens", "12"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return [json.loads(line) for line in out.read_text().splitlines()], summary


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_the_checkpoints_chat_template_is_the_training_prompt(tmp_path, student, tokenizer):
    from transformers import AutoTokenizer

    if tokenizer == "byte":  # ByT5 ids: no bos token, so the template must not write one
        student = build_student(load_spec(ROOT / "students" / "tiny.toml"), corpus=[], seed=5)
    for task in ("answer", "predict"):
        save_checkpoint(student, tmp_path / task, task=task)
        tok = AutoTokenizer.from_pretrained(tmp_path / task)
        for text in QUESTIONS:
            messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": text}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
            assert ids == prompt_ids(tok, format_prompt(text, task)), (tokenizer, task, text)


def test_eval_scores_rows_with_answers_and_answers_the_rest(tmp_path, student, capsys):
    checkpoint = tmp_path / "ck"
    save_checkpoint(student, checkpoint)
    data = rows_file(tmp_path / "q.jsonl", [{"instruction": q, "id": i} for i, q in enumerate(QUESTIONS)])
    rows, summary = run_eval(checkpoint, data, tmp_path / "a.jsonl", capsys)
    expected = generate_answers(student, QUESTIONS, max_new_tokens=12, batch_size=1)
    assert len(set(expected)) == len(QUESTIONS)  # answers that depend on the prompt
    assert [r["student_answer"] for r in rows] == expected and [r["id"] for r in rows] == [0, 1, 2, 3]
    assert summary["with_answers"] == 0 and summary["accuracy"] is None and "correct" not in rows[0]

    # Two rows give the student's own answer (right by exact match), one a wrong one, one none.
    given = [expected[0], "certainly not this", None, expected[3]]
    labelled = rows_file(tmp_path / "l.jsonl", [{"instruction": q, **({"answer": a} if a is not None else {})}
                                               for q, a in zip(QUESTIONS, given, strict=True)])
    rows, summary = run_eval(checkpoint, labelled, tmp_path / "b.jsonl", capsys)
    assert [r.get("correct") for r in rows] == [True, False, None, True]
    assert summary["with_answers"] == 3 and summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["scoring"] == "exact"


def test_eval_of_a_run_folder_takes_its_newest_checkpoint_and_its_task(tmp_path, student, capsys):
    run = tmp_path / "runs" / "r"
    save_checkpoint(student, run / "checkpoints" / "2")
    other = varied(build_student(load_spec(ROOT / "students" / "tiny.toml"), corpus=CORPUS, seed=9))
    with torch.no_grad():
        next(other.model.parameters()).mul_(-1)  # not the same weights as checkpoints/2
    save_checkpoint(other, run / "checkpoints" / "10")  # numerically newest, not lexically
    (run / "config.json").write_text(json.dumps({"task": {"kind": "arithmetic"}, "train": {"max_new_tokens": 12}}))
    data = rows_file(tmp_path / "q.jsonl", [{"instruction": q, "answer": 7} for q in QUESTIONS])
    rows, summary = run_eval(run, data, tmp_path / "a.jsonl", capsys)
    assert summary["checkpoint"] == str(run / "checkpoints" / "10") and summary["scoring"] == "arithmetic"
    newest = generate_answers(other, QUESTIONS, max_new_tokens=12, batch_size=1)
    assert [r["student_answer"] for r in rows] == newest
    assert newest != generate_answers(student, QUESTIONS, max_new_tokens=12, batch_size=1)


def test_a_rationale_trained_checkpoint_is_asked_through_its_label_task(tmp_path, student, capsys):
    save_checkpoint(student, tmp_path / "ck", task="predict")
    data = rows_file(tmp_path / "q.jsonl", [{"instruction": q} for q in QUESTIONS])
    rows, _ = run_eval(tmp_path / "ck", data, tmp_path / "a.jsonl", capsys)
    predict = generate_answers(student, QUESTIONS, max_new_tokens=12, batch_size=1, task="predict")
    assert [r["student_answer"] for r in rows] == predict
    assert predict != generate_answers(student, QUESTIONS, max_new_tokens=12, batch_size=1)  # the task matters


def test_eval_names_a_folder_that_holds_no_student(tmp_path, capsys):
    data = rows_file(tmp_path / "q.jsonl", [{"instruction": "x"}])
    assert main(["eval", str(tmp_path), "--input", str(data)]) == 2
    assert f"{tmp_path}: neither a checkpoint folder" in capsys.readouterr().err


def test_chat_answers_one_prompt_and_a_prompt_loop(tmp_path, student, capsys, monkeypatch):
    save_checkpoint(student, tmp_path / "ck")
    expected = generate_answers(student, QUESTIONS, max_new_tokens=12)
    assert main(["chat", str(tmp_path / "ck"), "--prompt", QUESTIONS[2], "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected[2] + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\n"))
    assert main(["chat", str(tmp_path / "ck"), "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.splitlines() == expected[:2]  # the blank line is skipped


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: ~15 s on 2 busy cores
def test_transformers_alone_loads_and_prompts_the_student_as_trained(tmp_path, student):
    """The README's snippet, run in a fresh interpreter that never imports agentkd."""
    save_checkpoint(student, tmp_path / "ck")
    snippet = (ROOT / "README.md").read_text().split("<!-- transformers-alone -->")[1].split("```python")[1]
    snippet = snippet.split("```")[0].replace('"runs/quickstart/checkpoints/3"', repr(str(tmp_path / "ck")))
    code = snippet + "\nimport sys\nassert not any(m.startswith('agentkd') for m in sys.modules)\nprint(repr(answer))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    question = snippet.split('"content": ')[1].split("}")[0]
    expected = generate_answers(student, [eval(question)], max_new_tokens=48)[0]
    assert done.stdout.strip().splitlines()[-1] == repr(expected)


def test_eval_of_a_label_task_run_renders_items_and_scores_labels(tmp_path, capsys):
    """A student trained to answer "entailment" on rendered NLI items: scored by label, synonyms and case
    read as the loop reads them, so 2 of the 3 rows with a gold label are right."""
    from agentkd.config import TrainSection
    from agentkd.training.train import train
    from agentkd.training.train_data import TrainingExample

    texts = [f"premise: Ann has {a} pens.\nhypothesis: Ann has {b} pens." for a in range(10) for b in range(4)]
    nli = build_student(load_spec(ROOT / "students" / "tiny.toml"), seed=1,
                        corpus=texts + ["entailment", "contradiction", "neutral"])
    run = tmp_path / "runs" / "nli"
    train(nli, [TrainingExample(instruction=t, response="entailment") for t in texts],
          TrainSection(max_steps=40, lr=0.01, batch_size=8, warmup_steps=0, epochs=100),
          out_dir=run / "checkpoints" / "1", progress=False)
    (run / "config.json").write_text(json.dumps({"task": {"kind": "nli"}, "train": {"max_new_tokens": 8}}))
    items = [{"premise": "Bob has 3 cats.", "hypothesis": "Bob has 3 cats.", "label": "entails"},
             {"premise": "Bob has 3 cats.", "hypothesis": "Bob has 9 cats.", "label": "contradiction"},
             {"premise": "Ann has 2 pens.", "hypothesis": "Ann has 2 pens.", "label": "Entailment"},
             {"premise": "Ann has 5 pens.", "hypothesis": "Ann has 1 pens."}]
    rows, summary = run_eval(run, rows_file(tmp_path / "nli.jsonl", items), tmp_path / "a.jsonl", capsys)
    assert [r["student_label"] for r in rows] == ["entailment"] * 4
    assert [r.get("correct") for r in rows] == [True, False, True, None]
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["scoring"] == "label (nli)"

    bad = rows_file(tmp_path / "bad.jsonl", [items[0], {"premise": "only a premise", "label": "neutral"}])
    assert main(["eval", str(run), "--input", str(bad)]) == 2
    assert "bad.jsonl:2:" in capsys.readouterr().err
