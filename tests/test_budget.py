"""The hard budget on its own (budget.py): prices, the admission boundary and the reservation bookkeeping."""

from __future__ import annotations

import pytest

from agentkd.gateway.budget import Budget, BudgetExhausted, Reservation, Usage, cost_usd, worst_case_usd
from agentkd.config import ConfigError, PriceSection

PRICE = PriceSection(input_per_mtok=1_000.0, output_per_mtok=2_000.0)  # $0.001 per token in, $0.002 out
CACHED = PriceSection(input_per_mtok=1_000.0, output_per_mtok=2_000.0, cached_input_per_mtok=100.0)
# Anthropic-like: cache reads at 0.1x input, cache writes at a 1.25x premium, batch at half price.
PREMIUM = PriceSection(input_per_mtok=1_000.0, output_per_mtok=2_000.0, cached_input_per_mtok=100.0,
                       cache_write_per_mtok=1_250.0, batch_discount=0.5)


def budget(usd: float | None = None, tokens: int | None = None) -> Budget:
    def price_of(model: str) -> PriceSection:
        if model == "unpriced":
            raise ConfigError(f"prices.{model}: no price")
        return {"cached": CACHED, "premium": PREMIUM}.get(model, PRICE)

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


# ---- prompt caching and batch mode: the prices of reads, writes and the batch discount ------------------
def test_cache_writes_cost_their_premium_and_reads_and_writes_never_exceed_the_prompt():
    # 10 uncached, 40 read, 50 written, 10 out: $0.01 + $0.004 + $0.0625 + $0.02
    assert cost_usd(PREMIUM, Usage(100, 10, cached_tokens=40, cache_write_tokens=50)) == pytest.approx(0.0965)
    # A provider reporting 80 read and 50 written of a 100-token prompt: only the 20 left are writes.
    assert cost_usd(PREMIUM, Usage(100, 0, cached_tokens=80, cache_write_tokens=50)) == pytest.approx(0.008 + 0.025)
    # No write price configured: written tokens cost what input costs.
    assert cost_usd(CACHED, Usage(100, 0, cache_write_tokens=60)) == pytest.approx(0.1)


def test_batch_mode_halves_every_token_and_stacks_with_cache_prices():
    assert cost_usd(PREMIUM, Usage(100, 10), batch=True) == pytest.approx(0.06)
    assert cost_usd(PREMIUM, Usage(100, 10, 40, 50), batch=True) == pytest.approx(0.0965 / 2)
    assert cost_usd(PREMIUM, Usage(100, 10, 40, 50)) == pytest.approx(0.0965)  # online unless asked


def test_the_worst_case_with_caching_writes_the_whole_prompt_at_the_premium():
    assert worst_case_usd(PREMIUM, 100, 10) == pytest.approx(0.12)  # online, no caching: plain input
    assert worst_case_usd(PREMIUM, 100, 10, cache_writes=True) == pytest.approx(0.125 + 0.02)
    assert worst_case_usd(PREMIUM, 100, 10, batch=True) == pytest.approx(0.06)
    assert worst_case_usd(PREMIUM, 100, 10, batch=True, cache_writes=True) == pytest.approx(0.0725)
    # No premium (no write price, or a write price below input): the worst case is plain input.
    assert worst_case_usd(PRICE, 100, 10, cache_writes=True) == pytest.approx(0.12)
    cheap_writes = PriceSection(input_per_mtok=1_000.0, output_per_mtok=2_000.0, cache_write_per_mtok=500.0)
    assert worst_case_usd(cheap_writes, 100, 10, cache_writes=True) == pytest.approx(0.12)


def test_the_budget_reserves_the_cache_write_premium_only_for_calls_that_cache():
    b = budget()
    assert b.worst_case("premium", 100, 10) == (pytest.approx(0.12), 110)
    assert b.worst_case("premium", 100, 10, cache_writes=True) == (pytest.approx(0.145), 110)
    assert b.worst_case("premium", 100, 10, batch=True, cache_writes=True) == (pytest.approx(0.0725), 110)
    assert b.worst_case("unpriced", 10, 10) == (0.0, 20)  # tokens-only budget: no USD
    b = budget(usd=1.0)
    assert b.reserve("a", "premium", 100, 10).usd == pytest.approx(0.12)
    assert b.reserve("b", "premium", 100, 10, cache_writes=True).usd == pytest.approx(0.145)
    assert b.reserved_usd == pytest.approx(0.265)


def test_a_cap_admits_a_call_that_overshoots_by_float_rounding_only():
    # Summed prices carry rounding error: up to 1e-12 over the cap is the cap; more is over it.
    assert budget(usd=0.12).fits(0.12 + 1e-12, 0)
    assert not budget(usd=0.12).fits(0.12 + 3e-12, 0)


# ---- batch requests: held from before upload until their result settles ----------------------------------
def test_a_hold_reserves_the_batch_worst_case_and_returns_it():
    b = budget(usd=1.0, tokens=1_000)
    r = b.hold("k1", "premium", 100, 10, reservation_id="s1-b0")
    assert r == Reservation("s1-b0", "k1", "premium", pytest.approx(0.06), 110)  # half price, no caching
    c = b.hold("k2", "premium", 100, 10, reservation_id="s1-b1", cache_writes=True)
    assert (c.usd, c.tokens) == (pytest.approx(0.0725), 110)  # the write premium at the batch price
    assert (b.held_usd, b.held_tokens, b.held_calls) == (pytest.approx(0.1325), 220, 2)
    assert (b.reserved_usd, b.reserved_tokens, b.reserved_calls) == (0.0, 0, 0)  # online calls' books apart
    assert b.settled_usd == 0.0 and b.settled_tokens == 0


def test_held_requests_count_against_both_caps():
    b = budget(usd=1.0, tokens=1_000)
    b.hold("k", "m", 100, 10, reservation_id="r0")  # $0.06, 110 tokens
    assert b.fits(0.94, 890)
    assert not b.fits(0.9401, 0) and not b.fits(0.0, 891)


def test_a_hold_that_does_not_fit_holds_nothing():
    for b in (budget(usd=0.0599, tokens=1_000), budget(usd=1.0, tokens=109)):
        assert b.hold("k", "m", 100, 10, reservation_id="r0") is None
        assert (b.held_usd, b.held_tokens, b.held_calls) == (0.0, 0, 0)


def test_unhold_returns_one_request_whole_and_bills_nothing():
    b = budget(usd=1.0, tokens=1_000)
    b.hold("a", "m", 100, 10, reservation_id="r0")  # $0.06, 110 tokens
    unsent = b.hold("b", "m", 50, 10, reservation_id="r1")  # $0.035, 60 tokens
    b.hold("c", "m", 20, 5, reservation_id="r2")  # $0.015, 25 tokens
    b.unhold(unsent)
    assert (b.held_usd, b.held_tokens, b.held_calls) == (pytest.approx(0.075), 135, 2)
    assert (b.settled_usd, b.settled_tokens) == (0.0, 0)
    assert b.fits(0.925, 865) and not b.fits(0.0, 866)


def test_settle_held_bills_the_result_at_the_batch_price_or_the_whole_hold():
    b = budget(usd=1.0, tokens=1_000)
    b.restore(usd=0.5, tokens=100)
    read = b.hold("a", "premium", 100, 10, reservation_id="r0")
    lost = b.hold("b", "m", 100, 10, reservation_id="r1")
    kept = b.hold("c", "m", 20, 5, reservation_id="r2")
    assert b.settle_held(read, Usage(50, 5, cached_tokens=20, cache_write_tokens=10)) == (
        pytest.approx((0.02 + 0.002 + 0.0125 + 0.01) / 2), 55)
    assert b.settle_held(lost, None) == (pytest.approx(0.06), 110)  # billed but unreadable: all of it
    assert (b.batch_settled_usd, b.batch_settled_tokens) == (pytest.approx(0.02225 + 0.06), 165)
    assert (b.settled_usd, b.settled_tokens) == (pytest.approx(0.5 + 0.08225), 265)
    assert (b.held_usd, b.held_tokens, b.held_calls) == (pytest.approx(kept.usd), kept.tokens, 1)
    assert (b.restored_usd, b.restored_tokens) == (0.5, 100)


def test_adopting_earlier_sessions_pending_requests_moves_them_from_spent_to_held():
    b = budget(usd=10.0, tokens=10_000)
    b.restore(usd=1.0, tokens=500, run_id="s2-")  # counts the two pending requests below as spent
    mine = b.hold("k0", "m", 100, 10, reservation_id="s2-b0")  # $0.06, 110 tokens
    first = Reservation("s1-b0", "k1", "m", 0.06, 110)
    second = Reservation("s1-b1", "k2", "premium", 0.0725, 120)
    b.adopt(first)
    b.adopt(second)
    assert (b.settled_usd, b.settled_tokens) == (pytest.approx(1.0 - 0.1325), 500 - 230)
    assert (b.restored_usd, b.restored_tokens) == (pytest.approx(1.0 - 0.1325), 500 - 230)
    assert (b.held_usd, b.held_tokens, b.held_calls) == (pytest.approx(mine.usd + 0.1325), 340, 3)
    assert (b.adopted_usd, b.adopted_calls) == (pytest.approx(0.1325), 2)
    # The exposure is what it was: nothing more, nothing less, fits under the cap.
    assert b.fits(10.0 - 1.06, 10_000 - 610) and not b.fits(10.0 - 1.06 + 1e-9, 0)
    assert b.settle_held(first, Usage(50, 5)) == (pytest.approx(0.03), 55)
    assert (b.settled_usd, b.settled_tokens) == (pytest.approx(0.8675 + 0.03), 325)
    assert (b.held_usd, b.held_tokens, b.held_calls) == (pytest.approx(0.1325), 230, 2)
