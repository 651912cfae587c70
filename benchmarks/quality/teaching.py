"""Teaching: the lab teacher behind the sim's HTTP layer, reached only through agentkd's gateway.

A RunConfig names it like any OpenAI-compatible provider (base_url, prices, top_logprobs = 5) and
`agentkd teach` does the rest: answerer calls for every method's shared answers, explainer calls for
the rationale method, as many rows as cost about the answers' tokens. What each call cost is read back
from the run's DuckDB `calls` table, as the server billed it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from agentkd.config import SimSection, config_from_dict
from agentkd.datasets import read_jsonl, write_jsonl
from agentkd.estimate import explainer_prompt_tokens
from agentkd.lion.evaluate import answer_number
from agentkd.roles.template import builtin_prompts_dir
from agentkd.store.writer import Store
from agentkd.training.students import Student
from agentkd.teach import teach
from agentkd.teachers.sim import sim_in_thread
from agentkd.teachers.sim.world import Problem
from agentkd.training.train_data import TrainingExample
from agentkd.training.run import examples_from_store

from .teacher import LMResponder

TEACHER_MODEL = "lab-teacher-1"
# Nominal prices, the sim's (a small paid model's): USD figures compare methods, they bill nobody.
PRICE = {"input_per_mtok": 0.15, "output_per_mtok": 0.60}
PILOT_ROWS = 100  # explainer rows whose mean cost sets how many rows match the answers' tokens


def lab_config(run_dir: Path, base_url: str, *, seed: int):
    return config_from_dict({
        "run": {"name": run_dir.name, "dir": str(run_dir.parent), "seed": seed},
        "teacher": {"provider": "openai_compatible", "model": TEACHER_MODEL, "base_url": f"{base_url}/v1",
                    "top_logprobs": 5, "structured_output": False},  # the lab teacher replies in plain text
        "prices": {TEACHER_MODEL: PRICE},
        "budget": {"usd": 10.0},
        "limits": {"max_concurrency": 64},
    }, source="benchmarks/distill_quality.py")


@dataclass
class Taught:
    answers: list[TrainingExample]  # one per answerer call, with the teacher's top-5 logprobs
    rationale: list[TrainingExample]  # one per parsed explainer call: label + rationale
    costs: dict[str, dict[str, float]]  # role -> calls, input_tokens, output_tokens, usd (billed)
    explainer_rows: int
    explainer_parse_failures: int
    batches: int  # batched decodes the server ran


def _quiet(config, role: str, rows: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    src, out = folder / f"{role}_in.jsonl", folder / f"{role}_out.jsonl"
    write_jsonl(src, rows)
    asyncio.run(teach(config, role, src, out, show_progress=False, console=Console(file=io.StringIO())))
    return read_jsonl(out, ("instruction",))


def call_costs(db: Path) -> dict[str, dict[str, float]]:
    store = Store(db)
    try:
        rows = store.query_dicts(
            "SELECT role, count(*) AS calls, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
            "sum(cost_usd) AS usd FROM calls WHERE status = 'ok' GROUP BY role")
    finally:
        store.close_sync()
    return {r["role"]: {k: float(r[k]) for k in ("calls", "input_tokens", "output_tokens", "usd")} for r in rows}


def teach_lab(teacher: Student, pool: list[Problem], n_answers: int, run_dir: Path, *, seed: int,
              max_new_tokens: int) -> Taught:
    """Answerer calls on pool[:n_answers]; explainer calls on pool[:m], m chosen so their tokens ~ the answers'."""
    run_dir.mkdir(parents=True, exist_ok=True)
    responder = LMResponder(teacher, seed=seed, max_new_tokens=max_new_tokens)
    with sim_in_thread(SimSection(error_rate=0.0), seed=seed, responder=responder) as handle:
        config = lab_config(run_dir, handle.base_url, seed=seed)
        _quiet(config, "answerer", [{"instruction": p.text} for p in pool[:n_answers]], run_dir)
        costs = call_costs(run_dir / "agentkd.duckdb")
        answer_tokens = costs["answerer"]["input_tokens"] + costs["answerer"]["output_tokens"]
        pilot = min(PILOT_ROWS, n_answers)
        _quiet(config, "explainer", [{"instruction": p.text} for p in pool[:pilot]], run_dir)
        per_row = sum(call_costs(run_dir / "agentkd.duckdb")["explainer"][k] for k in ("input_tokens", "output_tokens")) / pilot
        m = max(pilot, min(len(pool), round(answer_tokens / per_row)))
        explained = _quiet(config, "explainer", [{"instruction": p.text} for p in pool[:m]], run_dir)  # pilot rows: stored
    store = Store(run_dir / "agentkd.duckdb")
    try:
        answers = [dataclasses.replace(e, label=None, rationale=None) for e in examples_from_store(store)]
    finally:
        store.close_sync()
    rationale = [TrainingExample(r["instruction"], r["label"], label=r["label"], rationale=r["rationale"])
                 for r in explained if r.get("parsed_ok")]
    return Taught(answers, rationale, call_costs(run_dir / "agentkd.duckdb"), m,
                  sum(not r.get("parsed_ok") for r in explained), responder.batches)


def explainer_label_accuracy(problems: list[Problem], run_dir: Path, *, seed: int) -> dict[str, Any]:
    """Zero-shot vs 6-shot explainer prompt on the rule-based sim: estimated and billed prompt tokens per
    row, and the label accuracy each reaches (the sim reads only the data blocks, so worked examples
    cannot change its labels: equal accuracy here is by construction, not evidence for the paper)."""
    rows = [{"instruction": p.text} for p in problems]
    out: dict[str, Any] = {"rows": len(rows)}
    for name, prompt in (("zero_shot", None), ("six_shot", str(builtin_prompts_dir() / "explainer_6shot.md"))):
        folder = run_dir / name
        config = config_from_dict({
            "run": {"name": folder.name, "dir": str(folder.parent), "seed": seed},
            "sim": {"error_rate": 0.05}, "budget": {"usd": 1.0}, "limits": {"max_concurrency": 64},
            "teacher": {"structured_output": False},
            "roles": {"explainer": {"prompt": prompt}} if prompt else {},
        }, source="benchmarks/distill_quality.py")
        if name == "zero_shot":
            out["estimated_tokens_per_row"] = explainer_prompt_tokens(config, [r["instruction"] for r in rows])
        got = _quiet(config, "explainer", rows, folder)
        cost = call_costs(folder / "agentkd.duckdb")["explainer"]
        right = sum(answer_number(r["label"] or "") == p.answer for r, p in zip(got, problems, strict=True))
        out[name] = {"billed_input_tokens_per_row": cost["input_tokens"] / len(rows),
                     "usd_per_row": cost["usd"] / len(rows), "label_accuracy": right / len(rows)}
    return out


def save_examples(examples: list[TrainingExample], path: Path) -> None:
    path.write_text("".join(json.dumps(dataclasses.asdict(e)) + "\n" for e in examples), encoding="utf-8")


def load_examples(path: Path) -> list[TrainingExample]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        top = d.pop("teacher_top_logprobs")
        out.append(TrainingExample(**d, teacher_top_logprobs=None if top is None else
                                   [[(t, lp) for t, lp in position] for position in top]))
    return out
