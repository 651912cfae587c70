"""Watching a run (issue 16, problem 1): while `teach` holds the run database no other process may open
it, so the running process keeps status.json current and `agentkd status` / `agentkd runs` read that."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


from agentkd.cli import main
from agentkd.config import SimSection
from agentkd.run_status import read_status
from agentkd.store.writer import Store
from agentkd.teachers.sim import sim_in_thread
from tests.test_cli import problems, write_rows

ROOT = Path(__file__).resolve().parents[1]


def agentkd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentkd.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def wait_for(condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_status_shows_a_running_teach_from_a_second_process_and_the_lock_message_names_what_works(
        tmp_path, capsys):
    with sim_in_thread(SimSection(latency_ms=100), seed=1) as sim:
        config = tmp_path / "run.toml"
        config.write_text(f'[run]\nname = "t"\ndir = "{tmp_path / "runs"}"\n[teacher]\nprovider = "sim"\n'
                          f'base_url = "{sim.base_url}"\n[limits]\nmax_concurrency = 1\n[budget]\nusd = 1\n')
        data = write_rows(tmp_path / "in.jsonl", problems(200))
        run_dir = tmp_path / "runs" / "t"
        teach = subprocess.Popen([sys.executable, "-m", "agentkd.cli", "teach", str(config), "--role", "answerer",
                                  "--input", str(data), "--output", str(tmp_path / "out.jsonl"), "--no-progress"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            wait_for(lambda: ((read_status(run_dir) or {}).get("items") or {}).get("done", 0) >= 3)

            # The problem: while teach holds the database, no other process can open it...
            assert main(["report", str(run_dir)]) == 2
            locked = capsys.readouterr().err
            assert f"process {teach.pid}" in locked and "duckdb -readonly" not in locked
            # ...and the one command the message names instead works, from another process.
            named = re.search(r"`agentkd status ([^`]+)`", locked).group(1)
            shown = agentkd("status", named)
            assert shown.returncode == 0, shown.stderr
            out = shown.stdout
            assert f"t: teach --role answerer, running (pid {teach.pid})" in out
            done, total = map(int, re.search(r"items: answerer: (\d+)/(\d+) done", out).groups())
            assert total == 200 and 3 <= done < 200
            assert re.search(r"spend: \$\d+\.\d{4} settled \+ \$\d+\.\d{4} in flight of \$1", out)
            assert re.search(r"requests: \d+ sent, [\d.]+/s, 429s: 0", out)

            as_json = json.loads(agentkd("status", str(run_dir), "--json").stdout)
            live = as_json["status"]
            assert as_json["running"] and live["pid"] == teach.pid and live["stage"] == "teach"
            assert live["spend"]["cap_usd"] == 1 and live["spend"]["settled_usd"] > 0
            assert main(["runs", str(tmp_path / "runs")]) == 0
            listed = capsys.readouterr().out.splitlines()
            assert listed[0].split() == ["run", "state", "doing", "spend", "updated"]
            assert listed[1].startswith("t ") and f"running (pid {teach.pid})" in listed[1] and "of $1" in listed[1]
        finally:
            os.kill(teach.pid, signal.SIGKILL)
            teach.wait()

    # No process holds it now: status says the run was interrupted and reads the database itself.
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"interrupted: process {teach.pid} is gone" in out and "from the run database:" in out
    store = Store(run_dir / "agentkd.duckdb", read_only=True)
    try:
        answered = store.query("SELECT count(DISTINCT key) FROM calls WHERE status = 'ok'")[0][0]
    finally:
        store.close_sync()
    assert re.search(rf"answerer\s+{answered:,} answered", out)
    assert "possibly billed by 1 interrupted session(s)" in out
    assert main(["runs", str(tmp_path / "runs")]) == 0
    assert "interrupted" in capsys.readouterr().out.splitlines()[1]


def test_a_finished_teach_leaves_its_final_state_and_status_needs_a_run_folder(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'[run]\nname = "done"\ndir = "{tmp_path / "runs"}"\n[teacher]\nprovider = "sim"\n'
                      f'[budget]\nusd = 1\n')
    data = write_rows(tmp_path / "in.jsonl", problems(12))
    assert main(["teach", str(config), "--role", "explainer", "--input", str(data), "--output",
                 str(tmp_path / "out.jsonl"), "--no-progress"]) == 0
    capsys.readouterr()
    status = read_status(tmp_path / "runs" / "done")
    assert status["state"] == "finished" and status["items"] == {"label": "explainer", "done": 12, "total": 12,
                                                                  "failed": 0}
    assert status["results"] == {"explainer/teach": {"results": 12, "unusable": 0, "share": 0.0}}
    assert main(["status", str(tmp_path / "runs" / "done")]) == 0
    out = capsys.readouterr().out
    assert "done: teach --role explainer, finished" in out and "explainer 0/12 (0%)" in out
    # Only status.json's own writes are in the folder: no partial file left behind.
    assert not list((tmp_path / "runs" / "done").glob(".status.json.*"))

    assert main(["status", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
