"""The trainer's data contract: TrainingExample, the student prompt format, tokenisation and batching.

Prompt format (one place, used by training, generation and evaluation):
    answer task     "{instruction}\nAnswer: "           -> response (the teacher's answer)
    rationale task  "predict: {instruction}\nAnswer: "  -> label      (distilling step-by-step)
                    "explain: {instruction}\nAnswer: "  -> rationale
A sequence is [bos] + prompt tokens + target tokens + [eos] (bos only if the tokenizer has one).
Prompt and target are tokenised separately, so target token boundaries never depend on the prompt
and a generated answer starts exactly where training targets start. Loss is on target + eos only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from agentkd.training.objectives import IGNORE, SparseTargets

Task = Literal["answer", "predict", "explain"]
TASK_PREFIX: dict[str, str] = {"answer": "", "predict": "predict: ", "explain": "explain: "}


@dataclass(frozen=True)
class TrainingExample:
    instruction: str
    response: str  # the teacher's answer (target)
    label: str | None = None  # rationale task
    rationale: str | None = None
    # per output token: the provider's top-k (token string, logprob)
    teacher_top_logprobs: list[list[tuple[str, float]]] | None = None


def format_prompt(instruction: str, task: Task = "answer") -> str:
    """The student's prompt for an instruction; task "predict"/"explain" add the multi-task prefixes."""
    return f"{TASK_PREFIX[task]}{instruction}\nAnswer: "


def chat_template(task: Task = "answer") -> str:
    """format_prompt as a tokenizer chat template (Jinja), saved with every checkpoint, so transformers
    pipelines and vLLM's chat API prompt the student exactly as it was trained: [bos] (if the tokenizer
    has one) + format_prompt(last user message, task). The student is single-turn: earlier turns and
    system messages are not rendered. The newline is a real one in the template text."""
    return (
        "{%- set users = messages | selectattr('role', 'equalto', 'user') | list -%}"
        "{%- if not users %}{{ raise_exception('the student answers a user message; none was given') }}{% endif -%}"
        "{%- if bos_token %}{{ bos_token }}{% endif -%}"
        f"{TASK_PREFIX[task]}{{{{ users[-1]['content'] }}}}\nAnswer: "
    )


def checkpoint_task(tokenizer) -> Task:
    """The task a checkpoint answers through: read back from the chat template it was saved with
    ("answer" for a checkpoint saved before templates were written)."""
    for task in ("predict", "explain", "answer"):
        if getattr(tokenizer, "chat_template", None) == chat_template(task):  # type: ignore[arg-type]
            return task  # type: ignore[return-value]
    return "answer"


@dataclass(frozen=True)
class EncodedRow:
    """One tokenised (prompt, target) pair; `start` is the index of the first target token."""

    input_ids: list[int]
    labels: list[int]
    start: int


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt, add_special_tokens=False).input_ids


def encode_pair(tokenizer, prompt: str, target: str, max_len: int) -> EncodedRow:
    """[bos] prompt target [eos], cut to max_len from the end; labels are -100 on the prompt."""
    head = prompt_ids(tokenizer, prompt)
    body = tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = (head + body)[:max_len]
    labels = ([IGNORE] * len(head) + body)[:max_len]
    return EncodedRow(input_ids=ids, labels=labels, start=min(len(head), len(ids)))


def encode_response_ids(tokenizer, prompt: str, response_ids: Sequence[int], max_len: int) -> EncodedRow:
    """Like encode_pair, with the response given as ids exactly as they should be scored (an eos is
    not added: it is in response_ids only if the response really ended)."""
    head = prompt_ids(tokenizer, prompt)
    ids = (head + list(response_ids))[:max_len]
    labels = ([IGNORE] * len(head) + list(response_ids))[:max_len]
    return EncodedRow(input_ids=ids, labels=labels, start=min(len(head), len(ids)))


def collate(rows: Sequence[EncodedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, all (B, T)."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
        mask[i, : len(r.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_targets(rows: Sequence[EncodedRow], targets: Sequence[SparseTargets | None], width: int) -> dict[str, torch.Tensor]:
    """Place each row's sparse targets at its label positions: ids, probs (B, T, k) and tail (B, T).
    A row without targets (None: NLL only, e.g. outside the KD role) gets zero mass, so no KL term.
    One concatenation and one indexed write per tensor (this runs every step: a per-row loop of small
    copies cost as much as the KD loss itself)."""
    k = max((t.ids.size(-1) for t in targets if t is not None), default=1)
    ids = torch.zeros((len(rows) * width, k), dtype=torch.long)
    probs = torch.zeros((len(rows) * width, k))
    tail = torch.zeros(len(rows) * width)
    flat, id_parts, prob_parts, tail_parts = [], [], [], []
    for i, (row, tgt) in enumerate(zip(rows, targets, strict=True)):
        if tgt is None:
            continue
        n = min(len(row.input_ids) - row.start, tgt.ids.size(0))  # target positions that survived truncation
        pad = k - tgt.ids.size(-1)  # rows may differ in support width: the rest stays zero mass
        flat.append(torch.arange(n) + (i * width + row.start))
        id_parts.append(torch.nn.functional.pad(tgt.ids[:n], (0, pad)) if pad else tgt.ids[:n])
        prob_parts.append(torch.nn.functional.pad(tgt.probs[:n], (0, pad)) if pad else tgt.probs[:n])
        tail_parts.append(tgt.tail[:n])
    if flat:
        at = torch.cat(flat)
        ids[at], probs[at], tail[at] = torch.cat(id_parts).long(), torch.cat(prob_parts), torch.cat(tail_parts)
    return {"target_ids": ids.view(len(rows), width, k), "target_probs": probs.view(len(rows), width, k),
            "target_tail": tail.view(len(rows), width)}


def left_padded(tokenizer, prompts: Sequence[str], max_len: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generate(): input_ids, attention_mask (B, T); long prompts keep their end."""
    encoded = [prompt_ids(tokenizer, p)[-max_len:] for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    return {"input_ids": ids, "attention_mask": mask}
