"""The run's proxy (Proxy-KD, arXiv 2401.07013 v2; METHODS.md §3): one white-box model per run, larger
than the student and on the SAME tokenizer, trained on teacher answers, kept and continued.

Lifecycle. The proxy is built once from `train.proxy_spec`, trained by `train_proxy` (warm-up SFT, then
K rounds of NLL(y) + DPO(teacher y preferred over the proxy's own sample y'), each round's reference
the proxy as the previous round left it), saved as runs/<name>/proxy/<iteration>/ (a folder
transformers or peft load alone) and, at the next iteration or in a resumed run, loaded and trained
further — never rebuilt. posterior_kd takes its evidence q from it; proxy_kd its targets.

Data roles (agentkd's reading of the paper's 10% / 45% / 45% split). Each example has one stable role,
chosen by a hash of its instruction, so it keeps that role in every iteration:
    warmup  -> the proxy's SFT warm-up (step a)
    align   -> the proxy's alignment rounds (step b)
    kd      -> the student's KD term (steps c-e)
The proxy never trains on a kd-role answer, so its q there is a prediction, not a memorised one-hot;
its quality is scored on kd-role answers for the same reason. The student still learns NLL from every
teacher answer (all roles) — only the KL term is limited to the kd role.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from agentkd.training import objectives as obj
from agentkd.config import ConfigError, TrainSection
from agentkd.training.decode import sample_response_ids
from agentkd.training.optimise import LogMetric, StepLoss, forward, make_accelerator, optimise, pad_id_of, sft_step
from agentkd.training.students import Student, StudentSpec, build_student, load_checkpoint, save_checkpoint
from agentkd.training.train_data import EncodedRow, TrainingExample, collate, encode_pair, encode_response_ids, format_prompt

ROLES = ("warmup", "align", "kd")
MARKER = "agentkd_proxy.json"  # written last: a folder without it is not a usable proxy


# ---------------------------------------------------------------- data roles


def example_role(instruction: str, split: Sequence[float]) -> str:
    """The stable role of an example: a hash of its instruction, cut by the (warm-up, align, kd) fractions."""
    if len(split) != 3 or sum(split) <= 0 or min(split) < 0:
        raise ConfigError("train.proxy_split: expected three non-negative fractions (warm-up, alignment, KD)")
    u = int.from_bytes(hashlib.sha256(instruction.encode("utf-8")).digest()[:8], "big") / 2**64  # [0, 1)
    total, edge = sum(split), 0.0
    for role, fraction in zip(ROLES, split, strict=True):
        edge += fraction / total
        if u < edge:
            return role
    return ROLES[-1]


def split_by_role(examples: Sequence[TrainingExample], split: Sequence[float]) -> dict[str, list[TrainingExample]]:
    parts: dict[str, list[TrainingExample]] = {role: [] for role in ROLES}
    for e in examples:
        parts[example_role(e.instruction, split)].append(e)
    return parts


# ---------------------------------------------------------------- the proxy model


def vocab_hash(tokenizer: Any) -> str:
    """sha256 of the token -> id map and the special ids: two tokenizers with the same hash give every
    text the same ids (a vocabulary size says nothing of that)."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode("utf-8")).hexdigest()


def check_same_tokenizer(student: Student, proxy: Student, key: str = "train.proxy_spec") -> None:
    if vocab_hash(student.tokenizer) != vocab_hash(proxy.tokenizer):
        raise ConfigError(
            f"{key}: the proxy's tokenizer differs from the student's (vocabulary hash); posterior/proxy KD "
            "compare distributions over the same ids: use tokenizer = \"shared\" for a from_config proxy, or a "
            "pretrained proxy of the student's family"
        )


def build_proxy_model(spec: StudentSpec, student: Student, *, seed: int) -> Student:
    """A fresh, untrained proxy on the student's tokenizer (checked by hash, not by size)."""
    proxy = build_student(spec, tokenizer=student.tokenizer, seed=seed)
    check_same_tokenizer(student, proxy)
    return proxy


def save_proxy(proxy: Student, path: Path, *, iteration: int) -> None:
    """Write the proxy to `path` atomically (a temp folder renamed), with its marker last."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(proxy, tmp)
    marker = {"iteration": iteration, "trained_examples": proxy.trained_examples,
              "vocab_hash": vocab_hash(proxy.tokenizer)}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_proxy(path: Path, *, spec: StudentSpec) -> Student:
    marker = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    proxy = load_checkpoint(path, spec=spec)
    proxy.trained_examples = int(marker["trained_examples"])
    return proxy


def latest_proxy_dir(proxy_root: Path, *, up_to: int) -> Path | None:
    """The newest saved proxy of a run at iteration <= up_to (complete folders only)."""
    found = [(int(p.name), p) for p in Path(proxy_root).glob("*") if p.name.isdigit() and (p / MARKER).exists()]
    found = [f for f in found if f[0] <= up_to]
    return max(found)[1] if found else None


# ---------------------------------------------------------------- training the proxy


@dataclass
class ProxyStage:
    """One stage of the proxy's training, with its quality after the stage: mean per-token
    log p(teacher answer) on held-out (kd-role) answers, the proxy's and (if given) the student's."""

    iteration: int
    stage: str  # "before", "warmup", "align1", "align2", ...
    steps: int
    examples: int
    loss: float | None
    seconds: float
    proxy_logp: float | None
    student_logp: float | None
    # alignment rounds: the preference pairs and the frozen reference log-probs (chosen, rejected) used
    pairs: list[tuple[EncodedRow, EncodedRow]] = field(default_factory=list, repr=False)
    reference: list[tuple[float, float]] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "stage": self.stage, "steps": self.steps, "examples": self.examples,
                "loss": self.loss, "seconds": self.seconds, "proxy_logp": self.proxy_logp,
                "student_logp": self.student_logp}


def train_proxy(
    proxy: Student,
    examples: Sequence[TrainingExample],
    cfg: TrainSection,
    *,
    seed: int,
    iteration: int = 1,
    student: Student | None = None,
    accelerator: Accelerator | None = None,
    log_metric: LogMetric | None = None,
    progress: bool = False,
) -> list[ProxyStage]:
    """Proxy-KD steps a-b on this call's examples, continuing from the proxy's current weights:
    warm-up SFT on the warm-up role, then cfg.align_rounds rounds of NLL(y) + DPO(y > y') on the
    alignment role. Trains `proxy` in place and returns one ProxyStage per stage (plus "before")."""
    accelerator = accelerator or make_accelerator(cfg)
    roles = split_by_role(examples, cfg.proxy_split)
    warm, align = roles["warmup"], roles["align"]
    if not warm and not align:
        raise ConfigError(f"train.proxy_split: none of the {len(examples)} examples falls in the proxy's warm-up "
                          "or alignment role, so the proxy cannot be trained")
    tok, L = proxy.tokenizer, cfg.max_len
    held_out = [encode_pair(tok, format_prompt(e.instruction), e.response, L) for e in roles["kd"][: cfg.proxy_eval_size]]

    # the student does not change while the proxy trains: scored once, shown next to every stage
    student_logp = mean_logprob(student.model, held_out, accelerator, tok.pad_token_id) if student is not None else None

    def quality(name: str, steps: int, n: int, loss: float | None, began: float, **extra: Any) -> ProxyStage:
        stage = ProxyStage(
            iteration, name, steps, n, loss, time.perf_counter() - began,
            mean_logprob(proxy.model, held_out, accelerator, tok.pad_token_id), student_logp, **extra,
        )
        if log_metric is not None and stage.proxy_logp is not None:
            log_metric(f"proxy/{name}/heldout_logp", stage.proxy_logp, steps)
        return stage

    common = dict(pad_id=tok.pad_token_id, epochs=cfg.proxy_epochs, max_seconds=cfg.proxy_max_seconds,
                  max_steps=cfg.proxy_max_steps, seed=seed, log_metric=log_metric, progress=progress)
    stages = [quality("before", 0, 0, None, time.perf_counter())]
    if warm:
        began = time.perf_counter()
        rows = [encode_pair(tok, format_prompt(e.instruction), e.response, L) for e in warm]
        stats = optimise(proxy.model, rows, sft_step, cfg, accelerator, name="proxy_warmup", **common)
        stages.append(quality("warmup", stats["steps"], len(rows), stats["final_loss"], began))
    for k in range(1, (cfg.align_rounds if align else 0) + 1):
        began = time.perf_counter()
        pairs = preference_pairs(proxy, align, cfg, seed=seed + 1000 * iteration + k)
        reference = reference_logprobs(proxy.model, pairs, accelerator, tok.pad_token_id)  # frozen: round start
        rows = list(zip(pairs, reference, strict=True))
        stats = optimise(proxy.model, rows, dpo_step(cfg.dpo_beta), cfg, accelerator, name=f"proxy_align{k}", **common)
        stages.append(quality(f"align{k}", stats["steps"], len(rows), stats["final_loss"], began,
                              pairs=pairs, reference=reference))
    proxy.trained_examples += len(warm) + len(align)
    return stages


def preference_pairs(proxy: Student, align: Sequence[TrainingExample], cfg: TrainSection, *, seed: int) -> list[tuple[EncodedRow, EncodedRow]]:
    """(teacher answer, the proxy's own sample) per alignment example, encoded alike: both capped at
    max_new_tokens response tokens and both ending in eos only if the answer ended within the cap, so
    summed log-probs hold no length or eos shortcut between chosen and rejected."""
    tok, L, cap = proxy.tokenizer, cfg.max_len, cfg.max_new_tokens
    samples = sample_response_ids(proxy, [e.instruction for e in align], max_new_tokens=cap,
                                  temperature=cfg.proxy_temperature, seed=seed)
    pairs = []
    for e, rejected in zip(align, samples, strict=True):
        prompt = format_prompt(e.instruction)
        chosen = (tok(e.response, add_special_tokens=False).input_ids + [tok.eos_token_id])[:cap]
        pairs.append((encode_response_ids(tok, prompt, chosen, L), encode_response_ids(tok, prompt, rejected, L)))
    return pairs


@torch.no_grad()
def reference_logprobs(model: Any, pairs: Sequence[tuple[EncodedRow, EncodedRow]], accelerator: Accelerator,
                       pad_id: int, *, batch_size: int = 32) -> list[tuple[float, float]]:
    """Sequence log-probs (chosen, rejected) under `model` as it is now, in the precision the policy
    trains in (the same autocast), so the DPO margin starts at exactly zero."""
    model.to(accelerator.device).eval()
    out: list[tuple[float, float]] = []
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo : lo + batch_size]
        batch = collate([p[0] for p in chunk] + [p[1] for p in chunk], pad_id)
        with accelerator.autocast():
            logits = forward(model, batch)  # (2B, T, V)
        logp = obj.sequence_logprob(logits, batch["labels"].to(logits.device)).cpu()  # (2B,)
        out += list(zip(logp[: len(chunk)].tolist(), logp[len(chunk) :].tolist(), strict=True))
    return out


def dpo_step(beta: float) -> StepLoss:
    """Proxy-KD step b: NLL(y) on the chosen (teacher) answers + DPO(y > y') against the frozen reference."""

    def step(model: Any, rows: list[tuple[tuple[EncodedRow, EncodedRow], tuple[float, float]]]) -> tuple[torch.Tensor, int]:
        n = len(rows)
        batch = collate([r[0][0] for r in rows] + [r[0][1] for r in rows], pad_id_of(model))
        logits = forward(model, batch)  # (2B, T, V): chosen rows, then rejected rows
        labels = batch["labels"].to(logits.device)
        logp = obj.sequence_logprob(logits, labels)  # (2B,)
        ref = torch.tensor([r[1] for r in rows], device=logits.device)  # (B, 2)
        loss = obj.sft_loss(logits[:n], labels[:n]) + obj.dpo_loss(logp[:n], logp[n:], ref[:, 0], ref[:, 1], beta)
        return loss, int(batch["attention_mask"].sum())

    return step


@torch.no_grad()
def mean_logprob(model: Any, rows: Sequence[EncodedRow], accelerator: Accelerator, pad_id: int,
                 *, batch_size: int = 32) -> float | None:
    """Mean per-token log p(response | prompt) over all response tokens of `rows` (None if none)."""
    if not rows:
        return None
    was_training = model.training
    model.to(accelerator.device).eval()
    total, count = 0.0, 0
    for lo in range(0, len(rows), batch_size):
        batch = collate(rows[lo : lo + batch_size], pad_id)
        with accelerator.autocast():
            logits = forward(model, batch)
        labels = batch["labels"].to(logits.device)
        total += float(obj.token_logprobs(logits, labels).sum())
        count += int((labels[:, 1:] != obj.IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------- the student's proxy-KD targets


def proxy_targets(
    model: Any, encoded: Sequence[EncodedRow], cfg: TrainSection, device: torch.device, *, pad_id: int, batch_size: int = 8
) -> tuple[list[obj.SparseTargets], torch.Tensor]:
    """Proxy-KD steps c-d: the targets of `proxy_target_logps` and w = sigmoid(z-score of mean per-token
    log p_proxy(y|x)) over all of `encoded`, constants."""
    targets, mean_logp = proxy_target_logps(model, encoded, cfg, device, pad_id=pad_id, batch_size=batch_size)
    return targets, obj.proxy_sample_weights(mean_logp)


@torch.no_grad()
def proxy_target_logps(
    model: Any, encoded: Sequence[EncodedRow], cfg: TrainSection, device: torch.device, *, pad_id: int, batch_size: int = 8
) -> tuple[list[obj.SparseTargets], torch.Tensor]:
    """The aligned proxy teacher-forced on (x, y) of the kd role: top-k (cfg.proxy_top_k) probs + tail per
    response position, and each row's mean per-token log p_proxy(y|x) (N,), the input of the sample
    weights (kept apart so rows built in shards, by several processes, are weighted together). Like
    posterior targets, the V-wide logits exist only on the device, a chunk of positions at a time
    (cfg.target_chunk_logits); only (positions, k) values reach the host."""
    model.to(device).eval()
    body, head = model.get_decoder(), model.get_output_embeddings()
    step = max(1, cfg.target_chunk_logits // model.config.vocab_size)
    targets, mean_logp = [], []
    for lo in range(0, len(encoded), batch_size):
        chunk = list(encoded[lo : lo + batch_size])
        batch = collate(chunk, pad_id)
        hidden = body(input_ids=batch["input_ids"].to(device),
                      attention_mask=batch["attention_mask"].to(device)).last_hidden_state  # (B, T, H)
        T = hidden.size(1)
        where = torch.cat([torch.arange(r.start - 1, len(r.input_ids) - 1) + i * T for i, r in enumerate(chunk)])
        ys = torch.tensor([t for r in chunk for t in r.labels[r.start : len(r.input_ids)]], device=device)  # (P,)
        h = hidden.reshape(-1, hidden.size(-1))[where.to(device)]  # (P, H): state at t-1 predicts token t
        top_p, top_i, label_lp = [], [], []
        for a in range(0, h.size(0), step):
            logits = head(h[a : a + step]).float()  # (C, V), on the device only
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (C, 1)
            values, ids = logits.topk(cfg.proxy_top_k, dim=-1)  # (C, k)
            top_p.append((values - lse).exp().cpu())
            top_i.append(ids.cpu())
            label_lp.append((logits.gather(-1, ys[a : a + step, None]) - lse).squeeze(-1).cpu())  # (C,)
            del logits
        probs, ids, lp = torch.cat(top_p), torch.cat(top_i), torch.cat(label_lp)
        at = 0
        for r in chunk:
            n = len(r.input_ids) - r.start
            p = probs[at : at + n]
            targets.append(obj.SparseTargets(ids=ids[at : at + n].to(torch.int32), probs=p.contiguous(),
                                             tail=(1.0 - p.sum(-1)).clamp_min(0.0)))
            mean_logp.append(float(lp[at : at + n].mean()) if n else 0.0)
            at += n
    return targets, torch.tensor(mean_logp)


def frozen_copy(student: Student) -> Student:
    """posterior_q = "self": the student as it is before this call, frozen (self-distillation)."""
    return Student(model=copy.deepcopy(student.model), tokenizer=student.tokenizer, spec=student.spec)
