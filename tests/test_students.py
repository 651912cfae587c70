"""Student specs, building from config, LoRA and checkpoints that transformers/peft load alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from agentkd.config import ConfigError, LoraSection  # noqa: E402
from agentkd.training.students import (  # noqa: E402
    Student,
    StudentSpec,
    build_student,
    count_parameters,
    load_checkpoint,
    load_spec,
    save_checkpoint,
)

STUDENTS = Path(__file__).resolve().parent.parent / "students"
CORPUS = [
    f"Ann has {a} pens and buys {b} more. How many pens does Ann have?\nAnswer: {a} + {b} = {a + b}. The answer is {a + b}."
    for a, b in [(3, 4), (12, 7), (25, 30), (8, 19)]
] * 5


@pytest.mark.parametrize("path", sorted(STUDENTS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_student_spec_loads(path):
    spec = load_spec(path)
    assert isinstance(spec, StudentSpec)


def test_bad_spec_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nhiden_size = 64\n')
    with pytest.raises(ConfigError) as err:
        load_spec(bad)
    assert "bad.toml" in str(err.value) and "hiden_size" in str(err.value)
    (tmp_path / "pre.toml").write_text('kind = "pretrained"\n')
    with pytest.raises(ConfigError, match="name_or_path"):
        load_spec(tmp_path / "pre.toml")


def test_tiny_student_is_small_with_single_digit_tokens():
    student = build_student(load_spec(STUDENTS / "tiny.toml"), corpus=CORPUS)
    assert 100_000 <= count_parameters(student.model) <= 300_000
    tokens = student.tokenizer.tokenize("12 + 7 = 19")
    assert [t for t in tokens if any(c.isdigit() for c in t)] == ["1", "2", "7", "1", "9"]
    tok = student.tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert student.model.config.tie_word_embeddings
    assert student.model.config.vocab_size == len(tok)


def test_without_corpus_the_student_uses_byte_tokenizer():
    student = build_student(load_spec(STUDENTS / "tiny.toml"))
    assert type(student.tokenizer).__name__ == "ByT5Tokenizer"
    assert student.model.config.vocab_size == len(student.tokenizer)


def test_proxy_shares_the_students_tokenizer():
    student = build_student(load_spec(STUDENTS / "tiny.toml"), corpus=CORPUS)
    proxy = build_student(load_spec(STUDENTS / "tiny-proxy.toml"), tokenizer=student.tokenizer, seed=1)
    assert proxy.tokenizer is student.tokenizer
    assert proxy.model.config.vocab_size == student.model.config.vocab_size
    assert count_parameters(proxy.model) > count_parameters(student.model)
    with pytest.raises(ConfigError, match="shared"):
        build_student(load_spec(STUDENTS / "tiny-proxy.toml"))


def _logits(student: Student, text: str) -> torch.Tensor:
    ids = torch.tensor([student.tokenizer(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        return student.model(input_ids=ids).logits


def test_checkpoint_reloads_with_plain_transformers_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = build_student(load_spec(STUDENTS / "tiny.toml"), corpus=CORPUS, seed=3)
    save_checkpoint(student, tmp_path / "ck")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    tok = AutoTokenizer.from_pretrained(tmp_path / "ck")
    ids = torch.tensor([tok("Ann has 3 pens", add_special_tokens=False).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, _logits(student, "Ann has 3 pens"))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    again = load_checkpoint(tmp_path / "ck", spec=student.spec)
    torch.testing.assert_close(_logits(again, "Ann has 3 pens"), _logits(student, "Ann has 3 pens"))


def test_lora_checkpoint_reloads_with_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    student = build_student(load_spec(STUDENTS / "tiny.toml"), corpus=CORPUS, lora=LoraSection(enabled=True, r=4))
    trainable = count_parameters(student.model, trainable_only=True)
    assert 0 < trainable < count_parameters(student.model) / 4
    # make the adapter non-trivial (LoRA B starts at zero)
    with torch.no_grad():
        for name, p in student.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_checkpoint(student, tmp_path / "ck")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "ck" / "base")
    plain = Student(PeftModel.from_pretrained(base, tmp_path / "ck"), student.tokenizer, student.spec)
    torch.testing.assert_close(_logits(plain, "Ann has 3 pens"), _logits(student, "Ann has 3 pens"))
    out = plain.model.generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] > 3
    again = load_checkpoint(tmp_path / "ck", spec=student.spec)
    assert count_parameters(again.model, trainable_only=True) == trainable
    torch.testing.assert_close(_logits(again, "Ann has 3 pens"), _logits(student, "Ann has 3 pens"))
