"""Mutation testing of the money and data path (`make mutants`; not in CI: too slow for 2 cores).

mutmut 3 mutates the files named in pyproject's [tool.mutmut] only_mutate; this script asks it to test
the mutants of the functions that hold money or data: all of budget.py, ledger.py and retry.py, the
gateway's reserve/settle path and the store's writer. Each mutant runs only the tests (of
pytest_add_cli_args_test_selection) that executed its function. Writes benchmarks/mutation.json
({"killed", "survived", "score", "by_module"}) and benchmarks/mutation.md, where every survivor is listed
with its diff and, if it is in benchmarks/mutation_equivalent.toml, why no test can kill it.

    python benchmarks/mutation.py            # run every mutant (about an hour on a loaded 2-core machine)
    python benchmarks/mutation.py --rerun-survivors   # after adding tests: only last run's survivors
    python benchmarks/mutation.py --resume   # survivors and whatever an interrupted run did not reach
    python benchmarks/mutation.py --report   # rewrite the reports from mutants/ without running
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
EQUIVALENT = HERE / "mutation_equivalent.toml"

# Mutant names are "<module>.x_<function>__mutmut_<n>" or "<module>.xǁ<Class>ǁ<method>__mutmut_<n>".
GATEWAY = "agentkd.gateway.core.xǁGatewayǁ"
STORE = "agentkd.store.writer."
TARGETS = {
    "budget": ["agentkd.gateway.budget.*"],
    "ledger": ["agentkd.gateway.ledger.*"],
    "retry": ["agentkd.gateway.retry.*"],
    # reserve -> cover -> send -> settle/release, and what a session restores and closes
    "gateway reserve/settle": [f"{GATEWAY}{m}__mutmut_*" for m in ("start", "aclose", "_attempt",
                                                                  "_reserved_attempt", "_reserve")],
    # the single writer: queueing, batching, commit, acknowledgement, failure
    "store writer": [f"{STORE}x__resolve__mutmut_*", f"{STORE}x__to_tuple__mutmut_*"]
    + [f"{STORE}xǁStoreǁ{m}__mutmut_*" for m in ("append_now", "_flush", "start", "submit", "enqueue", "write",
                                                  "write_many", "_write_loop", "_before_commit", "close",
                                                  "close_sync")],
}
KILLED = {"killed", "timeout", "segfault", "caught by type check"}  # a test (or its time limit) noticed
SURVIVED = {"survived", "no tests", "suspicious"}  # "no tests": no selected test runs that function
# mutmut's exit-code meanings (mutmut.stats.status_by_exit_code, 3.8)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 35: "suspicious",
          36: "timeout", 37: "caught by type check", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          -11: "segfault", -9: "segfault", 2: "interrupted", None: "not checked"}


def module_of(name: str) -> str | None:
    from fnmatch import fnmatch

    return next((m for m, globs in TARGETS.items() if any(fnmatch(name, g) for g in globs)), None)


def results() -> dict[str, str]:
    """mutant name -> status, for the targeted mutants mutmut has recorded under mutants/."""
    out = {}
    for meta in sorted((ROOT / "mutants" / "agentkd").rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if module_of(name) is not None:
                out[name] = STATUS.get(code, "suspicious")
    return out


def mutmut(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # tests must import mutants/agentkd
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True)


MEASURED_AT = ROOT / "mutants" / "measured-at"  # the commit whose source the recorded results are for


def run(names: list[str], max_children: int) -> None:
    log = ROOT / "mutants" / "mutmut-run.log"  # mutants/ is git-ignored
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, capture_output=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "agentkd", "tests"], cwd=ROOT, text=True,
                           capture_output=True).stdout.strip()
    (ROOT / "mutants").mkdir(exist_ok=True)
    MEASURED_AT.write_text(f"{head.strip()}{' + uncommitted changes' if dirty else ''}\n")
    proc = mutmut("run", "--max-children", str(max_children), *names)
    log.write_text(proc.stdout[-200_000:] + proc.stderr[-50_000:])
    if proc.returncode != 0:
        sys.exit(f"mutmut run failed ({proc.returncode}); see {log}")


def diff_of(name: str) -> str:
    text = mutmut("show", name).stdout
    return "\n".join(line for line in text.splitlines()[1:] if line.strip())


def mutated_line(diff: str) -> str:
    plus = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return plus[0] if plus else ""


def report(status: dict[str, str]) -> int:
    equivalent = tomllib.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    by_module: dict[str, Counter] = {m: Counter() for m in TARGETS}
    survivors = []
    for name, state in sorted(status.items()):
        counts = by_module[module_of(name)]
        if state in KILLED:
            counts["killed"] += 1
        elif state in SURVIVED:
            counts["survived"] += 1
            survivors.append(name)
        else:
            counts["not run"] += 1
    killed = sum(c["killed"] for c in by_module.values())
    survived = sum(c["survived"] for c in by_module.values())
    score = killed / (killed + survived) if killed + survived else 0.0
    rows, unexplained = [], []
    for name in survivors:
        diff = diff_of(name)
        entry = equivalent.get(name)
        if entry is not None and entry.get("line") != mutated_line(diff):
            entry = None  # the source moved: this explanation was for another mutant
        if entry is None:
            unexplained.append(name)
        rows.append((name, status[name], diff, entry["why"] if entry else None))
    summary = {
        "killed": killed, "survived": survived, "score": round(score, 4),
        "equivalent": survived - len(unexplained), "unexplained_survivors": unexplained,
        "not_run": sum(c["not run"] for c in by_module.values()),
        "measured_at": MEASURED_AT.read_text().strip() if MEASURED_AT.exists() else None,
        "by_module": {m: {"killed": c["killed"], "survived": c["survived"],
                          "score": round(c["killed"] / (c["killed"] + c["survived"]), 4)
                          if c["killed"] + c["survived"] else None} for m, c in by_module.items()},
    }
    (HERE / "mutation.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_markdown(summary, rows)
    print(json.dumps({k: summary[k] for k in ("killed", "survived", "score", "equivalent")}))
    return 0 if score >= 0.9 and not unexplained else 1


def write_markdown(summary: dict, rows: list[tuple[str, str, str, str | None]]) -> None:
    lines = ["# Mutation testing: the money and data path", "",
             "Written by `make mutants` (benchmarks/mutation.py, mutmut 3) — do not edit by hand; the",
             "explanations of equivalent mutants live in benchmarks/mutation_equivalent.toml.", "",
             "Mutated: all of budget.py, ledger.py and retry.py; the gateway's reserve/settle path (Gateway.start,",
             "aclose, _attempt, _reserved_attempt, _reserve); the store's writer (_resolve, _to_tuple and Store's",
             "append_now, _flush, start, submit, enqueue, write, write_many, _write_loop, _before_commit, close,",
             "close_sync). Each mutant ran the tests of [tool.mutmut] pytest_add_cli_args_test_selection that",
             "execute its function. Killed includes time-outs; survived includes mutants no selected test reaches.",
             "mutmut keeps each mutant's result under mutants/ and re-tests a function whose source changed, so",
             "`--resume` / `--rerun-survivors` after adding tests update this without a full run (a full run from",
             "scratch took about 40 min on a shared, loaded 2-core machine).",
             "", f"Measured at: {summary['measured_at']}.",
             "", f"**Score {summary['score']:.3f}**: {summary['killed']} killed, {summary['survived']} survived "
             f"({summary['equivalent']} explained as equivalent below, {len(summary['unexplained_survivors'])} "
             "unexplained).", "", "| module | killed | survived | score |", "| --- | ---: | ---: | ---: |"]
    for module, c in summary["by_module"].items():
        score = "—" if c["score"] is None else f"{c['score']:.3f}"
        lines.append(f"| {module} | {c['killed']} | {c['survived']} | {score} |")
    lines += ["", "## Survivors", ""]
    if not rows:
        lines.append("None.")
    for name, state, diff, why in rows:
        lines += [f"### `{name}` ({state})", "", "```diff", diff, "```", "",
                  f"**Equivalent:** {why}" if why else "**UNEXPLAINED**: needs a test or an explanation.", ""]
    (HERE / "mutation.md").write_text("\n".join(lines).rstrip() + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only rewrite the reports from mutants/")
    parser.add_argument("--rerun-survivors", action="store_true", help="run only the last run's survivors")
    parser.add_argument("--resume", action="store_true",
                        help="run only the mutants not yet killed (survivors and those an interrupted run left)")
    parser.add_argument("--only", nargs="*", choices=list(TARGETS), help="run only these modules' mutants")
    # Most of a mutant's test time is waiting (commits, the sim, timers), not CPU: more workers than cores help.
    parser.add_argument("--max-children", type=int, default=6)
    args = parser.parse_args()
    if not args.report:
        if args.resume and results():
            # mutmut regenerates the mutants of functions whose source changed when a run starts: one cheap
            # run first, so the list below includes them (reset to "not checked").
            run([next(iter(results()))], args.max_children)
        if args.rerun_survivors or args.resume:
            wanted = SURVIVED | ({"not checked", "interrupted"} if args.resume else set())
            names = [n for n, s in results().items() if s in wanted]
        else:
            names = [g for m in (args.only or TARGETS) for g in TARGETS[m]]
        if names:
            run(names, args.max_children)
    return report(results())


if __name__ == "__main__":
    sys.exit(main())
