"""students/*.toml -> a transformers causal LM + tokenizer (+ a peft LoRA adapter), and checkpoints.

Two kinds of spec:
- "from_config": a small Llama built from a config (no download). Its tokenizer is a byte-level BPE
  trained here on the task text with digits split one per token (ENVIRONMENT.md: learns far faster
  than raw bytes), or ByT5's byte tokenizer ("byte"), or "shared": the tokenizer of another student,
  passed in. The posterior/proxy KD proxy uses "shared" so that it and the student have the SAME
  tokenizer (METHODS.md §3) — their distributions are over the same ids.
- "pretrained": AutoModelForCausalLM/AutoTokenizer from name_or_path (a local path, or the hub when
  the user has network; tests never do this).

A checkpoint folder is loadable by transformers/peft alone: a full model folder, or for LoRA an
adapter folder whose adapter_config.json names its base (for from_config students the base is saved
in <checkpoint>/base, since it exists nowhere else).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from agentkd.config import ConfigError, LoraSection, format_validation_error, read_user_file
from agentkd.training.train_data import Task, chat_template

SPEC_FILE = "agentkd_student.json"  # the spec a checkpoint was built from, for humans and load_checkpoint
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


class StudentSpec(BaseModel):
    """Schema of students/*.toml. Architecture fields apply to kind = "from_config" only."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field("tiny", description="Label used in logs and reports.")
    kind: Literal["from_config", "pretrained"] = Field(
        "from_config", description="from_config (a small Llama built here, no download) or pretrained (name_or_path)."
    )
    name_or_path: str | None = Field(None, description="pretrained: local folder or hub id.")
    tokenizer: Literal["bpe", "byte", "shared"] = Field(
        "bpe", description="from_config: BPE trained on the corpus, ByT5 bytes, or another student's."
    )
    vocab_size: int = Field(512, gt=0, description="BPE: the most tokens to learn (digits 0-9 always).")
    hidden_size: int = Field(64, gt=0, description="from_config: model width.")
    intermediate_size: int = Field(128, gt=0, description="from_config: MLP width.")
    num_layers: int = Field(4, gt=0, description="from_config: transformer layers.")
    num_heads: int = Field(4, gt=0, description="from_config: attention heads.")
    num_kv_heads: int | None = Field(None, gt=0, description="None: same as num_heads (no GQA).")
    max_position_embeddings: int = Field(256, gt=0, description="from_config: longest sequence (prompt + answer).")
    rope_theta: float = Field(10000.0, gt=0, description="from_config: RoPE base.")
    tie_word_embeddings: bool = Field(True, description="Share input and output embeddings.")
    lora_targets: list[str] | None = Field(
        None, description="Module names LoRA wraps for this architecture; overrides train.lora.targets."
    )
    trust_remote_code: bool = Field(
        False, description="pretrained: allow the model's own code (transformers trust_remote_code)."
    )


@dataclass
class Student:
    model: Any  # a transformers PreTrainedModel, or a peft PeftModel around one
    tokenizer: PreTrainedTokenizerBase
    spec: StudentSpec
    trained_examples: int = 0  # teacher answers a proxy has trained on (0: untrained, unusable as a proxy)


def load_spec(path: str | Path) -> StudentSpec:
    """Read a students/*.toml; a bad file or key is a ConfigError naming the file and the key."""
    path = Path(path)
    text = read_user_file(path, "student spec")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    try:
        spec = StudentSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None
    if spec.kind == "pretrained" and not spec.name_or_path:
        raise ConfigError(f"{path}: name_or_path: required when kind = \"pretrained\"")
    if spec.kind == "from_config" and spec.hidden_size % spec.num_heads:
        raise ConfigError(f"{path}: hidden_size: {spec.hidden_size} is not divisible by num_heads")
    return spec


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`, every digit its own token, with explicit pad/bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Digits first, so "127" is always 1 / 2 / 7 and no merge can glue digits together.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def _build_tokenizer(spec: StudentSpec, corpus: list[str], shared: PreTrainedTokenizerBase | None):
    if spec.tokenizer == "shared":
        if shared is None:
            raise ConfigError(f"student {spec.name}: tokenizer = \"shared\" needs the student's tokenizer")
        return shared
    if spec.tokenizer == "bpe" and corpus:
        return train_bpe_tokenizer(corpus, spec.vocab_size)
    # No corpus (or "byte"): ByT5's 256 byte ids + pad/eos/unk, no files needed. It has no bos.
    return ByT5Tokenizer()


def build_student(
    spec: StudentSpec,
    *,
    corpus: Iterable[str] = (),
    lora: LoraSection | None = None,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Student:
    """A fresh student from its spec. `tokenizer` is required for tokenizer = "shared" specs (the proxy
    gets the student's tokenizer) and otherwise ignored; `corpus` trains the BPE tokenizer."""
    torch.manual_seed(seed)
    if spec.kind == "pretrained":
        assert spec.name_or_path is not None  # load_spec checked
        tok = AutoTokenizer.from_pretrained(spec.name_or_path, trust_remote_code=spec.trust_remote_code)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(spec.name_or_path, trust_remote_code=spec.trust_remote_code)
    else:
        tok = _build_tokenizer(spec, list(corpus), tokenizer)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads or spec.num_heads,
            max_position_embeddings=spec.max_position_embeddings,
            rope_theta=spec.rope_theta,
            tie_word_embeddings=spec.tie_word_embeddings,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    if lora is not None and lora.enabled:
        model = _with_lora(model, spec, lora)
    return Student(model=model, tokenizer=tok, spec=spec)


def _with_lora(model: Any, spec: StudentSpec, lora: LoraSection) -> Any:
    """Wrap in a peft LoRA adapter; the base weights are frozen, only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    targets = spec.lora_targets if spec.lora_targets is not None else list(lora.targets)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def is_lora(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_checkpoint(student: Student, path: Path, *, task: Task = "answer",
                    state_dict: dict[str, Any] | None = None) -> None:
    """Write a folder that AutoModelForCausalLM (full model) or peft PeftModel (LoRA) loads alone; its
    tokenizer carries the student's prompt format for `task` as its chat template. `state_dict`: the
    model's full weights when the live model holds only a shard of them (train.fsdp)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    student.tokenizer.chat_template = chat_template(task)
    model = student.model
    if is_lora(model):
        if student.spec.kind == "from_config":
            base_dir = path / "base"
            _plain_base(model, state_dict).save_pretrained(base_dir)
            student.tokenizer.save_pretrained(base_dir)
            base_ref = str(base_dir.resolve())
        else:
            base_ref = str(student.spec.name_or_path)
        for config in model.peft_config.values():
            config.base_model_name_or_path = base_ref
    model.save_pretrained(path, state_dict=state_dict)
    student.tokenizer.save_pretrained(path)
    (path / SPEC_FILE).write_text(json.dumps(student.spec.model_dump(mode="json"), indent=2) + "\n")


def _plain_base(peft_model: Any, full: dict[str, Any] | None = None) -> Any:
    """The base model without LoRA layers, as a separate copy (the live adapter is left untouched).
    `full`: the peft model's whole state dict, when the live one is sharded."""
    base = peft_model.get_base_model()
    prefix = "base_model.model."  # peft's keys for the base model's own
    source = base.state_dict() if full is None else {k.removeprefix(prefix): v for k, v in full.items()}
    state = {
        key.replace(".base_layer.", "."): value
        for key, value in source.items()
        if "lora_" not in key
    }
    plain = type(base)(base.config)
    plain.load_state_dict(state, strict=False)  # strict=False: tied lm_head may be absent from state
    plain.tie_weights()
    return plain


def load_checkpoint(path: Path, *, spec: StudentSpec) -> Student:
    """Reload a checkpoint written by save_checkpoint (LoRA adapters come back trainable)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: checkpoint folder not found")
    tok = AutoTokenizer.from_pretrained(path)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        base_dir = path / "base" if (path / "base").is_dir() else spec.name_or_path
        base = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=spec.trust_remote_code)
        model = PeftModel.from_pretrained(base, path, is_trainable=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return Student(model=model, tokenizer=tok, spec=spec)


def count_parameters(model: Any, *, trainable_only: bool = False) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
