"""Role calls through the gateway: one async function per role, returning typed, parsed results.

Used by `agentkd teach` and by the Lion loop alike. A reply that does not parse is a result with a
reason, never an exception; only the gateway's own errors (budget, auth, a skipped call) propagate,
and UnusableReplies once a role's results are unusable past the run's fail_fast threshold.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from agentkd.gateway.core import Completion, Gateway
from agentkd.roles.explainer import Explanation, parse_explanation, parse_rationale
from agentkd.roles.items import GeneratedItem, parse_item
from agentkd.roles.referee import Judgment, Verdict, combine_orders, parse_judgment
from agentkd.roles.requests import GeneratorPrompt, RolePrompts


async def answer(gateway: Gateway, prompts: RolePrompts, instruction: str, *, tag: str | None = None) -> Completion:
    return await gateway.complete(prompts.answer(instruction, tag=tag))


def rationale_selected(text: str, rate: float) -> bool:
    """Partial rationale augmentation (XR): a stable choice per row, so a resumed run picks the same rows."""
    if rate >= 1.0:
        return True
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 2**32 < rate


async def explain(gateway: Gateway, prompts: RolePrompts, text: str, *, with_rationale: bool = True,
                  gold_label: str | None = None, options: list[str] | None = None,
                  tag: str | None = None) -> tuple[Explanation, Completion]:
    """Zero-shot label + reason; with a gold label only the reason is asked (rationalisation). A
    multiple-choice item's options go into the prompt's labels block and into the parser's synonyms."""
    task = prompts.task.with_options(options) if options else prompts.task
    if gold_label is not None:
        completion = await gateway.complete(prompts.explain_given_label(text, gold_label))
        explanation = parse_rationale(completion.text, gold_label, task)
    else:
        completion = await gateway.complete(prompts.explain(text, with_rationale=with_rationale, options=options,
                                                            tag=tag))
        explanation = parse_explanation(completion.text, task)
    _check(gateway, "explainer", explanation.ok, completion.text, explanation.reason)
    return explanation, completion


@dataclass
class JudgedPair:
    verdict: Verdict
    teacher_first: Judgment
    student_first: Judgment
    keys: tuple[str, str]
    completions: list[Completion]  # every referee call made, re-asks included


async def judge(gateway: Gateway, prompts: RolePrompts, instruction: str, teacher_answer: str,
                student_answer: str, *, tau: float, tag: str | None = None) -> JudgedPair:
    """Lion's referee in BOTH orders; an order that does not parse is asked once more, then unscored."""
    made: list[Completion] = []
    first = await _judge_once(gateway, prompts, instruction, teacher_answer, student_answer, made, tag)
    key_1 = made[-1].key
    second = await _judge_once(gateway, prompts, instruction, student_answer, teacher_answer, made, tag)
    return JudgedPair(combine_orders(first, second, tau), first, second, (key_1, made[-1].key), made)


async def _judge_once(gateway: Gateway, prompts: RolePrompts, instruction: str, answer_a: str,
                      answer_b: str, made: list[Completion], tag: str | None) -> Judgment:
    for sample in (0, 1):
        completion = await gateway.complete(prompts.judge(instruction, answer_a, answer_b, sample=sample, tag=tag))
        made.append(completion)
        judgment = parse_judgment(completion.text)
        if judgment.ok:
            break
    _check(gateway, "referee", judgment.ok, completion.text, judgment.reason)  # one result per order
    return judgment


async def generate(gateway: Gateway, prompts: RolePrompts, seed_instruction: str, *, prompt: GeneratorPrompt,
                   failed_answer: str | None = None, referee_comparison: str | None = None,
                   sample: int = 0) -> tuple[GeneratedItem, Completion]:
    """One new instruction from one seed: hard = same kind and difficulty (Lion), easy = rarer (Lion),
    plain = another of the same kind (the random-expansion baseline)."""
    request = prompts.generate(seed_instruction, prompt=prompt, failed_answer=failed_answer,
                               referee_comparison=referee_comparison, sample=sample)
    completion = await gateway.complete(request)
    generated = parse_item(completion.text, completion.finish_reason, prompts.items)
    _check(gateway, "generator", generated.ok, completion.text, generated.reason)
    return generated, completion


def _check(gateway: Gateway, role: str, usable: bool, reply: str, why: str | None) -> None:
    """Fail fast (agentkd/roles/replies.py): raises UnusableReplies once the role's results are mostly unusable."""
    if gateway.reply_check is not None:
        gateway.reply_check.record(role, usable, reply, why)
