"""Batched decoding of a student's (or the proxy's) answers: greedy or sampled, always bounded."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from agentkd.training.students import Student
from agentkd.training.train_data import format_prompt, left_padded


def _generate(
    student: Student, prompts: Sequence[str], *, max_new_tokens: int, temperature: float, batch_size: int, seed: int
) -> Iterator[torch.Tensor]:
    """Left-padded batches through model.generate (greedy at temperature 0): the new tokens, (B, <= max_new_tokens)."""
    model, tok = student.model, student.tokenizer
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    room = max(1, model.config.max_position_embeddings - max_new_tokens)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    for lo in range(0, len(prompts), batch_size):
        batch = {k: v.to(device) for k, v in left_padded(tok, prompts[lo : lo + batch_size], room).items()}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, **sampling,
            )
        yield out[:, batch["input_ids"].size(1) :]


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
    prompts = [format_prompt(x, task) for x in instructions]  # type: ignore[arg-type]
    answers: list[str] = []
    for new in _generate(student, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                         batch_size=batch_size, seed=seed):
        answers += student.tokenizer.batch_decode(new, skip_special_tokens=True)
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
    eos = student.tokenizer.eos_token_id
    out_ids: list[list[int]] = []
    for new in _generate(student, [format_prompt(x) for x in instructions], max_new_tokens=max_new_tokens,
                         temperature=temperature, batch_size=batch_size, seed=seed):
        for row in new.tolist():
            out_ids.append(row[: row.index(eos) + 1] if eos in row else row)  # after eos, generate() pads: dropped
    return out_ids
