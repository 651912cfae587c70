"""`agentkd estimate`: what a `teach` run would send and cost, computed locally; nothing is sent.

Input tokens are estimated per request exactly as the gateway reserves them; output is bounded by each
role's max_tokens, so the USD figure is a range: input only .. worst case (what the budget reserves).
Requests already answered in the run's database cost nothing and are counted apart, and what the
run has already spent (settled, and what an interrupted session may have been billed) is shown against
the cap, which is cumulative over the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from agentkd.gateway.budget import Budget, Usage, cost_usd, worst_case_usd
from agentkd.config import ConfigError, RoleOverride, RunConfig
from agentkd.gateway.ledger import PriorSpend, prior_spend, spend_text
from agentkd.roles.requests import RolePrompts
from agentkd.roles.template import builtin_prompts_dir
from agentkd.store.writer import Store
from agentkd.roles.calls import rationale_selected
from agentkd.roles.inputs import check_rationale_rate, read_role_rows, row_options
from agentkd.teach import generator_prompt
from agentkd.teachers.base import TeacherRequest
from agentkd.gateway.tokens import estimate_prompt


def requests_for(prompts: RolePrompts, role: str, row: dict, rationale_rate: float,
                 mode: str = "hard") -> list[TeacherRequest]:
    text = row["instruction"]
    if role == "answerer":
        return [prompts.answer(text)]
    if role == "explainer":
        gold = row.get("label") if isinstance(row.get("label"), str) else None
        if gold is not None:
            return [prompts.explain_given_label(text, gold)]
        return [prompts.explain(text, with_rationale=rationale_selected(text, rationale_rate),
                                options=row_options(row, prompts.task.kind))]
    if role == "referee":  # both orders; a re-ask after an unparseable judgment is not counted
        return [prompts.judge(text, row["teacher_answer"], row["student_answer"]),
                prompts.judge(text, row["student_answer"], row["teacher_answer"])]
    return [prompts.generate(text, prompt=generator_prompt(row, mode))]


def estimate(config: RunConfig, *, role: str, input_path: Path | None, rationale_rate: float,
             mode: str = "hard") -> str:
    check_rationale_rate(rationale_rate)
    if input_path is None:
        return "\n".join([_loop_estimate(config), *_budget_lines(config, _stored(config)[1], None)])
    prompts = RolePrompts(config)
    rows = read_role_rows(input_path, role, rationale_rate=rationale_rate, task=config.task)  # what teach accepts
    stored, prior = _stored(config)
    calls = cached = input_tokens = max_output = 0
    costs = CostColumns()
    estimators = set()
    cache_seen: set[tuple[str, str, str]] = set()  # prefixes a provider's cache would hold by now
    for row in rows:
        for request in requests_for(prompts, role, row, rationale_rate, mode):
            if request.key in stored:
                cached += 1
                continue
            estimate_ = estimate_prompt(request.messages, request.provider)
            estimators.add(estimate_.estimator)
            calls += 1
            input_tokens += estimate_.tokens
            max_output += request.max_tokens
            costs.add(config.price(request.model), request, estimate_.tokens, cache_seen)
    worst = costs.batch_high if config.role(role).mode == "batch" else costs.online_high
    lines = [
        f"estimate for `agentkd teach --role {role}` over {len(rows)} rows of {input_path} (nothing sent):",
        f"  calls to send:        {calls:,}   (already stored, free: {cached:,})",
        f"  input tokens:         {input_tokens:,}   (estimator: {', '.join(sorted(estimators)) or '-'})",
        f"  output tokens:        at most {max_output:,}",
        *costs.lines(config.role(role).mode),
    ]
    return "\n".join([*lines, *_budget_lines(config, prior, worst)])


CACHE_MIN_TOKENS = 1024  # the shortest prefix OpenAI caches; Anthropic's minimum is 1,024-4,096 by model


class CostColumns:
    """USD of the same requests online, in batch mode, and with the system prompt read from the provider's
    prefix cache after its first use (what teacher.prompt_cache buys; OpenAI caches by itself): input
    only .. worst case each. A prefix counts as cached only from CACHE_MIN_TOKENS tokens."""

    def __init__(self) -> None:
        self.online_low = self.online_high = self.batch_low = self.batch_high = 0.0
        self.cached_low = self.cached_high = self.cached_batch_low = 0.0

    def add(self, price, request: TeacherRequest, tokens: int, seen: set[tuple[str, str, str]]) -> None:
        self.online_low += cost_usd(price, Usage(tokens, 0))
        self.online_high += worst_case_usd(price, tokens, request.max_tokens, cache_writes=request.prompt_cache)
        self.batch_low += cost_usd(price, Usage(tokens, 0), batch=True)
        self.batch_high += worst_case_usd(price, tokens, request.max_tokens, batch=True,
                                          cache_writes=request.prompt_cache)
        system = tuple(m for m in request.messages if m["role"] == "system")
        prefix = estimate_prompt(system, request.provider).tokens if system else 0
        read = written = 0
        if prefix >= CACHE_MIN_TOKENS:
            entry = (request.provider, request.model, system[0]["content"])
            if entry in seen:
                read = prefix
            elif request.provider == "anthropic":
                written = prefix
            seen.add(entry)
        self.cached_low += cost_usd(price, Usage(tokens, 0, read, written))
        self.cached_high += cost_usd(price, Usage(tokens, request.max_tokens, read, written))
        self.cached_batch_low += cost_usd(price, Usage(tokens, 0, read, written), batch=True)

    def lines(self, mode: str) -> list[str]:
        reserved = ", what the budget reserves"
        return [
            f"  USD online:           ${self.online_low:.4f} (input) .. ${self.online_high:.4f} (worst case"
            f"{reserved if mode == 'online' else ''})",
            f"  USD batch:            ${self.batch_low:.4f} .. ${self.batch_high:.4f}"
            f"{' (' + reserved[2:] + ')' if mode == 'batch' else ''}",
            f"  USD cached prefix:    ${self.cached_low:.4f} .. ${self.cached_high:.4f} online, from "
            f"${self.cached_batch_low:.4f} in batch (system prompts of {CACHE_MIN_TOKENS:,}+ tokens read from "
            f"the cache after their first call)",
        ]


def _budget_lines(config: RunConfig, prior: PriorSpend, worst_usd: float | None) -> list[str]:
    """The run's spend so far against the cap, and whether `worst_usd` more fits in what is left."""
    budget = Budget(usd=config.budget.usd, tokens=config.budget.tokens, price_of=config.price)
    budget.restore(usd=prior.usd, tokens=prior.tokens)
    lines = []
    if prior.usd > 0 or prior.interrupted:
        lines.append(f"  run so far:           {spend_text(budget, prior)}")
    if config.budget.usd is not None and worst_usd is not None:
        left = max(config.budget.usd - prior.usd, 0.0)
        verdict = "fits" if worst_usd <= left + 1e-12 else "may not fit"
        room = f" (${left:.4f} left)" if prior.usd > 0 else ""
        lines.append(f"  budget:               ${config.budget.usd:g}{room}: the worst case {verdict}")
    return lines


EXPLAINER_PROMPT_FILES = {"zero_shot": "explainer.md", "six_shot": "explainer_6shot.md"}


def explainer_prompt_tokens(config: RunConfig, instructions: Sequence[str], *, sample: int = 200) -> dict[str, float]:
    """Mean input tokens per row of the shipped zero-shot explainer prompt (prompts/explainer.md, what
    2403.15886 sends) and of the same prompt with six worked examples (prompts/explainer_6shot.md).

    Both are rendered by RolePrompts for this config's task and explainer provider and counted by the
    estimator the gateway reserves with, over the first `sample` instructions; the token saving of
    zero-shot labelling is their difference, measured, not assumed.
    """
    rows = list(instructions)[:sample]
    if not rows:
        raise ConfigError("explainer prompt tokens: no instructions to render")
    tokens = {}
    for name, file in EXPLAINER_PROMPT_FILES.items():
        prompts = RolePrompts(_with_explainer_prompt(config, builtin_prompts_dir() / file))
        requests = [prompts.explain(text) for text in rows]
        tokens[name] = sum(estimate_prompt(r.messages, r.provider).tokens for r in requests) / len(requests)
    return tokens


def _with_explainer_prompt(config: RunConfig, path: Path) -> RunConfig:
    """config with `[roles.explainer] prompt = path`, the explainer's other settings kept."""
    override = config.roles.get("explainer", RoleOverride())
    roles = {**config.roles, "explainer": override.model_copy(update={"prompt": str(path)})}
    return config.model_copy(update={"roles": roles})


def _stored(config: RunConfig) -> tuple[set[str], PriorSpend]:
    """Request keys already answered in the run's database, and what the run has spent so far."""
    path = config.run_dir / "agentkd.duckdb"
    if not path.exists():
        return set(), PriorSpend()
    store = Store(path, read_only=True)
    try:
        return store.ok_call_keys(), prior_spend(store)
    finally:
        store.close_sync()


def _loop_estimate(config: RunConfig) -> str:
    from agentkd.lion.plan import plan_calls

    return plan_calls(config)
