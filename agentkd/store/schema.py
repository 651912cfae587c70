"""The run database's schema: tables, views, and the errors a store raises.

Kept apart from the store itself so the writer process (store/db.py) loads only what it needs.
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
        # How it was bought ("online" | "batch"; batch_id is then the agentkd batch id, else the session),
        # and the prompt-cache tokens written (cached_tokens are the ones read).
        ("mode", "VARCHAR"), ("cache_write_tokens", "BIGINT"),
        # The logprob record (evidence.py): alternatives per position, "raw" (as the provider sent them),
        # the sampling temperature, and a hash of the tokenizer the tokens belong to when known.
        ("logprobs_top", "INTEGER"), ("logprobs_kind", "VARCHAR"), ("logprobs_temperature", "DOUBLE"),
        ("tokenizer_hash", "VARCHAR"),
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
    # Provider batches (batches/records.py), one row per event of an agentkd batch: `prepared` (its
    # requests are in batch_requests, committed before anything is uploaded), `uploaded` (OpenAI: the
    # input file), `submitted` (the provider's batch id), `status` (a poll that saw a change), `ended`
    # (its final status; every result stored).
    "batches": [
        ("batch_id", "VARCHAR"), ("provider", "VARCHAR"), ("model", "VARCHAR"), ("event", "VARCHAR"),
        ("provider_batch_id", "VARCHAR"), ("file_id", "VARCHAR"), ("status", "VARCHAR"),
        ("requests", "INTEGER"), ("counts_json", "VARCHAR"), ("detail", "VARCHAR"), ("session", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
    ],
    # One row per request and event: `queued` (in a batch, with its worst case held and the canonical
    # request), then one of `done` (its answer is a calls row), `requeued` (expired, cancelled or errored
    # at the provider: asked again in a later batch, nothing billed), `failed` (the provider refused it).
    "batch_requests": [
        ("batch_id", "VARCHAR"), ("custom_id", "VARCHAR"), ("key", "VARCHAR"), ("event", "VARCHAR"),
        ("role", "VARCHAR"), ("reserved_usd", "DOUBLE"), ("reserved_tokens", "BIGINT"),
        ("request_json", "VARCHAR"), ("detail", "VARCHAR"), ("created_at", "TIMESTAMP"),
    ],
    # One row per instruction id (Store writes an id once; its pool is decided once): train, heldout
    # or rejected. Files from earlier versions can hold later rows for an id (a generated copy of it
    # stored as rejected, a seed stored again on resume); readers take its first row (instruction_pool).
    # call_key: the generator call that produced it (generated instructions only).
    "instructions": [
        ("id", "VARCHAR"), ("text", "VARCHAR"), ("source", "VARCHAR"), ("parent_id", "VARCHAR"),
        ("iteration", "INTEGER"), ("pool", "VARCHAR"), ("rouge_nearest", "DOUBLE"),
        ("rejected_reason", "VARCHAR"), ("answer", "VARCHAR"), ("created_at", "TIMESTAMP"),
        ("fields", "VARCHAR"),  # JSON object of a structured item's fields (agentkd/roles/items.py); NULL: plain text
        ("call_key", "VARCHAR"),
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

# Read-only views over the tables, created (replaced) whenever agentkd opens the file for writing, and
# as temporary views when it opens it read-only, so agentkd's readers find them in files of any version.
# Dict order is creation order: a view may use the ones above it. README.md ("The run database")
# documents the user-facing ones.
VIEWS: dict[str, str] = {
    "attempts": "SELECT key, attempt, status_code, error_class, latency_s, created_at FROM reservations "
                "WHERE event IN ('settle', 'release')",
    # One row per instruction: the row that first stored it, which decides its pool.
    "instruction_pool": "SELECT * FROM instructions "
                        "QUALIFY row_number() OVER (PARTITION BY id ORDER BY created_at, rowid) = 1",
    # What training uses and `agentkd export` writes: every pooled, teacher-answered instruction (never
    # one that was ever held out) with its latest teacher answer and latest parsed label and rationale.
    # `iteration` is the Train Pool it joined: iteration t trains on iteration = t (loop.imitate_on =
    # "train_pool") or <= t ("cache_pool").
    "training_examples": """
WITH answers AS (
    SELECT instruction_id, text, call_key FROM responses WHERE actor = 'teacher' AND text IS NOT NULL
    QUALIFY row_number() OVER (PARTITION BY instruction_id ORDER BY created_at DESC, rowid DESC) = 1
), parsed_rationales AS (
    SELECT example_id, label, rationale FROM rationales WHERE parsed_ok
    QUALIFY row_number() OVER (PARTITION BY example_id ORDER BY created_at DESC, rowid DESC) = 1
)
SELECT p.id, p.text AS instruction, a.text AS teacher_answer, r.rationale, r.label, p.source, p.parent_id,
       p.iteration, p.fields, a.call_key AS answer_call_key
FROM instruction_pool p
JOIN answers a ON a.instruction_id = p.id
LEFT JOIN parsed_rationales r ON r.example_id = p.id
WHERE p.pool IN ('train', 'cache') AND p.rejected_reason IS NULL
  AND p.id NOT IN (SELECT id FROM instructions WHERE pool = 'heldout')""",
    # Teacher spend and tokens by role (eval calls are booked as role 'eval') and model.
    "spend": """
SELECT role, provider, model, count(*) AS calls, count(*) FILTER (WHERE status = 'ok') AS ok,
       count(*) FILTER (WHERE status <> 'ok') AS failed,
       coalesce(sum(input_tokens), 0) AS input_tokens, coalesce(sum(output_tokens), 0) AS output_tokens,
       coalesce(sum(cached_tokens), 0) AS cached_tokens, coalesce(sum(cost_usd), 0.0) AS usd
FROM calls GROUP BY role, provider, model""",
    # One row per failure: a call that did not succeed (kind 'call', its error class), a referee or
    # explainer reply that did not parse (kind 'unparsed', with the parser's reason), a generated
    # instruction a filter rejected (kind 'rejected'; near-duplicates are not failures and not here).
    "failures": """
SELECT 'call' AS kind, role, model, error_class AS class, error_detail AS detail, key AS call_key, created_at
FROM calls WHERE status <> 'ok'
UNION ALL
SELECT 'unparsed', coalesce(c.role, 'referee'), c.model, 'referee_unparsed', j.reason, j.call_key, j.created_at
FROM judgments j LEFT JOIN (SELECT key, any_value(role) AS role, any_value(model) AS model FROM calls
                            GROUP BY key) c ON c.key = j.call_key
WHERE NOT coalesce(j.parsed_ok, false)
UNION ALL
SELECT 'unparsed', coalesce(c.role, 'explainer'), c.model, 'explainer_unparsed', x.reason, x.call_key, x.created_at
FROM rationales x LEFT JOIN (SELECT key, any_value(role) AS role, any_value(model) AS model FROM calls
                             GROUP BY key) c ON c.key = x.call_key
WHERE NOT coalesce(x.parsed_ok, false)
UNION ALL
SELECT 'rejected', coalesce(c.role, 'generator'), c.model, 'generator_rejected', i.rejected_reason, i.call_key,
       i.created_at
FROM instruction_pool i LEFT JOIN (SELECT key, any_value(role) AS role, any_value(model) AS model FROM calls
                                   GROUP BY key) c ON c.key = i.call_key
WHERE i.pool = 'rejected' AND i.rejected_reason NOT LIKE 'near-duplicate%'""",
}

COLUMNS: dict[str, tuple[str, ...]] = {t: tuple(c for c, _ in cols) for t, cols in SCHEMA.items()}
COLUMN_SETS: dict[str, frozenset[str]] = {t: frozenset(cols) for t, cols in COLUMNS.items()}


class StoreError(Exception):
    """The store cannot be opened or written; paid calls must stop."""


class StoreLockedError(StoreError):
    """Another process holds the run's database open for writing."""
