"""The hard budget on its own (budget.py): prices, the admission boundary and the reservation bookkeeping."""

from __future__ import annotations

import pytest

from agentkd.gateway.budget import Budget, BudgetExhausted, Usage, cost_usd
from agentkd.config import ConfigError, PriceSection

PRICE = PriceSection(input_per_mtok=1_000.0, output_per_mtok=2_000.0)  # $0.001 per token in, $0.002 out
CACHED = PriceSection(input_per_mtok=1_000.0, output_per_mtok=2_000.0, cached_input_per_mtok=100.0)


def budget(usd: float | None = None, tokens: int | None = None) -> Budget:
    def price_of(model: str) -> PriceSection:
        if model == "unpriced":
            raise ConfigError(f"prices.{model}: no price")
        return CACHED if model == "cached" else PRICE

    return Budget(usd=usd, tokens=tokens, price_of=price_of)


def test_cost_is_per_million_tokens_with_cached_input_at_its_own_price():
    assert cost_usd(PRICE, Usage(100, 10)) == pytest.approx(0.1 + 0.02)
    assert cost_usd(CACHED, Usage(100, 10, cached_tokens=40)) == pytest.approx(0.06 + 0.004 + 0.02)
    # A provider reporting more cached than input tokens: never a negative uncached count.
    assert cost_usd(CACHED, Usage(100, 0, cached_tokens=500)) == pytest.approx(0.01)
    # No cached price configured: cached tokens cost what input costs.
    assert cost_usd(PRICE, Usage(100, 0, cached_tokens=40)) == pytest.approx(0.1)


def test_worst_case_is_the_whole_prompt_and_max_tokens():
    b = budget()
    assert b.worst_case("m", 100, 10) == (pytest.approx(0.12), 110)
    assert b.cost("cached", Usage(100, 10, 40)) == pytest.approx(0.084)


def test_a_model_without_a_price_costs_nothing_in_usd_and_is_looked_up_once():
    looked_up = []

    def price_of(model: str) -> PriceSection:
        looked_up.append(model)
        raise ConfigError("no price")

    b = Budget(usd=None, tokens=1000, price_of=price_of)
    assert b.cost("x", Usage(10, 10)) == 0.0 and b.cost("x", Usage(10, 10)) == 0.0
    assert looked_up == ["x"]
    assert b.reserve("k", "x", 10, 10).tokens == 20


@pytest.mark.parametrize("cap_usd, fits", [(0.12, True), (0.1199, False)])
def test_a_call_fits_up_to_exactly_the_usd_cap(cap_usd, fits):
    b = budget(usd=cap_usd)
    if fits:
        assert b.reserve("k", "m", 100, 10).usd == pytest.approx(0.12)
    else:
        with pytest.raises(BudgetExhausted):
            b.reserve("k", "m", 100, 10)
        assert (b.reserved_usd, b.reserved_tokens, b.reserved_calls) == (0.0, 0, 0)


@pytest.mark.parametrize("cap_tokens, fits", [(110, True), (109, False)])
def test_a_call_fits_up_to_exactly_the_token_cap(cap_tokens, fits):
    assert budget(tokens=cap_tokens).fits(0.0, 110) is fits


def test_settled_and_reserved_both_count_against_the_cap():
    b = budget(usd=1.0, tokens=1000)
    b.reserve("a", "m", 100, 10)  # 0.12 reserved
    b.settled_usd = 0.8
    assert b.fits(0.08, 0) and not b.fits(0.0801, 0)
    b.settled_usd, b.reserved_tokens = 0.0, 900
    assert b.fits(0.0, 100) and not b.fits(0.0, 101)


def test_reserve_settle_and_release_keep_the_books():
    b = budget(usd=10.0, tokens=10_000)
    b.restore(usd=1.0, tokens=100, run_id="s1-")
    a = b.reserve("ka", "m", 100, 10)
    c = b.reserve("kc", "m", 50, 10)
    assert (a.id, c.id) == ("s1-0", "s1-1") and (a.key, a.model) == ("ka", "m")
    assert (a.usd, a.tokens) == (pytest.approx(0.12), 110)
    assert b.reserved_calls == 2 and b.reserved_usd == pytest.approx(0.19) and b.reserved_tokens == 170
    assert b.settle(a, Usage(20, 5)) == (pytest.approx(0.03), 25)  # actual usage
    assert b.reserved_calls == 1 and b.reserved_usd == pytest.approx(0.07) and b.reserved_tokens == 60
    assert b.settled_usd == pytest.approx(1.03) and b.settled_tokens == 125
    assert (b.restored_usd, b.restored_tokens) == (1.0, 100)  # earlier sessions' part stays apart
    b.release(c)  # never reached the provider
    assert (b.reserved_calls, b.reserved_tokens) == (0, 0) and b.reserved_usd == pytest.approx(0.0)
    assert b.settled_usd == pytest.approx(1.03) and b.settled_tokens == 125
    d = b.reserve("kd", "m", 100, 10)
    assert d.id == "s1-2" and b.settle(d, None) == (pytest.approx(0.12), 110)  # ambiguous: all of it
    assert b.settled_usd == pytest.approx(1.15) and b.settled_tokens == 235 and b.reserved_calls == 0


def test_the_exhausted_message_says_what_was_spent_reserved_needed_and_the_caps():
    b = budget(usd=0.2, tokens=1_500)
    b.restore(usd=0.05, tokens=1_200)
    b.reserve("a", "m", 50, 10)  # $0.07, 60 tokens
    with pytest.raises(BudgetExhausted) as err:
        b.reserve("b", "m", 100, 10)
    assert str(err.value) == ("budget exhausted: spent $0.0500 and 1,200 tokens, $0.0700 reserved in flight; "
                              "the next call needs up to $0.1200 / 110 tokens (caps: $0.2, 1,500 tokens)")
    with pytest.raises(BudgetExhausted, match=r"\(caps: \$0\.1\)$"):
        budget(usd=0.1).reserve("a", "m", 100, 10)
    with pytest.raises(BudgetExhausted, match=r"\(caps: 100 tokens\)$"):
        budget(tokens=100).reserve("a", "m", 100, 10)
    assert budget()._caps() == "none"


def test_a_settled_call_is_priced_at_its_own_model():
    b = budget(usd=10.0)
    r = b.reserve("k", "cached", 100, 10)
    assert b.settle(r, Usage(100, 10, cached_tokens=40)) == (pytest.approx(0.084), 110)


def test_reservation_ids_count_up_from_the_run_prefix_which_defaults_to_none():
    b = budget(usd=10.0)
    assert b.reserve("k", "m", 1, 1).id == "0"  # never restored: no prefix
    b.restore(usd=0.0, tokens=0)
    assert [b.reserve(f"k{i}", "m", 1, 1).id for i in range(2)] == ["1", "2"]
