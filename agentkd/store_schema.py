"""The run database's schema: tables, views, and the errors a store raises.

Kept apart from the store itself so the writer process (store_db.py) loads only what it needs.
"""

from __future__ import annotations

# table -> ordered (column, type). Adding a column is a schema change: append it at the end.
SCHEMA: dict[str, list[tuple[str, str]]] = {
    "calls": [
        ("key", "VARCHAR"), ("role", "VARCHAR"), ("provider", "VARCHAR"), ("model", "VARCHAR"),
        ("prompt_version", "VARCHAR"), ("request_json", "VARCHAR"), ("response_text", "VARCHAR"),
        ("finish_reason", "VARCHAR"), ("truncated", "BOOLEAN"), ("input_tokens", "BIGINT"),
        ("output_tokens", "BIGINT"), ("cached_tokens", "BIGINT"), ("cost_usd", "DOUBLE"),
        ("latency_s", "DOUBLE"), ("attempts", "INTEGER"), ("status", "VARCHAR"),
        ("error_class", "VARCHAR"), ("error_detail", "VARCHAR"), ("request_id", "VARCHAR"),
        ("batch_id", "VARCHAR"), ("estimator", "VARCHAR"), ("logprobs_json", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
    ],
    # The budget ledger (ledger.py). Per session: `cover` rows, each the level of spend (usd, tokens)
    # the session may have reached, committed before the calls it covers are sent, and a `close` row
    # when the session ended cleanly. Per HTTP attempt one `settle` (or `release`) row: what it cost,
    # the worst case it had reserved, and the attempt itself (number, HTTP status, error class,
    # latency), so retries are visible (the `attempts` view) without another row to commit per call.
    # in_flight: the session's open reservations just after the row's event. Files from earlier
    # versions have `block` rows (increments of cover) or, before those, per-attempt `reserve` rows
    # and no session.
    "reservations": [
        ("reservation_id", "VARCHAR"), ("key", "VARCHAR"), ("event", "VARCHAR"), ("usd", "DOUBLE"),
        ("tokens", "BIGINT"), ("created_at", "TIMESTAMP"), ("attempt", "INTEGER"),
        ("status_code", "INTEGER"), ("error_class", "VARCHAR"), ("latency_s", "DOUBLE"),
        ("session", "VARCHAR"), ("reserved_usd", "DOUBLE"), ("reserved_tokens", "BIGINT"),
        ("in_flight", "INTEGER"),
    ],
    "instructions": [
        ("id", "VARCHAR"), ("text", "VARCHAR"), ("source", "VARCHAR"), ("parent_id", "VARCHAR"),
        ("iteration", "INTEGER"), ("pool", "VARCHAR"), ("rouge_nearest", "DOUBLE"),
        ("rejected_reason", "VARCHAR"), ("answer", "VARCHAR"), ("created_at", "TIMESTAMP"),
        ("fields", "VARCHAR"),  # JSON object of a structured item's fields (agentkd/items.py); NULL: plain text
    ],
    "responses": [
        ("instruction_id", "VARCHAR"), ("actor", "VARCHAR"), ("iteration", "INTEGER"),
        ("checkpoint", "VARCHAR"), ("text", "VARCHAR"), ("call_key", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
    ],
    "judgments": [
        ("instruction_id", "VARCHAR"), ("iteration", "INTEGER"), ("order", "VARCHAR"),
        ("teacher_score", "DOUBLE"), ("student_score", "DOUBLE"), ("parsed_ok", "BOOLEAN"),
        ("reason", "VARCHAR"), ("call_key", "VARCHAR"), ("created_at", "TIMESTAMP"),
    ],
    "verdicts": [
        ("instruction_id", "VARCHAR"), ("iteration", "INTEGER"), ("teacher_score", "DOUBLE"),
        ("student_score", "DOUBLE"), ("label", "VARCHAR"), ("order_disagreement", "BOOLEAN"),
        ("created_at", "TIMESTAMP"),
    ],
    "rationales": [
        ("example_id", "VARCHAR"), ("label", "VARCHAR"), ("rationale", "VARCHAR"),
        ("parsed_ok", "BOOLEAN"), ("reason", "VARCHAR"), ("call_key", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
    ],
    "train_runs": [
        ("iteration", "INTEGER"), ("objective", "VARCHAR"), ("checkpoint", "VARCHAR"),
        ("steps", "INTEGER"), ("examples", "INTEGER"), ("final_loss", "DOUBLE"),
        ("seconds", "DOUBLE"), ("created_at", "TIMESTAMP"), ("kd_examples", "INTEGER"),
        ("evidence_used", "INTEGER"), ("evidence_unused", "INTEGER"),
    ],
    # The proxy's training (proxy.py): one row per stage, with its quality after the stage — mean
    # per-token log p(teacher answer) on held-out (kd-role) answers, the proxy's and the student's.
    "proxy_stages": [
        ("iteration", "INTEGER"), ("stage", "VARCHAR"), ("steps", "INTEGER"), ("examples", "INTEGER"),
        ("loss", "DOUBLE"), ("seconds", "DOUBLE"), ("proxy_logp", "DOUBLE"), ("student_logp", "DOUBLE"),
        ("checkpoint", "VARCHAR"), ("created_at", "TIMESTAMP"),
    ],
    "metrics": [
        ("iteration", "INTEGER"), ("name", "VARCHAR"), ("value", "DOUBLE"), ("step", "INTEGER"),
        ("created_at", "TIMESTAMP"),
    ],
    # Loop progress markers: a stage row is written when the stage has finished, so a resumed run
    # skips exactly the stages that completed.
    "loop_state": [("iteration", "INTEGER"), ("stage", "VARCHAR"), ("created_at", "TIMESTAMP")],
}

# Read-only views over the tables, created with them.
VIEWS: dict[str, str] = {
    "attempts": "SELECT key, attempt, status_code, error_class, latency_s, created_at FROM reservations "
                "WHERE event IN ('settle', 'release')",
}

COLUMNS: dict[str, tuple[str, ...]] = {t: tuple(c for c, _ in cols) for t, cols in SCHEMA.items()}
COLUMN_SETS: dict[str, frozenset[str]] = {t: frozenset(cols) for t, cols in COLUMNS.items()}


class StoreError(Exception):
    """The store cannot be opened or written; paid calls must stop."""


class StoreLockedError(StoreError):
    """Another process holds the run's database open for writing."""
