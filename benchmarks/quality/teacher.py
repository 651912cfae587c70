"""The lab's teacher: a small causal LM trained on the sim's world, whose weights the lab holds.

It learns two tasks in its own prompt format: the worked answer (the sim's varied phrasing, so its
distribution over wordings is genuinely spread) and the explainer's reply ("Label: N\\nReason: ...").
Sampling adds Gumbel noise drawn from a generator seeded by the request, so a reply depends on its
request key, never on the batch it shared; the logprobs it reports are those of the distribution it
sampled from, softmax(logits / temperature), over the student's own tokens (one shared tokenizer).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from agentkd.config import TrainSection
from agentkd.training.students import Student, StudentSpec, build_student
from agentkd.teachers.sim import Generation, roles
from agentkd.teachers.sim.protocol import BadRequest, ModelRequest
from agentkd.teachers.sim.world import Problem, worked_answer
from agentkd.training.train import train
from agentkd.training.train_data import TrainingExample, format_prompt, left_padded

# The teacher's own prompts: an answer task (the student's format) and an explain task.
EXPLAIN_PREFIX = "Label and reason: "


def teacher_prompt(text: str, task: str) -> str:
    return format_prompt(f"{EXPLAIN_PREFIX}{text}" if task == "explain" else text)


def teacher_examples(problems: Sequence[Problem], seed: int) -> list[TrainingExample]:
    """Both tasks for every problem, phrasing drawn per example (worked answers and reasons vary)."""
    rng = random.Random(seed)
    out = []
    for p in problems:
        out.append(TrainingExample(p.text, worked_answer(p, rng)))
        out.append(TrainingExample(f"{EXPLAIN_PREFIX}{p.text}", roles.explanation(p.text, rng, rng)))
    return out


def train_teacher(spec: StudentSpec, tokenizer, problems: Sequence[Problem], cfg: TrainSection, *,
                  out_dir: Path, seed: int) -> Student:
    teacher = build_student(spec, tokenizer=tokenizer, seed=seed)
    train(teacher, teacher_examples(problems, seed), cfg, out_dir=out_dir, seed=seed, progress=False)
    return teacher


def request_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16)


class _Gumbel(LogitsProcessor):
    """scores / T + Gumbel noise, one generator per row: argmax of it is a sample of softmax(logits / T)."""

    def __init__(self, generators: list[torch.Generator], temperature: float) -> None:
        self.generators, self.temperature = generators, temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        noise = torch.stack([torch.rand(scores.size(-1), generator=g) for g in self.generators])  # (B, V)
        gumbel = -torch.log(-torch.log(noise.clamp(1e-10, 1 - 1e-7)))
        return scores / self.temperature + gumbel.to(scores.device)


@dataclass
class Sample:
    ids: list[int]  # response tokens, eos excluded
    logprobs: torch.Tensor  # (len(ids) + ended, V): log p of the distribution sampled from, per step
    ended: bool  # eos was sampled (else the token cap cut it)


@torch.no_grad()
def sample(teacher: Student, prompts: Sequence[str], seeds: Sequence[int], *, temperature: float,
           max_new_tokens: Sequence[int]) -> list[Sample]:
    """One batched decode; row i samples at `temperature` (0: greedy) with its own seed and token cap."""
    model, tok = teacher.model, teacher.tokenizer
    model.eval()
    cap = max(max_new_tokens)
    room = max(1, model.config.max_position_embeddings - cap)
    batch = left_padded(tok, prompts, room)
    processors = LogitsProcessorList()
    if temperature > 0:
        processors.append(_Gumbel([torch.Generator().manual_seed(s) for s in seeds], temperature))
    out = model.generate(
        **batch, max_new_tokens=cap, do_sample=False, logits_processor=processors, output_logits=True,
        return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    new = out.sequences[:, batch["input_ids"].size(1):]  # (B, steps)
    raw = torch.stack(out.logits, dim=1).float()  # (B, steps, V) before the processors
    logprobs = torch.log_softmax(raw / (temperature if temperature > 0 else 1.0), dim=-1)
    samples = []
    for i in range(len(prompts)):
        ids = new[i, : max_new_tokens[i]].tolist()
        ended = tok.eos_token_id in ids
        n = ids.index(tok.eos_token_id) if ended else len(ids)
        samples.append(Sample(ids[:n], logprobs[i, : n + ended].clone(), ended))
    return samples


class LMResponder:
    """The sim server's responder for the lab teacher: requests that arrive within `gather_s` of each
    other are decoded as one batch in a worker thread (the gateway sends many at once)."""

    def __init__(self, teacher: Student, *, seed: int, max_new_tokens: int, batch_size: int = 64,
                 gather_s: float = 0.005) -> None:
        self.teacher, self.seed, self.cap = teacher, seed, max_new_tokens
        self.batch_size, self.gather_s = batch_size, gather_s
        self._queue: list[tuple[ModelRequest, str, str, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self.batches = 0

    async def __call__(self, req: ModelRequest) -> Generation:
        task, text = self._task(req)
        future = asyncio.get_running_loop().create_future()
        self._queue.append((req, task, text, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    @staticmethod
    def _task(req: ModelRequest) -> tuple[str, str]:
        """Which of its two tasks the prompt asks for, from the prompt's data blocks (as roles.reply does)."""
        if req.json_mode:
            raise BadRequest("response_format: the lab teacher replies in plain text only.")
        blocks, _ = roles.data_blocks(req.user)
        if "input" in blocks and "labels" in blocks and "label" not in blocks:
            return "explain", blocks["input"].strip()
        if set(blocks) <= {"instruction"}:
            return "answer", blocks.get("instruction", req.user).strip()
        raise BadRequest("The lab teacher answers the answerer and explainer prompts only.")

    async def _drain(self) -> None:
        while self._queue:
            await asyncio.sleep(self.gather_s)
            batch, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size :]
            try:
                replies = await asyncio.to_thread(self._decode, batch)
            except Exception as err:  # noqa: BLE001 - every waiting request gets the failure
                for *_, future in batch:
                    future.set_exception(err)
                continue
            self.batches += 1
            for (*_, future), reply in zip(batch, replies, strict=True):
                future.set_result(reply)

    def _decode(self, batch: list[tuple[ModelRequest, str, str, asyncio.Future]]) -> list[Generation]:
        tok = self.teacher.tokenizer
        # One temperature per batch: the lab's roles each send one; mixed batches are split by it.
        out: list[Generation | None] = [None] * len(batch)
        for temperature in sorted({req.temperature for req, *_ in batch}):
            rows = [i for i, (req, *_) in enumerate(batch) if req.temperature == temperature]
            samples = sample(
                self.teacher, [teacher_prompt(batch[i][2], batch[i][1]) for i in rows],
                [request_seed(self.seed, batch[i][0].key) for i in rows], temperature=temperature,
                max_new_tokens=[min(batch[i][0].max_tokens, self.cap) for i in rows],
            )
            for i, s in zip(rows, samples, strict=True):
                req, task, _, _ = batch[i]
                out[i] = _generation(tok, s, req, label_only=task == "explain" and not _REASON.search(
                    roles.data_blocks(req.user)[1]))
        return out  # type: ignore[return-value]


_REASON = re.compile(r"\breason\b", re.IGNORECASE)


def _generation(tok, s: Sample, req: ModelRequest, *, label_only: bool) -> Generation:
    """The reply with one OpenAI logprobs content item per token: the token, its logprob, the top-k."""
    k = min(20, req.top_logprobs or 0)
    top_lp, top_ids = s.logprobs.topk(k, dim=-1) if k else (None, None)
    items = []
    for t, token_id in enumerate(s.ids):
        piece = tok.decode([token_id])
        if label_only and "\n" in piece:  # the label-only prompt gets the label line, as a model would
            break
        alternatives = [
            {"token": tok.decode([j]), "logprob": float(lp), "bytes": list(tok.decode([j]).encode())}
            for j, lp in zip(top_ids[t].tolist(), top_lp[t].tolist(), strict=True)
        ] if k else []
        items.append({"token": piece, "logprob": float(s.logprobs[t, token_id]), "bytes": list(piece.encode()),
                      "top_logprobs": alternatives})
    stopped = s.ended or len(items) < len(s.ids)
    messages = 2 if req.system else 1
    prompt_tokens = len(tok(req.system).input_ids) + len(tok(req.user).input_ids) + 3 * messages + 3
    return Generation("".join(i["token"] for i in items), not stopped, items, prompt_tokens)
