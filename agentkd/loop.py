"""`agentkd run`: the Lion loop (arXiv 2305.12870) with the teacher behind the gateway.

    setup         seeds -> Train Pool A(1) and Cache Pool B; the held-out set is fixed here
    for t in 1..T:
      answer      the teacher answers A(t) (and explains it, for the rationale objective)
      proxy       (posterior_kd, proxy_kd) the run's proxy trains further on A(t): proxy/<t>/
      train       the student is fine-tuned on A(t), continuing from iteration t-1's weights
      judge       student and teacher answer a budgeted sample of B(t); the referee scores both, in
                  both orders -> hard / easy / unscored
      generate    new instructions from hard and easy seeds, filtered and de-duplicated
                  -> A(t+1) := the accepted ones; B(t+1) := B(t) + them
      eval        held-out accuracy and the referee-judged capability ratio; metrics for the report

Each stage writes its rows, then a loop_state marker; a resumed run skips marked stages and re-does the
one it was in, which re-pays nothing because every answered call is served from the store.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence

from rich.console import Console

from agentkd import pools
from agentkd.budget import BudgetExhausted
from agentkd.config import RunConfig
from agentkd.dedup import InstructionIndex, instruction_id
from agentkd.roles import calls
from agentkd.session import TeacherSession, teacher_session
from agentkd.students import Student
from agentkd.train import generate_answers
from agentkd.training_run import examples_from_store, load_student, needs_proxy, proxy_stage, train_iteration
from agentkd.workpool import PoolOutcome, run_all

EXIT_OK, EXIT_BUDGET = 0, 3


def run_loop(config: RunConfig, *, show_progress: bool = True, console: Console | None = None) -> int:
    console = console or Console(stderr=True)
    try:
        summary = asyncio.run(_run(config, show_progress, console))
    except BudgetExhausted as err:
        from agentkd.loop_plan import remaining_cost

        console.print(f"[yellow]budget stop:[/yellow] {err}")
        console.print(remaining_cost(config), highlight=False)
        console.print("Everything answered so far is stored; re-run with a larger budget "
                      "(e.g. --set budget.usd=...) to continue where this run stopped.")
        return EXIT_BUDGET
    print(summary)
    return EXIT_OK


async def _run(config: RunConfig, show_progress: bool, console: Console) -> str:
    from agentkd.report import write_report

    async with teacher_session(config) as session:
        lion = Lion(config, session, console, show_progress)
        await lion.run()
        summary = lion.summary()
    write_report(config.run_dir)  # reads the database, so after the session has closed it
    return summary


class Lion:
    def __init__(self, config: RunConfig, session: TeacherSession, console: Console, show_progress: bool):
        self.config = config
        self.loop = config.loop
        self.s = session
        self.store = session.store
        self.console = console
        self.show_progress = show_progress
        self.student: Student | None = None

    async def run(self) -> None:
        done = self.store.stages_done()
        await self._stage(done, 0, "setup", self.setup)
        for t in range(1, self.loop.iterations + 1):
            await self._stage(done, t, "answer", lambda t=t: self.answer(t))
            if (0, "eval") not in done:  # baseline: the untrained student, built once answers exist
                await self._stage(done, 0, "eval", lambda: self.evaluate(0))
            if needs_proxy(self.config):
                await self._stage(done, t, "proxy", lambda t=t: self.proxy(t))
            await self._stage(done, t, "train", lambda t=t: self.train(t))
            await self._stage(done, t, "judge", lambda t=t: self.judge(t))
            await self._stage(done, t, "generate", lambda t=t: self.generate(t))
            await self._stage(done, t, "eval", lambda t=t: self.evaluate(t))

    async def _stage(self, done: set, iteration: int, stage: str, body: Callable[[], Awaitable[None]]) -> None:
        if (iteration, stage) in done:
            return
        spent = self.s.gateway.budget.settled_usd
        cap = f" / ${self.config.budget.usd:g}" if self.config.budget.usd is not None else ""
        self.console.rule(f"iteration {iteration}/{self.loop.iterations} · {stage} · ${spent:.4f}{cap}")
        await body()
        await self.store.write("loop_state", {"iteration": iteration, "stage": stage})
        done.add((iteration, stage))

    async def _each(self, items: Sequence, handle, label: str) -> PoolOutcome:
        outcome = await run_all(items, handle, gateway=self.s.gateway, label=label,
                                concurrency=self.config.limits.max_concurrency, console=self.console,
                                show_progress=self.show_progress)
        if outcome.failed:
            self.console.print(f"{label}: {len(outcome.failed)} item(s) skipped: {dict(outcome.failure_classes)}")
        return outcome

    # ---- stages ---------------------------------------------------------------------------------
    async def setup(self) -> None:
        seeds, heldout = pools.initial_items(self.config)
        await self.store.write_many("instructions", [
            {"id": i.id, "text": i.text, "source": "seed", "iteration": 1, "pool": "train"} for i in seeds])
        await self.store.write_many("instructions", [
            {"id": i.id, "text": i.text, "source": "heldout", "iteration": 0, "pool": "heldout",
             "answer": i.answer} for i in heldout])

    async def answer(self, t: int) -> None:
        """Imitation data: the teacher answers A(t); stored answers are reused, never re-bought."""
        items = pools.train_pool(self.store, t)
        rationale = self.config.train.objective == "rationale"

        async def handle(item: pools.Item) -> None:
            completion = await calls.answer(self.s.gateway, self.s.prompts, item.text)
            rows = [{"instruction_id": item.id, "actor": "teacher", "iteration": t, "text": completion.text,
                     "call_key": completion.key}]
            if rationale:
                explanation, c = await calls.explain(self.s.gateway, self.s.prompts, item.text, with_rationale=
                                                     calls.rationale_selected(item.text, self.loop.rationale_rate))
                self.store.enqueue("rationales", [{
                    "example_id": item.id, "label": explanation.label, "rationale": explanation.rationale,
                    "parsed_ok": explanation.label is not None, "reason": explanation.reason, "call_key": c.key}])
            await self.store.write_many("responses", rows)

        await self._each(items, handle, f"answer A({t})")

    def _train_examples(self, t: int):
        return examples_from_store(self.store, iteration=t, up_to=self.loop.imitate_on == "cache_pool")

    async def proxy(self, t: int) -> None:
        """posterior/proxy KD: the run's proxy trained further on this iteration's answers (proxy.py)."""
        examples = self._train_examples(t)
        if not examples:
            return
        await asyncio.to_thread(proxy_stage, self.config, self.store, self._student(), examples, t,
                                progress=self.show_progress)
        rows = self.store.query("SELECT stage, proxy_logp, student_logp FROM proxy_stages WHERE iteration = ? "
                                "ORDER BY created_at", [t])
        if rows:
            first, last = rows[0], rows[-1]
            self.console.print(f"proxy: held-out log p per token {first[1]:.3f} -> {last[1]:.3f} "
                               f"(student {last[2]:.3f}) over {len(rows) - 1} stage(s)")

    async def train(self, t: int) -> None:
        """Fine-tune on A(t) (or all of B(t)), continuing from iteration t-1 (Lion), in a worker thread."""
        examples = self._train_examples(t)
        if not examples:
            self.console.print(f"iteration {t}: no teacher-answered instructions in A({t}); training skipped")
            return
        student = self._student()
        result = await asyncio.to_thread(train_iteration, self.config, self.store, student, examples, t,
                                         progress=self.show_progress)
        self.console.print(f"trained on {result.examples} examples: {result.steps} steps in "
                           f"{result.seconds:.0f} s, final loss {result.final_loss:.3f}")

    async def judge(self, t: int) -> None:
        """Discrimination: referee scores teacher vs student on a budgeted sample of B(t), both orders."""
        sample = self._judge_sample(t)
        teacher = pools.responses(self.store, "teacher")
        sample = [i for i in sample if i.id in teacher]
        student_answers = await self._student_answers(sample, t, temperature=self.config.train.student_temperature)

        async def handle(item: pools.Item) -> None:
            pair = await calls.judge(self.s.gateway, self.s.prompts, item.text, teacher[item.id],
                                     student_answers[item.id], tau=self.loop.tau)
            judgments = [
                {"instruction_id": item.id, "iteration": t, "order": order, "teacher_score": ts,
                 "student_score": ss, "parsed_ok": j.ok, "reason": j.reason, "call_key": key}
                for order, j, ts, ss, key in (
                    ("teacher_first", pair.teacher_first, pair.teacher_first.score_a, pair.teacher_first.score_b,
                     pair.keys[0]),
                    ("student_first", pair.student_first, pair.student_first.score_b, pair.student_first.score_a,
                     pair.keys[1]))]
            self.store.enqueue("judgments", judgments)
            v = pair.verdict
            await self.store.write("verdicts", {"instruction_id": item.id, "iteration": t, "teacher_score":
                                                v.teacher_score, "student_score": v.student_score, "label": v.label,
                                                "order_disagreement": v.order_disagreement})

        await self._each(sample, handle, f"judge B({t})")
        labels = pools.verdict_labels(self.store, t)
        scored = [lbl for lbl in labels.values() if lbl != "unscored"]
        disagreements = self.store.query("SELECT avg(CAST(order_disagreement AS DOUBLE)) FROM verdicts "
                                         "WHERE iteration = ? AND label != 'unscored'", [t])[0][0]
        children = [i for i in sample if i.source == "hard" and i.iteration == t and i.id in labels]
        metrics = {
            "judged": len(labels),
            "hard_share": sum(lbl == "hard" for lbl in scored) / len(scored) if scored else None,
            "unscored_share": sum(lbl == "unscored" for lbl in labels.values()) / len(labels) if labels else None,
            "order_disagreement_rate": disagreements,
            # Lion's point: do children of hard seeds stay hard for the student?
            "hard_yield": (sum(labels[i.id] == "hard" for i in children) / len(children)) if children else None,
        }
        await self._metrics(t, metrics)

    async def generate(self, t: int) -> None:
        """New instructions: hard seeds -> same kind and difficulty; easy seeds -> rarer (Lion, 1:1)."""
        labels = pools.verdict_labels(self.store, t)
        by_id = {i.id: i for i in pools.cache_pool(self.store, t)}
        # Sorted, so the same seeds are drawn (and the same requests re-served free) on resume.
        hard = [by_id[i] for i, lbl in sorted(labels.items()) if lbl == "hard" and i in by_id]
        easy = [by_id[i] for i, lbl in sorted(labels.items()) if lbl == "easy" and i in by_id]
        rng = random.Random(self.config.run.seed * 1000 + t)
        n_hard = round(self.loop.new_per_iteration * self.loop.hard_fraction)
        draws = _draw(rng, hard or easy, n_hard, True) + _draw(rng, easy or hard, self.loop.new_per_iteration - n_hard, False)
        failures = self._failures(t) if self.loop.targeted_generation else {}

        async def handle(draw: tuple[int, pools.Item, bool]):
            j, seed, is_hard = draw
            failed_answer, comparison = failures.get(seed.id, (None, None)) if is_hard else (None, None)
            return await calls.generate(self.s.gateway, self.s.prompts, seed.text, hard=is_hard,
                                        failed_answer=failed_answer, referee_comparison=comparison,
                                        sample=t * 100_000 + j)

        outcome = await self._each(draws, handle, f"generate for A({t + 1})")
        index = InstructionIndex(threshold=self.loop.rouge_max, texts=pools.all_texts(self.store))
        rows, accepted = [], 0
        for position in sorted(outcome.results):  # draw order: deterministic acceptance on resume
            j, seed, is_hard = draws[position]
            generated, _ = outcome.results[position]
            row = {"source": "hard" if is_hard else "easy", "parent_id": seed.id, "iteration": t + 1}
            if not generated.ok:
                rows.append({**row, "id": instruction_id(str(generated.instruction or f"{seed.id}:{j}")),
                             "text": generated.instruction or "", "pool": "rejected",
                             "rejected_reason": generated.reason})
                continue
            is_new, score = index.add_if_new(generated.instruction)
            accepted += is_new
            rows.append({**row, "id": instruction_id(generated.instruction), "text": generated.instruction,
                         "pool": "train" if is_new else "rejected",
                         "rouge_nearest": None if is_new else score,  # exact only above the threshold
                         "rejected_reason": None if is_new else f"near-duplicate (ROUGE-L {score:.2f})"})
        await self.store.write_many("instructions", rows)
        await self._metrics(t, {"generated": len(draws), "accepted": accepted,
                                "pool/train": accepted, "pool/cache": len(by_id) + accepted})

    async def evaluate(self, t: int) -> None:
        """Held-out task accuracy, and the referee-judged capability ratio (Lion's metric)."""
        from agentkd.evaluate import accuracy

        items = pools.heldout(self.store)
        answers = await self._student_answers(items, t, temperature=0.0)
        metrics: dict[str, float | None] = {"accuracy": accuracy(items, answers, self.config.task.kind)}
        judged = items[: self.loop.eval_judge_sample]

        async def handle(item: pools.Item):
            teacher = await calls.answer(self.s.gateway, self.s.prompts, item.text, tag="eval")
            return await calls.judge(self.s.gateway, self.s.prompts, item.text, teacher.text, answers[item.id],
                                     tau=self.loop.tau, tag="eval")

        if judged:
            outcome = await self._each(judged, handle, f"eval referee ({t})")
            verdicts = [p.verdict for p in outcome.results.values() if p.verdict.label != "unscored"]
            teacher_sum = sum(v.teacher_score for v in verdicts)
            metrics["capability_ratio"] = (sum(v.student_score for v in verdicts) / teacher_sum
                                           if teacher_sum else None)
        metrics.update(self._spend_metrics(t))
        base = pools.metric(self.store, 0, "accuracy")
        if t > 0 and base is not None and metrics["accuracy"] is not None and metrics["accuracy"] > base:
            metrics["usd_per_accuracy_point"] = metrics["usd_cumulative"] / ((metrics["accuracy"] - base) * 100)
        await self._metrics(t, metrics)
        ratio = metrics.get("capability_ratio")
        self.console.print(f"iteration {t}: held-out accuracy {_pct(metrics['accuracy'])}, capability ratio "
                           f"{'n/a' if ratio is None else f'{ratio:.2f}'}, spent ${metrics['usd_cumulative']:.4f}")

    # ---- helpers --------------------------------------------------------------------------------
    def _student(self) -> Student:
        if self.student is None:
            self.student, _ = load_student(self.config, self.store)
        return self.student

    async def _student_answers(self, items: Sequence[pools.Item], t: int, *, temperature: float) -> dict[str, str]:
        """The student's answers for iteration t: reused from the store when a resumed stage made them."""
        stored = pools.responses(self.store, "student", t)
        missing = [i for i in items if i.id not in stored]
        if missing:
            student = self._student()
            # A rationale-trained student answers through its label task ("predict: "), as at inference.
            task = "predict" if self.config.train.objective == "rationale" else "answer"
            texts = await asyncio.to_thread(generate_answers, student, [i.text for i in missing],
                                            max_new_tokens=self.config.train.max_new_tokens,
                                            temperature=temperature, seed=self.config.run.seed + t, task=task)
            rows = [{"instruction_id": i.id, "actor": "student", "iteration": t, "text": text,
                     "checkpoint": str(t)} for i, text in zip(missing, texts, strict=True)]
            await self.store.write_many("responses", rows)
            stored.update({r["instruction_id"]: r["text"] for r in rows})
        return stored

    def _judge_sample(self, t: int) -> list[pools.Item]:
        """Budgeted sample of B(t): new items first, then previously hard ones, then the rest at random."""
        pool = pools.cache_pool(self.store, t)
        if self.loop.judge_sample == "all" or self.loop.judge_sample >= len(pool):
            return pool
        rng = random.Random(self.config.run.seed * 1000 + t)
        hard_before = pools.ever_hard(self.store, t)
        new = [i for i in pool if i.iteration == t]
        was_hard = [i for i in pool if i.iteration < t and i.id in hard_before]
        rest = [i for i in pool if i.iteration < t and i.id not in hard_before]
        for group in (new, was_hard, rest):
            rng.shuffle(group)
        return (new + was_hard + rest)[: self.loop.judge_sample]

    def _failures(self, t: int) -> dict[str, tuple[str, str | None]]:
        """For targeted generation: the student's answer and the referee's comparison, per hard item."""
        rows = self.store.query(
            "SELECT r.instruction_id, arg_max(r.text, r.created_at), arg_max(c.response_text, c.created_at) "
            "FROM responses r JOIN judgments j ON j.instruction_id = r.instruction_id AND j.iteration = r.iteration "
            "AND j.\"order\" = 'teacher_first' LEFT JOIN calls c ON c.key = j.call_key "
            "WHERE r.actor = 'student' AND r.iteration = ? GROUP BY r.instruction_id", [t])
        return {r[0]: (r[1], r[2]) for r in rows}

    def _spend_metrics(self, t: int) -> dict[str, float]:
        cumulative = pools.spend_by_role(self.store)
        if t == 0:  # the baseline runs after A(1) is answered: that spend belongs to iteration 1
            cumulative = {role: usd for role, usd in cumulative.items() if role == "eval"}
        metrics = {"usd_cumulative": sum(cumulative.values())}
        for role, usd in cumulative.items():
            before = pools.metric(self.store, t - 1, f"usd_cumulative/{role}") if t > 0 else 0.0
            metrics[f"usd_cumulative/{role}"] = usd
            metrics[f"usd/{role}"] = usd - (before or 0.0)
        spent = sum(v for k, v in metrics.items() if k.startswith("usd/"))
        hard = pools.metric(self.store, t, "hard_share")
        judged = pools.metric(self.store, t, "judged")
        accepted = pools.metric(self.store, t, "accepted")
        if hard and judged:
            metrics["usd_per_hard"] = spent / (hard * judged)
        if accepted:
            metrics["usd_per_accepted"] = spent / accepted
        return metrics

    async def _metrics(self, t: int, values: dict[str, float | None]) -> None:
        await self.store.write_many("metrics", [{"iteration": t, "name": k, "value": float(v)}
                                                for k, v in values.items() if v is not None])

    def summary(self) -> str:
        first, last = pools.metric(self.store, 0, "accuracy"), pools.metric(self.store, self.loop.iterations, "accuracy")
        ratio = pools.metric(self.store, self.loop.iterations, "capability_ratio")
        spent = sum(pools.spend_by_role(self.store).values())
        cap = f" of ${self.config.budget.usd:g}" if self.config.budget.usd is not None else ""
        return (f"{self.config.run.name}: {self.loop.iterations} iterations, held-out accuracy {_pct(first)} "
                f"(untrained) -> {_pct(last)}, capability ratio {'n/a' if ratio is None else f'{ratio:.2f}'}, "
                f"${spent:.4f} spent{cap}; report: {self.config.run_dir / 'report.md'}")


def _draw(rng: random.Random, seeds: list[pools.Item], n: int, hard: bool) -> list[tuple[int, pools.Item, bool]]:
    """n seeds drawn with replacement (Lion), each draw numbered so its request is distinct."""
    if not seeds or n <= 0:
        return []
    return [(j if hard else 50_000 + j, rng.choice(seeds), hard) for j in range(n)]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
