"""The one optimisation loop (AdamW, warm-up, clipping, a step/epoch/time budget) and the helpers every
per-objective step shares. Used for the student (train.py) and for the proxy's stages (proxy.py).

Several GPUs: under `accelerate launch` each process takes every num_processes-th batch of the same
seeded permutation; accelerate wraps the model in DDP and averages gradients.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from agentkd import objectives as obj
from agentkd.config import TrainSection
from agentkd.train_data import EncodedRow, collate

LogMetric = Callable[[str, float, int], None]
StepLoss = Callable[[Any, list[Any]], tuple[torch.Tensor, int]]  # (model, rows) -> (loss, tokens)


def optimise(
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
    max_seconds of wall clock, whichever comes first. AdamW, linear warm-up then constant LR, grad
    clipping. Trains `model` in place."""
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


# ---------------------------------------------------------------- shared step helpers


def forward(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits


def pad_id_of(model: Any) -> int:
    pad = model.config.pad_token_id
    return 0 if pad is None else pad


def sft_step(model: Any, rows: list[EncodedRow]) -> tuple[torch.Tensor, int]:
    batch = collate(rows, pad_id_of(model))
    logits = forward(model, batch)  # (B, T, V)
    return obj.sft_loss(logits, batch["labels"].to(logits.device)), int(batch["attention_mask"].sum())
