"""What the run database says about provider batches (tables `batches` and `batch_requests`).

Order of the durable record of one batch, each step committed before the next is attempted:
  batch_requests `queued` rows (custom_id, request key, canonical request, worst case held)
  -> batches `prepared` -> [OpenAI: upload, `uploaded` with the file id] -> create, `submitted` with the
  provider's id -> polls (`status` rows on change) -> per result: its settle row (ledger), its calls row,
  its `done` / `requeued` / `failed` row -> batches `ended`.
A crash anywhere leaves a state a resumed session continues from without creating the batch twice.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from agentkd.store.writer import Store
from agentkd.teachers.base import TeacherRequest


@dataclass
class QueuedRequest:
    custom_id: str
    key: str
    role: str
    reserved_usd: float
    reserved_tokens: int
    request_json: str
    settled: bool  # its settle row is durable (a crash came before its `done` row)
    stored: bool  # its answer is a calls row of this batch
    prompt_cache: bool = False

    def request(self, mode: str = "batch") -> TeacherRequest:
        """The request rebuilt from its canonical JSON: the same key, so the same cache entry."""
        data = json.loads(self.request_json)
        return TeacherRequest(
            role=self.role, provider=data["provider"], model=data["model"],
            messages=tuple(data["messages"]), temperature=data["temperature"], max_tokens=data["max_tokens"],
            prompt_version=data["prompt_version"], top_logprobs=data["top_logprobs"],
            response_format=data["response_format"], sample=data["sample"], mode=mode,
            prompt_cache=self.prompt_cache,
        )


@dataclass
class OpenBatch:
    """An agentkd batch with requests that have no final row yet."""

    batch_id: str
    provider: str
    model: str
    prepared_at: dt.datetime | None  # None: its requests were queued, the batch never prepared
    file_id: str | None
    provider_batch_id: str | None
    status: str | None
    requests: list[QueuedRequest] = field(default_factory=list)


def open_batches(store: Store) -> list[OpenBatch]:
    """Batches with at least one queued request that is neither closed nor settled-and-stored."""
    rows = store.query_dicts(
        """
        SELECT q.batch_id, q.custom_id, q.key, q.role, q.reserved_usd, q.reserved_tokens, q.request_json,
               q.detail = 'prompt_cache' AS prompt_cache,
               EXISTS (SELECT 1 FROM reservations r WHERE r.reservation_id = q.custom_id AND r.event = 'settle')
                   AS settled,
               EXISTS (SELECT 1 FROM calls c WHERE c.key = q.key AND c.batch_id = q.batch_id AND c.status = 'ok')
                   AS stored
        FROM batch_requests q
        WHERE q.event = 'queued'
          AND NOT EXISTS (SELECT 1 FROM batch_requests c WHERE c.custom_id = q.custom_id AND c.event <> 'queued')
        ORDER BY q.batch_id, q.custom_id
        """
    )
    batches: dict[str, OpenBatch] = {}
    for row in rows:
        batch = batches.get(row["batch_id"])
        if batch is None:
            batch = batches[row["batch_id"]] = _batch(store, row["batch_id"], json.loads(row["request_json"]))
        batch.requests.append(QueuedRequest(row["custom_id"], row["key"], row["role"], row["reserved_usd"],
                                            row["reserved_tokens"], row["request_json"], row["settled"],
                                            row["stored"], bool(row["prompt_cache"])))
    return list(batches.values())


def _batch(store: Store, batch_id: str, first_request: dict[str, Any]) -> OpenBatch:
    events = store.query_dicts(
        "SELECT event, provider_batch_id, file_id, status, created_at FROM batches WHERE batch_id = ? "
        "ORDER BY created_at", [batch_id])
    prepared = next((e["created_at"] for e in events if e["event"] == "prepared"), None)
    file_id = next((e["file_id"] for e in events if e["file_id"]), None)
    provider_id = next((e["provider_batch_id"] for e in events if e["provider_batch_id"]), None)
    status = events[-1]["status"] if events else None
    return OpenBatch(batch_id, first_request["provider"], first_request["model"], prepared, file_id, provider_id,
                     status)


def batch_summary(store: Store) -> list[dict[str, Any]]:
    """One row per agentkd batch: provider ids, its last status, and its requests by final event."""
    return store.query_dicts(
        """
        WITH last AS (SELECT batch_id, arg_max(status, created_at) AS status,
                             max(provider_batch_id) AS provider_batch_id, min(created_at) AS created_at
                      FROM batches GROUP BY batch_id),
             final AS (SELECT batch_id, custom_id, max(event) FILTER (WHERE event <> 'queued') AS event
                       FROM batch_requests GROUP BY batch_id, custom_id)
        SELECT l.batch_id, l.provider_batch_id, l.status, count(f.custom_id) AS requests,
               count(*) FILTER (WHERE f.event = 'done') AS done,
               count(*) FILTER (WHERE f.event = 'requeued') AS requeued,
               count(*) FILTER (WHERE f.event = 'failed') AS failed,
               count(*) FILTER (WHERE f.event IS NULL) AS pending
        FROM last l LEFT JOIN final f USING (batch_id)
        GROUP BY l.batch_id, l.provider_batch_id, l.status, l.created_at ORDER BY l.created_at
        """
    )
