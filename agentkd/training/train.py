"""The student's training: examples -> objective -> the one optimisation loop -> checkpoint. Read it
top to bottom.

`train` prepares rows and a per-step loss for the configured objective, then runs `optimise`
(optimise.py, also used for the proxy's stages). Device: CUDA with bf16 autocast when present, else
CPU fp32 (train.precision) — both through accelerate.Accelerator (optimise.make_accelerator).

posterior_kd and proxy_kd take a TRAINED proxy (proxy.py: built once per run, trained on teacher
answers, kept across iterations). Every example gives the student its NLL term; the KD term is taken
only on examples of the proxy's "kd" role, the answers the proxy never trained on (see proxy.py).

Several processes: the same code runs under `accelerate launch -m agentkd.cli train ...` or torchrun
(optimise.py shards the batches; accelerate wraps the model in DDP and averages gradients, or with
train.fsdp the student is sharded with torch FSDP2 and gathered whole for the checkpoint). KD targets
given a `targets_dir` are built in shards split across the processes and streamed from disk by all of
them (kd_targets.py); only the main process writes the checkpoint and shows progress.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from agentkd.training import objectives as obj
from agentkd.config import ConfigError, TrainSection
from agentkd.training.decode import generate_answers  # noqa: F401  (re-exported: the loop and tests decode from here)
from agentkd.training.kd_targets import KDRows, ShardPart, build_target_shards, fingerprint
from agentkd.training.optimise import LogMetric, StepLoss, forward, make_accelerator, optimise, pad_id_of
from agentkd.training.optimise import sft_step as _sft_step
from agentkd.training.posterior import fit_prior, posterior_targets
from agentkd.training.proxy import check_same_tokenizer, example_role, frozen_copy, proxy_target_logps, vocab_hash
from agentkd.training.students import Student, save_checkpoint
from agentkd.training.train_data import EncodedRow, TrainingExample, collate, collate_targets, encode_pair, format_prompt


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
    targets_dir: Path | None = None,
) -> TrainResult:
    """Train `student` in place (continuing from its current weights) and save it to out_dir. KD targets
    are kept in memory, or with `targets_dir` written there in shards and streamed (reused when current)."""
    started = time.perf_counter()
    if not examples:
        raise ConfigError("train: no training examples")
    torch.manual_seed(seed)
    accelerator = make_accelerator(cfg)
    tok, L = student.tokenizer, cfg.max_len
    extra: dict[str, int] = {}

    if cfg.objective == "sft":
        rows = [encode_pair(tok, format_prompt(e.instruction), e.response, L) for e in examples]
        step_loss = _sft_step

    elif cfg.objective == "rationale":
        rows = rationale_rows(tok, examples, L)
        step_loss = _rationale_step(cfg.rationale_alpha)

    elif cfg.objective in ("posterior_kd", "proxy_kd"):
        # q: the run's trained proxy (the method), or for posterior_kd the student frozen as it is now
        self_q = cfg.objective == "posterior_kd" and cfg.posterior_q == "self"
        q = frozen_copy(student) if self_q else _trained_proxy(proxy, student, cfg.objective)
        encoded = [encode_pair(tok, format_prompt(e.instruction), e.response, L) for e in examples]
        # the KD term only on the proxy's kd role (self-distillation has no roles: every row)
        picked = list(range(len(examples))) if self_q else _kd_rows(examples, cfg)
        if cfg.objective == "posterior_kd":
            corpus = list(teacher_corpus) if teacher_corpus is not None else [e.response for e in examples]
            prior = fit_prior(tok, corpus, cfg, q.model.config.vocab_size)
            build = _posterior_builder(q, tok, examples, encoded, prior, cfg, accelerator)
            inputs: list = [[examples[i].teacher_top_logprobs for i in picked], corpus]
        else:
            build, inputs = _proxy_builder(q, encoded, cfg, accelerator, tok.pad_token_id), []
        if targets_dir is None:  # in memory: every process builds all of them
            part = build(picked)
            get, values, counts = dict(zip(picked, part.targets, strict=True)).get, part.row_values, part.counts
        else:  # on disk, in shards built across the processes (or reused: same inputs)
            key = fingerprint([cfg.objective, _target_settings(cfg), vocab_hash(tok),
                               [encoded[i].input_ids for i in picked], inputs], models=[q.model])
            shards, _ = build_target_shards(targets_dir, key, picked, build, accelerator,
                                            shard_rows=cfg.target_shard_rows)
            get, values, counts = shards.get, shards.row_values, shards.counts
        extra["kd_examples"] = len(picked)
        if cfg.objective == "posterior_kd":
            rows = KDRows(encoded, get)
            step_loss = _posterior_step(cfg.kd_lambda)
            extra |= {"evidence_used": counts.get("evidence_used", 0), "evidence_unused": counts.get("evidence_unused", 0)}
        else:  # outside the kd role: no targets and weight 0, i.e. NLL only
            w = obj.proxy_sample_weights(torch.tensor(values)) if picked else torch.zeros(0)
            rows = KDRows(encoded, get, _placed(picked, w.tolist(), len(examples), 0.0))
            step_loss = _proxy_kd_step(cfg.kd_lambda)

    else:  # pragma: no cover - the config's Literal rules this out
        raise ConfigError(f"train.objective: unknown objective {cfg.objective!r}")

    stats = optimise(
        student.model, rows, step_loss, cfg, accelerator,
        pad_id=tok.pad_token_id, epochs=cfg.epochs, max_seconds=cfg.max_seconds, max_steps=cfg.max_steps,
        seed=seed, name="train", log_metric=log_metric, progress=progress, fsdp=cfg.fsdp,
    )
    out_dir = Path(out_dir)
    if accelerator.is_main_process:
        # a rationale-trained student answers through its label task ("predict: "), as the loop decodes it;
        # sharded (train.fsdp): the weights optimise gathered
        save_checkpoint(student, out_dir, task="predict" if cfg.objective == "rationale" else "answer",
                        state_dict=stats.get("state_dict"))
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
                          "or agentkd.training.proxy.train_proxy)")
    return proxy


def _kd_rows(examples: Sequence[TrainingExample], cfg: TrainSection) -> list[int]:
    """Indices of the examples in the proxy's kd role: the ones that get a KD term."""
    return [i for i, e in enumerate(examples) if example_role(e.instruction, cfg.proxy_split) == "kd"]


# Settings that change nothing in the targets (how long and how the student trains): a resumed run that
# only changes these reuses the targets on disk.
_TRAINING_ONLY = {"lr", "weight_decay", "warmup_steps", "epochs", "max_seconds", "max_steps", "batch_size",
                  "grad_clip", "log_every", "cpu_threads", "student_temperature", "max_new_tokens", "lora",
                  "gradient_checkpointing", "effective_batch", "num_processes", "launcher", "launcher_args", "fsdp",
                  "target_shard_rows", "target_chunk_logits"}


def _target_settings(cfg: TrainSection) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude=_TRAINING_ONLY)


def _posterior_builder(q: Student, tok: Any, examples: Sequence[TrainingExample], encoded: list[EncodedRow],
                       prior: Any, cfg: TrainSection, accelerator: Any):
    def build(indices: list[int]) -> ShardPart:
        with accelerator.autocast():  # q in the precision the student trains in
            targets, counts = posterior_targets(q.model, tok, [examples[i] for i in indices],
                                                [encoded[i] for i in indices], prior, cfg, accelerator.device)
        return ShardPart(targets, counts={"evidence_used": counts.used, "evidence_unused": counts.unused})

    return build


def _proxy_builder(q: Student, encoded: list[EncodedRow], cfg: TrainSection, accelerator: Any, pad_id: int):
    def build(indices: list[int]) -> ShardPart:
        if not indices:
            return ShardPart([])
        with accelerator.autocast():
            targets, mean_logp = proxy_target_logps(q.model, [encoded[i] for i in indices], cfg, accelerator.device,
                                                    pad_id=pad_id)
        return ShardPart(targets, row_values=mean_logp.tolist())

    return build


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
        labelled = [r[0] for r in rows]
        explained = [r[1] for r in rows if r[1] is not None]  # rows without a rationale: label term only
        # one forward over both tasks (under DDP a step must be one forward per backward)
        batch = collate(labelled + explained, pad_id_of(model))
        logits = forward(model, batch)  # (B + E, T, V): label rows, then rationale rows
        labels, n = batch["labels"].to(logits.device), len(labelled)
        loss = obj.rationale_loss(logits[:n], labels[:n], logits[n:], labels[n:], alpha)
        return loss, int(batch["attention_mask"].sum())

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
