"""`agentkd run`: the Lion loop (arXiv 2305.12870) with the teacher behind the gateway.

    setup         seeds -> Train Pool A(1) and Cache Pool B; the held-out set is fixed here
    for t in 1..T:
      answer      the teacher answers A(t) (and explains it, for the rationale objective)
      proxy       (posterior_kd, proxy_kd) the run's proxy trains further on A(t): proxy/<t>/
      train       the student is fine-tuned on A(t), continuing from iteration t-1's weights
      judge       student and teacher answer a budgeted sample of B(t); the referee scores both, in
                  both orders -> hard / easy / unscored (skipped by the loop.selection = "random" baseline)
      generate    new instructions from hard and easy seeds (random: from seeds drawn uniformly from
                  B(t)), filtered and de-duplicated
                  -> A(t+1) := the accepted ones; B(t+1) := B(t) + them
      eval        held-out accuracy and the referee-judged capability ratio; metrics for the report

Each stage writes its rows, then a loop_state marker; a resumed run skips marked stages and re-does the
one it was in, which re-pays nothing because every answered call is served from the store.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

from rich.console import Console

from agentkd.lion import pools
from agentkd.gateway.budget import BudgetExhausted
from agentkd.config import RunConfig
from agentkd.lion.dedup import InstructionIndex
from agentkd.gateway.ledger import spend_text
from agentkd.lion.role_rows import GeneratedIntake, judgment_rows
from agentkd.roles import calls
from agentkd.training.proxy_check import weaker_than_student
from agentkd.lion.selection import Draw, generator_draws, judge_metrics
from agentkd.session import TeacherSession, teacher_session
from agentkd.training.students import Student
from agentkd.terminal import labelled, plain_console
from agentkd.training.train import generate_answers
from agentkd.training.run import (examples_from_store, launched_stage, load_student, needs_proxy, proxy_stage,
                                 teacher_corpus, train_iteration)
from agentkd.workpool import PoolOutcome, run_all

EXIT_OK, EXIT_BUDGET = 0, 3


def run_loop(config: RunConfig, *, show_progress: bool = True, console: Console | None = None) -> int:
    console = console or plain_console()
    try:
        summary = asyncio.run(_run(config, show_progress, console))
    except BudgetExhausted as err:
        from agentkd.lion.plan import remaining_cost

        console.print(labelled("budget stop:", "yellow", str(err)))
        console.print(remaining_cost(config), highlight=False)
        console.print("Everything answered so far is stored; re-run with a larger budget "
                      "(e.g. --set budget.usd=...) to continue where this run stopped.")
        return EXIT_BUDGET
    print(summary)
    return EXIT_OK


async def _run(config: RunConfig, show_progress: bool, console: Console) -> str:
    from agentkd.lion.report import write_report

    async with teacher_session(config, console=console) as session:
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
        spent = spend_text(self.s.gateway.budget, self.s.gateway.prior)  # the run's, against the cap
        self.console.rule(f"iteration {iteration}/{self.loop.iterations} · {stage} · {spent}")
        self.s.status.set_stage(stage, iteration)
        await body()
        await self.store.write("loop_state", {"iteration": iteration, "stage": stage})
        done.add((iteration, stage))

    async def _each(self, items: Sequence, handle, label: str) -> PoolOutcome:
        outcome = await run_all(items, handle, gateway=self.s.gateway, label=label,
                                concurrency=self.config.limits.max_concurrency, console=self.console,
                                show_progress=self.show_progress, status=self.s.status)
        if outcome.failed:
            self.console.print(f"{label}: {len(outcome.failed)} item(s) skipped: {dict(outcome.failure_classes)}")
        return outcome

    # ---- stages ---------------------------------------------------------------------------------
    async def setup(self) -> None:
        seeds, heldout = pools.initial_items(self.config)
        await self.store.write_many("instructions", [
            {"id": i.id, "text": i.text, "source": "seed", "iteration": 1, "pool": "train",
             "fields": i.fields_json()} for i in seeds])
        await self.store.write_many("instructions", [
            {"id": i.id, "text": i.text, "source": "heldout", "iteration": 0, "pool": "heldout",
             "answer": i.answer, "fields": i.fields_json()} for i in heldout])

    async def answer(self, t: int) -> None:
        """Imitation data: the teacher answers A(t); stored answers are reused, never re-bought."""
        items = pools.train_pool(self.store, t)
        rationale = self.config.train.objective == "rationale"
        if self.config.task.has_labels:
            await self._each(items, lambda item: self._label_answer(item, t, rationale), f"label A({t})")
            return

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

    async def _label_answer(self, item: pools.Item, t: int, rationale: bool) -> None:
        """A label task's teacher answer is the explainer's label (2403.15886: one zero-shot prompt, no
        answerer call): with a one-sentence reason on XR of the rows when the objective is rationale,
        the label-only prompt otherwise. A reply without a label is stored, and the item goes untrained."""
        why = rationale and calls.rationale_selected(item.text, self.loop.rationale_rate)
        explanation, c = await calls.explain(self.s.gateway, self.s.prompts, item.text, with_rationale=why,
                                             options=item.options)
        self.store.enqueue("rationales", [{
            "example_id": item.id, "label": explanation.label, "rationale": explanation.rationale,
            "parsed_ok": explanation.label is not None, "reason": explanation.reason, "call_key": c.key}])
        if explanation.label is not None:
            await self.store.write("responses", {"instruction_id": item.id, "actor": "teacher", "iteration": t,
                                                 "text": explanation.label, "call_key": c.key})

    def _train_examples(self, t: int):
        return examples_from_store(self.store, iteration=t, up_to=self.loop.imitate_on == "cache_pool")

    async def proxy(self, t: int) -> None:
        """posterior/proxy KD: the run's proxy trained further on this iteration's answers (proxy.py)."""
        examples = self._train_examples(t)
        if not examples:
            return
        if self.config.train.num_processes > 1:  # a launched subprocess of several processes
            await asyncio.to_thread(launched_stage, self.config, self.store, "proxy", t, examples, self._student(),
                                    progress=self.show_progress, echo=self.console.print)
        else:
            await asyncio.to_thread(proxy_stage, self.config, self.store, self._student(), examples, t,
                                    progress=self.show_progress)
        rows = self.store.query("SELECT stage, proxy_logp, student_logp FROM proxy_stages WHERE iteration = ? "
                                "ORDER BY created_at", [t])
        if rows:
            first, last = rows[0], rows[-1]
            self.console.print(f"proxy: held-out log p per token {first[1]:.3f} -> {last[1]:.3f} "
                               f"(student {last[2]:.3f}) over {len(rows) - 1} stage(s)")
            warning = weaker_than_student(last[1], last[2])
            if warning is not None:
                self.console.print(labelled("proxy warning:", "yellow", warning))

    async def train(self, t: int) -> None:
        """Fine-tune on A(t) (or all of B(t)), continuing from iteration t-1 (Lion), in a worker thread."""
        examples = self._train_examples(t)
        if not examples:
            self.console.print(f"iteration {t}: no teacher-answered instructions in A({t}); training skipped")
            return
        student = self._student()
        if self.config.train.num_processes > 1:  # a launched subprocess; the student is reloaded from its checkpoint
            result = await asyncio.to_thread(launched_stage, self.config, self.store, "train", t, examples, student,
                                             progress=self.show_progress, echo=self.console.print)
            self.student = None
        else:
            result = await asyncio.to_thread(train_iteration, self.config, self.store, student, examples, t,
                                             teacher_texts=teacher_corpus(self.store), progress=self.show_progress)
        self.console.print(f"trained on {result.examples} examples: {result.steps} steps in "
                           f"{result.seconds:.0f} s, final loss {result.final_loss:.3f}")

    async def judge(self, t: int) -> None:
        """Discrimination: referee scores teacher vs student on a budgeted sample of B(t), both orders.

        Random selection (the plain-expansion baseline) skips this stage: its generator uses no labels,
        so it buys no referee call outside eval and its spend is the baseline's own.
        """
        if self.loop.selection == "random":
            self.console.print(f"iteration {t}: random selection: nothing judged (no referee calls outside eval)")
            return
        sample = self._judge_sample(t)
        teacher = pools.responses(self.store, "teacher")
        sample = [i for i in sample if i.id in teacher]
        if self.config.discriminate == "label":
            await self._judge_by_label(t, sample, teacher)
            return
        student = await self._student_answers(sample, t, temperature=self.config.train.student_temperature)

        async def handle(item: pools.Item) -> None:
            pair = await calls.judge(self.s.gateway, self.s.prompts, item.text, teacher[item.id],
                                     student.judged[item.id], tau=self.loop.tau)
            judgments, verdict = judgment_rows(pair, item.id, t)
            self.store.enqueue("judgments", judgments)
            await self.store.write("verdicts", verdict)

        await self._each(sample, handle, f"judge B({t})")
        disagreements = self.store.query("SELECT avg(CAST(order_disagreement AS DOUBLE)) FROM verdicts "
                                         "WHERE iteration = ? AND label != 'unscored'", [t])[0][0]
        await self._metrics(t, judge_metrics(pools.verdict_labels(self.store, t), sample, t, disagreements))

    async def _judge_by_label(self, t: int, sample: list[pools.Item], teacher: dict[str, str]) -> None:
        """Label tasks (loop.discriminate = "label"): hard iff the student's label differs from the teacher's,
        a label that does not parse included. No referee call; what both orders would have cost is reported."""
        from agentkd.lion.evaluate import student_label

        labels = await self._student_labels(sample, t, temperature=self.config.train.student_temperature)
        rows = []
        for item in sample:
            same = student_label(labels[item.id], item, self.s.prompts.task) == teacher[item.id]
            rows.append({"instruction_id": item.id, "iteration": t, "teacher_score": 1.0,
                         "student_score": 1.0 if same else 0.0, "label": "easy" if same else "hard",
                         "order_disagreement": False})
        await self.store.write_many("verdicts", rows)
        low, high = referee_cost(self.config, self.s.prompts, sample, teacher, labels)
        metrics = judge_metrics(pools.verdict_labels(self.store, t), sample, t, None)
        await self._metrics(t, {**metrics, "referee_usd_saved": low, "referee_usd_saved_worst_case": high})
        self.console.print(f"iteration {t}: {len(sample)} items judged by label, {metrics['hard_share'] or 0:.0%} hard; "
                           f"no referee calls (2 x {len(sample)} saved: ${low:.4f} input .. ${high:.4f} worst case)")

    async def generate(self, t: int) -> None:
        """New instructions for A(t+1) from seeds of B(t) (agentkd/lion/selection.py: Lion's hard/easy, or the
        random baseline), filtered and de-duplicated against every pool instruction."""
        pool = pools.cache_pool(self.store, t)
        labels = pools.verdict_labels(self.store, t) if self.loop.selection == "lion" else {}
        draws = generator_draws(self.loop, pool, labels, random.Random(self.config.run.seed * 1000 + t))
        failures = self._failures(t) if self.loop.targeted_generation else {}

        async def handle(draw: Draw):
            failed_answer, comparison = failures.get(draw.seed.id, (None, None)) if draw.prompt == "hard" else (None, None)
            return await calls.generate(self.s.gateway, self.s.prompts, draw.seed.text, prompt=draw.prompt,
                                        failed_answer=failed_answer, referee_comparison=comparison,
                                        sample=t * 100_000 + draw.number)

        outcome = await self._each(draws, handle, f"generate for A({t + 1})")
        intake = GeneratedIntake(InstructionIndex(threshold=self.loop.rouge_max, texts=pools.all_texts(self.store)),
                                 pools.stored_instructions(self.store))
        rows = []
        for position in sorted(outcome.results):  # draw order: deterministic acceptance on resume
            draw = draws[position]
            generated, completion = outcome.results[position]
            fields = (json.dumps(generated.fields, ensure_ascii=False)
                      if generated.ok and self.s.prompts.items.structured else None)
            decision = intake.decide(generated, parent_id=draw.seed.id, source=draw.source, iteration=t + 1,
                                     call_key=completion.key, fallback_id=f"{draw.seed.id}:{t}:{draw.number}",
                                     fields=fields)
            if decision.row is not None:
                rows.append(decision.row)
        await self.store.write_many("instructions", rows)
        accepted = len(intake.accepted_ids())
        await self._metrics(t, {"generated": len(draws), "accepted": accepted,
                                "pool/train": accepted, "pool/cache": len(pool) + accepted})

    async def evaluate(self, t: int) -> None:
        """Held-out task accuracy, and the referee-judged capability ratio (Lion's metric)."""
        from agentkd.lion.evaluate import accuracy

        items = pools.heldout(self.store)
        by_label = self.config.discriminate == "label"
        if by_label:  # the held-out gold labels are the measure; no referee, so no teacher call in eval
            answers, judged = await self._student_labels(items, t, temperature=0.0), []
        else:
            student = await self._student_answers(items, t, temperature=0.0)
            answers, judged = student.labels, items[: self.loop.eval_judge_sample]
        metrics: dict[str, float | None] = {"accuracy": accuracy(items, answers, self.s.prompts.task)}

        async def handle(item: pools.Item):
            if self.config.task.has_labels:  # like the judge stage: the teacher's answer is its label
                explanation, _ = await calls.explain(self.s.gateway, self.s.prompts, item.text, with_rationale=False,
                                                     options=item.options, tag="eval")
                teacher_text = explanation.label or ""
            else:
                teacher_text = (await calls.answer(self.s.gateway, self.s.prompts, item.text, tag="eval")).text
            return await calls.judge(self.s.gateway, self.s.prompts, item.text, teacher_text, student.judged[item.id],
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

    async def _student_answers(self, items: Sequence[pools.Item], t: int, *, temperature: float) -> StudentAnswers:
        """The student's answers for iteration t: reused from the store when a resumed stage made them.

        A rationale-trained student answers through its label task ("predict: "), as at inference: that
        bare label is what held-out accuracy checks. The referee compares it with the teacher's worked
        answer, so like is judged with like: the label with the student's own explanation ("explain: ")
        in front, "<explanation> The answer is <label>." Stored as actor "student" (what the referee
        saw) and "student_label" (the label alone); other objectives answer once, stored as "student".
        """
        rationale = self.config.train.objective == "rationale"
        judged = pools.responses(self.store, "student", t)
        labels = pools.responses(self.store, "student_label", t) if rationale else judged
        missing = [i for i in items if i.id not in judged or i.id not in labels]
        if missing:
            texts = [i.text for i in missing]
            if rationale:
                label_texts = await self._decode(texts, t, temperature, "predict")
                explanations = await self._decode(texts, t, temperature, "explain")
                judged_texts = [labelled_explanation(e, lbl) for e, lbl in zip(explanations, label_texts, strict=True)]
            else:
                judged_texts = label_texts = await self._decode(texts, t, temperature, "answer")
            rows = [{"instruction_id": i.id, "actor": "student", "iteration": t, "text": text,
                     "checkpoint": str(t)} for i, text in zip(missing, judged_texts, strict=True)]
            if rationale:
                rows += [{"instruction_id": i.id, "actor": "student_label", "iteration": t, "text": text,
                          "checkpoint": str(t)} for i, text in zip(missing, label_texts, strict=True)]
            await self.store.write_many("responses", rows)
            judged.update({i.id: text for i, text in zip(missing, judged_texts, strict=True)})
            labels.update({i.id: text for i, text in zip(missing, label_texts, strict=True)})
        return StudentAnswers(judged=judged, labels=labels)

    async def _student_labels(self, items: Sequence[pools.Item], t: int, *, temperature: float) -> dict[str, str]:
        """The student's label per item (its label task for a rationale student): reused when stored."""
        actor = "student_label" if self.config.train.objective == "rationale" else "student"
        labels = pools.responses(self.store, actor, t)
        missing = [i for i in items if i.id not in labels]
        if missing:
            task = "predict" if actor == "student_label" else "answer"
            texts = await self._decode([i.text for i in missing], t, temperature, task)
            await self.store.write_many("responses", [{"instruction_id": i.id, "actor": actor, "iteration": t,
                                                       "text": text, "checkpoint": str(t)}
                                                      for i, text in zip(missing, texts, strict=True)])
            labels.update({i.id: text for i, text in zip(missing, texts, strict=True)})
        return labels

    async def _decode(self, texts: list[str], t: int, temperature: float, task: str) -> list[str]:
        return await asyncio.to_thread(generate_answers, self._student(), texts,
                                       max_new_tokens=self.config.train.max_new_tokens,
                                       temperature=temperature, seed=self.config.run.seed + t, task=task)

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
        # hard_share is over scored verdicts, so hard instructions found = hard_share * scored (not * judged).
        hard = pools.metric(self.store, t, "hard_share")
        scored = pools.metric(self.store, t, "scored")
        accepted = pools.metric(self.store, t, "accepted")
        if hard and scored:
            metrics["usd_per_hard"] = spent / (hard * scored)
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


class StudentAnswers(NamedTuple):
    judged: dict[str, str]  # instruction id -> what the referee is shown
    labels: dict[str, str]  # instruction id -> what held-out accuracy checks (the same text but for rationale)


def referee_cost(config: RunConfig, prompts, sample: Sequence[pools.Item], teacher: dict[str, str],
                 student: dict[str, str]) -> tuple[float, float]:
    """USD the referee would have cost on `sample` in both orders: input only, and with max_tokens out."""
    from agentkd.gateway.budget import Usage, cost_usd
    from agentkd.gateway.tokens import estimate_prompt

    low = high = 0.0
    for item in sample:
        for a, b in ((teacher[item.id], student[item.id]), (student[item.id], teacher[item.id])):
            request = prompts.judge(item.text, a, b)
            tokens = estimate_prompt(request.messages, request.provider).tokens
            price = config.price(request.model)
            low += cost_usd(price, Usage(tokens, 0))
            high += cost_usd(price, Usage(tokens, request.max_tokens))
    return low, high


def labelled_explanation(explanation: str, label: str) -> str:
    """A rationale student's judged answer: its explanation, then its label the way worked answers end."""
    answer = f"The answer is {label.strip().rstrip('.')}."
    reason = explanation.strip()
    return f"{reason} {answer}" if reason else answer


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
