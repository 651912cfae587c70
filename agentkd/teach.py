"""`agentkd teach`: one role over a JSONL dataset through the gateway, resumable, with live cost.

Every answered call is in the run's DuckDB file, so a re-run (after Ctrl-C, a crash or a budget stop)
pays nothing for rows already answered and writes the full output again. While it runs, the output
file gains each row as it is answered (written before the store commits anything queued after it, so
kill -9 leaves at least the rows whose results the store holds); at the end it is rewritten in input
order.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from agentkd.config import RunConfig
from agentkd.datasets import JsonlAppender, write_jsonl
from agentkd.lion import pools
from agentkd.lion.dedup import InstructionIndex, instruction_id
from agentkd.gateway.ledger import spend_text
from agentkd.lion.role_rows import GeneratedIntake, judgment_rows
from agentkd.roles import calls
from agentkd.roles.inputs import read_role_rows, row_options
from agentkd.roles.calls import rationale_selected
from agentkd.session import TeacherSession, teacher_session
from agentkd.terminal import plain_console
from agentkd.workpool import PoolOutcome, run_all

TEACH_JUDGED_ITERATION = 0  # teach's judgments and verdicts: the student judged is not one of this run's


@dataclass
class TeachSummary:
    role: str
    total: int
    done: int = 0
    failed: Counter = field(default_factory=Counter)
    parse_failures: int = 0
    deferred: int = 0
    usd: float = 0.0  # what this session settled
    run_spend: str = ""  # the run's cumulative spend against the cap (ledger.spend_text)
    resumed: bool = False  # earlier sessions of the run had spent something
    input_tokens: int = 0
    output_tokens: int = 0
    cache_hits: int = 0
    rate_limited: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        spend = f"${self.usd:.4f} this session; run: {self.run_spend}" if self.resumed else self.run_spend
        failed = sum(self.failed.values())
        classes = f" ({', '.join(f'{k}: {v}' for k, v in self.failed.items())})" if failed else ""
        rps = (self.done + failed) / self.seconds if self.seconds else 0.0
        return (f"{self.role}: {self.done}/{self.total} done, {failed} failed{classes}, "
                f"{self.parse_failures} parse failures, {self.deferred} deferred | {spend} | "
                f"{self.input_tokens:,} in + {self.output_tokens:,} out tokens | {rps:.1f} rows/s | "
                f"429s: {self.rate_limited} | answered from the store: {self.cache_hits}")


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def generator_prompt(row: dict[str, Any], mode: str) -> str:
    """The generator prompt for a row: its own "mode" field ("hard" | "easy" | "plain"), else --mode."""
    chosen = row.get("mode") or mode
    return chosen if chosen in ("easy", "plain") else "hard"


def _handlers(session: TeacherSession, summary: TeachSummary, rows: list[dict[str, Any]], *,
              rationale_rate: float, mode: str, tau: float) -> Handler:
    gateway, prompts = session.gateway, session.prompts
    role = summary.role

    def account(*completions) -> None:
        for c in completions:
            if not c.from_cache:
                summary.input_tokens += c.input_tokens
                summary.output_tokens += c.output_tokens

    if role == "answerer":
        async def handle(row):
            c = await calls.answer(gateway, prompts, row["instruction"])
            account(c)
            # Also as training data, so `agentkd train` can learn from what teach bought.
            iid = instruction_id(row["instruction"])
            session.store.enqueue("instructions", [{"id": iid, "text": row["instruction"], "source": "seed",
                                                   "iteration": 1, "pool": "train"}])
            session.store.enqueue("responses", [{"instruction_id": iid, "actor": "teacher", "iteration": 1,
                                                "text": c.text, "call_key": c.key}])
            return {"answer": c.text, "truncated": c.truncated}
        return handle

    if role == "explainer":
        async def handle(row):
            gold = row.get("label") if isinstance(row.get("label"), str) else None
            with_rationale = gold is not None or rationale_selected(row["instruction"], rationale_rate)
            explanation, c = await calls.explain(gateway, prompts, row["instruction"], with_rationale=with_rationale,
                                                 gold_label=gold, options=row_options(row, prompts.task.kind))
            account(c)
            summary.parse_failures += explanation.label is None
            session.store.enqueue("rationales", [{
                "example_id": instruction_id(row["instruction"]), "label": explanation.label,
                "rationale": explanation.rationale, "parsed_ok": explanation.label is not None,
                "reason": explanation.reason, "call_key": c.key}])
            return {"label": explanation.label, "rationale": explanation.rationale,
                    "parsed_ok": explanation.label is not None, "parse_reason": explanation.reason}
        return handle

    if role == "referee":
        # Stored as the loop stores its judge stage, at iteration 0 (no student iteration of this run was
        # judged). A pair already stored (a re-run over the same rows) is not stored again; the verdict
        # commits before its judgments, so stored judgments mean a stored verdict.
        stored_pairs = {r[0] for r in session.store.query(
            "SELECT call_key FROM judgments WHERE iteration = 0 AND \"order\" = 'teacher_first'")}

        async def handle(row):
            pair = await calls.judge(gateway, prompts, row["instruction"], row["teacher_answer"],
                                     row["student_answer"], tau=tau)
            account(*pair.completions)
            summary.parse_failures += (not pair.teacher_first.ok) + (not pair.student_first.ok)
            if pair.keys[0] not in stored_pairs:
                stored_pairs.add(pair.keys[0])
                judgments, verdict = judgment_rows(pair, instruction_id(row["instruction"]), TEACH_JUDGED_ITERATION)
                session.store.enqueue("verdicts", [verdict])
                session.store.enqueue("judgments", judgments)
            v = pair.verdict
            return {"teacher_score": v.teacher_score, "student_score": v.student_score, "verdict": v.label,
                    "order_disagreement": v.order_disagreement, "unscored_reason": v.reason}
        return handle

    # generator: as the loop's first generate stage stores its children: the inputs are seeds (A(1)) and
    # each new instruction joins A(2), de-duplicated against the inputs, every pool instruction of the run
    # and each acceptance before it; an instruction an earlier session stored keeps its decision.
    session.store.enqueue("instructions", [{"id": instruction_id(r["instruction"]), "text": r["instruction"],
                                            "source": "seed", "iteration": 1, "pool": "train"} for r in rows])
    index = InstructionIndex(threshold=session.config.loop.rouge_max,
                             texts=[r["instruction"] for r in rows] + pools.all_texts(session.store))
    intake = GeneratedIntake(index, pools.stored_instructions(session.store))

    async def handle(row):
        prompt = generator_prompt(row, mode)
        generated, c = await calls.generate(gateway, prompts, row["instruction"], prompt=prompt)
        account(c)
        summary.parse_failures += not generated.ok
        parent = instruction_id(row["instruction"])
        fields = json.dumps(generated.fields, ensure_ascii=False) if generated.ok and prompts.items.structured else None
        decision = intake.decide(generated, parent_id=parent, source=prompt, iteration=2, call_key=c.key,
                                 fallback_id=f"{parent}:{prompt}", fields=fields)
        if decision.row is not None:
            session.store.enqueue("instructions", [decision.row])
        return {"new_instruction": generated.instruction, "accepted": decision.accepted,
                "reject_reason": decision.reason, "rouge_nearest": decision.rouge_nearest}
    return handle


async def teach(config: RunConfig, role: str, input_path: Path, output_path: Path, *,
                rationale_rate: float = 1.0, mode: str = "hard", show_progress: bool = True,
                console: Console | None = None) -> TeachSummary:
    # every line checked before any call
    rows = read_role_rows(input_path, role, rationale_rate=rationale_rate, task=config.task)
    summary = TeachSummary(role=role, total=len(rows))
    results: dict[int, dict[str, Any]] = {}
    started = time.monotonic()
    console = console or plain_console()
    async with teacher_session(config, console=console, command="teach", role=role) as session:
        session.status.set_stage("teach")
        handle = _handlers(session, summary, rows, rationale_rate=rationale_rate, mode=mode,
                           tau=config.loop.tau)
        live = JsonlAppender(output_path)
        # Before each commit: so no later store row (a row's own side rows included) is durable before it.
        session.store.before_commit.append(live.flush)

        async def answer(index: int) -> dict[str, Any]:
            added = await handle(rows[index])
            live.add({**rows[index], **added})  # no await since the handler queued its rows
            return added

        outcome: PoolOutcome = PoolOutcome()
        try:
            await run_all(range(len(rows)), answer, gateway=session.gateway, label=role, outcome=outcome,
                          concurrency=config.limits.max_concurrency, console=console,
                          show_progress=show_progress, status=session.status)
        finally:
            session.store.before_commit.remove(live.flush)
            live.close()
            summary.done = len(outcome.results)
            summary.failed = outcome.failure_classes
            summary.deferred = outcome.deferred
            results = {i: {**rows[i], **added} for i, added in outcome.results.items()}
            results.update({i: {**rows[i], "error": cls} for i, cls in outcome.failed.items()})
            summary.seconds = time.monotonic() - started
            summary.cache_hits = session.gateway.stats.cache_hits
            summary.rate_limited = session.gateway.stats.rate_limited
            budget, prior = session.gateway.budget, session.gateway.prior
            summary.usd = budget.settled_usd - budget.restored_usd
            summary.run_spend = spend_text(budget, prior)
            summary.resumed = prior.usd > 0 or prior.interrupted > 0
            # Rows in input order; rows not reached are left out and a re-run completes them.
            write_jsonl(output_path, (results[i] for i in sorted(results)))
    return summary
