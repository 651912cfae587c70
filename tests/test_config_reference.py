"""docs/config.md is the config reference generated from the pydantic models: it must be current."""

from __future__ import annotations

from pathlib import Path

from agentkd.config import RunConfig
from agentkd.config_reference import render, undocumented

ROOT = Path(__file__).resolve().parents[1]


def test_the_config_reference_is_current():
    stale = (ROOT / "docs" / "config.md").read_text() != render()
    assert not stale, "docs/config.md is stale: run `python -m agentkd.config_reference > docs/config.md`"


def test_every_key_has_a_one_line_description():
    assert undocumented() == []


def test_the_reference_lists_every_key_with_its_default():
    text = render()
    for section in ("run", "teacher", "limits", "budget", "task", "student", "train", "loop", "sim"):
        model = type(getattr(RunConfig(), section))
        for name, field in model.model_fields.items():
            if name == "lora":
                continue
            assert f"| `{section}.{name}` |" in text, f"{section}.{name}"
    assert "| `train.lora.r` | int (> 0) | `8` |" in text
    assert "| `loop.rationale_rate` | float (>= 0, <= 1) | `1.0` |" in text
    for explained in ("loop.seeds is a JSONL file", "loop.heldout is the JSONL set", "## [task]"):
        assert explained in text
