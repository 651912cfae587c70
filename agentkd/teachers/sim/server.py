"""The simulated teacher's HTTP server (aiohttp, loopback): OpenAI chat completions and Anthropic messages.

One asyncio process. Order of a model request: count it -> scripted fault (errors answer at once) ->
auth -> parse -> rate limit (429 takes nothing from the buckets) -> random fault -> latency -> reply
-> bill. A request is billed when a 200 with content was sent or started (slow, drop and truncated
included, as a real provider would bill them); errors, 429s and the html page are not.
Latency: lognormal with mean latency_ms and coefficient of variation latency_jitter (0: constant).

What is said is the responder's business: by default the rule-based world of roles.py; a caller may
plug in another (an async callable ModelRequest -> Generation, e.g. a small language model whose
weights a benchmark holds) and keep this HTTP layer, its faults, limits and ledger unchanged.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import random
import threading
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agentkd.config import SimSection
from agentkd.teachers.sim import roles
from agentkd.teachers.sim.batches import SimBatches
from agentkd.teachers.sim.faults import HTML_PAGE, Fault, dumps, error_body, parse_script, quota_error, random_fault
from agentkd.teachers.sim.protocol import (
    CLIENT_KEY_HEADER,
    MODEL_IDS,
    BadRequest,
    ModelRequest,
    parse_request,
    response_body,
)
from agentkd.teachers.sim.ratelimit import RateLimiter, retry_after_headers


BATCH_MAX_BYTES = 256 * 1024 * 1024
CACHE_MIN_TOKENS = 1024  # OpenAI's floor; Anthropic's is 1,024-4,096 by model (the sim uses one)


@dataclass(frozen=True)
class Generation:
    """A responder's reply. `tokens` (model responders): one OpenAI logprobs content item per output
    token, whose "token" strings join to `text`; None: the sim's own word tokens and synthetic logprobs.
    `prompt_tokens`: the prompt as the responder's tokenizer counts it, billed instead of the sim's count."""

    text: str
    cut: bool  # max_tokens ended the reply (finish_reason "length")
    tokens: list[dict[str, Any]] | None = None
    prompt_tokens: int | None = None


Responder = Callable[[ModelRequest], Awaitable[Generation]]


class SimTeacher:
    """The simulated teacher server; one instance per event loop. `responder` replaces the rule-based
    replies (BadRequest from it is a 400); None keeps them."""

    def __init__(self, settings: SimSection, seed: int = 0, responder: Responder | None = None):
        self.settings = settings
        self.seed = settings.seed if settings.seed is not None else seed
        self.rng = random.Random(self.seed)
        self.responder = responder
        self.limiter = RateLimiter(settings.rpm, settings.tpm)
        self.base_url = ""
        self._script: deque[Fault] = deque()
        self._runner: web.AppRunner | None = None
        self._has_random_faults = any(
            (settings.fault_500, settings.fault_503, settings.fault_529, settings.fault_slow_read,
             settings.fault_drop, settings.fault_truncated)
        )
        self._serial = 0
        self.in_flight = 0  # model requests received and not yet answered (not part of reset())
        self.batch_api = SimBatches(self)  # the OpenAI and Anthropic batch endpoints (batches.py)
        self._prompt_cache: set[str] = set()  # system prompts seen (prompt_cache())
        self.reset()

    def reset(self) -> None:
        """Clear the ledger and the fault script."""
        self.requests = self.billed_requests = self.billed_input_tokens = self.billed_output_tokens = 0
        self.cache_read_tokens = self.cache_write_tokens = 0
        self.status_counts: Counter[str] = Counter()
        self.billed_by_key: Counter[str] = Counter()
        self._script.clear()

    def script(self, faults: list[dict[str, Any]]) -> None:
        """Queue faults for the next model requests, in order."""
        self._script.extend(parse_script(faults))

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "billed_requests": self.billed_requests,
            "billed_input_tokens": self.billed_input_tokens,
            "billed_output_tokens": self.billed_output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "status_counts": dict(self.status_counts),
            "billed_by_key": dict(self.billed_by_key),
            "batches": self.batch_api.stats(),
        }

    def app(self) -> web.Application:
        # Batch uploads and Anthropic batch bodies run to the providers' 200 / 256 MB (aiohttp's default: 1 MB).
        app = web.Application(client_max_size=BATCH_MAX_BYTES)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/messages", self._anthropic)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/_stats", self._stats)
        app.router.add_post("/_script", self._script_endpoint)
        app.router.add_post("/_reset", self._reset)
        self.batch_api.routes(app)
        return app

    async def start(self) -> str:
        # A short shutdown timeout: a scripted slow reply must not hold stop() for a minute.
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://{self.settings.host}:{port}"
        return self.base_url

    async def stop(self) -> None:
        await self.batch_api.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- control endpoints -------------------------------------------------------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _script_endpoint(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            self.script(body.get("faults") if isinstance(body, dict) else None)
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            return web.json_response({"error": str(err)}, status=400)
        return web.json_response({"queued": len(self._script)})

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._error(request, "openai", 401, {})
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "agentkd-sim"} for m in MODEL_IDS]
        return web.json_response({"object": "list", "data": data})

    # --- model endpoints ---------------------------------------------------------------------------

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "openai")

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "anthropic")

    def _authorised(self, request: web.Request) -> bool:
        expected = self.settings.require_api_key
        if expected is None:
            return True
        auth = request.headers.get("Authorization", "")
        sent = auth[7:] if auth.startswith("Bearer ") else request.headers.get("x-api-key", "")
        return hmac.compare_digest(sent.encode(), expected.encode())

    def _error(self, request: web.Request, api: str, status: int, headers: dict[str, str],
               body: dict[str, Any] | None = None, message: str | None = None) -> web.Response:
        self.status_counts[str(status)] += 1
        body = body or error_body(api, status, message)
        return web.Response(body=dumps(body), status=status, headers=headers, content_type="application/json")

    async def _handle(self, request: web.Request, api: str) -> web.StreamResponse:
        self.requests += 1
        self.in_flight += 1
        try:
            return await self._answer(request, api)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, api: str) -> web.StreamResponse:
        fault = self._script.popleft() if self._script else None
        if fault is not None and fault.status is not None:
            if fault.status == 429 and fault.code == "insufficient_quota":
                status, body = quota_error(api)
                return self._error(request, api, status, fault.headers, body)
            return self._error(request, api, fault.status, fault.headers)
        if not self._authorised(request):
            # Never echo what was sent: the message is fixed text.
            return self._error(request, api, 401, {}, message="Invalid API key (simulated teacher).")
        try:
            parsed = parse_request(api, await request.json())
        except (ValueError, BadRequest) as err:
            message = str(err) if isinstance(err, BadRequest) else "The body is not valid JSON."
            return self._error(request, api, 400, {}, message=message)
        # A client's own request key, when sent, identifies the request in the ledger: two deliberate
        # samples of one prompt (same body) are two requests, not one request paid twice.
        client_key = request.headers.get(CLIENT_KEY_HEADER)
        if client_key:
            parsed.key = client_key[:128]
        admission = self.limiter.admit(parsed.prompt_tokens + parsed.max_tokens)
        headers = self.limiter.headers()
        if admission.too_large:
            message = "Request too large for the tokens-per-minute limit of the simulated teacher."
            return self._error(request, api, 400, headers, message=message)
        if not admission.ok:
            headers.update(retry_after_headers(admission.retry_after_s))
            message = f"Rate limit reached for {admission.limited} (simulated teacher)."
            error_type = "rate_limit_error" if api == "anthropic" else admission.limited
            body = error_body(api, 429, message, error_type=error_type, code="rate_limit_exceeded")
            return self._error(request, api, 429, headers, body)
        if fault is None and self._has_random_faults:
            fault = random_fault(self.settings, self.rng)
            if fault is not None and fault.status is not None:
                return self._error(request, api, fault.status, headers)
        await self._latency()
        return await self._reply(request, parsed, fault, headers)

    async def _latency(self) -> None:
        mean = self.settings.latency_ms / 1000.0
        if mean <= 0:
            return
        jitter = self.settings.latency_jitter
        if jitter > 0:
            sigma = math.sqrt(math.log1p(jitter * jitter))
            delay = self.rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)
        else:
            delay = mean
        await asyncio.sleep(delay)

    async def generate(self, req: ModelRequest) -> tuple[Generation, random.Random]:
        """What the model says to one request (the rule-based world, or the plugged-in responder), and
        the RNG its synthetic logprobs draw from. The responder's BadRequest propagates (a 400)."""
        if req.temperature == 0:
            rng, phrasing = random.Random(int(req.key[:16], 16) ^ self.seed), None
        else:
            rng = phrasing = self.rng
        if self.responder is None:
            answer = roles.reply(req.system, req.user, json_mode=req.json_mode, rng=rng, phrasing=phrasing,
                                 error_rate=self.settings.error_rate, prose_rate=self.settings.referee_prose_rate,
                                 output_faults=self.settings)
            return Generation(*roles.truncate(answer.text, req.max_tokens)), rng
        return await self.responder(req), rng

    async def answer_body(self, api: str, body: Any, key: str) -> tuple[int, dict[str, Any]]:
        """One model request without HTTP (a batch's): (200, reply body), billed, or (400, error body).
        `key` names it in the ledger (a batch request's custom_id)."""
        try:
            req = parse_request(api, body)
            generation, rng = await self.generate(req)
        except BadRequest as err:
            return 400, error_body(api, 400, str(err))
        req.key = key
        if generation.prompt_tokens is not None:
            req.prompt_tokens = generation.prompt_tokens
        output_tokens = roles.count_tokens(generation.text) if generation.tokens is None else len(generation.tokens)
        self._serial += 1
        self.prompt_cache(req)
        reply = response_body(req, generation.text, generation.cut, output_tokens, rng, None, self._serial,
                              tokens=generation.tokens)
        self.bill(req, output_tokens)
        return 200, reply

    def prompt_cache(self, req: ModelRequest) -> None:
        """The providers' prefix caches, on the system prompt: at least CACHE_MIN_TOKENS of it, seen before.
        OpenAI caches by itself and reports reads in 128-token steps; Anthropic caches only a prefix
        marked with cache_control, reporting the first request's prefix as written, later ones as read."""
        prefix = roles.count_tokens(req.system) if req.system else 0
        if prefix < CACHE_MIN_TOKENS or (req.api == "anthropic" and not req.cache_marked):
            return
        entry = f"{req.api}:{req.model}:{req.system}"
        seen = entry in self._prompt_cache
        self._prompt_cache.add(entry)
        if req.api == "openai":
            req.cached_tokens = prefix // 128 * 128 if seen else 0
        elif seen:
            req.cached_tokens = prefix
        else:
            req.cache_write_tokens = prefix
        self.cache_read_tokens += req.cached_tokens
        self.cache_write_tokens += req.cache_write_tokens

    def bill(self, req: ModelRequest, output_tokens: int) -> None:
        self.billed_requests += 1
        self.billed_input_tokens += req.prompt_tokens
        self.billed_output_tokens += output_tokens
        self.billed_by_key[req.key] += 1

    async def _reply(self, request: web.Request, req: ModelRequest, fault: Fault | None,
                     headers: dict[str, str]) -> web.StreamResponse:
        kind = fault.kind if fault else None
        if kind == "html":
            self.status_counts["200"] += 1
            return web.Response(body=HTML_PAGE, headers=headers, content_type="text/html")
        try:
            generation, rng = await self.generate(req)
        except BadRequest as err:
            return self._error(request, req.api, 400, headers, message=str(err))
        if kind == "length" and not generation.cut:
            generation = _cut_in_half(generation)
        text, cut, tokens = generation.text, generation.cut, generation.tokens
        if kind == "no_choices":
            output_tokens = 0
        else:
            output_tokens = roles.count_tokens(text) if tokens is None else len(tokens)
        if generation.prompt_tokens is not None:
            req.prompt_tokens = generation.prompt_tokens
        self._serial += 1
        self.prompt_cache(req)
        body = response_body(req, text, cut, output_tokens, rng, kind, self._serial, tokens=tokens)
        if kind == "slow":
            await asyncio.sleep(fault.seconds if fault and fault.seconds else self.settings.slow_read_s)
        self.bill(req, output_tokens)
        self.status_counts["200"] += 1
        payload = dumps(body)
        if kind == "truncated":
            payload = payload[: max(1, len(payload) * 3 // 5)]
        if kind == "drop":
            return await self._drop(request, payload, headers)
        return web.Response(body=payload, headers=headers, content_type="application/json")

    async def _drop(self, request: web.Request, payload: bytes, headers: dict[str, str]) -> web.StreamResponse:
        """Promise the whole body, send part of it, then abort the connection."""
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = "application/json"
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # the connection is gone: nothing more to send


def _cut_in_half(generation: Generation) -> Generation:
    """The scripted "length" fault: half the output tokens, finish_reason length."""
    if generation.tokens is None:
        return Generation(*roles.truncate(generation.text, max(1, roles.count_tokens(generation.text) // 2)),
                          prompt_tokens=generation.prompt_tokens)
    kept = generation.tokens[: max(1, len(generation.tokens) // 2)]
    return Generation("".join(t["token"] for t in kept), True, kept, generation.prompt_tokens)


@dataclass
class SimHandle:
    """A sim running on its own loop in a daemon thread; calls hop onto that loop."""

    teacher: SimTeacher
    loop: asyncio.AbstractEventLoop
    base_url: str

    def _call(self, fn: Any, *args: Any) -> Any:
        async def call() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=10)

    def stats(self) -> dict[str, Any]:
        return self._call(self.teacher.stats)

    def script(self, faults: list[dict[str, Any]]) -> None:
        self._call(self.teacher.script, faults)

    def reset(self) -> None:
        self._call(self.teacher.reset)


@contextmanager
def sim_in_thread(settings: SimSection | None = None, seed: int = 0,
                  responder: Responder | None = None) -> Iterator[SimHandle]:
    """Serve the sim from a daemon thread (for sync SDKs, subprocesses, benchmarks); stops on exit."""
    teacher = SimTeacher(settings or SimSection(), seed, responder)
    loop = asyncio.new_event_loop()
    started: list[str | BaseException] = []
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started.append(loop.run_until_complete(teacher.start()))
        except BaseException as err:  # report the bind failure to the caller's thread
            started.append(err)
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(teacher.stop())
        loop.close()

    thread = threading.Thread(target=run, name="sim-teacher", daemon=True)
    thread.start()
    ready.wait(30)
    if not started or isinstance(started[0], BaseException):
        raise RuntimeError(f"simulated teacher failed to start: {started[0] if started else 'timeout'}")
    try:
        yield SimHandle(teacher, loop, str(started[0]))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def serve_forever(settings: SimSection, port: int | None = None, seed: int = 0) -> None:
    """Serve the simulated teacher until Ctrl-C."""
    if port is not None:
        settings = settings.model_copy(update={"port": port})

    async def main() -> None:
        teacher = SimTeacher(settings, seed)
        base_url = await teacher.start()
        print(f"simulated teacher listening on {base_url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await teacher.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        print("simulated teacher stopped", flush=True)
