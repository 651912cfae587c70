"""freeze_startup_heap: the objects alive at start leave the collector's sight, garbage does not stay."""

from __future__ import annotations

import subprocess
import sys


def test_freeze_keeps_no_garbage_and_exits_without_extension_leak_reports(tmp_path):
    script = """
import gc, sys, weakref
import duckdb
from agentkd.process import freeze_startup_heap

class Node:
    pass

cycle = Node(); cycle.self = cycle
probe = weakref.ref(cycle)
del cycle  # unreachable but not yet collected: freezing must not keep it
con = duckdb.connect(sys.argv[1])
con.execute("CREATE TABLE t (x INTEGER)")
freeze_startup_heap()
assert probe() is None, "garbage from before the freeze was kept"
assert gc.get_freeze_count() > 1000
assert gc.get_threshold()[0] == 10_000  # young collections less often (process.YOUNG_THRESHOLD)
late = Node(); late.self = late
late_probe = weakref.ref(late)
del late
gc.collect()
assert late_probe() is None, "garbage made after the freeze is still collected"
con.close()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.duckdb")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "leaked" not in done.stderr  # nanobind's teardown report when frozen objects outlive exit
