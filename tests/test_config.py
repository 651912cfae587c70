"""The typed run config: every shipped config loads; bad keys, types and values name the key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentkd.config import ConfigError, load_config, parse_override, resolve_api_key
from agentkd.training.students import load_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
STUDENTS = sorted((ROOT / "students").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_loads(path):
    config = load_config(path)
    assert config.run.name
    # Student specs named by examples exist and load too.
    assert load_spec(ROOT / config.student.spec).name


@pytest.mark.parametrize("path", STUDENTS, ids=lambda p: p.name)
def test_every_student_spec_loads(path):
    assert load_spec(path).name


def test_examples_and_students_are_shipped():
    assert {"quickstart.toml", "openai.toml", "anthropic.toml"} <= {p.name for p in EXAMPLES}
    assert {"tiny.toml"} <= {p.name for p in STUDENTS}


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "[limits]\nrpm = 10\nrmp = 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "limits.rmp: unknown key" in str(err.value)


@pytest.mark.parametrize("text, key", [
    ("[budget]\nusd = -1\n", "budget.usd"),
    ("[limits]\nrpm = \"fast\"\n", "limits.rpm"),
    ("[teacher]\nprovider = \"gemini\"\n", "teacher.provider"),
    ("[train]\nobjective = \"magic\"\n", "train.objective"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_unknown_price_is_an_error_unless_the_budget_is_tokens_only(tmp_path):
    text = '[teacher]\nprovider = "openai"\nmodel = "gpt-x"\napi_key_env = "K"\n'
    with pytest.raises(ConfigError, match=r"prices\.gpt-x"):
        load_config(write(tmp_path, text + "[budget]\nusd = 5\n"))
    assert load_config(write(tmp_path, text + "[budget]\ntokens = 100000\n")).budget.tokens == 100000


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[run\nname=")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_overrides_are_typed_and_checked(tmp_path):
    path = write(tmp_path, "")
    config = load_config(path, ["budget.usd=2.5", "loop.iterations=2", "run.name=abc"])
    assert config.budget.usd == 2.5 and config.loop.iterations == 2 and config.run.name == "abc"
    with pytest.raises(ConfigError, match="loop.iterations"):
        load_config(path, ["loop.iterations=zero"])
    assert parse_override("teacher.model=gpt-4o-mini") == (["teacher", "model"], "gpt-4o-mini")


def test_api_key_is_stripped_validated_and_never_in_messages(monkeypatch):
    monkeypatch.setenv("AGENTKD_TEST_KEY", "  sk-secret-value\n")
    assert resolve_api_key("AGENTKD_TEST_KEY", provider="openai") == "sk-secret-value"
    monkeypatch.setenv("AGENTKD_TEST_KEY", "sk-secret value")
    with pytest.raises(ConfigError) as err:
        resolve_api_key("AGENTKD_TEST_KEY", provider="openai")
    assert "AGENTKD_TEST_KEY" in str(err.value) and "secret" not in str(err.value)
    monkeypatch.delenv("AGENTKD_TEST_KEY")
    with pytest.raises(ConfigError, match="AGENTKD_TEST_KEY is not set"):
        resolve_api_key("AGENTKD_TEST_KEY", provider="anthropic")


BAD_CONFIGS = {  # RELIABILITY 25: what is wrong -> (config text, the key the message must name)
    "unknown key": ("[limits]\nrmp = 5\n", "limits.rmp"),
    "wrong type": ('[limits]\nrpm = "fast"\n', "limits.rpm"),
    "negative budget": ("[budget]\nusd = -1\n", "budget.usd"),
    "unknown provider": ('[teacher]\nprovider = "gemini"\n', "teacher.provider"),
    "unknown price": ('[teacher]\nprovider = "openai"\nmodel = "gpt-x"\napi_key_env = "K"\n[budget]\nusd = 5\n',
                      "prices.gpt-x"),
    "missing env var": ('[teacher]\nprovider = "openai"\nmodel = "gpt-x"\napi_key_env = "AGENTKD_TEST_UNSET_KEY"\n'
                        "[budget]\ntokens = 1000\n", "teacher.api_key_env"),
    "missing env var of a role": ('[teacher]\nprovider = "sim"\n[roles.referee]\nprovider = "anthropic"\n'
                                  'model = "claude-x"\napi_key_env = "AGENTKD_TEST_UNSET_KEY"\n[budget]\ntokens = 1000\n',
                                  "roles.referee.api_key_env"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_exits_2_naming_the_key_and_the_file(tmp_path, capsys, monkeypatch, case):
    from agentkd.cli import main

    monkeypatch.delenv("AGENTKD_TEST_UNSET_KEY", raising=False)
    text, key = BAD_CONFIGS[case]
    path = tmp_path / "bad.toml"
    path.write_text(f'[run]\nname = "t"\ndir = "{tmp_path / "runs"}"\n' + text)
    data = tmp_path / "in.jsonl"
    data.write_text('{"instruction": "What is 2 + 2?"}\n')
    assert main(["teach", str(path), "--role", "answerer", "--input", str(data), "--output",
                 str(tmp_path / "out.jsonl"), "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich may wrap a long line
    assert str(path) in err and key in err
