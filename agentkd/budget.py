"""The hard budget: reserve the worst case before a call, settle with actual usage after.

At every moment settled + reserved <= cap: a call whose worst case (prompt estimate + max_tokens at
the model's prices) does not fit is never sent. Admission is a check-and-add with no await between,
so under asyncio it is atomic however many tasks race for the last dollars.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

from agentkd.config import ConfigError, PriceSection


_UNKNOWN = object()


class BudgetExhausted(Exception):
    """The next call could pass the cap. The run stops (exit 3) and resumes with a larger budget."""


# NamedTuples rather than frozen dataclasses: every call makes two or three of them, and a frozen
# dataclass pays an object.__setattr__ per field.
class Reservation(NamedTuple):
    id: str
    key: str
    model: str
    usd: float
    tokens: int


class Usage(NamedTuple):
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0


def cost_usd(price: PriceSection, usage: Usage) -> float:
    """USD of one call: cached input at the cached price where the provider reports it."""
    cached = min(usage.cached_tokens, usage.input_tokens)
    cached_price = price.cached_input_per_mtok if price.cached_input_per_mtok is not None else price.input_per_mtok
    return (
        (usage.input_tokens - cached) * price.input_per_mtok
        + cached * cached_price
        + usage.output_tokens * price.output_per_mtok
    ) / 1_000_000


class Budget:
    def __init__(self, *, usd: float | None, tokens: int | None, price_of: Callable[[str], PriceSection]):
        self.cap_usd = usd
        self.cap_tokens = tokens
        self._price_of = price_of
        self.settled_usd = 0.0
        self.settled_tokens = 0
        self.reserved_usd = 0.0
        self.reserved_tokens = 0
        self.reserved_calls = 0  # reservations open now: calls in flight or about to be sent
        self.restored_usd = 0.0  # what earlier sessions spent (part of settled_*)
        self.restored_tokens = 0
        self._ids = itertools.count()
        self._prices: dict[str, PriceSection | None] = {}  # looked up once per model
        self._prefix = ""

    def restore(self, *, usd: float, tokens: int, run_id: str = "") -> None:
        """Seed from the store on resume: what earlier processes spent (or may have) counts."""
        self.settled_usd = self.restored_usd = usd
        self.settled_tokens = self.restored_tokens = tokens
        self._prefix = run_id

    def worst_case(self, model: str, input_tokens: int, max_tokens: int) -> tuple[float, int]:
        return self.cost(model, Usage(input_tokens, max_tokens)), input_tokens + max_tokens

    def cost(self, model: str, usage: Usage) -> float:
        price = self._prices.get(model, _UNKNOWN)
        if price is _UNKNOWN:
            try:
                price = self._price_of(model)
            except ConfigError:
                price = None  # a tokens-only budget may use a model without a configured price
            self._prices[model] = price
        return 0.0 if price is None else cost_usd(price, usage)

    def fits(self, usd: float, tokens: int) -> bool:
        if self.cap_usd is not None and self.settled_usd + self.reserved_usd + usd > self.cap_usd + 1e-12:
            return False
        if self.cap_tokens is not None and self.settled_tokens + self.reserved_tokens + tokens > self.cap_tokens:
            return False
        return True

    def reserve(self, key: str, model: str, input_tokens: int, max_tokens: int) -> Reservation:
        usd, tokens = self.worst_case(model, input_tokens, max_tokens)
        if not self.fits(usd, tokens):
            raise BudgetExhausted(
                f"budget exhausted: spent ${self.settled_usd:.4f} and {self.settled_tokens:,} tokens, "
                f"${self.reserved_usd:.4f} reserved in flight; the next call needs up to ${usd:.4f} / "
                f"{tokens:,} tokens (caps: {self._caps()})"
            )
        self.reserved_usd += usd
        self.reserved_tokens += tokens
        self.reserved_calls += 1
        return Reservation(f"{self._prefix}{next(self._ids)}", key, model, usd, tokens)

    def settle(self, reservation: Reservation, usage: Usage | None) -> tuple[float, int]:
        """Close a reservation. usage None = ambiguous failure: charge the whole reservation."""
        self.reserved_usd -= reservation.usd
        self.reserved_tokens -= reservation.tokens
        self.reserved_calls -= 1
        if usage is None:
            usd, tokens = reservation.usd, reservation.tokens
        else:
            usd = self.cost(reservation.model, usage)
            tokens = usage.input_tokens + usage.output_tokens
        self.settled_usd += usd
        self.settled_tokens += tokens
        return usd, tokens

    def release(self, reservation: Reservation) -> None:
        """Nothing reached the provider: the reservation is returned whole."""
        self.reserved_usd -= reservation.usd
        self.reserved_tokens -= reservation.tokens
        self.reserved_calls -= 1

    def _caps(self) -> str:
        parts = []
        if self.cap_usd is not None:
            parts.append(f"${self.cap_usd:g}")
        if self.cap_tokens is not None:
            parts.append(f"{self.cap_tokens:,} tokens")
        return ", ".join(parts) or "none"
