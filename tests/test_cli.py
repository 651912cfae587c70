"""`agentkd teach` / `estimate` / `train` end to end on the simulated teacher, and the exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentkd.cli import main
from agentkd.teachers.sim import sim_in_thread
from agentkd.teachers.sim.world import sample_problems
from agentkd.config import SimSection

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, extra: str = "", *, budget: float = 1.0) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f'[run]\nname = "t"\ndir = "{tmp_path / "runs"}"\n[teacher]\nprovider = "sim"\n'
                    f"[budget]\nusd = {budget}\n{extra}")
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def problems(n: int, seed: int = 3) -> list[dict]:
    return [{"instruction": p.text, "id": i} for i, p in enumerate(sample_problems(n, seed=seed))]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_teach_answerer_keeps_input_fields_and_resumes_for_free(tmp_path, capsys):
    config = write_config(tmp_path)
    data = write_rows(tmp_path / "in.jsonl", problems(12))
    out = tmp_path / "out.jsonl"
    assert main(["teach", str(config), "--role", "answerer", "--input", str(data), "--output", str(out),
                 "--no-progress"]) == 0
    rows = read_rows(out)
    assert [r["id"] for r in rows] == list(range(12))
    assert all("The answer is" in r["answer"] for r in rows)
    first = capsys.readouterr().out
    assert "12/12 done" in first
    assert main(["teach", str(config), "--role", "answerer", "--input", str(data), "--output", str(out),
                 "--no-progress"]) == 0
    assert "answered from the store: 12" in capsys.readouterr().out


def test_teach_explainer_with_partial_rationales(tmp_path, capsys):
    config = write_config(tmp_path)
    data = write_rows(tmp_path / "in.jsonl", problems(20))
    out = tmp_path / "out.jsonl"
    assert main(["teach", str(config), "--role", "explainer", "--input", str(data), "--output", str(out),
                 "--rationale-rate", "0.5", "--no-progress"]) == 0
    rows = read_rows(out)
    assert all(r["label"] is not None for r in rows)
    with_rationale = sum(r["rationale"] is not None for r in rows)
    assert 0 < with_rationale < 20  # only the selected share was asked for a reason
    printed = capsys.readouterr().out
    assert "0 parse failures" in printed and "saved" in printed  # the zero-shot vs 6-shot comparison


def test_teach_prints_the_measured_token_counts_of_both_explainer_prompts(tmp_path, capsys):
    import re

    from agentkd.config import load_config
    from agentkd.estimate import explainer_prompt_tokens

    config = write_config(tmp_path)
    rows = problems(15)
    data = write_rows(tmp_path / "in.jsonl", rows)
    assert main(["teach", str(config), "--role", "explainer", "--input", str(data), "--output",
                 str(tmp_path / "out.jsonl"), "--no-progress"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("explainer prompt:")][0]
    zero, six = map(int, re.search(r"(\d+) tokens/row zero-shot vs (\d+) with 6 worked examples", line).groups())
    measured = explainer_prompt_tokens(load_config(config), [r["instruction"] for r in rows])
    assert (zero, six) == (round(measured["zero_shot"]), round(measured["six_shot"]))
    assert measured["six_shot"] > measured["zero_shot"] + 6 * 30  # six examples of ~50 tokens each, rendered


def test_the_six_shot_explainer_prompt_is_selectable_and_the_sim_answers_it(tmp_path, capsys):
    six_shot = ROOT / "prompts" / "explainer_6shot.md"
    config = write_config(tmp_path, f'[roles.explainer]\nprompt = "{six_shot}"\n')
    data = write_rows(tmp_path / "in.jsonl", problems(10))
    out = tmp_path / "out.jsonl"
    for structured in ("true", "false"):  # a JSON reply and the two-line reply both parse
        assert main(["teach", str(config), "--role", "explainer", "--input", str(data), "--output", str(out),
                     "--no-progress", "--set", f"teacher.structured_output={structured}"]) == 0
        assert "0 parse failures" in capsys.readouterr().out
        rows = read_rows(out)
        assert all(r["label"] is not None and r["rationale"] for r in rows)
    from agentkd.store.writer import Store

    store = Store(tmp_path / "runs" / "t" / "agentkd.duckdb", read_only=True)
    try:
        sent = store.query("SELECT DISTINCT request_json FROM calls WHERE role = 'explainer'")
    finally:
        store.close_sync()
    assert sent and all("Example 6" in r[0] for r in sent)


def test_teach_referee_and_generator(tmp_path):
    config = write_config(tmp_path)
    items = sample_problems(8, seed=5)
    judged = write_rows(tmp_path / "j.jsonl", [
        {"instruction": p.text, "teacher_answer": f"The answer is {p.answer}.", "student_answer": "The answer is 99999."}
        for p in items])
    out = tmp_path / "j_out.jsonl"
    assert main(["teach", str(config), "--role", "referee", "--input", str(judged), "--output", str(out),
                 "--no-progress"]) == 0
    verdicts = [r["verdict"] for r in read_rows(out)]
    assert verdicts.count("hard") >= 5  # a wrong student answer is judged worse than the teacher's

    seeds = write_rows(tmp_path / "s.jsonl", problems(10))
    gen_out = tmp_path / "g_out.jsonl"
    assert main(["teach", str(config), "--role", "generator", "--input", str(seeds), "--output", str(gen_out),
                 "--mode", "easy", "--no-progress"]) == 0
    rows = read_rows(gen_out)
    assert all(r["new_instruction"] for r in rows)
    assert all((r["accepted"] and r["reject_reason"] is None) or (not r["accepted"] and r["reject_reason"])
               for r in rows)


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a"}\nnot json\n', ":2: not valid JSON"),
    ('{"instruction": "a"}\n{"text": "b"}\n', ":2: field 'instruction' is missing"),
    ("", "no rows"),
])
def test_bad_input_exits_2_naming_the_line_and_sends_nothing(tmp_path, capsys, content, message):
    config = write_config(tmp_path)
    data = tmp_path / "in.jsonl"
    data.write_text(content)
    assert main(["teach", str(config), "--role", "answerer", "--input", str(data), "--output",
                 str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "runs" / "t" / "agentkd.duckdb").exists()


def test_bad_encoding_names_the_line(tmp_path, capsys):
    config = write_config(tmp_path)
    data = tmp_path / "in.jsonl"
    data.write_bytes(b'{"instruction": "a"}\n{"instruction": "\xff\xfe"}\n')
    assert main(["teach", str(config), "--role", "answerer", "--input", str(data), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "in.jsonl:2: not UTF-8" in capsys.readouterr().err.replace("\n", "")


def test_bad_config_exits_2(tmp_path, capsys):
    config = write_config(tmp_path, "[limits]\nrpmm = 3\n")
    assert main(["estimate", str(config)]) == 2
    assert "limits.rpmm: unknown key" in capsys.readouterr().err


def test_budget_too_small_exits_3_and_a_larger_one_finishes(tmp_path, capsys):
    config = write_config(tmp_path, budget=0.0005)  # ~6 calls: each reserves $0.00032, costs ~$0.00003
    data = write_rows(tmp_path / "in.jsonl", problems(30))
    out = tmp_path / "out.jsonl"
    assert main(["teach", str(config), "--role", "answerer", "--input", str(data), "--output", str(out),
                 "--no-progress"]) == 3
    assert "budget exhausted" in capsys.readouterr().err
    partial = len(read_rows(out))
    assert 0 < partial < 30
    assert main(["teach", str(config), "--role", "answerer", "--input", str(data), "--output", str(out),
                 "--no-progress", "--set", "budget.usd=1"]) == 0
    assert len(read_rows(out)) == 30


def test_refused_key_exits_4_naming_the_variable_not_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SIM_KEY", "sk-wrong-key-1234")
    config = write_config(tmp_path, '[sim]\nrequire_api_key = "sk-right"\n')
    text = config.read_text().replace('provider = "sim"\n', 'provider = "sim"\napi_key_env = "SIM_KEY"\n')
    config.write_text(text)
    data = write_rows(tmp_path / "in.jsonl", problems(3))
    assert main(["teach", str(config), "--role", "answerer", "--input", str(data), "--output",
                 str(tmp_path / "o.jsonl"), "--no-progress"]) == 4
    err = capsys.readouterr().err
    assert "SIM_KEY" in err and "sk-wrong-key-1234" not in err


def test_estimate_sends_nothing_and_counts_stored_calls(tmp_path, capsys):
    config = write_config(tmp_path)
    data = write_rows(tmp_path / "in.jsonl", problems(10))
    assert main(["estimate", str(config), "--role", "answerer", "--input", str(data)]) == 0
    out = capsys.readouterr().out
    assert "calls to send:        10" in out and "worst case" in out
    assert not (tmp_path / "runs" / "t" / "agentkd.duckdb").exists()
    assert main(["teach", str(config), "--role", "answerer", "--input", str(data), "--output",
                 str(tmp_path / "o.jsonl"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["estimate", str(config), "--role", "answerer", "--input", str(data)]) == 0
    assert "already stored, free: 10" in capsys.readouterr().out


def test_estimate_of_the_whole_loop(capsys):
    assert main(["estimate", str(ROOT / "examples" / "quickstart.toml")]) == 0
    out = capsys.readouterr().out
    assert "generator" in out and "referee" in out and "total" in out


def test_estimate_of_the_random_baseline_has_no_referee_line(capsys):
    assert main(["estimate", str(ROOT / "examples" / "quickstart.toml"), "--set", "loop.selection=random"]) == 0
    out = capsys.readouterr().out
    assert "generator" in out and "eval" in out and "referee" not in out


@pytest.mark.slow
def test_ctrl_c_exits_cleanly_and_a_rerun_pays_nothing_twice(tmp_path):
    with sim_in_thread(SimSection(latency_ms=50), seed=1) as sim:
        config = tmp_path / "run.toml"
        config.write_text(f'[run]\nname = "t"\ndir = "{tmp_path / "runs"}"\n[teacher]\nprovider = "sim"\n'
                          f'base_url = "{sim.base_url}"\n[limits]\nmax_concurrency = 4\n[budget]\nusd = 1\n')
        data = write_rows(tmp_path / "in.jsonl", problems(150))
        out = tmp_path / "out.jsonl"
        cmd = [sys.executable, "-m", "agentkd.cli", "teach", str(config), "--role", "answerer", "--input",
               str(data), "--output", str(out), "--no-progress"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        deadline = time.monotonic() + 30
        while sim.stats()["billed_requests"] < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "re-run" in err
        assert 0 < len(read_rows(out)) < 150
        rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        assert len(read_rows(out)) == 150
        billed = sim.stats()["billed_by_key"]
        assert len(billed) == 150 and max(billed.values()) == 1


def test_sim_teacher_command_answers_both_official_sdks():
    import anthropic
    import openai

    proc = subprocess.Popen([sys.executable, "-m", "agentkd.cli", "sim-teacher", "--port", "0"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("simulated teacher listening on http://127.0.0.1:")
        base_url = line.rsplit(" ", 1)[1].strip()
        problem = sample_problems(1, seed=8)[0]
        chat = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="sim-teacher-1", messages=[{"role": "user", "content": problem.text}], temperature=0)
        assert f"The answer is {problem.answer}." in chat.choices[0].message.content
        assert chat.usage.prompt_tokens > 0
        message = anthropic.Anthropic(base_url=base_url, api_key="x", max_retries=0).messages.create(
            model="sim-teacher-1", max_tokens=200, messages=[{"role": "user", "content": problem.text}])
        assert message.content[0].text.endswith(f"The answer is {problem.answer}.")
        assert message.usage.output_tokens > 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
