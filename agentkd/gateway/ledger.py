"""Durable spend cover: before a call is sent, the store holds a record that covers it.

A crash must hide no spend, and should invent little. Each session keeps one figure durable, its
cover: the level (USD and tokens) its spend may have reached, settled + reserved in flight + some
unused room, written as a `cover` row. A call is sent only once a committed level covers it. The
level follows what is in flight both ways, within a band [low, high] of unused room:
  - raised to exposure + target when a reservation would pass it (that call waits for the commit),
    or ahead of need when less than `low` is left (nobody waits);
  - lowered to exposure + target when more than `high` is unused, in the same commit as the settle
    row that freed it (nobody waits: until that commit the higher level is the durable one).
A clean end writes a `close` row. On resume, a session without one counts at its last committed
level (at its settled rows, if those are more): the worst case of the calls it had in flight plus
at most `high`, whatever max_concurrency is.

Batch requests (batches/runner.py) are outside the cover. From before their batch is uploaded until
their result settles, their durable record is their `queued` row (worst case at the batch price), and
pending_batch_spend counts them; their settle rows count as settled and move no level. So what a crash
adds beyond the settled rows is the online calls in flight plus at most `high` (per session: its
level minus its online settles), and the worst case of each batch request still pending, however many
results the session had settled. A session that only settled batch results wrote no level and is not
counted as interrupted: it had nothing in flight that its rows do not name.

Per capped dimension, with w the session's largest worst case and M = max(2w, 1% of the cap) the
margin a crash may cost beyond the calls in flight: high = M - w, target = high / 2, low = high / 4.
The w left over is for the one window inherent to any record written before a send: a call whose
cover has just committed counts from that moment, a moment before its request is on the wire. A
dimension with no cap bounds nothing: target = max_concurrency x w, so its level is rewritten rarely.
Under a tight cap (M = 2w) the level is rewritten about once per call and calls often wait for one
commit; benchmarks/gateway_overhead.py --budget-usd measures what a cap near the spend costs.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, NamedTuple

from agentkd.gateway.budget import Budget
from agentkd.store.writer import Store

EPS = 1e-12
CAP_SHARE = 0.01  # of the cap: at most this (or two worst cases) counted unspent after a crash

Band = tuple[float, float, float]  # unused room: (low, target, high)


class SpendCover:
    def __init__(self, store: Store, budget: Budget, *, session: str, max_concurrency: int) -> None:
        self.store = store
        self.budget = budget
        self.session = session
        self.max_concurrency = max(1, max_concurrency)
        self.level: tuple[float, int] = (0.0, 0)  # the level written last (committed or on its way)
        self.floor: tuple[float, int] = (0.0, 0)  # the lowest level a durable state can show from now on
        self.writes = 0
        self._committed: tuple[float, int] = (0.0, 0)
        self._pending: deque[tuple[asyncio.Future, tuple[float, int]]] = deque()  # FIFO, like the writer
        self._worst: tuple[float, int] = (0.0, 0)  # the largest worst case reserved by this session
        self._bands = self.bands()  # recomputed when the largest worst case grows

    def _exposure(self) -> tuple[float, int]:
        """What this session has spent or may be spending now on online calls (batch results settle
        outside the cover: see the module docstring)."""
        b = self.budget
        return (b.settled_usd + b.reserved_usd - b.restored_usd - b.batch_settled_usd,
                b.settled_tokens + b.reserved_tokens - b.restored_tokens - b.batch_settled_tokens)

    def bands(self) -> tuple[Band, Band]:
        """The unused room a level may keep, in USD and in tokens."""
        b, (worst_usd, worst_tokens) = self.budget, self._worst
        return (_band(b.cap_usd, worst_usd, self.max_concurrency),
                _band(b.cap_tokens, worst_tokens, self.max_concurrency))

    def _wanted(self, usd: float, tokens: int) -> tuple[float, int]:
        """Exposure + target room, never past what the cap leaves online calls (never below the exposure):
        earlier sessions, this one's settled batch results and its held batch requests count apart."""
        b = self.budget
        band_usd, band_tokens = self._bands
        want_usd, want_tokens = usd + band_usd[1], tokens + int(band_tokens[1])
        if b.cap_usd is not None:
            left = b.cap_usd - b.restored_usd - b.batch_settled_usd - b.held_usd
            want_usd = max(usd, min(want_usd, left))
        if b.cap_tokens is not None:
            left_tokens = b.cap_tokens - b.restored_tokens - b.batch_settled_tokens - b.held_tokens
            want_tokens = max(tokens, min(want_tokens, left_tokens))
        return want_usd, want_tokens

    def _next_level(self, usd: float, tokens: int) -> tuple[float, int] | None:
        """The level to write now, or None while the written one leaves room inside its band."""
        (low_usd, _, high_usd), (low_tokens, _, high_tokens) = self._bands
        slack_usd, slack_tokens = self.level[0] - usd, self.level[1] - tokens
        if low_usd <= slack_usd <= high_usd + EPS and low_tokens <= slack_tokens <= high_tokens:
            return None  # the usual case: nothing to write
        want = self._wanted(usd, tokens)
        raise_ = ((slack_usd < low_usd and want[0] > self.level[0] + EPS)
                  or (slack_tokens < low_tokens and want[1] > self.level[1]))
        lower = slack_usd > high_usd + EPS or slack_tokens > high_tokens
        return want if raise_ or lower else None

    async def cover(self, worst_usd: float, worst_tokens: int) -> None:
        """Return once a committed level covers this session's exposure (the caller's reservation included)."""
        if worst_usd > self._worst[0] or worst_tokens > self._worst[1]:
            self._worst = (max(worst_usd, self._worst[0]), max(worst_tokens, self._worst[1]))
            self._bands = self.bands()
        mine = self._exposure()
        level = self._next_level(*mine)
        if level is not None:
            self._submit([], level)
        while True:
            # Covered when every durable state from now on shows at least the exposure as it was at
            # this reservation, or as it is now if calls have settled since (levels written after
            # this one are computed with this reservation in them).
            usd, tokens = self._exposure()
            if (self.floor[0] + EPS >= min(usd, mine[0])) and self.floor[1] >= min(tokens, mine[1]):
                return
            if not self._pending:  # nothing on its way covers it (a lowering raced it): write what is needed
                self._submit([], self._wanted(usd, tokens))
            pending = self._pending[-1][0]
            # Applied here as well as in the done-callback: awaiting a future that is already done
            # does not yield, so a callback not yet run would leave this loop spinning.
            await asyncio.shield(pending)
            self._on_commit(pending)

    def record(self, row: dict[str, Any]) -> None:
        """Queue an attempt's settle or release row; a level it leaves too high (or too low) is
        rewritten in the same commit, so no durable state has the settle without the new level."""
        row["in_flight"] = self.budget.reserved_calls
        level = self._next_level(*self._exposure())
        if level is None:
            self.store.enqueue("reservations", [row])
        else:
            self._submit([row], level)

    def _submit(self, rows: list[dict[str, Any]], level: tuple[float, int]) -> None:
        self.writes += 1
        rows.append(self._row("cover", level[0], level[1], f"{self.session}-cover{self.writes}",
                              in_flight=self.budget.reserved_calls))
        future = self.store.submit("reservations", rows)
        self.level = level
        self._pending.append((future, level))
        self.floor = (min(self.floor[0], level[0]), min(self.floor[1], level[1]))
        future.add_done_callback(self._on_commit)

    def _on_commit(self, future: asyncio.Future) -> None:
        """A level is durable once its row commits; commits come in FIFO order (idempotent: the
        callback and a waiter both call it)."""
        while self._pending and self._pending[0][0].done():
            done, level = self._pending.popleft()
            if not done.cancelled() and done.exception() is None:
                self._committed = level
        self.floor = self._committed
        for _, level in self._pending:
            self.floor = (min(self.floor[0], level[0]), min(self.floor[1], level[1]))

    async def close(self) -> None:
        """A clean end: nothing in flight, so the settled rows alone are this session's spend."""
        while self._pending:
            pending = self._pending[-1][0]
            await asyncio.shield(pending)
            self._on_commit(pending)
        if self.writes == 0 or self.budget.reserved_calls > 0 or self.store.failure is not None:
            return
        usd, tokens = self._exposure()
        await self.store.write("reservations", self._row("close", usd, tokens, f"{self.session}-close",
                                                         in_flight=0))

    def _row(self, event: str, usd: float, tokens: int, reservation_id: str, *,
             in_flight: int) -> dict[str, Any]:
        return {"reservation_id": reservation_id, "key": None, "event": event, "usd": usd, "tokens": tokens,
                "session": self.session, "in_flight": in_flight}


def _band(cap: float | None, worst: float, max_concurrency: int) -> Band:
    if cap is None:
        target = max_concurrency * worst
        return target / 2, target, 2 * target
    high = max(2 * worst, CAP_SHARE * cap) - worst
    return high / 4, high / 2, high


class PriorSpend(NamedTuple):
    """What earlier sessions of the run spent: settled rows, and what interrupted ones may have spent."""

    settled_usd: float = 0.0
    settled_tokens: int = 0
    unsettled_usd: float = 0.0  # counted beyond the settled rows for sessions that never closed
    unsettled_tokens: int = 0
    interrupted: int = 0  # sessions without a close row (kill -9, power loss, a failed store)
    in_flight: int | None = 0  # their calls in flight at their last ledger row; None: an older file
    # Batch requests queued in a provider batch with no result yet: their worst cases at the batch price
    # (a session that resumes the batch holds them again and settles each as its result comes).
    batch_usd: float = 0.0
    batch_tokens: int = 0
    batch_requests: int = 0

    @property
    def usd(self) -> float:
        return self.settled_usd + self.unsettled_usd + self.batch_usd

    @property
    def tokens(self) -> int:
        return self.settled_tokens + self.unsettled_tokens + self.batch_tokens

    def interruption(self) -> str:
        """e.g. "an interrupted session (3 calls in flight)"."""
        who = "an interrupted session" if self.interrupted == 1 else f"{self.interrupted} interrupted sessions"
        if self.in_flight is None:
            return f"{who} (calls in flight unknown: written by an older agentkd)"
        return f"{who} ({self.in_flight} call{'' if self.in_flight == 1 else 's'} in flight)"


def prior_spend(store: Store) -> PriorSpend:
    """Settled rows of every session, plus for a session that never closed what its last committed
    cover (or, in files from earlier versions, its blocks) allowed beyond its online settles; and the
    batch requests still pending (pending_batch_spend).

    A batch result's settle row (its reservation id is a batch custom_id) counts as settled and is no
    part of the cover. Files written while batch settles raised the cover count those settles again
    beyond it after a crash: the safe side.

    Rows without a session come from files written before blocks existed: there every reservation
    row was durable before its call, and one never settled counts at its worst case.
    """
    sessions = store.query(
        """
        WITH batch_ids AS (SELECT DISTINCT custom_id FROM batch_requests WHERE event = 'queued')
        SELECT coalesce(sum(r.usd) FILTER (WHERE r.event = 'settle'), 0),
               coalesce(sum(r.tokens) FILTER (WHERE r.event = 'settle'), 0),
               coalesce(sum(r.usd) FILTER (WHERE r.event = 'settle' AND b.custom_id IS NULL), 0),
               coalesce(sum(r.tokens) FILTER (WHERE r.event = 'settle' AND b.custom_id IS NULL), 0),
               coalesce(arg_max(r.usd, r.created_at) FILTER (WHERE r.event = 'cover'),
                        sum(r.usd) FILTER (WHERE r.event = 'block'), 0),
               coalesce(arg_max(r.tokens, r.created_at) FILTER (WHERE r.event = 'cover'),
                        sum(r.tokens) FILTER (WHERE r.event = 'block'), 0),
               bool_or(r.event = 'close'),
               bool_or(r.event = 'cover'),
               bool_or(r.event IN ('cover', 'block')),
               arg_max(r.in_flight, r.created_at) FILTER (WHERE r.in_flight IS NOT NULL)
        FROM reservations r LEFT JOIN batch_ids b ON b.custom_id = r.reservation_id
        WHERE r.session IS NOT NULL GROUP BY r.session
        """
    )
    legacy = store.query(
        """
        WITH opened AS (SELECT reservation_id, usd, tokens FROM reservations
                        WHERE session IS NULL AND event = 'reserve'),
             closed AS (SELECT reservation_id, sum(usd) AS usd, sum(tokens) AS tokens FROM reservations
                        WHERE session IS NULL AND event IN ('settle', 'release') GROUP BY reservation_id)
        SELECT coalesce(sum(c.usd), 0), coalesce(sum(c.tokens), 0),
               coalesce(sum(o.usd) FILTER (WHERE c.reservation_id IS NULL), 0),
               coalesce(sum(o.tokens) FILTER (WHERE c.reservation_id IS NULL), 0),
               count(*) FILTER (WHERE c.reservation_id IS NULL)
        FROM opened o LEFT JOIN closed c USING (reservation_id)
        """
    )[0]
    settled_usd, settled_tokens = float(legacy[0]), int(legacy[1])
    unsettled_usd, unsettled_tokens = float(legacy[2]), int(legacy[3])
    interrupted = 1 if legacy[4] else 0
    in_flight: int | None = int(legacy[4])
    batch_usd, batch_tokens, batch_requests = pending_batch_spend(store)
    for s_usd, s_tokens, o_usd, o_tokens, c_usd, c_tokens, closed, has_cover, covered, last_in_flight in sessions:
        settled_usd += float(s_usd)
        settled_tokens += int(s_tokens)
        if closed or not covered:
            continue  # closed, or batch results only: no online call of it can have been in flight
        interrupted += 1
        unsettled_usd += max(float(c_usd) - float(o_usd), 0.0)
        unsettled_tokens += max(int(c_tokens) - int(o_tokens), 0)
        if not has_cover or in_flight is None:
            in_flight = None  # a block session: nothing says how many calls it had in flight
        else:
            in_flight += int(last_in_flight or 0)
    return PriorSpend(settled_usd, settled_tokens, unsettled_usd, unsettled_tokens, interrupted, in_flight,
                      batch_usd, batch_tokens, batch_requests)


def pending_batch_spend(store: Store) -> tuple[float, int, int]:
    """Worst cases of batch requests queued and neither closed (done, requeued, failed) nor settled.

    Such a request is possibly billed: the provider may run its batch after a crash, whether or not
    agentkd comes back for it. So it counts at its worst case until a session settles its result, not
    in any session's cover: a resumed run that finds the batch holds the request again (Budget.adopt,
    shown as held, no longer as pending) and settles it at its usage, or frees it when the batch ended
    without it. Once settled it is spend like any other; its worst case no longer counts anywhere.

    A request's settle row is written before its `done` row, and its reservation id is its custom_id,
    so a crash between the two counts it once, as settled."""
    row = store.query(
        """
        SELECT coalesce(sum(q.reserved_usd), 0), coalesce(sum(q.reserved_tokens), 0), count(*)
        FROM batch_requests q
        WHERE q.event = 'queued'
          AND NOT EXISTS (SELECT 1 FROM batch_requests c WHERE c.custom_id = q.custom_id AND c.event <> 'queued')
          AND NOT EXISTS (SELECT 1 FROM reservations r WHERE r.reservation_id = q.custom_id AND r.event = 'settle')
        """
    )[0]
    return float(row[0]), int(row[1]), int(row[2])


def spent_in_store(store: Store) -> tuple[float, int]:
    """What earlier sessions spent, or may have: what a resumed budget starts from."""
    prior = prior_spend(store)
    return prior.usd, prior.tokens


def spend_text(budget: Budget, prior: PriorSpend, *, short: bool = False) -> str:
    """The run's cumulative spend against the cap: settled, what an interrupted session may have been
    billed for the calls it had in flight, and what batch requests hold until their results come (all
    count against the cap). `short`: for a progress bar."""
    # Pending batch requests restore() counted as spent and no session holds yet (estimate, report).
    unadopted_usd = max(prior.batch_usd - budget.adopted_usd, 0.0)
    unadopted = max(prior.batch_requests - budget.adopted_calls, 0)
    # At least 0: settled_usd was restored as the sum of these parts, and float subtraction can leave -1e-17.
    settled = max(budget.settled_usd - prior.unsettled_usd - unadopted_usd, 0.0)
    held_usd, held = budget.held_usd + unadopted_usd, budget.held_calls + unadopted
    if short:
        extra = f" +${prior.unsettled_usd:.4f} interrupted" if prior.interrupted else ""
        extra += f" +${held_usd:.4f} batch" if held else ""
        return f"${settled:.4f}{extra}" + (f"/${budget.cap_usd:g}" if budget.cap_usd is not None else "")
    cap = f" of ${budget.cap_usd:g}" if budget.cap_usd is not None else ""
    text = f"${settled:.4f}"
    if prior.interrupted:
        text = f"${settled:.4f} settled + ${prior.unsettled_usd:.4f} possibly billed by {prior.interruption()}"
    if held:
        text += f" + ${held_usd:.4f} held for {held:,} batch request{'' if held == 1 else 's'}"
    text += cap
    if budget.cap_tokens is not None:
        text += f", {budget.settled_tokens:,} of {budget.cap_tokens:,} tokens"
    return text


def resume_note(prior: PriorSpend) -> str | None:
    """The one line a resumed run prints when earlier sessions ended without closing."""
    if not prior.interrupted:
        return None
    return (f"resuming after {prior.interruption()}: the run has settled ${prior.settled_usd:.4f}, and "
            f"${prior.unsettled_usd:.4f} more may have been billed for the calls in flight; both count "
            f"against the cap")
