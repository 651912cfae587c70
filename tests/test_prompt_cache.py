"""Prompt caching priced right: cache writes in the worst case at their premium, settled cost from the
cache-read and cache-write counts the provider reports, against the sim's prefix cache over real HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agentkd.gateway.budget import Budget, Usage, cost_usd
from agentkd.config import PriceSection, SimSection, config_from_dict
from agentkd.gateway.ledger import prior_spend
from agentkd.store.writer import Store
from agentkd.teach import teach
from agentkd.teachers.sim import sim_in_thread
from agentkd.teachers.sim.world import sample_problems

ANTHROPIC_LIKE = PriceSection(input_per_mtok=3.0, output_per_mtok=15.0, cached_input_per_mtok=0.3,
                              cache_write_per_mtok=3.75)


def test_worst_case_counts_every_input_token_as_a_cache_write_when_caching_is_on():
    budget = Budget(usd=None, tokens=None, price_of=lambda model: ANTHROPIC_LIKE)
    plain, _ = budget.worst_case("m", 2000, 100)
    cached, _ = budget.worst_case("m", 2000, 100, cache_writes=True)
    assert plain == pytest.approx((2000 * 3.0 + 100 * 15.0) / 1e6)
    assert cached == pytest.approx((2000 * 3.75 + 100 * 15.0) / 1e6)
    batch, _ = budget.worst_case("m", 2000, 100, batch=True, cache_writes=True)
    assert batch == pytest.approx(cached / 2)


def test_settled_cost_prices_reads_and_writes_apart():
    usage = Usage(input_tokens=1500, output_tokens=10, cached_tokens=1000, cache_write_tokens=200)
    expected = (300 * 3.0 + 1000 * 0.3 + 200 * 3.75 + 10 * 15.0) / 1e6
    assert cost_usd(ANTHROPIC_LIKE, usage) == pytest.approx(expected)


def _long_prompt(folder: Path) -> Path:
    guide = "\n".join(f"Rule {n}: keep the unit of every quantity through each step of the sum." for n in range(150))
    path = folder / "answerer.md"
    path.write_text(f"## system\nYou answer word problems.\n{guide}\n\n## user\nSolve this:\n\n{{{{instruction}}}}\n")
    return path


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_a_long_fixed_system_prompt_is_read_from_the_cache_and_billed_less(tmp_path, provider, monkeypatch):
    monkeypatch.setenv("AGENTKD_CACHE_TEST_KEY", "sk-cache-test-0000")
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"instruction": p.text}) + "\n" for p in sample_problems(6, seed=5)))
    with sim_in_thread(SimSection()) as sim:
        config = config_from_dict({
            "run": {"name": "c", "dir": str(tmp_path / "runs")},
            "teacher": {"provider": provider, "model": "sim-teacher-1", "api_key_env": "AGENTKD_CACHE_TEST_KEY",
                        "prompt_cache": True, "base_url": sim.base_url + ("/v1" if provider == "openai" else "")},
            "roles": {"answerer": {"prompt": str(_long_prompt(tmp_path))}},
            "limits": {"max_concurrency": 1},  # one at a time: the first call writes, the rest read
            "prices": {"sim-teacher-1": ANTHROPIC_LIKE.model_dump()},
        })
        asyncio.run(teach(config, "answerer", rows, tmp_path / "out.jsonl", show_progress=False))
        stats = sim.stats()
    assert stats["cache_read_tokens"] > 0
    store = Store(config.run_dir / "agentkd.duckdb", read_only=True)
    try:
        calls = store.query_dicts("SELECT * FROM calls WHERE status = 'ok' ORDER BY created_at")
        settled = prior_spend(store).settled_usd
    finally:
        store.close_sync()
    assert sum(c["cached_tokens"] for c in calls) == stats["cache_read_tokens"]
    assert sum(c["cache_write_tokens"] for c in calls) == stats["cache_write_tokens"]
    if provider == "anthropic":  # writes only when asked (cache_control), reported on the first call
        assert calls[0]["cache_write_tokens"] > 0 and all(c["cached_tokens"] > 0 for c in calls[1:])
    for c in calls:
        usage = Usage(c["input_tokens"], c["output_tokens"], c["cached_tokens"], c["cache_write_tokens"])
        assert c["cost_usd"] == pytest.approx(cost_usd(ANTHROPIC_LIKE, usage))
    plain = sum(cost_usd(ANTHROPIC_LIKE, Usage(c["input_tokens"], c["output_tokens"])) for c in calls)
    # 5 of 6 calls read ~1,000 of their ~1,050 input tokens at 0.1x (OpenAI: in 128-token steps)
    assert settled == pytest.approx(sum(c["cost_usd"] for c in calls))
    assert settled < (0.5 if provider == "anthropic" else 0.8) * plain
