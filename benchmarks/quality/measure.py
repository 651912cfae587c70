"""Held-out figures: task accuracy (greedy decoding) and the exact token-level KL(teacher || model).

The KL is teacher-forced on teacher samples of the held-out problems, drawn once at the answerer's
temperature: at each response position (eos included where the teacher ended) the teacher's full
next-token distribution softmax(logits / T) — the one its answers are drawn from — against the
model's softmax(logits), summed over the whole shared vocabulary, then averaged over positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from agentkd.training.decode import generate_answers
from agentkd.lion.evaluate import is_correct
from agentkd.training.optimise import forward
from agentkd.training.students import Student
from agentkd.teachers.sim.world import Problem
from agentkd.training.train_data import collate, encode_response_ids, format_prompt

from .teacher import Sample, request_seed, sample, teacher_prompt


@dataclass
class HeldOut:
    texts: list[str]
    answers: list[int]
    samples: list[Sample]  # the teacher's answers to the held-out problems, with its distributions

    def save(self, path: Path) -> None:
        torch.save({"texts": self.texts, "answers": self.answers,
                    "samples": [(s.ids, s.logprobs, s.ended) for s in self.samples]}, path)

    @classmethod
    def load(cls, path: Path) -> HeldOut:
        data = torch.load(path, weights_only=False)
        return cls(data["texts"], data["answers"], [Sample(*s) for s in data["samples"]])


def teacher_heldout(teacher: Student, problems: list[Problem], *, temperature: float, max_new_tokens: int,
                    seed: int, batch_size: int = 64) -> HeldOut:
    """Sample the teacher once per held-out problem (locally: measurement, not teaching)."""
    samples: list[Sample] = []
    for lo in range(0, len(problems), batch_size):
        chunk = problems[lo : lo + batch_size]
        samples += sample(teacher, [teacher_prompt(p.text, "answer") for p in chunk],
                          [request_seed(seed, f"heldout:{lo + i}") for i in range(len(chunk))],
                          temperature=temperature, max_new_tokens=[max_new_tokens] * len(chunk))
    return HeldOut([p.text for p in problems], [p.answer for p in problems], samples)


def accuracy(model: Student, held: HeldOut, *, max_new_tokens: int, task: str = "answer") -> float:
    """Share of held-out problems whose greedy answer ends in the right number."""
    answers = generate_answers(model, held.texts, max_new_tokens=max_new_tokens, task=task)
    return sum(is_correct(str(a), text, "arithmetic") for a, text in zip(held.answers, answers, strict=True)) / len(answers)


def sample_accuracy(teacher: Student, held: HeldOut) -> float:
    """The teacher's accuracy as served: its held-out samples at the answerer's temperature."""
    texts = teacher.tokenizer.batch_decode([s.ids for s in held.samples], skip_special_tokens=True)
    return sum(is_correct(str(a), t, "arithmetic") for a, t in zip(held.answers, texts, strict=True)) / len(texts)


@torch.no_grad()
def token_kl(model: Student, held: HeldOut, *, batch_size: int = 32) -> float:
    """Mean over the teacher's held-out response positions of KL(p_teacher || p_model), exact over V."""
    tok = model.tokenizer
    model.model.eval()
    total, count = 0.0, 0
    for lo in range(0, len(held.samples), batch_size):
        chunk = held.samples[lo : lo + batch_size]
        rows = [encode_response_ids(tok, format_prompt(text), s.ids + [tok.eos_token_id] * s.ended, 10_000)
                for text, s in zip(held.texts[lo : lo + batch_size], chunk, strict=True)]
        logits = forward(model.model, collate(rows, tok.pad_token_id)).float()  # (B, T, V)
        for i, (row, s) in enumerate(zip(rows, chunk, strict=True)):
            n = s.logprobs.size(0)  # response positions: tokens, plus eos where the teacher ended
            log_q = torch.log_softmax(logits[i, row.start - 1 : row.start - 1 + n], dim=-1)  # (n, V): t-1 predicts t
            log_p = s.logprobs  # (n, V)
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += n
    return total / max(count, 1)
