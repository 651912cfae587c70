"""The student's training: examples -> objective -> the one optimisation loop -> checkpoint. Read it
top to bottom.

`train` prepares rows and a per-step loss for the configured objective, then runs `optimise`
(optimise.py, also used for the proxy's stages). Device: CUDA with bf16 autocast when present, else
CPU fp32 — both through accelerate.Accelerator.

posterior_kd and proxy_kd take a TRAINED proxy (proxy.py: built once per run, trained on teacher
answers, kept across iterations). Every example gives the student its NLL term; the KD term is taken
only on examples of the proxy's "kd" role, the answers the proxy never trained on (see proxy.py).

Several GPUs: the same code runs unchanged under `accelerate launch -m agentkd.cli train ...` (or
torchrun). Each process takes every num_processes-th batch; accelerate wraps the model in DDP and
averages gradients; only the main process writes the checkpoint and shows progress. Targets for
posterior/proxy KD are computed by every process (cheap next to training).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from agentkd import objectives as obj
from agentkd.config import ConfigError, TrainSection
from agentkd.decode import generate_answers  # noqa: F401  (re-exported: the loop and tests decode from here)
from agentkd.optimise import LogMetric, StepLoss, forward, optimise, pad_id_of
from agentkd.optimise import sft_step as _sft_step
from agentkd.posterior import fit_prior, posterior_targets
from agentkd.proxy import check_same_tokenizer, example_role, frozen_copy, proxy_targets
from agentkd.students import Student, save_checkpoint
from agentkd.train_data import EncodedRow, TrainingExample, collate, collate_targets, encode_pair, format_prompt


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    examples: int
    final_loss: float  # mean loss of the last (up to) 10 steps
    tokens_per_s: float  # input tokens (padding excluded) per second of optimisation
    seconds: float
    kd_examples: int = 0  # examples that carried a KD term (the proxy's kd role)
    evidence_used: int = 0  # response positions where the teacher's top-k logprobs entered the posterior
    evidence_unused: int = 0  # positions with provider logprobs whose token did not match the student's


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
    extra: dict[str, int] = {}

    if cfg.objective == "sft":
        rows = [encode_pair(tok, format_prompt(e.instruction), e.response, L) for e in examples]
        step_loss = _sft_step

    elif cfg.objective == "rationale":
        rows = rationale_rows(tok, examples, L)
        step_loss = _rationale_step(cfg.rationale_alpha)

    elif cfg.objective == "posterior_kd":
        # q: the run's trained proxy (the method), or the student frozen as it is now (posterior_q = "self")
        q = frozen_copy(student) if cfg.posterior_q == "self" else _trained_proxy(proxy, student, cfg.objective)
        encoded = [encode_pair(tok, format_prompt(e.instruction), e.response, L) for e in examples]
        # self-distillation has no proxy roles: every row gets a KD term
        picked = list(range(len(examples))) if cfg.posterior_q == "self" else _kd_rows(examples, cfg)
        corpus = list(teacher_corpus) if teacher_corpus is not None else [e.response for e in examples]
        prior = fit_prior(tok, corpus, cfg, q.model.config.vocab_size)
        computed, counts = posterior_targets(q.model, tok, [examples[i] for i in picked], [encoded[i] for i in picked],
                                             prior, cfg, accelerator.device)
        rows = list(zip(encoded, _placed(picked, computed, len(examples), None), strict=True))
        step_loss = _posterior_step(cfg.kd_lambda)
        extra |= {"kd_examples": len(picked), "evidence_used": counts.used, "evidence_unused": counts.unused}

    elif cfg.objective == "proxy_kd":
        q = _trained_proxy(proxy, student, cfg.objective)
        encoded = [encode_pair(tok, format_prompt(e.instruction), e.response, L) for e in examples]
        picked = _kd_rows(examples, cfg)
        computed, w = proxy_targets(q.model, [encoded[i] for i in picked], cfg, accelerator.device,
                                    pad_id=tok.pad_token_id) if picked else ([], torch.zeros(0))
        # outside the kd role: no targets and weight 0, i.e. NLL only
        rows = list(zip(encoded, _placed(picked, computed, len(examples), None),
                        _placed(picked, w.tolist(), len(examples), 0.0), strict=True))
        step_loss = _proxy_kd_step(cfg.kd_lambda)
        extra["kd_examples"] = len(picked)

    else:  # pragma: no cover - the config's Literal rules this out
        raise ConfigError(f"train.objective: unknown objective {cfg.objective!r}")

    stats = optimise(
        student.model, rows, step_loss, cfg, accelerator,
        pad_id=tok.pad_token_id, epochs=cfg.epochs, max_seconds=cfg.max_seconds, max_steps=cfg.max_steps,
        seed=seed, name="train", log_metric=log_metric, progress=progress,
    )
    out_dir = Path(out_dir)
    if accelerator.is_main_process:
        # a rationale-trained student answers through its label task ("predict: "), as the loop decodes it
        save_checkpoint(student, out_dir, task="predict" if cfg.objective == "rationale" else "answer")
    accelerator.wait_for_everyone()
    return TrainResult(
        checkpoint=out_dir, steps=stats["steps"], examples=len(rows), final_loss=stats["final_loss"],
        tokens_per_s=stats["tokens_per_s"], seconds=time.perf_counter() - started, **extra,
    )


def _trained_proxy(proxy: Student | None, student: Student, objective: str) -> Student:
    """The proxy posterior/proxy KD need: present, on the student's tokenizer, trained on teacher data."""
    if proxy is None:
        raise ConfigError(f"train.proxy_spec: {objective} needs the run's trained proxy (set train.proxy_spec"
                          + (', or train.posterior_q = "self" for self-distillation)' if objective == "posterior_kd" else ")"))
    check_same_tokenizer(student, proxy)
    if proxy.trained_examples <= 0:
        raise ConfigError(f"train.proxy_spec: the proxy has not been trained on teacher answers; {objective} with "
                          "an untrained proxy is label smoothing toward noise (train it first: the loop's proxy stage "
                          "or agentkd.proxy.train_proxy)")
    return proxy


def _kd_rows(examples: Sequence[TrainingExample], cfg: TrainSection) -> list[int]:
    """Indices of the examples in the proxy's kd role: the ones that get a KD term."""
    return [i for i, e in enumerate(examples) if example_role(e.instruction, cfg.proxy_split) == "kd"]


def _placed(picked: list[int], values: Sequence[Any], n: int, fill: Any) -> list[Any]:
    """values[j] at position picked[j] of a list of n, `fill` elsewhere."""
    out = [fill] * n
    for i, v in zip(picked, values, strict=True):
        out[i] = v
    return out


def rationale_rows(tok: Any, examples: Sequence[TrainingExample], max_len: int) -> list[tuple[EncodedRow, EncodedRow | None]]:
    """Per example: the label task row and the rationale task row, None for an example without a
    rationale (RELIABILITY 23: kept for the label task only). The label target is the example's
    label, else the teacher's whole answer (agentkd choice)."""
    return [
        (
            encode_pair(tok, format_prompt(e.instruction, "predict"), e.label or e.response, max_len),
            encode_pair(tok, format_prompt(e.instruction, "explain"), e.rationale, max_len) if e.rationale else None,
        )
        for e in examples
    ]


# ---------------------------------------------------------------- per-objective steps


def _rationale_step(alpha: float) -> StepLoss:
    def step(model: Any, rows: list[tuple[EncodedRow, EncodedRow | None]]) -> tuple[torch.Tensor, int]:
        label_batch = collate([r[0] for r in rows], pad_id_of(model))
        label_logits = forward(model, label_batch)  # (B, T, V)
        explained = [r[1] for r in rows if r[1] is not None]  # rows without a rationale: label term only
        if explained:
            why_batch = collate(explained, pad_id_of(model))
            why_logits, why_labels = forward(model, why_batch), why_batch["labels"]
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
    batch = collate(encoded, pad_id_of(model))
    batch |= collate_targets(encoded, [r[1] for r in rows], batch["input_ids"].size(1))
    logits = forward(model, batch)  # (B, T, V)
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
