"""Issue 16, problems 2 and 5: inputs are discoverable, and messages never lose or mangle text.

Every case runs the real CLI entry point (`agentkd.cli.main`) and reads what a user would see on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentkd.cli import main
from agentkd.config import ConfigError, load_config
from agentkd.roles.inputs import ROLE_INPUTS

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f'[run]\nname = "t"\ndir = "{tmp_path / "runs"}"\n[teacher]\nprovider = "sim"\n'
                    f"[budget]\nusd = 1.0\n{text}")
    return path


def rows_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def estimate(*args: str) -> int:
    return main(["estimate", *args])


# Problem 2: inputs are not discoverable ---------------------------------------------------------


def test_missing_referee_fields_are_all_named_at_once_with_what_the_role_reads(tmp_path, capsys):
    data = rows_file(tmp_path / "seeds.jsonl", [{"instruction": "2 + 3?"}, {"instruction": "4 + 4?"}])
    assert estimate(str(write_config(tmp_path)), "--role", "referee", "--input", str(data)) == 2
    err = capsys.readouterr().err
    assert "seeds.jsonl:1: field 'teacher_answer' is missing, field 'student_answer' is missing" in err
    assert "1 more line(s) lack fields too" in err
    assert "--role referee rows need: instruction, teacher_answer, student_answer" in err


def test_teach_help_lists_every_roles_required_and_optional_fields(capsys):
    with pytest.raises(SystemExit):
        main(["teach", "--help"])
    text = capsys.readouterr().out
    for role, spec in ROLE_INPUTS.items():
        assert f"  {role}:" in text
        for name, _ in spec.required:
            assert any(line.split()[:2] == [name, "required:"] for line in text.splitlines()
                       if line.startswith("    ")), (role, name)
        for name, _ in spec.optional:
            assert any(line.split()[:2] == [name, "optional:"] for line in text.splitlines()), (role, name)
    assert {n for spec in ROLE_INPUTS.values() for n, _ in spec.optional} == {"label", "mode"}


def test_prompts_readme_names_the_jsonl_fields_that_fill_each_placeholder():
    """The README's field table uses the JSONL names of ROLE_INPUTS, each under its own role."""
    text = (ROOT / "prompts" / "README.md").read_text()
    table = text[text.index("## Where each value comes from"):]
    named: dict[str, set[str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in ROLE_INPUTS:
            named.setdefault(cells[0], set()).add(cells[1].split("`")[1])
    assert named == {role: {n for n, _ in spec.required + spec.optional} for role, spec in ROLE_INPUTS.items()}


# Problem 5: messages lose text --------------------------------------------------------------------


def test_a_missing_price_prints_the_table_header_it_asks_for(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('[teacher]\nprovider = "openai"\nmodel = "gpt-x"\napi_key_env = "K"\n[budget]\nusd = 5\n')
    assert estimate(str(config)) == 2
    assert 'add [prices."gpt-x"] input_per_mtok/output_per_mtok' in capsys.readouterr().err


def test_a_path_with_brackets_is_printed_verbatim(tmp_path, capsys):
    missing = tmp_path / "bad" / "[red]x[/red].jsonl"
    assert estimate(str(write_config(tmp_path)), "--input", str(missing)) == 2
    assert f"{missing}: input file not found" in capsys.readouterr().err


def test_teacher_text_with_markup_and_emoji_codes_is_printed_verbatim(tmp_path, capsys):
    data = rows_file(tmp_path / "in.jsonl", [{"instruction": "[bold]a[/bold] :smile:", "n": 1}, {"x": 1}])
    assert estimate(str(write_config(tmp_path)), "--input", str(data)) == 2
    assert "in.jsonl:2: field 'instruction' is missing" in capsys.readouterr().err
    # the same console prints a budget stop's and a store error's text: no markup is read from data
    from agentkd.terminal import labelled, plain_console

    plain_console().print(labelled("error:", "red", "[prices.\"m\"] [bold]x[/bold] :smile:"))
    assert 'error: [prices."m"] [bold]x[/bold] :smile:' in capsys.readouterr().err


def test_a_directory_given_as_the_config_is_exit_2_naming_it(tmp_path, capsys):
    assert estimate(str(tmp_path)) == 2
    assert f"{tmp_path}: is a directory" in capsys.readouterr().err


def test_a_fifo_given_as_the_config_is_exit_2_without_blocking(tmp_path):
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    # In a subprocess with a timeout: opening a FIFO with no writer would block this test forever.
    done = subprocess.run([sys.executable, "-m", "agentkd.cli", "estimate", str(fifo)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert f"{fifo}: not a regular file" in done.stderr


def test_an_unreadable_config_is_exit_2_naming_it(tmp_path, capsys):
    if os.geteuid() == 0:
        # root reads any mode; /proc/self/mem is a regular file that read() refuses (EIO) even to root
        path = Path("/proc/self/mem")
    else:
        path = tmp_path / "run.toml"
        path.write_text("")
        path.chmod(0)
    assert estimate(str(path)) == 2
    assert f"{path}: cannot read the config file" in capsys.readouterr().err


def test_set_errors_name_the_override_not_the_file(tmp_path):
    config = write_config(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(config, ["loop.iterations=zero", "limits.rpmm=3"])
    text = str(err.value)
    assert "--set loop.iterations=zero: loop.iterations:" in text
    assert "--set limits.rpmm=3: limits.rpmm: unknown key" in text
    assert f"{config}: invalid config" not in text  # the file is fine
    # a problem in the file is still the file's
    bad = write_config(tmp_path, "[limits]\nrpmm = 3\n")
    with pytest.raises(ConfigError, match=r"run\.toml: invalid config\n  limits\.rpmm: unknown key"):
        load_config(bad, ["budget.usd=2"])


@pytest.mark.parametrize("override", ["budget.usd=1e400", "budget.usd=inf", "sim.error_rate=nan",
                                      "limits.timeout_s=-inf"])
def test_non_finite_numbers_are_rejected(tmp_path, override):
    with pytest.raises(ConfigError, match=f"--set {override}: .*finite number"):
        load_config(write_config(tmp_path), [override])


def test_a_non_finite_number_in_the_file_is_rejected_too(tmp_path):
    path = tmp_path / "inf.toml"
    path.write_text("[budget]\nusd = inf\n")
    with pytest.raises(ConfigError, match=r"budget\.usd: Input should be a finite number"):
        load_config(path)


@pytest.mark.parametrize("rate", ["2", "-0.1", "nan"])
def test_estimate_rejects_a_rationale_rate_that_teach_rejects(tmp_path, capsys, rate):
    config = write_config(tmp_path)
    data = rows_file(tmp_path / "in.jsonl", [{"instruction": "1 + 1?"}])
    out = tmp_path / "out.jsonl"
    assert main(["teach", str(config), "--role", "explainer", "--input", str(data), "--output", str(out),
                 "--rationale-rate", rate, "--no-progress"]) == 2
    teach_err = capsys.readouterr().err
    assert estimate(str(config), "--role", "explainer", "--input", str(data), "--rationale-rate", rate) == 2
    assert capsys.readouterr().err == teach_err and "--rationale-rate" in teach_err
    assert estimate(str(config), "--rationale-rate", rate) == 2  # the whole-loop estimate too


def test_an_unterminated_string_is_reported_with_one_at(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text('{"instruction": "a\n')
    assert estimate(str(write_config(tmp_path)), "--input", str(data)) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:1: not valid JSON (Unterminated string starting at column 17)" in err
    assert "at at" not in err


def test_a_whole_config_problem_names_the_overrides_it_came_with(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[teacher]\nprovider = "openai"\nmodel = "gpt-x"\napi_key_env = "K"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, ["budget.usd=5"])  # the file alone is valid: the price is needed once a USD cap is set
    assert str(err.value).startswith(f"{path} with --set budget.usd=5: invalid config")
