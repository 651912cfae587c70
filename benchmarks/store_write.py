"""Store write throughput: 100k interaction rows through the async single writer into a DuckDB file.

Baseline in the same run: the same rows through executemany (what the design forbids on hot paths),
on a 5,000-row sample. Last line: a JSON object with "rows_per_s" (target >= 20,000 on 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import duckdb

from agentkd.store.writer import COLUMNS, Store

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000


def interaction(i: int) -> dict:
    return {
        "key": f"{i:064x}", "role": "answerer", "provider": "sim", "model": "sim-teacher-1",
        "prompt_version": "a1b2c3d4e5f6",
        "request_json": '{"messages": [{"role": "user", "content": "Tom has 12 apples. He buys 7 more."}]}',
        "response_text": "12 + 7 = 19. The answer is 19.", "finish_reason": "stop", "truncated": False,
        "input_tokens": 42, "output_tokens": 12, "cached_tokens": 0, "cost_usd": 1.2e-5,
        "latency_s": 0.3, "attempts": 1, "status": "ok", "estimator": "tiktoken:o200k_base",
    }


async def async_writer(path: Path, rows: list[dict], chunk: int) -> float:
    store = Store(path)
    await store.start()
    start = time.perf_counter()
    # Producers submit concurrently, as gateway tasks do; each awaits its own acknowledgement.
    await asyncio.gather(*(store.write_many("calls", rows[i:i + chunk]) for i in range(0, len(rows), chunk)))
    elapsed = time.perf_counter() - start
    assert store.count("calls") == len(rows)
    await store.close()
    return elapsed


def executemany_baseline(path: Path, rows: list[dict]) -> float:
    Store(path).close_sync()  # the schema
    con = duckdb.connect(str(path))
    cols = COLUMNS["calls"]
    sql = f"INSERT INTO calls ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
    tuples = [tuple(r.get(c) for c in cols) for r in rows]
    start = time.perf_counter()
    con.executemany(sql, tuples)
    elapsed = time.perf_counter() - start
    con.close()
    return elapsed


def main() -> None:
    rows = [interaction(i) for i in range(ROWS)]
    with tempfile.TemporaryDirectory() as tmp:
        seconds = asyncio.run(async_writer(Path(tmp) / "a.duckdb", rows, chunk=500))
        # One row per acknowledgement, as the gateway writes one call row per request.
        single_seconds = asyncio.run(async_writer(Path(tmp) / "s.duckdb", rows, chunk=1))
        sample = rows[:5_000]
        base_seconds = executemany_baseline(Path(tmp) / "b.duckdb", sample)
    rows_per_s = ROWS / seconds
    base_rps = len(sample) / base_seconds
    single_rps = ROWS / single_seconds
    print(f"async writer, 500-row submits:    {ROWS:,} rows in {seconds:.2f} s = {rows_per_s:,.0f} rows/s")
    print(f"async writer, 1-row submits:      {ROWS:,} rows in {single_seconds:.2f} s = {single_rps:,.0f} rows/s")
    print(f"baseline executemany:             {len(sample):,} rows in {base_seconds:.2f} s = {base_rps:,.0f} rows/s")
    print(json.dumps({"rows": ROWS, "seconds": round(seconds, 3), "rows_per_s": round(rows_per_s),
                      "single_row_submits_rows_per_s": round(single_rps),
                      "executemany_rows_per_s": round(base_rps), "target_rows_per_s": 20_000}))


if __name__ == "__main__":
    main()
