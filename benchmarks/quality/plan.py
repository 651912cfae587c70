"""The lab's sizes (full and --quick), its slice of the sim's world, and the one shared tokenizer.

Sized from ENVIRONMENT.md and pilots on this 2-core machine (tiny student, batch 32, 1 torch thread:
~0.1 s a step alone, ~0.15 s with a second training beside it). Every budget is in optimiser steps,
so the figures do not depend on machine load; only the wall clock does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from agentkd.training.students import StudentSpec, load_spec, train_bpe_tokenizer
from agentkd.teachers.sim import roles
from agentkd.teachers.sim.world import Problem, sample_problems, worked_answer
from agentkd.training.train_data import format_prompt
from .teacher import teacher_prompt

ROOT = Path(__file__).resolve().parents[2]
STUDENT_SPEC = ROOT / "students" / "tiny.toml"
PROXY_SPEC = ROOT / "students" / "tiny-proxy.toml"
METHODS = ("sft", "posterior_kd", "posterior_kd_evidence", "proxy_kd", "rationale")
WORLD_SEED = 1207  # the lab's world draw; never the loop's or the tests' seeds


@dataclass(frozen=True)
class LabSizes:
    name: str
    # the world: one- and two-step problems with one-digit operands (a tiny student learns them in minutes)
    world_steps: tuple[int, int] = (1, 2)
    world_digits: tuple[int, int] = (1, 1)
    vocab_size: int = 512
    # the teacher: the student's architecture with ~5x its data and steps (pilots here: this reached 90%
    # held-out accuracy in 2,500 steps; a wider 96/256 model only 60-77% in the same steps)
    teacher_hidden: int = 64
    teacher_intermediate: int = 128
    teacher_problems: int = 8000
    teacher_steps: int = 2500
    teacher_lr: float = 2e-3
    # teaching and measuring
    taught: int = 1500  # answerer rows (one call each, top-5 logprobs)
    heldout: int = 300
    max_new_tokens: int = 48
    # the students: one spec, one step budget for every method
    student_steps: int = 500
    student_lr: float = 2e-3
    proxy_stage_steps: int = 120  # per proxy stage: warm-up, then each of the 2 alignment rounds
    seeds: tuple[int, ...] = (0, 1, 2)
    # Lion against random expansion (rule-based sim)
    lion_seeds: tuple[int, ...] = (0, 1)
    lion_iterations: int = 3
    lion_seed_count: int = 300
    lion_new: int = 300
    lion_judge: int = 150
    lion_heldout: int = 200
    lion_steps: int = 250  # per iteration, weights kept
    kshot_rows: int = 200  # explainer rows for the zero-shot vs 6-shot comparison
    workers: int = 2


FULL = LabSizes(name="full")
QUICK = LabSizes(
    name="quick", teacher_problems=1500, teacher_steps=300, taught=160, heldout=60, student_steps=30,
    proxy_stage_steps=10, seeds=(0,), lion_seeds=(0,), lion_iterations=2, lion_seed_count=40, lion_new=40,
    lion_judge=20, lion_heldout=40, lion_steps=20, kshot_rows=40,
)


@dataclass(frozen=True)
class WorldSplit:
    heldout: list[Problem]  # never taught, never in the teacher's training data
    taught: list[Problem]  # the pool the gateway teaches from (answerer first, explainer as far as needed)
    teacher: list[Problem]  # the teacher's own training problems


def world_split(sizes: LabSizes) -> WorldSplit:
    """Distinct problems, cut in three disjoint parts (held-out first, so it never depends on the others)."""
    n_taught = 2 * sizes.taught  # room for the explainer when its rows cost less than an answer's
    problems = sample_problems(sizes.heldout + n_taught + sizes.teacher_problems, WORLD_SEED,
                               steps=sizes.world_steps, digits=sizes.world_digits)
    a, b = sizes.heldout, sizes.heldout + n_taught
    return WorldSplit(problems[:a], problems[a:b], problems[b:])


def teacher_spec(sizes: LabSizes) -> StudentSpec:
    return StudentSpec(name="lab-teacher", tokenizer="shared", hidden_size=sizes.teacher_hidden,
                       intermediate_size=sizes.teacher_intermediate, num_layers=4, num_heads=4)


def student_spec() -> StudentSpec:
    """students/tiny.toml on the lab's tokenizer (trained once, shared by teacher, proxy and students)."""
    return load_spec(STUDENT_SPEC).model_copy(update={"tokenizer": "shared"})


def proxy_spec() -> StudentSpec:
    return load_spec(PROXY_SPEC)


def lab_tokenizer(split: WorldSplit, sizes: LabSizes, seed: int = 0):
    """BPE (digits one per token) on the world's text: problems in every prompt format, answers, reasons."""
    rng = random.Random(seed)
    corpus = []
    for p in split.teacher:
        corpus += [teacher_prompt(p.text, "explain"), format_prompt(p.text, "predict"), format_prompt(p.text, "explain"),
                   worked_answer(p, rng), roles.explanation(p.text, rng, rng)]
    return train_bpe_tokenizer(corpus, sizes.vocab_size)
