"""Issue 16, problem 7: agentkd works outside the checkout.

Shipped student specs and prompts resolve from any working directory (from the checkout, and from an
installed wheel, where they are package data), and the docs the README points to are in the repository.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agentkd.cli import main
from agentkd.teachers.sim.world import sample_problems

ROOT = Path(__file__).resolve().parents[1]


def test_train_from_another_directory_finds_the_shipped_student_spec(tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = elsewhere / "run.toml"  # student.spec is the default "students/tiny.toml"; the explainer's
    config.write_text('[run]\nname = "o"\n[teacher]\nprovider = "sim"\n[budget]\nusd = 1.0\n'  # prompt too
                      '[roles.explainer]\nprompt = "prompts/explainer_6shot.md"\n')
    rows = elsewhere / "in.jsonl"
    rows.write_text("".join(json.dumps({"instruction": p.text}) + "\n" for p in sample_problems(24, seed=2)))
    assert not (elsewhere / "students").exists() and not (elsewhere / "prompts").exists()
    assert main(["estimate", str(config), "--role", "explainer", "--input", str(rows)]) == 0
    assert main(["teach", str(config), "--role", "answerer", "--input", str(rows), "--output", "out.jsonl",
                 "--no-progress"]) == 0
    assert main(["train", str(config), "--set", "train.max_steps=2", "--set", "train.batch_size=8"]) == 0
    assert "trained 24 examples" in capsys.readouterr().out
    assert (elsewhere / "runs" / "o" / "checkpoints" / "1" / "config.json").is_file()


def test_a_users_own_file_at_a_shipped_path_wins(tmp_path, monkeypatch):
    from agentkd.shipped import resolve_shipped, shipped_dir

    monkeypatch.chdir(tmp_path)
    assert resolve_shipped("students/tiny.toml") == shipped_dir("students") / "tiny.toml"
    (tmp_path / "students").mkdir()
    (tmp_path / "students" / "tiny.toml").write_text('name = "mine"\n')
    assert resolve_shipped("students/tiny.toml") == Path("students/tiny.toml")
    assert resolve_shipped("students/none.toml") == Path("students/none.toml")  # the error names it as written


def test_every_package_is_listed_for_the_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "agentkd").rglob("__init__.py")}
    assert found | set(setuptools["package-dir"]) == set(setuptools["packages"])


@pytest.mark.slow
def test_an_installed_wheel_carries_the_prompts_and_student_specs(tmp_path):
    """Build the wheel, install it into a bare folder, and load the shipped files from outside the checkout."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(ROOT)], capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("agentkd-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                              str(tmp_path / "site"), str(wheel)], capture_output=True, text=True, timeout=240)
    assert install.returncode == 0, install.stderr[-2000:]
    code = (
        "import agentkd, pathlib\n"
        "from agentkd.config import config_from_dict\n"
        "from agentkd.roles.requests import RolePrompts\n"
        "from agentkd.training.students import load_spec\n"
        "config = config_from_dict({'roles': {'explainer': {'prompt': 'prompts/explainer_6shot.md'}}})\n"
        "print(pathlib.Path(agentkd.__file__).parent)\n"
        "print(load_spec(config.resolve_path(config.student.spec)).name)\n"
        "print(RolePrompts(config).templates['explainer'].path)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert done.returncode == 0, done.stderr[-2000:]
    package, spec_name, prompt = done.stdout.split()
    assert Path(package) == tmp_path / "site" / "agentkd"
    assert spec_name == "tiny"
    assert Path(prompt) == tmp_path / "site" / "agentkd" / "prompts" / "explainer_6shot.md"


def test_readme_and_docs_link_only_inside_the_repository():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "../shared" not in text, doc
        for target in re.findall(r"\]\(([^)#]+)\)|`((?:docs|prompts|students|examples|benchmarks)/[^`\s]+\.(?:md|toml|jsonl|png))`",
                                 text):
            path = next(t for t in target if t)
            if "://" in path or "<" in path or "*" in path:
                continue
            assert (doc.parent / path).resolve().is_relative_to(ROOT), (doc, path)
            assert (doc.parent / path).exists() or (ROOT / path).exists(), (doc, path)
