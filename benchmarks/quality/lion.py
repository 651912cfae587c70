"""Lion against random expansion at equal USD, on the rule-based sim teacher (agentkd.lion.loop.run_loop).

Both arms run the same small loop (same seeds, held-out set, student spec and per-iteration step
budget; weights kept across iterations); only loop.selection differs. A curve is held-out accuracy
against cumulative teaching USD per iteration: every role's spend except 'eval' (measurement).
The figure: the USD at which Lion's curve (interpolated linearly) first reaches random expansion's
final accuracy, over random's total USD; None when Lion never reaches it (or when random's final
accuracy is no better than an untrained student's, a target reached by doing nothing).
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from agentkd.config import RunConfig, config_from_dict
from agentkd.lion.loop import run_loop
from agentkd.lion.pools import metric
from agentkd.store.writer import Store

from .plan import STUDENT_SPEC, LabSizes


def lion_config(root: Path, sizes: LabSizes, selection: str, seed: int) -> RunConfig:
    return config_from_dict({
        "run": {"name": f"{selection}-seed{seed}", "dir": str(root), "seed": seed},
        "teacher": {"provider": "sim", "model": "sim-teacher-1"},
        "sim": {"error_rate": 0.05},
        "budget": {"usd": 5.0},
        "limits": {"max_concurrency": 64},
        "student": {"spec": str(STUDENT_SPEC)},
        "train": {"objective": "sft", "lr": sizes.student_lr, "batch_size": 32, "epochs": 10_000,
                  "max_steps": sizes.lion_steps, "cpu_threads": 1, "max_new_tokens": sizes.max_new_tokens},
        "loop": {"iterations": sizes.lion_iterations, "selection": selection, "seed_count": sizes.lion_seed_count,
                 "heldout_count": sizes.lion_heldout, "world_steps": list(sizes.world_steps),
                 "world_digits": list(sizes.world_digits), "new_per_iteration": sizes.lion_new,
                 "judge_sample": sizes.lion_judge, "imitate_on": "cache_pool", "eval_judge_sample": 0,
                 "rouge_max": 0.9},
    }, source="benchmarks/distill_quality.py")


def lion_job(work: Path, sizes: LabSizes, selection: str, seed: int) -> dict[str, Any]:
    """One arm, one seed: run the loop, then read accuracy and teaching USD per iteration from its metrics."""
    began = time.perf_counter()
    config = lion_config(work / "lion", sizes, selection, seed)
    code = run_loop(config, show_progress=False, console=Console(file=io.StringIO()))
    store = Store(config.run_dir / "agentkd.duckdb")
    try:
        curve = []
        for t in range(sizes.lion_iterations + 1):
            total = metric(store, t, "usd_cumulative") or 0.0
            curve.append({"iteration": t, "accuracy": metric(store, t, "accuracy"),
                          "usd": total - (metric(store, t, "usd_cumulative/eval") or 0.0)})
    finally:
        store.close_sync()
    return {"selection": selection, "seed": seed, "exit_code": code, "curve": curve,
            "seconds": time.perf_counter() - began}


def usd_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first USD at which the (usd, accuracy) curve reaches target, interpolated linearly."""
    if curve and curve[0][1] >= target:
        return curve[0][0]
    for (u0, a0), (u1, a1) in zip(curve, curve[1:]):
        if a1 >= target:
            return u0 + (target - a0) / (a1 - a0) * (u1 - u0)
    return None


def mean_curve(runs: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(usd, accuracy) per iteration, each the mean over the arm's seeds."""
    return [(statistics.fmean(r["curve"][t]["usd"] for r in runs),
             statistics.fmean(r["curve"][t]["accuracy"] for r in runs)) for t in range(len(runs[0]["curve"]))]


def lion_vs_random(runs: list[dict[str, Any]]) -> dict[str, Any]:
    arms = {s: [r for r in runs if r["selection"] == s] for s in ("lion", "random")}
    curves = {s: mean_curve(arms[s]) for s in arms}
    final_usd, final_acc = curves["random"][-1]
    # Only a target above where both arms start is reached by teaching; else the figure says nothing.
    learned = final_acc > max(curves["random"][0][1], curves["lion"][0][1])
    reach = usd_to_reach(curves["lion"], final_acc) if learned else None
    per_seed = {}
    for lion in arms["lion"]:
        random_run = next(r for r in arms["random"] if r["seed"] == lion["seed"])
        u, a = random_run["curve"][-1]["usd"], random_run["curve"][-1]["accuracy"]
        start = max(lion["curve"][0]["accuracy"], random_run["curve"][0]["accuracy"])
        got = usd_to_reach([(p["usd"], p["accuracy"]) for p in lion["curve"]], a) if a > start else None
        per_seed[str(lion["seed"])] = None if got is None or u <= 0 else got / u
    return {
        "curves": {s: [{"usd": u, "accuracy": a} for u, a in c] for s, c in curves.items()},
        "random_final_accuracy": final_acc, "random_usd": final_usd, "random_learned": learned,
        "lion_usd_to_reach": reach,
        "lion_usd_over_random": None if reach is None or final_usd <= 0 else reach / final_usd,
        "per_seed": per_seed,
        "runs": runs,
    }
