"""The shipped OpenAI and Anthropic example configs drive every role over real HTTP.

The configs are used as users have them; only base_url points at the loopback simulated teacher, which
speaks both wire formats (max_completion_tokens + Bearer auth + json_schema for OpenAI; x-api-key,
anthropic-version and /v1/messages for Anthropic). No request leaves the machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentkd.cli import main
from agentkd.config import SimSection
from agentkd.teachers.sim import sim_in_thread
from agentkd.teachers.sim.world import sample_problems

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-example-test-key"


@pytest.fixture(scope="module")
def sim():
    with sim_in_thread(SimSection(require_api_key=KEY, error_rate=0.0), seed=4) as handle:
        yield handle


def rows_for(role: str) -> list[dict]:
    problems = sample_problems(4, seed=9)
    if role == "referee":
        return [{"instruction": p.text, "teacher_answer": f"The answer is {p.answer}.",
                 "student_answer": f"The answer is {p.answer + 1}."} for p in problems]
    return [{"instruction": p.text} for p in problems]


@pytest.mark.parametrize("transport", ["aiohttp", "sdk"])
@pytest.mark.parametrize("example, key_env, base", [
    ("openai.toml", "OPENAI_API_KEY", "/v1"), ("anthropic.toml", "ANTHROPIC_API_KEY", ""),
])
@pytest.mark.parametrize("role", ["answerer", "explainer", "referee", "generator"])
def test_example_config_runs_every_role(tmp_path, monkeypatch, capsys, sim, example, key_env, base, role,
                                        transport):
    monkeypatch.setenv(key_env, f" {KEY}\n")  # stripped at load, like a key pasted with a newline
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_for(role)))
    out = tmp_path / "out.jsonl"
    code = main(["teach", str(ROOT / "examples" / example), "--role", role, "--input", str(data),
                 "--output", str(out), "--no-progress",
                 "--set", f'teacher.base_url="{sim.base_url}{base}"', "--set", f'run.dir="{tmp_path}"',
                 "--set", f'teacher.transport="{transport}"',
                 # the examples' tier limits would pace this test to minutes; the limiter has its own tests
                 "--set", "limits.rpm=100000", "--set", "limits.input_tpm=10000000",
                 "--set", "limits.output_tpm=10000000"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "4/4 done, 0 failed, 0 parse failures" in printed.out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    field = {"answerer": "answer", "explainer": "label", "referee": "verdict", "generator": "new_instruction"}[role]
    assert all(r[field] for r in rows)
    if role == "referee":
        assert all(r["verdict"] == "hard" for r in rows)  # wrong student answers, both orders
    assert KEY not in printed.out + printed.err
