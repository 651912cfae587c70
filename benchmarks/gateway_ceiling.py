"""How close the gateway runs to a provider's rate-limit ceiling, and whether a USD cap ever overshoots.

The simulated teacher runs in its own process (`python -m agentkd.teachers.sim`) with rpm=600,
tpm=60,000 and 300 ms latency; its ledger (GET /_stats) is the judge of what was sent, refused with a
429 and billed. Two clients, one after the other, with the same workload and concurrency:
  gateway   the full Gateway (store, budget, limiter, retries) with [limits] rpm/tpm seeded from the same
            numbers (--learn: no limits configured, the limiter follows x-ratelimit-* headers);
  baseline  asyncio.Semaphore + the official openai SDK with its default retries (max_retries=2) and a
            naive budget check (stop sending once the spend seen so far reaches the cap).
Both get the same USD cap, set so that about TARGET requests fit: overshoot is measured on the sim's
bill. Figures:
  ceiling_ratio       successes/s from first send to last success, over the ceiling
                      min(rpm/60, tpm/60 / tokens per request as the sim counts them: prompt + max_tokens)
  rate_limited_share  429s / requests the sim received
  overshoot_usd       max(0, billed USD - cap)
Targets (DESIGN.md): ceiling_ratio >= 0.95, rate_limited_share <= 0.01, overshoot_usd == 0.
Last line: one JSON object with both runs. Takes ~4 minutes (two runs of >= 1,000 requests at ~9/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

from agentkd.gateway.budget import Budget, BudgetExhausted, Usage, cost_usd
from agentkd.config import LimitsSection, PriceSection
from agentkd.gateway.core import CallFailed, Gateway
from agentkd.store.writer import Store
from agentkd.teachers.base import TeacherRequest
from agentkd.teachers.sim.protocol import parse_request
from agentkd.teachers.wire import WireTeacher, openai_body

RPM, TPM, LATENCY_MS = 600, 60_000, 300.0
MAX_TOKENS = 80
CONCURRENCY = 64
PRICE = PriceSection(input_per_mtok=1.0, output_per_mtok=4.0)


def start_sim() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkd.teachers.sim", "--port", "0", "--rpm", str(RPM), "--tpm", str(TPM),
         "--latency-ms", str(LATENCY_MS), "--seed", "3"],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, line.strip().rsplit(" ", 1)[-1]


def sim_get(base_url: str, path: str, post: bool = False) -> dict:
    req = urllib.request.Request(base_url + path, data=b"{}" if post else None, method="POST" if post else "GET")
    with urllib.request.urlopen(req, timeout=10) as response:
        return json.loads(response.read())


def requests_for(n: int, tag: str) -> list[TeacherRequest]:
    return [TeacherRequest(role="answerer", provider="sim", model="sim-teacher-1",
                           messages=({"role": "user", "content":
                                      f"Run {tag}: Tom has {i} apples and buys {i % 7 + 2} more. "
                                      f"How many apples does he have now?"},),
                           temperature=0.0, max_tokens=MAX_TOKENS) for i in range(n)]


def ceiling_per_s(requests: list[TeacherRequest]) -> float:
    sim_tokens = [parse_request("openai", openai_body(r, "sim")).prompt_tokens + r.max_tokens for r in requests]
    return min(RPM / 60.0, TPM / 60.0 / (sum(sim_tokens) / len(sim_tokens)))


def figures(name: str, stats: dict, ok: int, first: float, last: float, ceiling: float, cap: float,
            extra: dict) -> dict:
    billed = (stats["billed_input_tokens"] * PRICE.input_per_mtok
              + stats["billed_output_tokens"] * PRICE.output_per_mtok) / 1e6
    rate = ok / (last - first) if last > first else 0.0
    out = {
        "ok": ok, "seconds": round(last - first, 2), "ok_per_s": round(rate, 3), "ceiling_per_s": round(ceiling, 3),
        "ceiling_ratio": round(rate / ceiling, 4), "sent": stats["requests"],
        "rate_limited": stats["status_counts"].get("429", 0),
        "rate_limited_share": round(stats["status_counts"].get("429", 0) / max(1, stats["requests"]), 4),
        "billed_usd": round(billed, 6), "cap_usd": cap, "overshoot_usd": round(max(0.0, billed - cap), 6),
        "billed_twice": sum(1 for n in stats["billed_by_key"].values() if n > 1), **extra,
    }
    print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in out.items()), flush=True)
    return out


async def run_gateway(base_url: str, requests: list[TeacherRequest], cap: float, learn: bool) -> dict:
    limits = LimitsSection(rpm=None if learn else RPM, tpm=None if learn else TPM,
                           max_concurrency=CONCURRENCY, timeout_s=30.0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "run.duckdb")
        budget = Budget(usd=cap, tokens=None, price_of=lambda model: PRICE)
        teacher = WireTeacher(provider="sim", wire="openai", base_url=base_url + "/v1", api_key=None)
        gateway = Gateway(teachers={"sim": teacher}, store=store, budget=budget, limits=limits)
        await gateway.start()
        slots = asyncio.Semaphore(CONCURRENCY)  # same task concurrency as the baseline
        done: list[float] = []
        refused = failed = 0

        async def one(request: TeacherRequest) -> None:
            nonlocal refused, failed
            async with slots:
                try:
                    await gateway.complete(request)
                except BudgetExhausted:
                    refused += 1
                    return
                except CallFailed:
                    failed += 1
                    return
                done.append(time.perf_counter())

        first = time.perf_counter()
        await asyncio.gather(*(one(r) for r in requests))
        await gateway.aclose()
        spent = budget.settled_usd
        await store.close()
    return {"ok": len(done), "first": first, "last": max(done), "extra": {
        "refused_by_budget": refused, "failed": failed, "gateway_spent_usd": round(spent, 6),
        "limits": "learned from headers" if learn else "seeded from config"}}


async def run_baseline(base_url: str, requests: list[TeacherRequest], cap: float) -> dict:
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=2)
    slots = asyncio.Semaphore(CONCURRENCY)
    done: list[float] = []
    spent = 0.0
    refused = failed = 0

    async def one(request: TeacherRequest) -> None:
        nonlocal spent, refused, failed
        async with slots:
            if spent >= cap:  # the naive budget: calls already in flight are not counted
                refused += 1
                return
            try:
                reply = await client.chat.completions.create(**openai_body(request, "sim"))
            except openai.APIError:
                failed += 1
                return
            spent += cost_usd(PRICE, Usage(reply.usage.prompt_tokens, reply.usage.completion_tokens))
            done.append(time.perf_counter())

    first = time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    await client.close()
    return {"ok": len(done), "first": first, "last": max(done),
            "extra": {"refused_by_budget": refused, "failed_after_sdk_retries": failed}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1_150, help="requests sent per client")
    parser.add_argument("--fit", type=int, default=1_050, help="about this many calls fit the USD cap")
    parser.add_argument("--learn", action="store_true", help="gateway learns limits from headers")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    proc, base_url = start_sim()
    try:
        # Pilot (not measured): the mean billed cost of one call sets the cap so that ~args.fit calls fit.
        pilot = requests_for(20, "pilot")
        asyncio.run(run_baseline(base_url, pilot, cap=1e9))
        stats = sim_get(base_url, "/_stats")
        per_call = (stats["billed_input_tokens"] * PRICE.input_per_mtok
                    + stats["billed_output_tokens"] * PRICE.output_per_mtok) / 1e6 / stats["billed_requests"]
        cap = round(per_call * args.fit, 6)
        print(f"sim {base_url}: rpm={RPM} tpm={TPM} latency={LATENCY_MS:g} ms; cap ${cap} "
              f"(~{args.fit} calls of ${per_call:.2e})", flush=True)
        results = {}
        runs = [("gateway", lambda r: run_gateway(base_url, r, cap, args.learn))]
        if not args.skip_baseline:
            runs.append(("baseline_sdk_semaphore", lambda r: run_baseline(base_url, r, cap)))
        for name, run in runs:
            time.sleep(2.0)  # let the sim's buckets refill (they hold one second of the rate)
            sim_get(base_url, "/_reset", post=True)
            requests = requests_for(args.requests, name)
            got = asyncio.run(run(requests))
            stats = sim_get(base_url, "/_stats")
            results[name] = figures(name, stats, got["ok"], got["first"], got["last"], ceiling_per_s(requests),
                                    cap, got["extra"])
        targets = {"ceiling_ratio": ">= 0.95", "rate_limited_share": "<= 0.01", "overshoot_usd": "== 0"}
        print(json.dumps({"benchmark": "gateway_ceiling", "rpm": RPM, "tpm": TPM, "latency_ms": LATENCY_MS,
                          "concurrency": CONCURRENCY, "targets": targets, **results}))
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
