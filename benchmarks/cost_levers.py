"""What the three cost levers buy on one labelling job: batch APIs, prompt caching, and the hard budget.

The job: `agentkd teach --role explainer` over ROWS word problems (temperature 0, so every leg gets the
same replies and token counts) with a labelling guide of ~1,300 fixed tokens in the system prompt, as
real annotation prompts have. It runs against the simulated teacher over loopback HTTP, through the
gateway, for each provider wire (OpenAI and Anthropic) in four legs: online, batch, online with prompt
caching, batch with prompt caching. Each leg is a fresh run database; its USD is the ledger's settled
spend (equal to the sum of calls.cost_usd). Prices: the sim's for OpenAI (cached reads 0.5x input, no
write premium), Anthropic's ratios for Anthropic (reads 0.1x, 5-minute writes 1.25x), both 50% in batch.
Then one batch job whose worst case is twice the cap: it must stop with its spend, and the sim's
bill, within the cap.

The sim is a stand-in: its "USD" are nominal, and the saving from caching depends on the share of the
prompt that is fixed (here ~90%). Last line: a JSON object with usd_online, usd_batch, batch_over_online
(target <= 0.51), cached_prefix_saving (per provider: the share of what the cached leg's tokens cost at
the plain input price that cache reads and writes saved; OpenAI caches long prefixes by itself, so its
plain legs are cached too), budget_overshoot_usd (target 0: settled spend and the sim's own bill against
the cap), and every leg under "providers".
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from agentkd.gateway.budget import BudgetExhausted
from agentkd.config import SimSection, config_from_dict
from agentkd.gateway.ledger import prior_spend
from agentkd.store.writer import Store
from agentkd.teach import teach
from agentkd.teachers.sim import sim_in_thread
from agentkd.teachers.sim.world import sample_problems

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
QUIET = Console(file=io.StringIO())  # batch status lines are for people; the figures are printed below
KEY_ENV = "AGENTKD_COST_LEVERS_KEY"
ANTHROPIC_LIKE = {"input_per_mtok": 3.0, "output_per_mtok": 15.0, "cached_input_per_mtok": 0.3,
                  "cache_write_per_mtok": 3.75, "batch_discount": 0.5}
SIM_LIKE = {"input_per_mtok": 0.15, "output_per_mtok": 0.60, "cached_input_per_mtok": 0.075}  # config.SIM_PRICE


def guide() -> str:
    """A fixed labelling guide (~1,300 tokens): the part of the prompt every row shares."""
    rules = []
    for n in range(1, 61):
        rules.append(f"{n}. When a problem states quantity {n} of an item, keep the unit of that item in "
                     f"every step, carry the running total forward, and check it against rule {max(1, n - 1)}.")
    return "Labelling guide. Read every rule before you label.\n" + "\n".join(rules)


def explainer_template(folder: Path) -> Path:
    builtin = (Path(__file__).resolve().parents[1] / "prompts" / "explainer.md").read_text()
    system, user = builtin.split("## user", 1)
    path = folder / "explainer_with_guide.md"
    path.write_text(f"{system.rstrip()}\n\n{guide()}\n\n## user{user}")
    return path


def config(folder: Path, name: str, provider: str, base_url: str, *, mode: str, cache: bool,
           usd: float | None = None):
    data = {
        "run": {"name": name, "dir": str(folder / "runs")},
        "teacher": {"provider": provider, "model": "sim-teacher-1", "api_key_env": KEY_ENV, "mode": mode,
                    "prompt_cache": cache, "base_url": base_url + ("/v1" if provider == "openai" else "")},
        "roles": {"explainer": {"prompt": str(explainer_template(folder))}},
        "batch": {"collect_s": 0.2, "poll_s": 0.05, "poll_max_s": 0.2},
        "limits": {"max_concurrency": 16},
        "budget": {"usd": usd},
    }
    if provider == "anthropic":
        data["prices"] = {"sim-teacher-1": ANTHROPIC_LIKE}
    return config_from_dict(data, source=f"cost_levers:{name}")


def leg(folder: Path, name: str, provider: str, base_url: str, rows: Path, *, mode: str, cache: bool,
        usd: float | None = None) -> dict:
    """One run of the job; `usd_plain` is what its tokens cost with every input token at the input price."""
    cfg = config(folder, name, provider, base_url, mode=mode, cache=cache, usd=usd)
    stopped = False
    try:
        asyncio.run(teach(cfg, "explainer", rows, folder / f"{name}.jsonl", show_progress=False,
                          console=QUIET))
    except BudgetExhausted:
        stopped = True
    store = Store(cfg.run_dir / "agentkd.duckdb", read_only=True)
    try:
        prior = prior_spend(store)
        calls_usd, answered, cached, written, input_tokens, output_tokens = store.query(
            "SELECT coalesce(sum(cost_usd), 0), count(*) FILTER (WHERE status = 'ok'), "
            "coalesce(sum(cached_tokens), 0), coalesce(sum(cache_write_tokens), 0), "
            "coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0) FROM calls")[0]
    finally:
        store.close_sync()
    price = ANTHROPIC_LIKE if provider == "anthropic" else SIM_LIKE
    plain = (input_tokens * price["input_per_mtok"] + output_tokens * price["output_per_mtok"]) / 1e6
    return {"usd": round(prior.usd, 8), "calls_usd": round(calls_usd, 8),
            "usd_plain": round(plain * (0.5 if mode == "batch" else 1.0), 8), "answered": answered,
            "cache_read_tokens": int(cached), "cache_write_tokens": int(written), "budget_stop": stopped}


def sim_billed_usd(stats: dict, provider: str) -> float:
    """What the sim's own ledger says the batch requests it answered cost (every one in batch mode here)."""
    price = ANTHROPIC_LIKE if provider == "anthropic" else SIM_LIKE
    read, written = stats["cache_read_tokens"], stats["cache_write_tokens"]
    plain_input = stats["billed_input_tokens"] - read - written
    usd = (plain_input * price["input_per_mtok"] + read * price["cached_input_per_mtok"]
           + written * price.get("cache_write_per_mtok", price["input_per_mtok"])
           + stats["billed_output_tokens"] * price["output_per_mtok"]) / 1e6
    return usd * 0.5


def main() -> None:
    os.environ[KEY_ENV] = "sk-cost-levers-0000"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = folder / "rows.jsonl"
        rows.write_text("".join(json.dumps({"instruction": p.text}) + "\n"
                                for p in sample_problems(ROWS, seed=41)))
        results: dict[str, dict] = {}
        for provider in ("openai", "anthropic"):
            legs = {}
            for name, mode, cache in (("online", "online", False), ("batch", "batch", False),
                                      ("online_cached", "online", True), ("batch_cached", "batch", True)):
                with sim_in_thread(SimSection(batch_time_scale=1e-4)) as sim:  # a cold prompt cache per leg
                    legs[name] = leg(folder, f"{provider}-{name}", provider, sim.base_url, rows, mode=mode,
                                     cache=cache)
            with sim_in_thread(SimSection(batch_time_scale=1e-4)) as sim:
                # A cap at half of what the whole job costs in batch mode: its worst case is far above it.
                cap = legs["batch"]["usd"] / 2
                capped = leg(folder, f"{provider}-capped", provider, sim.base_url, rows, mode="batch", cache=False,
                             usd=cap)
                billed = sim_billed_usd(sim.stats(), provider)
            online, cached = legs["online"], legs["online_cached"]
            results[provider] = {
                **{f"usd_{name}": value["usd"] for name, value in legs.items()},
                "batch_over_online": round(legs["batch"]["usd"] / online["usd"], 4),
                # the share of what the cached leg's tokens cost at the plain input price that caching saved
                # (OpenAI caches >= 1,024-token prefixes by itself, so its uncached legs save too)
                "cached_prefix_saving": round(1 - cached["usd"] / cached["usd_plain"], 4),
                "batch_cached_over_online_plain": round(legs["batch_cached"]["usd"] / online["usd_plain"], 4),
                "cache_read_tokens": cached["cache_read_tokens"], "cache_write_tokens": cached["cache_write_tokens"],
                "capped": {"cap_usd": round(cap, 8), "settled_usd": capped["usd"], "sim_billed_usd": round(billed, 8),
                           "answered": capped["answered"], "budget_stop": capped["budget_stop"]},
                "budget_overshoot_usd": round(max(0.0, capped["usd"] - cap, billed - cap), 10),
                "legs": legs,
            }
            r = results[provider]
            print(f"{provider}: online ${online['usd']:.5f}, batch ${legs['batch']['usd']:.5f} "
                  f"({r['batch_over_online']:.3f}x); with prompt caching online ${cached['usd']:.5f} "
                  f"({r['cached_prefix_saving']:.1%} below the plain input price), batch "
                  f"${legs['batch_cached']['usd']:.5f}; capped batch job: ${capped['usd']:.5f} settled, "
                  f"${billed:.5f} billed by the sim, cap ${cap:.5f}, {capped['answered']}/{ROWS} answered",
                  flush=True)
    main_provider = results["openai"]
    print(json.dumps({
        "rows": ROWS,
        "usd_online": main_provider["usd_online"],
        "usd_batch": main_provider["usd_batch"],
        "batch_over_online": max(r["batch_over_online"] for r in results.values()),
        "cached_prefix_saving": {p: r["cached_prefix_saving"] for p, r in results.items()},
        "budget_overshoot_usd": max(r["budget_overshoot_usd"] for r in results.values()),
        "providers": results,
    }))


if __name__ == "__main__":
    main()
