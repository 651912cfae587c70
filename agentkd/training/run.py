"""From the run database to a trained checkpoint: examples, the student (new or continued), metrics.

Used by the loop (one call per Lion iteration) and by `agentkd train CONFIG`, in one process or under
`accelerate launch` / torchrun. Several processes: only the main one opens the store (DuckDB has one
writer); it reads what training needs into a TrainPlan and broadcasts it. Rows go to a RowSink: the
store, a launched job's rows.jsonl (launch.py), or nowhere (every process but the main one).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate.utils import broadcast_object_list, gather_object
from transformers.utils import logging as hf_logging

from agentkd.config import ConfigError, RunConfig
from agentkd.training.launch import (Discard, JobRows, Stage, TrainPlan, job_rows, prepare_job, read_result, run_job,
                            write_result)
from agentkd.training.optimise import make_accelerator
from agentkd.store.writer import Store, StoreLockedError
from agentkd.training.proxy import MARKER as PROXY_MARKER
from agentkd.store.logprob_record import evidence_fit
from agentkd.training.proxy import (build_proxy_model, check_same_tokenizer, latest_proxy_dir, load_proxy, save_proxy, train_proxy,
                           vocab_hash)
from agentkd.training.students import Student, build_student, load_checkpoint, load_spec
from agentkd.training.train import TrainResult, train
from agentkd.training.train_data import TrainingExample

hf_logging.disable_progress_bar()  # "Writing model shards" bars on every checkpoint are noise here


class RowSink(Protocol):
    """Where training rows go: Store.append_now, or launch.JobRows / launch.Discard."""

    def append_now(self, table: str, rows: Iterable[Mapping[str, Any]]) -> int: ...


# The training_examples view (store/schema.py) is what `agentkd export` writes too; the call's logprobs
# come along for posterior KD's evidence.
_EXAMPLES_SQL = """
SELECT e.instruction, e.teacher_answer, e.label, e.rationale, c.logprobs_json
FROM training_examples e
LEFT JOIN (SELECT key, any_value(logprobs_json) AS logprobs_json FROM calls WHERE status = 'ok' GROUP BY key) c
    ON c.key = e.answer_call_key
WHERE {where}
ORDER BY e.iteration, e.id
"""


def examples_from_store(store: Store, *, iteration: int | None = None, up_to: bool = False) -> list[TrainingExample]:
    """Teacher-answered pool instructions: of one iteration's Train Pool, up to it, or all of them."""
    if iteration is None:
        where, params = "TRUE", []
    else:
        where, params = ("e.iteration <= ?" if up_to else "e.iteration = ?"), [iteration]
    rows = store.query_dicts(_EXAMPLES_SQL.format(where=where), params)
    return [
        TrainingExample(
            instruction=row["instruction"], response=row["teacher_answer"], label=row["label"],
            rationale=row["rationale"],
            teacher_top_logprobs=_top_logprobs(row["logprobs_json"]),
        )
        for row in rows
    ]


def _top_logprobs(raw: str | None) -> list[list[tuple[str, float]]] | None:
    """Per output token: the SAMPLED token first (with its logprob), then the provider's other top
    alternatives. Providers rank `top` by probability, so the sampled token is often not top[0] (or not
    in `top` at all); evidence alignment reads position[0] as what was actually emitted."""
    if not raw:
        return None
    out = []
    for item in json.loads(raw):
        token, logprob = str(item.get("token") or ""), item.get("logprob")
        alternatives = [(str(t), float(lp)) for t, lp in item.get("top") or [] if str(t) != token and lp is not None]
        out.append([(token, float(logprob if logprob is not None else 0.0)), *alternatives])
    return out


def teacher_corpus(store: Store) -> list[str]:
    """Every stored teacher answer: the n-gram prior of posterior KD is built from all of them."""
    return [r[0] for r in store.query("SELECT response_text FROM calls WHERE status = 'ok' AND role = 'answerer'")]


def tokenizer_corpus(store: Store) -> list[str]:
    rows = store.query("SELECT text FROM instructions UNION ALL SELECT text FROM responses WHERE actor = 'teacher' "
                       "UNION ALL SELECT rationale FROM rationales WHERE rationale IS NOT NULL")  # the explain task's targets
    return [r[0] for r in rows]


def latest_checkpoint(store: Store) -> tuple[int, Path] | None:
    rows = store.query("SELECT iteration, checkpoint FROM train_runs ORDER BY iteration DESC, created_at DESC LIMIT 1")
    if not rows or not Path(rows[0][1]).exists():
        return None
    return rows[0][0], Path(rows[0][1])


def student_spec_path(config: RunConfig) -> Path:
    return config.resolve_path(config.student.spec)


def load_student(config: RunConfig, store: Store) -> tuple[Student, int]:
    """The latest checkpoint of this run (and its iteration), or a fresh student (iteration 0)."""
    spec = load_spec(student_spec_path(config))
    found = latest_checkpoint(store)
    if found is not None:
        return load_checkpoint(found[1], spec=spec), found[0]
    return build_student(spec, corpus=tokenizer_corpus(store), lora=config.train.lora, seed=config.run.seed), 0


def needs_proxy(config: RunConfig, objective: str | None = None) -> bool:
    """posterior_kd (with the proxy's q, the method) and proxy_kd train on the run's proxy."""
    objective = objective or config.train.objective
    return objective == "proxy_kd" or (objective == "posterior_kd" and config.train.posterior_q == "proxy")


def proxy_dir(config: RunConfig, iteration: int) -> Path:
    return config.run_dir / "proxy" / str(iteration)


def proxy_stage(config: RunConfig, store: RowSink, student: Student, examples: list[TrainingExample],
                iteration: int, *, progress: bool = True) -> Student:
    """The proxy for this iteration: proxy/<iteration>/ if it was already trained (a resumed run), else
    the newest earlier proxy of the run (or a fresh one from train.proxy_spec) trained further on these
    examples, saved to proxy/<iteration>/ (by the main process), and one proxy_stages row per stage."""
    if config.train.proxy_spec is None:
        raise ConfigError("train.proxy_spec: this objective needs the run's proxy; set train.proxy_spec")
    spec = load_spec(config.resolve_path(config.train.proxy_spec))
    done = proxy_dir(config, iteration)
    accelerator = make_accelerator(config.train)
    if (done / PROXY_MARKER).exists():
        proxy = load_proxy(done, spec=spec)
        check_same_tokenizer(student, proxy)
        return proxy
    earlier = latest_proxy_dir(config.run_dir / "proxy", up_to=iteration - 1)
    proxy = load_proxy(earlier, spec=spec) if earlier is not None else build_proxy_model(spec, student, seed=config.run.seed + 1)
    check_same_tokenizer(student, proxy)
    _set_threads(config)

    def log_metric(name: str, value: float, step: int) -> None:
        store.append_now("metrics", [{"iteration": iteration, "name": name, "value": value, "step": step}])

    stages = train_proxy(proxy, examples, config.train, seed=config.run.seed + iteration, iteration=iteration,
                         student=student, accelerator=accelerator, log_metric=log_metric,
                         progress=progress and accelerator.is_main_process)
    if accelerator.is_main_process:
        save_proxy(proxy, done, iteration=iteration)
        store.append_now("proxy_stages", [{**s.row(), "checkpoint": str(done)} for s in stages])
    accelerator.wait_for_everyone()  # the saved proxy is there for every process
    return proxy


def _set_threads(config: RunConfig) -> None:
    if config.train.cpu_threads is not None and not torch.cuda.is_available():
        torch.set_num_threads(config.train.cpu_threads)


def train_iteration(config: RunConfig, store: RowSink, student: Student, examples: list[TrainingExample],
                    iteration: int, *, teacher_texts: list[str] | None = None, progress: bool = True,
                    objective: str | None = None) -> TrainResult:
    """Train (continuing from the student's weights), save checkpoints/<iteration>/, record it. The
    posterior/proxy KD objectives train or load this iteration's proxy first (proxy_stage); their targets
    go to targets/<iteration>/ in shards (reused by a resumed run when their inputs did not change).
    `teacher_texts`: every stored teacher answer (posterior KD's n-gram prior; None: these examples')."""
    cfg = config.train if objective is None else config.train.model_copy(update={"objective": objective})
    _set_threads(config)
    proxy = proxy_stage(config, store, student, examples, iteration, progress=progress) if needs_proxy(config, cfg.objective) else None
    if cfg.objective == "posterior_kd" and isinstance(store, Store):  # reads provider logprobs; a job has no store
        fit = evidence_fit(store, vocab_hash(student.tokenizer))
        if fit is not None:
            print(fit, file=sys.stderr, flush=True)

    def log_metric(name: str, value: float, step: int) -> None:
        store.append_now("metrics", [{"iteration": iteration, "name": name, "value": value, "step": step}])

    result = train(student, examples, cfg, out_dir=config.run_dir / "checkpoints" / str(iteration),
                   seed=config.run.seed + iteration, proxy=proxy, teacher_corpus=teacher_texts or None,
                   log_metric=log_metric, progress=progress, targets_dir=config.run_dir / "targets" / str(iteration))
    store.append_now("train_runs", [{
        "iteration": iteration, "objective": cfg.objective, "checkpoint": str(result.checkpoint),
        "steps": result.steps, "examples": result.examples, "final_loss": result.final_loss,
        "seconds": result.seconds, "kd_examples": result.kd_examples, "evidence_used": result.evidence_used,
        "evidence_unused": result.evidence_unused}])
    return result


def launched_stage(config: RunConfig, store: Store, stage: Stage, iteration: int, examples: list[TrainingExample],
                   student: Student, *, progress: bool = True, echo=print) -> TrainResult | None:
    """The loop's proxy or train stage in train.num_processes launched processes (launch.py): the job
    written, the launcher run (exit code checked), then what its main process recorded stored here."""
    found = latest_checkpoint(store)
    job = prepare_job(config, stage, iteration, examples, teacher_corpus(store), student,
                      None if found is None else found[1], progress=progress)
    run_job(config.train, job, stage, echo=echo)
    for table, rows in job_rows(job):
        store.append_now(table, rows)
    return read_result(job) if stage == "train" else None


def train_command(config: RunConfig, *, objective: str | None, iteration: int | None, job: Path | None = None) -> str:
    """`agentkd train`: train on everything the run stored (up to --iteration) and save a checkpoint; or,
    with `job` (a folder the loop wrote, launch.py), run that job's proxy or train stage. Works alike in
    one process and under `accelerate launch` / torchrun; returns the summary line (empty off the main
    process)."""
    accelerator = make_accelerator(config.train)  # under a launcher: joins the process group
    main = accelerator.is_main_process
    store: Store | None = None
    try:
        if job is not None:
            plan, sink = TrainPlan.read(job), (JobRows(job) if main else Discard())
        else:
            found: TrainPlan | str | None = None
            if main:
                try:
                    store = _open_store(config)
                    found = _plan_from_store(config, store, objective=objective, iteration=iteration)
                except (ConfigError, StoreLockedError) as err:  # every process must hear of it, or they hang
                    found = str(err)
            [found] = broadcast_object_list([found]) if accelerator.num_processes > 1 else [found]
            if isinstance(found, str):
                raise ConfigError(found)
            assert found is not None
            plan, sink = found, (store if main else Discard())
        student = _plan_student(config, plan)
        if accelerator.num_processes > 1 and len(set(gather_object([vocab_hash(student.tokenizer)]))) > 1:
            raise ConfigError(f"{config.student.spec}: the processes built different tokenizers for a fresh student")
        if plan.stage == "proxy":
            proxy_stage(config, sink, student, plan.examples, plan.iteration, progress=plan.progress and main)
            return f"proxy for iteration {plan.iteration}: {proxy_dir(config, plan.iteration)}" if main else ""
        result = train_iteration(config, sink, student, plan.examples, plan.iteration, objective=plan.objective,
                                 teacher_texts=plan.teacher_texts, progress=plan.progress and main)
        if job is not None and main:
            write_result(job, result)
    finally:
        if store is not None:
            store.close_sync()
    if not main:
        return ""
    return (f"trained {result.examples} examples, {result.steps} steps in {result.seconds:.0f} s "
            f"(final loss {result.final_loss:.3f}, {result.tokens_per_s:,.0f} tokens/s): {result.checkpoint}")


def _open_store(config: RunConfig) -> Store:
    path = config.run_dir / "agentkd.duckdb"
    if not path.exists():
        raise ConfigError(f"{path}: no run database; run `agentkd run` or `agentkd teach` first")
    return Store(path)


def _plan_from_store(config: RunConfig, store: Store, *, objective: str | None, iteration: int | None) -> TrainPlan:
    examples = examples_from_store(store, iteration=iteration, up_to=True)
    if not examples:
        raise ConfigError(f"{store.path}: no teacher-answered instructions to train on")
    found = latest_checkpoint(store)
    last = found[0] if found is not None else 0
    return TrainPlan(stage="train", iteration=(iteration if iteration is not None else last) + 1,
                     objective=objective or config.train.objective, examples=examples,
                     teacher_texts=teacher_corpus(store),
                     student_checkpoint=None if found is None else str(found[1]),
                     tokenizer_texts=[] if found is not None else tokenizer_corpus(store))


def _plan_student(config: RunConfig, plan: TrainPlan) -> Student:
    """The plan's student: its checkpoint, or a fresh one (every process builds the same from the same
    corpus and seed; DDP starts them from the main process's weights regardless)."""
    spec = load_spec(student_spec_path(config))
    if plan.student_checkpoint is not None:
        return load_checkpoint(Path(plan.student_checkpoint), spec=spec)
    return build_student(spec, corpus=plan.tokenizer_texts, lora=config.train.lora, seed=config.run.seed)
