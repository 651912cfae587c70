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
    input_tokens: int  # every input token: cache reads and writes included
    output_tokens: int
    cached_tokens: int = 0  # cache reads
    cache_write_tokens: int = 0  # written to the provider's prompt cache (Anthropic bills a premium)


def cost_usd(price: PriceSection, usage: Usage, *, batch: bool = False) -> float:
    """USD of one call: cache reads and writes at their prices where the provider reports them; in
    batch mode every token at the batch discount (the two stack on both providers)."""
    cached = min(usage.cached_tokens, usage.input_tokens)
    written = min(usage.cache_write_tokens, usage.input_tokens - cached)
    cached_price = price.cached_input_per_mtok if price.cached_input_per_mtok is not None else price.input_per_mtok
    write_price = price.cache_write_per_mtok if price.cache_write_per_mtok is not None else price.input_per_mtok
    usd = (
        (usage.input_tokens - cached - written) * price.input_per_mtok
        + cached * cached_price
        + written * write_price
        + usage.output_tokens * price.output_per_mtok
    ) / 1_000_000
    return usd * (1.0 - price.batch_discount) if batch else usd


def worst_case_usd(price: PriceSection, input_tokens: int, max_tokens: int, *, batch: bool = False,
                   cache_writes: bool = False) -> float:
    """The most one call can cost: every output token, and with caching on every input token written
    to the cache at its premium (when that costs more than plain input)."""
    write_price = price.cache_write_per_mtok if price.cache_write_per_mtok is not None else price.input_per_mtok
    written = input_tokens if cache_writes and write_price > price.input_per_mtok else 0
    return cost_usd(price, Usage(input_tokens, max_tokens, 0, written), batch=batch)


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
        # Batch requests submitted (or about to be) and not yet settled. Apart from reserved_*: their
        # durable record is the batch tables (batches/records.py), not the session's spend cover.
        self.held_usd = 0.0
        self.held_tokens = 0
        self.held_calls = 0
        self.adopted_usd = 0.0  # pending batch requests of earlier sessions this one holds (adopt())
        self.adopted_calls = 0
        self.batch_settled_usd = 0.0  # batch results this session settled (part of settled_*)
        self.batch_settled_tokens = 0
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

    def worst_case(self, model: str, input_tokens: int, max_tokens: int, *, batch: bool = False,
                   cache_writes: bool = False) -> tuple[float, int]:
        price = self._price(model)
        usd = 0.0 if price is None else worst_case_usd(price, input_tokens, max_tokens, batch=batch,
                                                        cache_writes=cache_writes)
        return usd, input_tokens + max_tokens

    def _price(self, model: str) -> PriceSection | None:
        price = self._prices.get(model, _UNKNOWN)
        if price is _UNKNOWN:
            try:
                price = self._price_of(model)
            except ConfigError:
                price = None  # a tokens-only budget may use a model without a configured price
            self._prices[model] = price
        return price  # type: ignore[return-value]

    def cost(self, model: str, usage: Usage, *, batch: bool = False) -> float:
        price = self._price(model)
        return 0.0 if price is None else cost_usd(price, usage, batch=batch)

    def fits(self, usd: float, tokens: int) -> bool:
        if (self.cap_usd is not None
                and self.settled_usd + self.reserved_usd + self.held_usd + usd > self.cap_usd + 1e-12):
            return False
        if (self.cap_tokens is not None
                and self.settled_tokens + self.reserved_tokens + self.held_tokens + tokens > self.cap_tokens):
            return False
        return True

    # ---- batch requests: held from before their batch is uploaded until their result settles -------
    def hold(self, key: str, model: str, input_tokens: int, max_tokens: int, *, reservation_id: str,
             cache_writes: bool = False) -> Reservation | None:
        """Reserve a batch request's worst case at the batch price; None if it does not fit now."""
        usd, tokens = self.worst_case(model, input_tokens, max_tokens, batch=True, cache_writes=cache_writes)
        if not self.fits(usd, tokens):
            return None
        self.held_usd += usd
        self.held_tokens += tokens
        self.held_calls += 1
        return Reservation(reservation_id, key, model, usd, tokens)

    def adopt(self, reservation: Reservation) -> None:
        """A pending batch request of an earlier session: what restore() counted as possibly spent for
        it becomes this session's hold, to be settled when its result comes."""
        self.settled_usd -= reservation.usd
        self.restored_usd -= reservation.usd
        self.settled_tokens -= reservation.tokens
        self.restored_tokens -= reservation.tokens
        self.held_usd += reservation.usd
        self.held_tokens += reservation.tokens
        self.held_calls += 1
        self.adopted_usd += reservation.usd
        self.adopted_calls += 1

    def settle_held(self, reservation: Reservation, usage: Usage | None) -> tuple[float, int]:
        """A batch request's result: at its usage, or (None: billed but unreadable) its whole hold."""
        self.unhold(reservation)
        usd, tokens = self._charge(reservation, usage, batch=True)
        self.batch_settled_usd += usd
        self.batch_settled_tokens += tokens
        return usd, tokens

    def unhold(self, reservation: Reservation) -> None:
        """The request was not processed (expired, cancelled, errored, or never submitted): nothing billed."""
        self.held_usd -= reservation.usd
        self.held_tokens -= reservation.tokens
        self.held_calls -= 1

    def reserve(self, key: str, model: str, input_tokens: int, max_tokens: int, *,
                cache_writes: bool = False) -> Reservation:
        usd, tokens = self.worst_case(model, input_tokens, max_tokens, cache_writes=cache_writes)
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
        return self._charge(reservation, usage, batch=False)

    def release(self, reservation: Reservation) -> None:
        """Nothing reached the provider: the reservation is returned whole."""
        self.reserved_usd -= reservation.usd
        self.reserved_tokens -= reservation.tokens
        self.reserved_calls -= 1

    def _charge(self, reservation: Reservation, usage: Usage | None, *, batch: bool) -> tuple[float, int]:
        """Add a closed reservation to the settled spend: its usage priced, or (None) the whole reservation."""
        if usage is None:
            usd, tokens = reservation.usd, reservation.tokens
        else:
            usd = self.cost(reservation.model, usage, batch=batch)
            tokens = usage.input_tokens + usage.output_tokens
        self.settled_usd += usd
        self.settled_tokens += tokens
        return usd, tokens

    def _caps(self) -> str:
        parts = []
        if self.cap_usd is not None:
            parts.append(f"${self.cap_usd:g}")
        if self.cap_tokens is not None:
            parts.append(f"{self.cap_tokens:,} tokens")
        return ", ".join(parts) or "none"
