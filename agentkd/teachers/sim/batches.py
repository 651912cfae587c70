"""The simulated teacher's batch APIs: OpenAI files + batches, and Anthropic message batches.

Each batch's requests finish at moments spread uniformly over `sim.batch_hours` of simulated time,
which runs `1 / sim.batch_time_scale` times faster than the wall clock, so a test's batch ends in a
fraction of a second. Every request is answered by the same model code as the online endpoints
(SimTeacher.answer_body) and billed once, under its custom_id. Faults (`sim.batch_faults`, one entry
per created batch, in order):
  "ok"                  every request succeeds;
  "expire:<share>"      the batch ends `expired` with only that share of its requests done (OpenAI: the
                        rest are in the error file as batch_expired; Anthropic: results of type expired);
  "cancel:<share>"      as expire, but cancelled (OpenAI `cancelled`, Anthropic results `canceled`);
  "fail"                OpenAI: the batch fails validation, nothing runs; Anthropic (which has no failed
                        state): every request is `errored` with an api_error;
  "drop_create"         the batch is created and starts, and the create response is cut off, as when
                        the client dies between sending the create and reading its answer;
  "hold"                the batch stays in progress, running nothing, until it is cancelled (a batch
                        that is still running for as long as a test needs).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agentkd.teachers.sim.faults import dumps, error_body

if TYPE_CHECKING:
    from agentkd.teachers.sim.server import SimTeacher

OPENAI_ENDPOINT = "/v1/chat/completions"
WINDOW_S = 24 * 3600  # both providers: a batch that has not finished in 24 h expires


@dataclass
class SimBatch:
    id: str
    api: str  # "openai" | "anthropic"
    requests: list[tuple[str, Any]]  # (custom_id, body)
    fault: str
    created_at: float  # unix seconds
    metadata: dict[str, str] | None = None
    input_file_id: str | None = None
    status: str = "validating"  # OpenAI words; Anthropic's processing_status is derived
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # custom_id -> result line
    unfinished: str | None = None  # "expired" | "cancelled" | "failed" once it ended early
    ended_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    cancel_requested: bool = False
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)  # set with cancel_requested


class SimBatches:
    """Batch endpoints of one SimTeacher; `created` counts every batch made, per API."""

    def __init__(self, teacher: SimTeacher) -> None:
        self.teacher = teacher
        self.files: dict[str, tuple[str, bytes]] = {}  # id -> (filename, content)
        self.batches: dict[str, SimBatch] = {}
        self._faults = list(teacher.settings.batch_faults)
        self._tasks: set[asyncio.Task] = set()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}", self._file)
        app.router.add_get("/v1/files/{id}/content", self._file_content)
        app.router.add_post("/v1/batches", self._openai_create)
        app.router.add_get("/v1/batches", self._openai_list)
        app.router.add_get("/v1/batches/{id}", self._retrieve("openai", self._openai_object))
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)
        app.router.add_post("/v1/messages/batches", self._anthropic_create)
        app.router.add_get("/v1/messages/batches", self._anthropic_list)
        app.router.add_get("/v1/messages/batches/{id}", self._retrieve("anthropic", self._anthropic_object))
        app.router.add_get("/v1/messages/batches/{id}/results", self._anthropic_results)
        app.router.add_post("/v1/messages/batches/{id}/cancel", self._cancel)

    def stats(self) -> list[dict[str, Any]]:
        return [{"id": b.id, "api": b.api, "requests": len(b.requests), "status": b.status,
                 "metadata": b.metadata, "custom_ids": [c for c, _ in b.requests], "results": len(b.results)}
                for b in self.batches.values()]

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- OpenAI ------------------------------------------------------------------------------------
    async def _upload(self, request: web.Request) -> web.Response:
        if not self.teacher._authorised(request):
            return _json(error_body("openai", 401), 401)
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or upload is None or not hasattr(upload, "file"):
            return _json(error_body("openai", 400, "purpose must be batch and a file is required"), 400)
        content = upload.file.read()
        file_id = f"file-sim{uuid.uuid4().hex[:20]}"
        self.files[file_id] = (upload.filename or "upload.jsonl", content)
        return _json(self._file_object(file_id))

    def _file_object(self, file_id: str) -> dict[str, Any]:
        name, content = self.files[file_id]
        return {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": name, "purpose": "batch", "status": "processed"}

    async def _file(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        if file_id not in self.files:
            return _json(error_body("openai", 404, "No such file."), 404)
        return _json(self._file_object(file_id))

    async def _file_content(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        if file_id not in self.files:
            return _json(error_body("openai", 404, "No such file."), 404)
        return web.Response(body=self.files[file_id][1], content_type="application/octet-stream")

    async def _openai_create(self, request: web.Request) -> web.StreamResponse:
        if not self.teacher._authorised(request):
            return _json(error_body("openai", 401), 401)
        body = await request.json()
        file_id = body.get("input_file_id")
        if file_id not in self.files:
            return _json(error_body("openai", 400, "input_file_id: no such file"), 400)
        if body.get("endpoint") != OPENAI_ENDPOINT or body.get("completion_window") != "24h":
            return _json(error_body("openai", 400, "endpoint and completion_window are required"), 400)
        requests, problem = _openai_lines(self.files[file_id][1])
        batch = SimBatch(f"batch_sim{uuid.uuid4().hex[:20]}", "openai", requests, self._next_fault(),
                         time.time(), metadata=body.get("metadata"), input_file_id=file_id)
        if problem is not None:
            batch.fault = "invalid:" + problem
        return await self._created(request, batch, self._openai_object)

    async def _openai_list(self, request: web.Request) -> web.Response:
        page = self._page("openai", request.query.get("after"), int(request.query.get("limit", 20)))
        data = [self._openai_object(b) for b in page]
        return _json({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                      "last_id": data[-1]["id"] if data else None, "has_more": self._has_more("openai", page)})

    def _openai_object(self, b: SimBatch) -> dict[str, Any]:
        done = sum(1 for r in b.results.values() if r.get("response", {}) and r["response"].get("status_code") == 200)
        failed = len(b.results) - done
        if b.unfinished in ("expired", "cancelled"):
            failed = len(b.requests) - done
        errors = None
        if b.status == "failed":
            errors = {"object": "list", "data": [{"code": "invalid_request", "message": b.fault.partition(":")[2]
                                                  or "The batch failed validation (simulated).", "line": None,
                                                  "param": None}]}
        return {
            "id": b.id, "object": "batch", "endpoint": OPENAI_ENDPOINT, "errors": errors,
            "input_file_id": b.input_file_id, "completion_window": "24h", "status": b.status,
            "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
            "created_at": int(b.created_at), "in_progress_at": None, "expires_at": int(b.created_at) + WINDOW_S,
            "finalizing_at": None, "completed_at": int(b.ended_at) if b.status == "completed" and b.ended_at else None,
            "failed_at": None, "expired_at": int(b.ended_at) if b.status == "expired" and b.ended_at else None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": len(b.requests), "completed": done, "failed": failed},
            "metadata": b.metadata,
        }

    def _retrieve(self, api: str, to_object):
        """GET one batch of `api` (a batch of the other API is not found there, as at the providers)."""
        async def handler(request: web.Request) -> web.Response:
            batch = self.batches.get(request.match_info["id"])
            if batch is None or batch.api != api:
                return _json(error_body(api, 404, "No such batch."), 404)
            return _json(to_object(batch))

        return handler

    # --- Anthropic ---------------------------------------------------------------------------------
    async def _anthropic_create(self, request: web.Request) -> web.StreamResponse:
        if not self.teacher._authorised(request):
            return _json(error_body("anthropic", 401), 401)
        body = await request.json()
        items = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            return _json(error_body("anthropic", 400, "requests: a non-empty list is required"), 400)
        ids = [r.get("custom_id") if isinstance(r, dict) else None for r in items]
        if not all(isinstance(i, str) and 0 < len(i) <= 64 for i in ids) or len(set(ids)) != len(ids):
            return _json(error_body("anthropic", 400, "custom_id: unique strings of 1-64 characters"), 400)
        requests = [(r["custom_id"], r.get("params")) for r in items]
        batch = SimBatch(f"msgbatch_sim{uuid.uuid4().hex[:20]}", "anthropic", requests, self._next_fault(),
                         time.time())
        return await self._created(request, batch, self._anthropic_object)

    async def _anthropic_list(self, request: web.Request) -> web.Response:
        page = self._page("anthropic", request.query.get("after_id"), int(request.query.get("limit", 20)))
        data = [self._anthropic_object(b) for b in page]
        return _json({"data": data, "has_more": self._has_more("anthropic", page),
                      "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    def _anthropic_object(self, b: SimBatch) -> dict[str, Any]:
        ended = b.ended_at is not None
        counts = {"processing": 0 if ended else len(b.requests), "succeeded": 0, "errored": 0, "canceled": 0,
                  "expired": 0}
        if ended:
            for result in b.results.values():
                counts[result["result"]["type"]] += 1
        status = "ended" if ended else ("canceling" if b.cancel_requested else "in_progress")
        return {
            "id": b.id, "type": "message_batch", "processing_status": status, "request_counts": counts,
            "created_at": _rfc3339(b.created_at), "expires_at": _rfc3339(b.created_at + WINDOW_S),
            "ended_at": _rfc3339(b.ended_at) if ended else None, "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": f"{self.teacher.base_url}/v1/messages/batches/{b.id}/results" if ended else None,
        }

    async def _anthropic_results(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None or batch.api != "anthropic" or batch.ended_at is None:
            return _json(error_body("anthropic", 404, "No results for this batch (yet)."), 404)
        lines = b"".join(dumps(r) + b"\n" for r in batch.results.values())
        return web.Response(body=lines, content_type="application/binary")

    # --- both --------------------------------------------------------------------------------------
    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _json(error_body("openai", 404, "No such batch."), 404)
        batch.cancel_requested = True
        batch.cancelled.set()
        if batch.api == "openai" and batch.ended_at is None:
            batch.status = "cancelling"
        return _json(self._openai_object(batch) if batch.api == "openai" else self._anthropic_object(batch))

    def _next_fault(self) -> str:
        return self._faults.pop(0) if self._faults else "ok"

    def _page(self, api: str, after: str | None, limit: int) -> list[SimBatch]:
        newest_first = [b for b in reversed(self.batches.values()) if b.api == api]
        if after is not None:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
        return newest_first[:limit]

    def _has_more(self, api: str, page: list[SimBatch]) -> bool:
        mine = [b for b in self.batches.values() if b.api == api]
        return bool(page) and page[-1] is not mine[0]

    async def _created(self, request: web.Request, batch: SimBatch, render) -> web.StreamResponse:
        self.batches[batch.id] = batch
        task = asyncio.create_task(self._process(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if batch.fault == "drop_create":
            # The batch exists and runs; the client never learns its id from this response.
            response = web.StreamResponse(status=200)
            response.content_type = "application/json"
            response.content_length = 4096
            await response.prepare(request)
            await response.write(b'{"id": "')
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        return _json(render(batch))

    async def _process(self, batch: SimBatch) -> None:
        settings = self.teacher.settings
        scale, span = settings.batch_time_scale, settings.batch_hours * 3600
        kind, _, share_text = batch.fault.partition(":")
        n = len(batch.requests)
        if kind in ("fail", "invalid") and batch.api == "openai":
            await asyncio.sleep(0.01 * span * scale)
            batch.status, batch.unfinished, batch.ended_at = "failed", "failed", time.time()
            return
        batch.status = "in_progress"
        if kind == "hold":
            await batch.cancelled.wait()
        finishing = n if kind not in ("expire", "cancel") else int(n * float(share_text or 0.5))
        rng = self.teacher.rng
        moments = sorted(rng.uniform(0, span) for _ in range(n))
        started = time.monotonic()
        for index, (custom_id, body) in enumerate(batch.requests):
            if batch.cancel_requested and kind != "cancel":
                kind, finishing = "cancel", index
            if index >= finishing:
                break
            await asyncio.sleep(max(0.0, started + moments[index] * scale - time.monotonic()))
            if kind == "fail":  # Anthropic: the request errored at the provider
                batch.results[custom_id] = self._errored(batch, custom_id, 500, "api_error")
                continue
            status, reply = await self.teacher.answer_body(batch.api, body, custom_id)
            batch.results[custom_id] = self._line(batch, custom_id, status, reply)
        if kind in ("expire", "cancel"):
            word = "expired" if kind == "expire" else "cancelled"
            batch.unfinished = word
            for custom_id, _ in batch.requests[finishing:]:
                batch.results[custom_id] = self._not_run(batch, custom_id, word)
        batch.status = "finalizing"
        await asyncio.sleep(0.01 * span * scale)
        self._write_files(batch)
        batch.status = batch.unfinished or "completed"
        batch.ended_at = time.time()

    def _line(self, batch: SimBatch, custom_id: str, status: int, reply: dict[str, Any]) -> dict[str, Any]:
        if batch.api == "anthropic":
            if status == 200:
                return {"custom_id": custom_id, "result": {"type": "succeeded", "message": reply}}
            return {"custom_id": custom_id, "result": {"type": "errored", "error": reply}}
        return {"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": custom_id,
                "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex[:12]}", "body": reply},
                "error": None}

    def _errored(self, batch: SimBatch, custom_id: str, status: int, kind: str) -> dict[str, Any]:
        return {"custom_id": custom_id, "result": {"type": "errored",
                                                    "error": error_body("anthropic", status, error_type=kind)}}

    def _not_run(self, batch: SimBatch, custom_id: str, word: str) -> dict[str, Any]:
        if batch.api == "anthropic":
            return {"custom_id": custom_id, "result": {"type": "canceled" if word == "cancelled" else "expired"}}
        code = "batch_expired" if word == "expired" else "batch_cancelled"
        return {"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": custom_id, "response": None,
                "error": {"code": code, "message": f"This request was not run: the batch {word}."}}

    def _write_files(self, batch: SimBatch) -> None:
        """OpenAI: requests answered 200 go to the output file, the rest (errors, and those not run) to
        the error file; a file that would be empty is not made."""
        if batch.api != "openai":
            return
        ok = [r for r in batch.results.values() if r["response"] is not None and r["response"]["status_code"] == 200]
        rest = [r for r in batch.results.values() if r not in ok]
        for lines, attr, suffix in ((ok, "output_file_id", "output"), (rest, "error_file_id", "errors")):
            if lines:
                file_id = f"file-sim{uuid.uuid4().hex[:20]}"
                self.files[file_id] = (f"{batch.id}_{suffix}.jsonl", b"".join(dumps(r) + b"\n" for r in lines))
                setattr(batch, attr, file_id)


def _openai_lines(content: bytes) -> tuple[list[tuple[str, Any]], str | None]:
    """The (custom_id, body) of each line of an input file, or the reason the file is invalid."""
    requests: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for number, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            return requests, f"line {number}: not JSON"
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        if not isinstance(custom_id, str) or custom_id in seen:
            return requests, f"line {number}: custom_id missing or repeated"
        if item.get("method") != "POST" or item.get("url") != OPENAI_ENDPOINT:
            return requests, f"line {number}: method/url must be POST {OPENAI_ENDPOINT}"
        seen.add(custom_id)
        requests.append((custom_id, item.get("body")))
    return requests, None if requests else "the file holds no requests"


def _rfc3339(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=dumps(body), status=status, content_type="application/json")
