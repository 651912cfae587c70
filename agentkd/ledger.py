"""Durable spend cover: budget committed to the store in blocks, ahead of the calls that use it.

A crash must not hide spend: before a call is sent, the store must already hold a record that covers
it. Writing and awaiting one reservation row per call did that at the price of a second durable wait
per request. Instead, the gateway writes a `block` row that covers many calls at once, and a call is
sent only while this session's exposure (settled + reserved in flight) fits under the committed
blocks. A clean shutdown writes a `close` row; a session without one (kill -9, power loss) is counted
on resume at the whole of its blocks, which covers every call it had in flight.

The price: after a crash, up to one block of budget that was never billed counts as spent. A block is
sized to `max_concurrency` worst-case calls, about what the per-call scheme left charged for the calls
in flight, and is never allowed past the cap. The next block is written while half of the current one
is still unused, so calls rarely wait for it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agentkd.budget import Budget
from agentkd.store import Store

EPS = 1e-12


class SpendCover:
    def __init__(self, store: Store, budget: Budget, *, session: str, block_calls: int) -> None:
        self.store = store
        self.budget = budget
        self.session = session
        self.block_calls = max(1, block_calls)
        self.usd = 0.0  # committed blocks of this session
        self.tokens = 0
        self.blocks = 0
        self._pending: asyncio.Future | None = None
        self._amounts: dict[asyncio.Future, tuple[float, int]] = {}

    def _exposure(self) -> tuple[float, int]:
        """What this session has spent or may be spending now."""
        b = self.budget
        return (b.settled_usd + b.reserved_usd - b.restored_usd,
                b.settled_tokens + b.reserved_tokens - b.restored_tokens)

    async def cover(self, worst_usd: float, worst_tokens: int) -> None:
        """Return once the store covers everything reserved so far (the caller's reservation included)."""
        while True:
            usd, tokens = self._exposure()
            short_usd, short_tokens = usd - self.usd, tokens - self.tokens
            if short_usd <= EPS and short_tokens <= 0:
                # Covered. Write the next block early while half of this one is still unused.
                if (self._pending is None and (-short_usd < self.block_calls * worst_usd / 2
                                               or -short_tokens < self.block_calls * worst_tokens / 2)):
                    self._write_block(0.0, 0, worst_usd, worst_tokens)
                return
            if self._pending is None:
                self._write_block(max(short_usd, 0.0), max(short_tokens, 0), worst_usd, worst_tokens)
            assert self._pending is not None
            pending = self._pending
            # Applied here as well as in the done-callback: awaiting a future that is already done
            # does not yield, so a callback not yet run would leave this loop spinning.
            await asyncio.shield(pending)
            self._committed(pending)

    def _write_block(self, need_usd: float, need_tokens: int, worst_usd: float, worst_tokens: int) -> None:
        b = self.budget
        usd = max(need_usd, self.block_calls * worst_usd)
        tokens = max(need_tokens, self.block_calls * worst_tokens)
        # Never commit past the cap: after a crash the whole block counts as spent.
        if b.cap_usd is not None:
            usd = max(need_usd, min(usd, b.cap_usd - b.restored_usd - self.usd))
        if b.cap_tokens is not None:
            tokens = max(need_tokens, min(tokens, b.cap_tokens - b.restored_tokens - self.tokens))
        if usd <= EPS and tokens <= 0:
            return  # at the cap: nothing left to commit ahead
        self.blocks += 1
        row = self._row("block", usd, tokens, f"{self.session}-block{self.blocks}")
        future = self.store.submit("reservations", [row])
        self._pending = future
        self._amounts[future] = (usd, tokens)
        future.add_done_callback(self._committed)

    def _committed(self, future: asyncio.Future) -> None:
        """Count a block once its row is committed (idempotent: callback and waiter both call it)."""
        if self._pending is future:
            self._pending = None
        amounts = self._amounts.pop(future, None)
        if amounts is not None and not future.cancelled() and future.exception() is None:
            self.usd += amounts[0]
            self.tokens += amounts[1]

    async def close(self) -> None:
        """A clean end: nothing in flight, so the settled rows alone are this session's spend."""
        if self._pending is not None:
            pending = self._pending
            await asyncio.shield(pending)
            self._committed(pending)
        if self.blocks == 0 or self.budget.reserved_tokens > 0 or self.store.failure is not None:
            return
        usd, tokens = self._exposure()
        await self.store.write("reservations", self._row("close", usd, tokens, f"{self.session}-close"))

    def _row(self, event: str, usd: float, tokens: int, reservation_id: str) -> dict[str, Any]:
        return {"reservation_id": reservation_id, "key": None, "event": event, "usd": usd, "tokens": tokens,
                "session": self.session}


def spent_in_store(store: Store) -> tuple[float, int]:
    """What earlier sessions spent, or may have: settled rows, plus the blocks of a session that crashed.

    Rows without a session come from files written before blocks existed: there every reservation
    row was durable before its call, and one never settled counts at its worst case.
    """
    row = store.query(
        """
        WITH per_session AS (
            SELECT coalesce(sum(usd) FILTER (WHERE event = 'block'), 0) AS block_usd,
                   coalesce(sum(tokens) FILTER (WHERE event = 'block'), 0) AS block_tokens,
                   coalesce(sum(usd) FILTER (WHERE event = 'settle'), 0) AS settled_usd,
                   coalesce(sum(tokens) FILTER (WHERE event = 'settle'), 0) AS settled_tokens,
                   bool_or(event = 'close') AS closed
            FROM reservations WHERE session IS NOT NULL GROUP BY session),
        opened AS (SELECT reservation_id, usd, tokens FROM reservations
                   WHERE session IS NULL AND event = 'reserve'),
        closed AS (SELECT reservation_id, sum(usd) AS usd, sum(tokens) AS tokens FROM reservations
                   WHERE session IS NULL AND event IN ('settle', 'release') GROUP BY reservation_id)
        SELECT
            (SELECT coalesce(sum(CASE WHEN closed THEN settled_usd
                                      ELSE greatest(block_usd, settled_usd) END), 0) FROM per_session)
            + (SELECT coalesce(sum(coalesce(c.usd, o.usd)), 0) FROM opened o LEFT JOIN closed c USING (reservation_id)),
            (SELECT coalesce(sum(CASE WHEN closed THEN settled_tokens
                                      ELSE greatest(block_tokens, settled_tokens) END), 0) FROM per_session)
            + (SELECT coalesce(sum(coalesce(c.tokens, o.tokens)), 0) FROM opened o
               LEFT JOIN closed c USING (reservation_id))
        """
    )[0]
    return float(row[0]), int(row[1])
