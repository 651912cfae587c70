"""Batched decoding of a student's (or the proxy's) answers: greedy or sampled, always bounded."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from agentkd.students import Student
from agentkd.train_data import format_prompt, left_padded


@torch.no_grad()
def generate_answers(
    student: Student,
    instructions: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    task: str = "answer",
) -> list[str]:
    """Batched, left-padded decoding of the student's answers (greedy at temperature 0). Unconverged
    students often skip EOS, so max_new_tokens always bounds the output. A rationale-trained student
    answers with task="predict"."""
    model, tok = student.model, student.tokenizer
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    room = max(1, model.config.max_position_embeddings - max_new_tokens)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    answers: list[str] = []
    for lo in range(0, len(instructions), batch_size):
        prompts = [format_prompt(x, task) for x in instructions[lo : lo + batch_size]]  # type: ignore[arg-type]
        batch = {k: v.to(device) for k, v in left_padded(tok, prompts, room).items()}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, **sampling,
            )
        answers += tok.batch_decode(out[:, batch["input_ids"].size(1) :], skip_special_tokens=True)
    return answers


@torch.no_grad()
def sample_response_ids(
    student: Student,
    instructions: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[int]]:
    """Sampled responses as token ids, ending with eos only when the model emitted it within
    max_new_tokens (never appended): DPO's rejected answers, compared like for like with the chosen ones."""
    model, tok = student.model, student.tokenizer
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    room = max(1, model.config.max_position_embeddings - max_new_tokens)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    out_ids: list[list[int]] = []
    for lo in range(0, len(instructions), batch_size):
        prompts = [format_prompt(x) for x in instructions[lo : lo + batch_size]]
        batch = {k: v.to(device) for k, v in left_padded(tok, prompts, room).items()}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, **sampling,
            )
        for row in out[:, batch["input_ids"].size(1) :].tolist():
            cut = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            out_ids.append(row[:cut])  # after eos, generate() pads: dropped
    return out_ids
