"""Process-wide settings a long run of calls wants, applied by the commands that start one."""

from __future__ import annotations

import atexit
import gc

_unfreeze_registered = False
# Allocations (net of frees) between young collections; CPython's default is 700. A call in flight holds
# a few hundred objects (futures, aiohttp request and response, rows), so at 700 the young collection
# ran every ~2 calls, re-walking the objects of all calls still in flight and promoting them to the
# older generations, whose collections then walked them again: measured 40-60 us of the gateway's CPU
# per call on the zero-latency sim (benchmarks/gateway_overhead.py), 1-2 us at 10,000. The young
# generation is collected as before, only less often: at most ~10,000 objects (a few MB) of garbage
# cycles wait for it.
YOUNG_THRESHOLD = 10_000


def freeze_startup_heap() -> None:
    """Hide everything alive now (modules, SDK and pydantic classes: ~50,000 objects) from the cyclic
    garbage collector.

    None of it becomes garbage during a run, yet every full collection re-walks all of it: measured here,
    84 ms per full collection and ~20 us of the gateway's ~115 us own CPU per call. Garbage is collected
    first, so none of it is kept. Frozen objects are released again at exit, so extension modules tear
    down normally (DuckDB's bindings report leaks otherwise). The young generation's threshold is raised
    to YOUNG_THRESHOLD; the older generations' stay.
    """
    global _unfreeze_registered
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    if not _unfreeze_registered:
        atexit.register(gc.unfreeze)
        _unfreeze_registered = True
