"""What a loop will ask of the teacher, before or during a run: calls and USD per role, nothing sent.

Input tokens per call come from the run's own stored calls when there are some (the best predictor),
else from one rendered prompt per role; output is bounded by each role's max_tokens, so USD is a range.
"""

from __future__ import annotations

from agentkd.gateway.budget import Usage, cost_usd
from agentkd.config import RunConfig
from agentkd.roles.requests import RolePrompts
from agentkd.store.writer import Store
from agentkd.gateway.tokens import estimate_prompt

SAMPLE_TEXT = "Ann has 12 apples. Ann gets 7 more apples. How many apples does Ann have now?"


def calls_per_iteration(config: RunConfig, iteration: int) -> dict[str, int]:
    """Calls per role in one iteration, at most. Random selection judges nothing: no referee calls
    outside eval (eval's answerer + two referee orders per judged held-out item are booked as "eval")."""
    loop = config.loop
    train_pool = loop.seed_count if iteration == 1 else loop.new_per_iteration  # at most: not all are accepted
    cache_pool = loop.seed_count + (iteration - 1) * loop.new_per_iteration
    judged = cache_pool if loop.judge_sample == "all" else min(loop.judge_sample, cache_pool)
    if config.task.has_labels:  # the explainer's label is the teacher's answer (2403.15886)
        calls = {"explainer": train_pool, "generator": loop.new_per_iteration}
    else:
        calls = {"answerer": train_pool, "generator": loop.new_per_iteration}
        if config.train.objective == "rationale":
            calls["explainer"] = train_pool
    if config.discriminate == "referee":  # label discrimination calls no referee, in judge or eval
        calls["eval"] = 3 * loop.eval_judge_sample
        if loop.selection == "lion":
            calls["referee"] = 2 * judged
    return calls


def _per_call(config: RunConfig, store: Store | None) -> dict[str, tuple[float, int, int, str]]:
    """role -> (input tokens per call, max output tokens, model, source of the figure)."""
    prompts = RolePrompts(config)
    rendered = {
        "answerer": prompts.answer(SAMPLE_TEXT), "referee": prompts.judge(SAMPLE_TEXT, "x " * 30, "y " * 30),
        "generator": prompts.generate(SAMPLE_TEXT, prompt="hard" if config.loop.selection == "lion" else "plain"),
        "explainer": prompts.explain(SAMPLE_TEXT),
        "eval": prompts.judge(SAMPLE_TEXT, "x " * 30, "y " * 30),
    }
    stored: dict[str, float] = {}
    if store is not None:
        stored = {r[0]: float(r[1]) for r in store.query(
            "SELECT role, avg(input_tokens) FROM calls WHERE status = 'ok' GROUP BY role")}
    out = {}
    for role, request in rendered.items():
        tokens = stored.get(role) or estimate_prompt(request.messages, request.provider).tokens
        out[role] = (tokens, request.max_tokens, request.model, "stored calls" if role in stored else "estimate")
    return out


def _table(config: RunConfig, iterations: range, store: Store | None) -> tuple[list[str], float, float]:
    per_call = _per_call(config, store)
    totals: dict[str, int] = {}
    for t in iterations:
        for role, n in calls_per_iteration(config, t).items():
            totals[role] = totals.get(role, 0) + n
    lines, low, high = [], 0.0, 0.0
    for role, n in sorted(totals.items()):
        tokens, max_out, model, source = per_call[role]
        price = config.price(model)
        lo = n * cost_usd(price, Usage(int(tokens), 0))
        hi = n * cost_usd(price, Usage(int(tokens), max_out))
        low, high = low + lo, high + hi
        lines.append(f"  {role:<10} {n:>7,} calls  ~{tokens:,.0f} input tokens each ({source})  ${lo:.4f} .. ${hi:.4f}")
    return lines, low, high


def plan_calls(config: RunConfig) -> str:
    lines, low, high = _table(config, range(1, config.loop.iterations + 1), None)
    head = f"estimate for `agentkd run` ({config.loop.iterations} iterations, at most; nothing sent):"
    return "\n".join([head, *lines, f"  total      ${low:.4f} (input) .. ${high:.4f} (worst case)"])


def remaining_cost(config: RunConfig) -> str:
    """After a budget stop: what the rest of the loop would cost (from what this run's calls cost)."""
    path = config.run_dir / "agentkd.duckdb"
    store = Store(path, read_only=True) if path.exists() else None
    try:
        done = store.stages_done() if store is not None else set()
        spent = store.query("SELECT coalesce(sum(cost_usd), 0) FROM calls")[0][0] if store is not None else 0.0
        finished = [t for t in range(1, config.loop.iterations + 1) if (t, "eval") in done]
        remaining = range((max(finished) if finished else 0) + 1, config.loop.iterations + 1)
        lines, low, high = _table(config, remaining, store)
    finally:
        if store is not None:
            store.close_sync()
    return "\n".join([f"done: {len(finished)} of {config.loop.iterations} iterations complete, ${spent:.4f} spent; "
                      f"the rest would cost about:", *lines,
                      f"  total      ${low:.4f} .. ${high:.4f} more (worst case is what the budget must cover)"])
