"""`agentkd status RUN_DIR` and `agentkd runs [DIR]`: what a run is doing, or did, from anywhere.

While a `teach` or `run` holds the run database, DuckDB lets no other process open it, so a running
run is shown from its status.json (run_status.py), which that process keeps current. Once no process
holds it, `status` reads the database itself: stages done, spend against the cap, calls and failures
by role, and the share of each role's replies that did not parse. Everything is printed as plain
text: run names, model names and error classes come from files and are shown as they are.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

from agentkd.config import ConfigError
from agentkd.run_status import STATUS_FILE, is_running, read_status

DB_NAME = "agentkd.duckdb"


def add_commands(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="what a run is doing now (from a second terminal), or its summary")
    status.add_argument("run_dir", type=Path, help="the run folder, runs/<name>")
    status.add_argument("--json", action="store_true", help="print the status (and summary) as JSON")
    runs = sub.add_parser("runs", help="list the runs in a folder with their state and spend")
    runs.add_argument("dir", type=Path, nargs="?", default=Path("runs"), help="folder of run folders (default runs)")


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "status":
        print(status_text(args.run_dir, as_json=args.json))
    else:
        print(runs_text(args.dir))
    return 0


# ---- agentkd status ------------------------------------------------------------------------------
def status_text(run_dir: Path, *, as_json: bool = False) -> str:
    run_dir = Path(run_dir)
    if not (run_dir / STATUS_FILE).is_file() and not (run_dir / DB_NAME).is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no {STATUS_FILE} or {DB_NAME} in it)")
    status = read_status(run_dir)
    live = is_running(status)
    summary: dict[str, Any] | None = None
    held = None
    if not live and (run_dir / DB_NAME).is_file():
        summary, held = _summary_or_lock(run_dir)
    if as_json:
        return json.dumps({"running": live, "status": status, "summary": summary, "database_held": held},
                          indent=1, default=str)
    lines = _status_lines(run_dir, status, live)
    if held:
        lines.append(f"database: {held}")
    if summary is not None:
        lines += _summary_lines(summary, status)
    return "\n".join(lines)


def _status_lines(run_dir: Path, status: dict[str, Any] | None, live: bool) -> list[str]:
    if status is None:
        return [f"{run_dir}: no {STATUS_FILE} (the run was made by an agentkd that did not write one)"]
    what = status.get("command") or "?"
    if status.get("role"):
        what += f" --role {status['role']}"
    state = status.get("state")
    if live:
        head = f"running (pid {status.get('pid')})"
    elif state == "running":
        head = (f"interrupted: process {status.get('pid')} is gone (killed or crashed); re-run the same "
                f"command to resume")
    else:
        head = state or "?"
        if status.get("stop_reason"):
            head += f": {status['stop_reason']}"
    lines = [f"{status.get('run', run_dir.name)}: {what}, {head}",
             f"  updated {status.get('updated_at', '?')}{_ago(status.get('updated_at'))}"]
    stage = status.get("stage")
    if stage:
        where = f"iteration {status['iteration']}/{status.get('iterations') or '?'} · " if status.get("iteration") is not None else ""
        lines.append(f"  stage: {where}{stage}")
    items = status.get("items")
    if items:
        lines.append(f"  items: {items['label']}: {items['done']:,}/{items['total']:,} done, {items['failed']:,} failed")
    spend = status.get("spend") or {}
    if spend:
        cap = f" of ${spend['cap_usd']:g}" if spend.get("cap_usd") is not None else " (no USD cap)"
        text = f"  spend: ${spend['settled_usd']:.4f} settled + ${spend['in_flight_usd']:.4f} in flight"
        if spend.get("interrupted_usd"):
            text += f" + ${spend['interrupted_usd']:.4f} possibly billed by an interrupted session"
        lines.append(text + cap)
    requests = status.get("requests") or {}
    if requests:
        lines.append(f"  requests: {requests['sent']:,} sent, {requests['per_second']:.1f}/s, "
                     f"429s: {requests['rate_limited']:,}, answered from the store: {requests['answered_from_store']:,}")
    failures = status.get("failures") or {}
    lines.append("  items skipped: " + (", ".join(f"{k} {v:,}" for k, v in sorted(failures.items())) or "none"))
    results = status.get("results") or {}
    if results:
        lines.append("  unusable results (fail-fast counts, per role/stage): " + ", ".join(
            f"{key} {r['unusable']:,}/{r['results']:,} ({r['share']:.0%})" for key, r in sorted(results.items())))
    return lines


def _ago(stamp: str | None) -> str:
    try:
        then = dt.datetime.fromisoformat(stamp or "")
    except ValueError:
        return ""
    seconds = (dt.datetime.now(dt.UTC) - then).total_seconds()
    return f" ({seconds:.1f} s ago)" if seconds < 120 else f" ({seconds / 60:.0f} min ago)"


def _summary_or_lock(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    from agentkd.store.export import open_run_store
    from agentkd.store.writer import StoreLockedError

    try:
        store = open_run_store(run_dir)
    except StoreLockedError:
        return None, "held by another process, which wrote no status file (an agentkd from before status files)"
    try:
        return run_summary(store, _config_json(run_dir)), None
    finally:
        store.close_sync()


def _config_json(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def run_summary(store, config: dict[str, Any]) -> dict[str, Any]:
    """The run as its database records it."""
    from agentkd.config import TaskSection
    from agentkd.gateway.ledger import prior_spend
    from agentkd.roles.replies import parse_failures

    prior = prior_spend(store)
    stages = store.query("SELECT iteration, stage FROM loop_state ORDER BY created_at")
    calls = store.query_dicts(
        "SELECT role, count(DISTINCT key) FILTER (WHERE status = 'ok') AS answered, "
        "count(*) FILTER (WHERE status = 'error') AS failed, coalesce(sum(cost_usd), 0) AS usd "
        "FROM calls GROUP BY role ORDER BY role")
    failures = dict(store.query("SELECT error_class, count(*) FROM calls WHERE status = 'error' "
                                "GROUP BY 1 ORDER BY 2 DESC"))
    metrics = store.query("SELECT iteration, name, arg_max(value, created_at) FROM metrics "
                          "WHERE name IN ('accuracy', 'capability_ratio') GROUP BY ALL ORDER BY iteration")
    try:
        task = TaskSection.model_validate(config.get("task") or {})
    except ValueError:
        task = TaskSection()
    return {
        "iterations": (config.get("loop") or {}).get("iterations"),
        "stages_done": [list(s) for s in stages],
        "spend": {"settled_usd": prior.settled_usd, "interrupted_usd": prior.unsettled_usd,
                  "interrupted_sessions": prior.interrupted, "cap_usd": (config.get("budget") or {}).get("usd")},
        "calls": calls, "failures": failures,
        "metrics": {f"{name}@{iteration}": value for iteration, name, value in metrics},
        "parse_failures": parse_failures(store, task),
    }


def _summary_lines(summary: dict[str, Any], status: dict[str, Any] | None) -> list[str]:
    lines = ["from the run database:"]
    stages = summary["stages_done"]
    if stages:
        iteration, stage = stages[-1]
        lines.append(f"  loop: {len(stages)} stage(s) done, the last iteration {iteration} · {stage} "
                     f"(of {summary['iterations']} iterations)")
    spend = summary["spend"]
    cap = f" of ${spend['cap_usd']:g}" if spend["cap_usd"] is not None else ""
    text = f"  spend: ${spend['settled_usd']:.4f} settled"
    if spend["interrupted_sessions"]:
        text += (f" + ${spend['interrupted_usd']:.4f} possibly billed by {spend['interrupted_sessions']} "
                 f"interrupted session(s)")
    lines.append(text + cap)
    for c in summary["calls"]:
        lines.append(f"  {c['role'] or '?':<10} {c['answered']:>7,} answered  {c['failed']:>5,} failed  ${c['usd']:.4f}")
    if summary["failures"]:
        lines.append("  failed calls by class: " + ", ".join(f"{k} {v:,}" for k, v in summary["failures"].items()))
    if summary["parse_failures"]:
        lines.append("  replies that did not parse: " + ", ".join(
            f"{p['role']} {p['failures']:,}/{p['replies']:,} ({p['share']:.0%})" for p in summary["parse_failures"]))
    for key, value in summary["metrics"].items():
        name, iteration = key.split("@")
        shown = f"{value:.1%}" if name == "accuracy" else f"{value:.2f}"
        lines.append(f"  {name.replace('_', ' ')} at iteration {iteration}: {shown}")
    return lines


# ---- agentkd runs --------------------------------------------------------------------------------
def runs_text(folder: Path) -> str:
    """One line per run folder: name, state, what it runs, spend against the cap, last update."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder of runs (give the folder that holds runs/<name> folders)")
    rows = []
    for run_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not (run_dir / STATUS_FILE).is_file() and not (run_dir / DB_NAME).is_file():
            continue
        rows.append(_run_row(run_dir))
    if not rows:
        return f"{folder}: no runs here"
    header = ("run", "state", "doing", "spend", "updated")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def _run_row(run_dir: Path) -> tuple[str, str, str, str, str]:
    status = read_status(run_dir)
    if status is None:
        spend, state = _spend_from_database(run_dir)
        return run_dir.name, state, "?", spend, "—"
    live = is_running(status)
    state = status.get("state") or "?"
    if live:
        state = f"running (pid {status.get('pid')})"
    elif state == "running":
        state = "interrupted"
    doing = status.get("command") or "?"
    if status.get("role"):
        doing += f" {status['role']}"
    if status.get("stage") and status.get("command") == "run":
        doing += f" {status.get('iteration')}/{status.get('iterations')} {status['stage']}"
    s = status.get("spend") or {}
    spend = f"${s.get('settled_usd', 0):.4f}" + (f" of ${s['cap_usd']:g}" if s.get("cap_usd") is not None else "")
    return run_dir.name, state, doing, spend, str(status.get("updated_at", "?"))[:19].replace("T", " ")


def _spend_from_database(run_dir: Path) -> tuple[str, str]:
    from agentkd.store.export import open_run_store
    from agentkd.gateway.ledger import prior_spend
    from agentkd.store.writer import StoreError, StoreLockedError

    if not (run_dir / DB_NAME).is_file():
        return "?", "no database"
    try:
        store = open_run_store(run_dir)
    except StoreLockedError:
        return "?", "running (no status file)"
    except StoreError:
        return "?", "unreadable database"
    try:
        return f"${prior_spend(store).settled_usd:.4f}", "no status file"
    finally:
        store.close_sync()
