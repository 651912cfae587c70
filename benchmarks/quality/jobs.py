"""The lab's trainings, one function per job, each run in a worker process with one torch thread.

Jobs read what the main process wrote into the work folder (tokenizer/, teacher/, taught/*.jsonl,
heldout.pt, proxies/) and return plain dicts of figures. Same student spec and the same step budget
for every method; the proxy is trained once per seed and shared by that seed's three KD methods.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from agentkd.config import TrainSection
from agentkd.training.proxy import build_proxy_model, load_proxy, save_proxy, train_proxy
from agentkd.training.students import build_student, count_parameters
from agentkd.training.train import train

from .measure import HeldOut, accuracy, token_kl
from .plan import PROXY_SPEC, LabSizes, proxy_spec, student_spec, teacher_spec, world_split
from .teacher import teacher_examples
from .teaching import load_examples

KD_METHODS = ("posterior_kd", "posterior_kd_evidence", "proxy_kd")
TEACHER_SEED = 1000


def init_worker() -> None:
    torch.set_num_threads(1)  # tiny models run fastest on one thread; two jobs share the two cores


def load_tokenizer(work: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(work / "tokenizer")


def method_cfg(method: str, sizes: LabSizes) -> TrainSection:
    """One TrainSection per method: same lr, batch and step budget (epochs high, so max_steps binds)."""
    return TrainSection(
        objective="posterior_kd" if method == "posterior_kd_evidence" else method,
        lr=sizes.student_lr, epochs=10_000, max_steps=sizes.student_steps, batch_size=32,
        max_new_tokens=sizes.max_new_tokens, cpu_threads=1,
        logprob_gamma=1.0 if method == "posterior_kd_evidence" else 0.0,  # the teacher's top-5 as evidence, or not
        proxy_spec=str(PROXY_SPEC), proxy_epochs=10_000, proxy_max_steps=sizes.proxy_stage_steps,
    )


def teacher_job(work: Path, sizes: LabSizes) -> dict[str, Any]:
    split = world_split(sizes)
    teacher = build_student(teacher_spec(sizes), tokenizer=load_tokenizer(work), seed=TEACHER_SEED)
    cfg = TrainSection(lr=sizes.teacher_lr, epochs=10_000, max_steps=sizes.teacher_steps, batch_size=32, cpu_threads=1)
    examples = teacher_examples(split.teacher, TEACHER_SEED)
    result = train(teacher, examples, cfg, out_dir=work / "teacher", seed=TEACHER_SEED, progress=False)
    return {"params": count_parameters(teacher.model), "examples": len(examples), "steps": result.steps,
            "final_loss": result.final_loss, "seconds": result.seconds}


def proxy_job(work: Path, sizes: LabSizes, seed: int) -> dict[str, Any]:
    """Warm-up + alignment rounds on the shared answers (agentkd.training.proxy), saved for this seed's KD students."""
    began = time.perf_counter()
    answers = load_examples(work / "taught" / "answers.jsonl")
    student = build_student(student_spec(), tokenizer=load_tokenizer(work), seed=seed)
    proxy = build_proxy_model(proxy_spec(), student, seed=seed + 100)
    stages = train_proxy(proxy, answers, method_cfg("proxy_kd", sizes), seed=seed, progress=False)
    save_proxy(proxy, work / "proxies" / f"seed{seed}", iteration=1)
    held = HeldOut.load(work / "heldout.pt")
    return {
        "seed": seed, "params": count_parameters(proxy.model), "steps": sum(s.steps for s in stages),
        "stages": [s.row() for s in stages], "seconds": time.perf_counter() - began,
        "accuracy": accuracy(proxy, held, max_new_tokens=sizes.max_new_tokens), "kl": token_kl(proxy, held),
    }


def student_job(work: Path, sizes: LabSizes, method: str, seed: int) -> dict[str, Any]:
    began = time.perf_counter()
    tok = load_tokenizer(work)
    answers = load_examples(work / "taught" / "answers.jsonl")
    examples = load_examples(work / "taught" / "rationale.jsonl") if method == "rationale" else answers
    student = build_student(student_spec(), tokenizer=tok, seed=seed)
    proxy = load_proxy(work / "proxies" / f"seed{seed}", spec=proxy_spec()) if method in KD_METHODS else None
    result = train(student, examples, method_cfg(method, sizes), out_dir=work / "students" / f"{method}-{seed}",
                   seed=seed, proxy=proxy, teacher_corpus=[e.response for e in answers] if proxy else None,
                   progress=False)
    held = HeldOut.load(work / "heldout.pt")
    task = "predict" if method == "rationale" else "answer"  # a rationale student answers through its label task
    return {
        "method": method, "seed": seed, "examples": result.examples, "steps": result.steps,
        "final_loss": result.final_loss, "kd_examples": result.kd_examples,
        "evidence_used": result.evidence_used, "evidence_unused": result.evidence_unused,
        "accuracy": accuracy(student, held, max_new_tokens=sizes.max_new_tokens, task=task),
        # a rationale student is never trained on worked answers: its KL to them measures nothing
        "kl": None if method == "rationale" else token_kl(student, held),
        "seconds": time.perf_counter() - began,
    }
