"""The training loop: examples -> objective -> AdamW -> checkpoint. Read it top to bottom.

`train` prepares rows and a per-step loss for the configured objective, then runs `_optimise`, the one
optimisation loop (also used for the proxy's stages in proxy_kd). Device: CUDA with bf16 autocast
when present, else CPU fp32 — both through accelerate.Accelerator.

Several GPUs: the same code runs unchanged under `accelerate launch -m agentkd.cli train ...` (or
torchrun). Each process takes every num_processes-th batch; accelerate wraps the model in DDP and
averages gradients; only the main process writes the checkpoint and shows progress. Targets for
posterior/proxy KD are computed by every process (cheap next to training).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from agentkd import objectives as obj
from agentkd.config import ConfigError, TrainSection
from agentkd.students import Student, save_checkpoint
from agentkd.train_data import (
    EncodedRow,
    TrainingExample,
    collate,
    collate_targets,
    encode_pair,
    format_prompt,
    left_padded,
)

LogMetric = Callable[[str, float, int], None]
StepLoss = Callable[[Any, list[Any]], tuple[torch.Tensor, int]]  # (model, rows) -> (loss, tokens)


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    examples: int
    final_loss: float  # mean loss of the last (up to) 10 steps
    tokens_per_s: float  # input tokens (padding excluded) per second of optimisation
    seconds: float


def train(
    student: Student,
    examples: Sequence[TrainingExample],
    cfg: TrainSection,
    *,
    out_dir: Path,
    seed: int = 0,
    proxy: Student | None = None,
    teacher_corpus: Sequence[str] | None = None,
    log_metric: LogMetric | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `student` in place (continuing from its current weights) and save it to out_dir."""
    started = time.perf_counter()
    if not examples:
        raise ConfigError("train: no training examples")
    torch.manual_seed(seed)
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    tok, L = student.tokenizer, cfg.max_len

    if cfg.objective == "sft":
        rows = [encode_pair(tok, format_prompt(e.instruction), e.response, L) for e in examples]
        step_loss = _sft_step

    elif cfg.objective == "rationale":
        # label target: the example's label, else the teacher's whole answer (agentkd choice)
        rows = [
            (
                encode_pair(tok, format_prompt(e.instruction, "predict"), e.label or e.response, L),
                encode_pair(tok, format_prompt(e.instruction, "explain"), e.rationale, L) if e.rationale else None,
            )
            for e in examples
        ]
        step_loss = _rationale_step(cfg.rationale_alpha)

    elif cfg.objective == "posterior_kd":
        encoded = [encode_pair(tok, format_prompt(e.instruction), e.response, L) for e in examples]
        # q comes from the proxy; without one, from the student frozen as it is now (agentkd choice:
        # a trained student from an earlier iteration is then its own evidence; an untrained one adds
        # a near-uniform q, i.e. label smoothing).
        q_model = proxy.model if proxy is not None else copy.deepcopy(student.model)
        _check_same_vocab(student, q_model)
        corpus = list(teacher_corpus) if teacher_corpus is not None else [e.response for e in examples]
        targets = posterior_targets(q_model, tok, examples, encoded, corpus, cfg, accelerator.device)
        rows = list(zip(encoded, targets, strict=True))
        step_loss = _posterior_step(cfg.kd_lambda)

    elif cfg.objective == "proxy_kd":
        if proxy is None:
            raise ConfigError("train.objective: proxy_kd needs a proxy model (set train.proxy_spec)")
        _check_same_vocab(student, proxy.model)
        kd_examples = align_proxy(proxy, examples, cfg, seed=seed, accelerator=accelerator, log_metric=log_metric, progress=progress)
        encoded = [encode_pair(tok, format_prompt(e.instruction), e.response, L) for e in kd_examples]
        targets, weights = proxy_targets(proxy.model, encoded, cfg, accelerator.device, pad_id=tok.pad_token_id)
        rows = list(zip(encoded, targets, weights.tolist(), strict=True))
        step_loss = _proxy_kd_step(cfg.kd_lambda)

    else:  # pragma: no cover - the config's Literal rules this out
        raise ConfigError(f"train.objective: unknown objective {cfg.objective!r}")

    stats = _optimise(
        student.model, rows, step_loss, cfg, accelerator,
        pad_id=tok.pad_token_id, epochs=cfg.epochs, max_seconds=cfg.max_seconds, max_steps=cfg.max_steps,
        seed=seed, name="train", log_metric=log_metric, progress=progress,
    )
    out_dir = Path(out_dir)
    if accelerator.is_main_process:
        save_checkpoint(student, out_dir)
    accelerator.wait_for_everyone()
    return TrainResult(
        checkpoint=out_dir, steps=stats["steps"], examples=len(rows), final_loss=stats["final_loss"],
        tokens_per_s=stats["tokens_per_s"], seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------- the one optimisation loop


def _optimise(
    model: Any,
    rows: list[Any],
    step_loss: StepLoss,
    cfg: TrainSection,
    accelerator: Accelerator,
    *,
    pad_id: int,
    epochs: float,
    max_seconds: float | None,
    seed: int,
    name: str,
    max_steps: int | None = None,
    log_metric: LogMetric | None,
    progress: bool,
) -> dict[str, Any]:
    """Shuffled batches for `epochs` (a fraction allowed), at most max_steps optimiser steps, or until
    max_seconds of wall clock, whichever comes first. AdamW, linear warm-up then constant LR, grad clipping. Trains `model` in place."""
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapter only
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    wrapped.train()

    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = max(1, math.ceil(len(rows) / (cfg.batch_size * world)))  # last batch may be short
    total_steps = max(1, math.ceil(epochs * per_epoch))
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    rng = random.Random(seed)
    losses: list[float] = []
    tokens, step, begun = 0, 0, time.perf_counter()
    with _progress_bar(progress and accelerator.is_main_process, name, total_steps) as bar:
        while step < total_steps:
            order = list(range(len(rows)))
            rng.shuffle(order)  # same permutation on every process (same seed)
            for b in range(per_epoch):
                if step >= total_steps or _out_of_time(begun, max_seconds, accelerator):
                    total_steps = step
                    break
                batch_idx = order[(b * world + rank) * cfg.batch_size :][: cfg.batch_size]
                batch = [rows[i] for i in batch_idx]
                with accelerator.autocast():
                    loss, n_tokens = step_loss(wrapped, batch)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += n_tokens * world
                losses.append(loss.item())
                rate = tokens / max(time.perf_counter() - begun, 1e-9)
                if bar is not None:
                    bar.update(step, total=total_steps, loss=losses[-1], rate=rate)
                if log_metric is not None and (step % cfg.log_every == 0 or step == total_steps):
                    log_metric(f"{name}/loss", losses[-1], step)
                    log_metric(f"{name}/tokens_per_s", rate, step)
    elapsed = time.perf_counter() - begun
    accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False).eval()
    accelerator.free_memory()
    tail = losses[-10:]
    return {
        "steps": step,
        "final_loss": sum(tail) / len(tail) if tail else float("nan"),
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
    }


def _out_of_time(begun: float, max_seconds: float | None, accelerator: Accelerator) -> bool:
    if max_seconds is None:
        return False
    late = torch.tensor(float(time.perf_counter() - begun >= max_seconds), device=accelerator.device)
    if accelerator.num_processes > 1:  # every process must stop at the same step
        late = accelerator.reduce(late, reduction="sum")
    return bool(late.item() > 0)


class _progress_bar:
    """A rich progress bar with loss and tokens/s, or nothing when disabled."""

    def __init__(self, enabled: bool, name: str, total: int) -> None:
        self.enabled, self.name, self.total = enabled, name, total

    def __enter__(self) -> _progress_bar | None:
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:,.0f} tok/s"),
            TimeElapsedColumn(), transient=False,
        )
        self.progress.__enter__()
        self.task = self.progress.add_task(self.name, total=self.total, loss=float("nan"), rate=0.0)
        return self

    def update(self, step: int, *, total: int, loss: float, rate: float) -> None:
        self.progress.update(self.task, completed=step, total=total, loss=loss, rate=rate)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)


# ---------------------------------------------------------------- per-objective steps


def _forward(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits


def _pad_id(model: Any) -> int:
    pad = model.config.pad_token_id
    return 0 if pad is None else pad


def _sft_step(model: Any, rows: list[EncodedRow]) -> tuple[torch.Tensor, int]:
    batch = collate(rows, _pad_id(model))
    logits = _forward(model, batch)  # (B, T, V)
    return obj.sft_loss(logits, batch["labels"].to(logits.device)), int(batch["attention_mask"].sum())


def _rationale_step(alpha: float) -> StepLoss:
    def step(model: Any, rows: list[tuple[EncodedRow, EncodedRow | None]]) -> tuple[torch.Tensor, int]:
        label_batch = collate([r[0] for r in rows], _pad_id(model))
        label_logits = _forward(model, label_batch)  # (B, T, V)
        explained = [r[1] for r in rows if r[1] is not None]  # rows without a rationale: label term only
        if explained:
            why_batch = collate(explained, _pad_id(model))
            why_logits, why_labels = _forward(model, why_batch), why_batch["labels"]
            n_why = int(why_batch["attention_mask"].sum())
        else:
            why_logits, why_labels, n_why = label_logits[:0], label_batch["labels"][:0], 0
        device = label_logits.device
        loss = obj.rationale_loss(
            label_logits, label_batch["labels"].to(device), why_logits, why_labels.to(device), alpha
        )
        return loss, int(label_batch["attention_mask"].sum()) + n_why

    return step


def _kd_batch(model: Any, rows: list[tuple]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    encoded = [r[0] for r in rows]
    batch = collate(encoded, _pad_id(model))
    batch |= collate_targets(encoded, [r[1] for r in rows], batch["input_ids"].size(1))
    logits = _forward(model, batch)  # (B, T, V)
    return {k: v.to(logits.device) for k, v in batch.items()}, logits


def _posterior_step(kd_lambda: float) -> StepLoss:
    def step(model: Any, rows: list[tuple[EncodedRow, obj.SparseTargets]]) -> tuple[torch.Tensor, int]:
        batch, logits = _kd_batch(model, rows)
        loss = obj.posterior_kd_loss(
            logits, batch["labels"], batch["target_ids"], batch["target_probs"], batch["target_tail"], kd_lambda
        )
        return loss, int(batch["attention_mask"].sum())

    return step


def _proxy_kd_step(kd_lambda: float) -> StepLoss:
    def step(model: Any, rows: list[tuple[EncodedRow, obj.SparseTargets, float]]) -> tuple[torch.Tensor, int]:
        batch, logits = _kd_batch(model, rows)
        weights = torch.tensor([r[2] for r in rows], device=logits.device)  # (B,) constants
        loss = obj.proxy_kd_loss(
            logits, batch["labels"], batch["target_ids"], batch["target_probs"], batch["target_tail"],
            weights, kd_lambda,
        )
        return loss, int(batch["attention_mask"].sum())

    return step


def _check_same_vocab(student: Student, q_model: Any) -> None:
    v_student, v_proxy = student.model.config.vocab_size, q_model.config.vocab_size
    if v_student != v_proxy:
        raise ConfigError(
            f"train.proxy_spec: the proxy's vocabulary ({v_proxy}) differs from the student's ({v_student}); "
            "build the proxy with the student's tokenizer (tokenizer = \"shared\")"
        )


# ---------------------------------------------------------------- posterior KD targets (v1)


@torch.no_grad()
def posterior_targets(
    q_model: Any,
    tokenizer: Any,
    examples: Sequence[TrainingExample],
    encoded: Sequence[EncodedRow],
    corpus: Sequence[str],
    cfg: TrainSection,
    device: torch.device,
    *,
    batch_size: int = 32,
) -> list[obj.SparseTargets]:
    """Per example and response position: p_post from the n-gram prior, the proxy q and (where the
    tokenizers match) the teacher's top-k logprobs; kept sparse (cfg.top_k ids + tail). Computed once."""
    vocab = q_model.config.vocab_size
    eos = [tokenizer.eos_token_id]
    ngram = obj.NGramModel.fit(
        (tokenizer(t, add_special_tokens=False).input_ids + eos for t in corpus),
        n=cfg.ngram_n, vocab_size=vocab, add_k=cfg.ngram_add_k,
    )
    q_model.to(device).eval()
    out: list[obj.SparseTargets] = []
    for lo in range(0, len(encoded), batch_size):
        chunk = list(encoded[lo : lo + batch_size])
        batch = collate(chunk, _pad_id(q_model))
        q_all = torch.softmax(_forward(q_model, batch).float(), dim=-1).cpu()  # (B, T, V)
        for i, row in enumerate(chunk):
            ys = row.labels[row.start :]  # response tokens + eos (as truncated)
            q = q_all[i, row.start - 1 : row.start - 1 + len(ys)]  # (T_r, V): logits at t-1 predict t
            p0 = obj.prior(ngram, ys, cfg.prior_eps)  # (T_r, V)
            post = obj.posterior(p0, q, alpha=cfg.dirichlet_alpha, beta=cfg.dirichlet_beta)
            evidence = teacher_evidence(tokenizer, examples[lo + i], ys)
            if evidence is not None and cfg.logprob_gamma > 0:
                ids, logprobs = evidence
                n = ids.size(0)  # the eos position has no provider evidence
                p_e = obj.evidence_from_top_logprobs(ids, logprobs, q[:n])
                post[:n] = obj.posterior(
                    p0[:n], q[:n], alpha=cfg.dirichlet_alpha, beta=cfg.dirichlet_beta,
                    evidence=p_e, gamma=cfg.logprob_gamma,
                )
            out.append(obj.sparsify(post, cfg.top_k))
    return out


def teacher_evidence(tokenizer: Any, example: TrainingExample, ys: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The provider's top-k logprobs as (ids (T, k), logprobs (T, k)) in the student's ids, or None when
    the tokenizers do not match: agentkd's test is one provider position per student response token and
    every listed token string one student token (distinct within a position)."""
    top = example.teacher_top_logprobs
    if not top or len(top) != len(ys) - 1:  # ys ends with eos
        return None
    k = min(len(position) for position in top)
    if k == 0:
        return None
    ids, logprobs = [], []
    for position in top:
        row = []
        for token, _ in position[:k]:
            enc = tokenizer(token, add_special_tokens=False).input_ids
            if len(enc) != 1:
                return None
            row.append(enc[0])
        if len(set(row)) != k:
            return None
        ids.append(row)
        logprobs.append([lp for _, lp in position[:k]])
    return torch.tensor(ids), torch.tensor(logprobs, dtype=torch.float32)


# ---------------------------------------------------------------- proxy KD (v2)


def split_examples(examples: Sequence[TrainingExample], fractions: Sequence[float], seed: int) -> list[list[TrainingExample]]:
    """Seeded split into len(fractions) parts (warm-up / alignment / KD)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    total, parts, lo = sum(fractions), [], 0
    for j, f in enumerate(fractions):
        hi = len(order) if j == len(fractions) - 1 else lo + round(len(order) * f / total)
        parts.append([examples[i] for i in order[lo:hi]])
        lo = hi
    return parts


def align_proxy(
    proxy: Student,
    examples: Sequence[TrainingExample],
    cfg: TrainSection,
    *,
    seed: int,
    accelerator: Accelerator,
    log_metric: LogMetric | None = None,
    progress: bool = True,
) -> list[TrainingExample]:
    """Proxy-KD steps a-b (arXiv 2401.07013 v2): warm-up SFT of the proxy, then cfg.align_rounds rounds of
    NLL(y) + DPO(teacher y preferred over the proxy's own sample), the previous round's proxy the frozen
    reference. Trains `proxy` in place; returns the KD split."""
    if len(cfg.proxy_split) != 3:
        raise ConfigError("train.proxy_split: expected three fractions (warm-up, alignment, KD)")
    warm, align, kd = split_examples(examples, cfg.proxy_split, seed)
    tok, L = proxy.tokenizer, cfg.max_len
    common = dict(pad_id=tok.pad_token_id, epochs=cfg.proxy_epochs, max_seconds=cfg.proxy_max_seconds,
                  seed=seed, log_metric=log_metric, progress=progress)
    if warm:
        rows = [encode_pair(tok, format_prompt(e.instruction), e.response, L) for e in warm]
        _optimise(proxy.model, rows, _sft_step, cfg, accelerator, name="proxy_warmup", **common)
    for k in range(cfg.align_rounds if align else 0):
        samples = generate_answers(
            proxy, [e.instruction for e in align], max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.proxy_temperature, seed=seed + k,
        )
        pairs = [
            (encode_pair(tok, format_prompt(e.instruction), e.response, L),
             encode_pair(tok, format_prompt(e.instruction), y_proxy, L))
            for e, y_proxy in zip(align, samples, strict=True)
        ]
        ref = _reference_logps(proxy.model, pairs, accelerator.device, tok.pad_token_id)  # frozen: this round's start
        rows = list(zip(pairs, ref, strict=True))
        _optimise(proxy.model, rows, _dpo_step(cfg.dpo_beta), cfg, accelerator, name=f"proxy_align{k + 1}", **common)
    return kd


@torch.no_grad()
def _reference_logps(model: Any, pairs: list[tuple[EncodedRow, EncodedRow]], device: torch.device, pad_id: int) -> list[tuple[float, float]]:
    model.to(device).eval()
    out = []
    for lo in range(0, len(pairs), 32):
        chunk = pairs[lo : lo + 32]
        batch = collate([p[0] for p in chunk] + [p[1] for p in chunk], pad_id)
        logits = _forward(model, batch)
        logp = obj.sequence_logprob(logits, batch["labels"].to(logits.device)).cpu()  # (2B,)
        out += list(zip(logp[: len(chunk)].tolist(), logp[len(chunk) :].tolist(), strict=True))
    return out


def _dpo_step(beta: float) -> StepLoss:
    def step(model: Any, rows: list[tuple[tuple[EncodedRow, EncodedRow], tuple[float, float]]]) -> tuple[torch.Tensor, int]:
        n = len(rows)
        batch = collate([r[0][0] for r in rows] + [r[0][1] for r in rows], _pad_id(model))
        logits = _forward(model, batch)  # (2B, T, V): chosen rows, then rejected rows
        labels = batch["labels"].to(logits.device)
        logp = obj.sequence_logprob(logits, labels)  # (2B,)
        ref = torch.tensor([r[1] for r in rows], device=logits.device)  # (B, 2)
        loss = obj.sft_loss(logits[:n], labels[:n]) + obj.dpo_loss(logp[:n], logp[n:], ref[:, 0], ref[:, 1], beta)
        return loss, int(batch["attention_mask"].sum())

    return step


@torch.no_grad()
def proxy_targets(
    model: Any, encoded: Sequence[EncodedRow], cfg: TrainSection, device: torch.device, *, pad_id: int, batch_size: int = 32
) -> tuple[list[obj.SparseTargets], torch.Tensor]:
    """Proxy-KD steps c-d: the aligned proxy teacher-forced on (x, y): top-k (cfg.proxy_top_k) probs + tail
    per response position, and w = sigmoid(z-score of mean per-token log p_proxy(y|x)), constants."""
    model.to(device).eval()
    targets, mean_logp = [], []
    for lo in range(0, len(encoded), batch_size):
        chunk = list(encoded[lo : lo + batch_size])
        batch = collate(chunk, pad_id)
        logits = _forward(model, batch).float()  # (B, T, V)
        mean_logp += obj.sequence_logprob(logits, batch["labels"].to(logits.device), mean=True).tolist()
        probs = torch.softmax(logits, dim=-1).cpu()
        for i, row in enumerate(chunk):
            n = len(row.input_ids) - row.start
            targets.append(obj.sparsify(probs[i, row.start - 1 : row.start - 1 + n], cfg.proxy_top_k))
    return targets, obj.proxy_sample_weights(torch.tensor(mean_logp))


# ---------------------------------------------------------------- decoding


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
