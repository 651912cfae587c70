"""The one optimisation loop (AdamW, warm-up, clipping, gradient accumulation, a step/epoch/time budget)
and the helpers every per-objective step shares. Used for the student (train.py) and for the proxy's
stages (proxy.py).

Several processes (`accelerate launch` / torchrun): every process draws the same seeded stream of
examples (one shuffled permutation after another), and optimiser step s takes the next
G = batch_size x processes x accumulation of them: micro-batch j of process r is the r-th of the j-th
group of `processes` micro-batches. So every process gets a full micro-batch at every step, all stop
at the same step, and one process with accumulation a x p sees exactly the same rows per step as p
processes with accumulation a. accelerate wraps the model in DDP and averages gradients; the logged
loss is the mean over processes and micro-batches; only the main process logs and shows progress.

train.fsdp = true (the student, more than one process): instead of DDP the model is sharded with
torch's FSDP2 fully_shard (fsdp.py: each decoder layer, then the root; each process holds 1/world of
the weights, gradients and AdamW state), is not passed to accelerator.prepare (only the optimiser, made
after sharding), skips the gradient reduce-scatter on all but the last micro-batch of a step
(set_requires_gradient_sync), and clips the norm over the sharded (DTensor) gradients. The same rows
reach the same micro-batches, so the loss curve is DDP's. accelerate's own --use_fsdp is refused.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel

from agentkd.training import objectives as obj
from agentkd.config import ConfigError, TrainSection
from agentkd.training.fsdp import full_state_dict, shard_model
from agentkd.training.train_data import EncodedRow, collate

LogMetric = Callable[[str, float, int], None]
StepLoss = Callable[[Any, list[Any]], tuple[torch.Tensor, int]]  # (model, rows) -> (loss, tokens)


def make_accelerator(cfg: TrainSection) -> Accelerator:
    """The run's Accelerator: bf16 autocast on CUDA (train.precision = "auto"), fp32 elsewhere. On a
    machine without CUDA it is told so (cpu=True): under torchrun / `accelerate launch` that is what
    makes it join the gloo process group (MULTI_CPU) instead of running each process alone."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # accelerate picks FSDP only on GPU process groups (on CPU it would quietly be DDP) and would
        # wrap the model its own way; the trainer shards the student itself (fsdp.py)
        raise ConfigError("train.launcher_args: accelerate's own FSDP (--use_fsdp / an FSDP accelerate config) is "
                          "not used by agentkd's trainer: drop it and set train.fsdp = true (torch FSDP2 over "
                          "the launched processes)")
    cuda = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")


def accumulation_steps(cfg: TrainSection, processes: int) -> int:
    """Micro-batches per optimiser step, per process: enough for train.effective_batch examples per step
    (rounded up to whole micro-batches), 1 when effective_batch is not set."""
    if cfg.effective_batch is None:
        return 1
    return max(1, math.ceil(cfg.effective_batch / (cfg.batch_size * processes)))


def example_stream(n: int, seed: int) -> Iterator[int]:
    """Row indices: one seeded permutation of range(n) after another (the same on every process)."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


def optimise(
    model: Any,
    rows: Sequence[Any],
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
    fsdp: bool = False,
) -> dict[str, Any]:
    """`epochs` passes over `rows` (a fraction allowed; rows may be a lazy Sequence), at most max_steps
    optimiser steps, or until max_seconds of wall clock, whichever comes first. AdamW, linear warm-up
    then constant LR, grad clipping. Trains `model` in place.

    fsdp (train.fsdp, for the student) with more than one process: the model is sharded with torch's
    FSDP2 (fsdp.py) rather than wrapped in DDP, and stays sharded; the returned "state_dict" holds its
    full weights on the main process (gathered by every process), for the checkpoint. One process: no-op."""
    world, rank = accelerator.num_processes, accelerator.process_index
    sharded = fsdp and world > 1
    if cfg.gradient_checkpointing:
        # recompute activations in backward; non-reentrant, so DDP and a frozen (LoRA) base work
        _activation_checkpointing(model, True)
    if sharded:  # before the optimiser: it must step the shards
        layers = shard_model(model, accelerator.device, world, bf16=accelerator.mixed_precision == "bf16")
        if accelerator.is_main_process:
            print(f"{name}: FSDP2, {layers} layers and the root sharded over {world} processes", file=sys.stderr,
                  flush=True)
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapter only
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    if sharded:  # the model is not prepared: accelerate would wrap it in DDP
        wrapped, optimizer = model, accelerator.prepare(optimizer)
    else:
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    wrapped.train()

    bs, accum = cfg.batch_size, accumulation_steps(cfg, world)
    per_step = bs * world * accum  # examples per optimiser step, over all processes
    total_steps = max(1, math.ceil(epochs * len(rows) / per_step))
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    stream = example_stream(len(rows), seed)
    losses: list[float] = []
    tokens, step, begun = 0, 0, time.perf_counter()
    main = accelerator.is_main_process
    with _progress_bar(progress and main, name, total_steps) as bar:
        while step < total_steps:
            drawn = [next(stream) for _ in range(per_step)]
            loss_sum, n_tokens = 0.0, 0
            for j in range(accum):
                mine = drawn[(j * world + rank) * bs :][:bs]
                batch = [rows[i] for i in mine]
                # gradients are averaged across processes only on the last micro-batch of the step
                if sharded:
                    wrapped.set_requires_gradient_sync(j == accum - 1)
                with accelerator.no_sync(wrapped) if j < accum - 1 and not sharded else nullcontext():
                    with accelerator.autocast():
                        loss, n = step_loss(wrapped, batch)
                    accelerator.backward(loss / accum)
                loss_sum, n_tokens = loss_sum + float(loss.detach()) / accum, n_tokens + n
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            late = max_seconds is not None and time.perf_counter() - begun >= max_seconds
            # one reduction per step: the mean loss, the tokens, and whether any process is out of time
            summed = _sum_over_processes(accelerator, [loss_sum, float(n_tokens), float(late)])
            losses.append(summed[0] / world)
            tokens += int(summed[1])
            rate = tokens / max(time.perf_counter() - begun, 1e-9)
            if summed[2] > 0:  # every process stops at the same step
                total_steps = step
            if bar is not None:
                bar.update(step, total=total_steps, loss=losses[-1], rate=rate)
            if main and log_metric is not None and (step % cfg.log_every == 0 or step == total_steps):
                log_metric(f"{name}/loss", losses[-1], step)
                log_metric(f"{name}/tokens_per_s", rate, step)
    elapsed = time.perf_counter() - begun
    plain = model if sharded else accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
    if cfg.gradient_checkpointing:
        _activation_checkpointing(plain, False)
    plain.eval()
    accelerator.free_memory()
    tail = losses[-10:]
    stats: dict[str, Any] = {
        "steps": step,
        "final_loss": sum(tail) / len(tail) if tail else float("nan"),
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "effective_batch": per_step,
    }
    if sharded:  # a collective: every process gathers, the main one keeps the weights
        stats["state_dict"] = full_state_dict(model)
    return stats


def _activation_checkpointing(model: Any, on: bool) -> None:
    """Turn activation (gradient) checkpointing on or off. transformers 5.2x renamed the methods
    (activation_checkpointing_*; the gradient_checkpointing_* names warn and go in v6); earlier 5.x
    releases have only the old names."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def checkpointing_on(model: Any) -> bool:
    """Whether activation checkpointing is on (either transformers 5.x name), through a DDP wrapper."""
    plain = extract_model_from_parallel(model)
    flag = getattr(plain, "is_activation_checkpointing", None)
    return bool(plain.is_gradient_checkpointing if flag is None else flag)


def _sum_over_processes(accelerator: Accelerator, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    summed = accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=accelerator.device), reduction="sum")
    return summed.tolist()


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


# ---------------------------------------------------------------- shared step helpers


def forward(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits


def pad_id_of(model: Any) -> int:
    """The model's pad id; a DDP/FSDP wrapper is looked through (it has no .config)."""
    pad = extract_model_from_parallel(model).config.pad_token_id
    return 0 if pad is None else pad


def sft_step(model: Any, rows: list[EncodedRow]) -> tuple[torch.Tensor, int]:
    batch = collate(rows, pad_id_of(model))
    logits = forward(model, batch)  # (B, T, V)
    return obj.sft_loss(logits, batch["labels"].to(logits.device)), int(batch["attention_mask"].sum())
