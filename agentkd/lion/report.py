"""report.md and plots for a run: spend by role, hard share and yield, student score against USD.

Reads runs/<name>/agentkd.duckdb read-only (what the loop wrote: metrics per iteration, calls,
train_runs, instructions) and runs/<name>/config.json. Iteration 0 is the untrained baseline. A metric
the loop did not write is shown as "—" and listed as not measured; nothing here fills gaps by guessing.
Only named config fields are rendered, so no secret can reach the report even if a file held one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentkd.gateway.budget import Usage, cost_usd
from agentkd.config import ConfigError, RunConfig, TaskSection
from agentkd.store.export import open_run_store
from agentkd.training.proxy_check import weaker_than_student
from agentkd.roles.replies import parse_failures
from agentkd.store.writer import Store

SPEND_ROLES = ("answerer", "explainer", "referee", "generator", "eval")
ROLE_COLORS = {"answerer": "#4C72B0", "explainer": "#55A868", "referee": "#C44E52",
               "generator": "#8172B2", "eval": "#CCB974"}
# Per-iteration figures the loop is expected to write (report.md says which were not measured).
EXPECTED = ("accuracy", "capability_ratio", "hard_share", "hard_yield", "unscored_share",
            "order_disagreement_rate", "accepted", "generated", "usd_cumulative", "usd_per_hard",
            "usd_per_accuracy_point")
PLOTS = {"spend": "spend_by_role.png", "hard": "hard_share.png", "score": "score_vs_usd.png"}

# One value per (iteration, name): the last step of step-wise metrics, else the latest row.
_METRICS_SQL = """
SELECT iteration, name, value FROM metrics
QUALIFY row_number() OVER (
    PARTITION BY iteration, name ORDER BY coalesce(step, -1) DESC, created_at DESC, rowid DESC) = 1
ORDER BY iteration, name
"""
_CALLS_SQL = """
SELECT role, count(*) AS calls, count(*) FILTER (WHERE status = 'ok') AS ok,
       coalesce(sum(input_tokens), 0) AS input_tokens, coalesce(sum(output_tokens), 0) AS output_tokens,
       coalesce(sum(cached_tokens), 0) AS cached_tokens, coalesce(sum(cost_usd), 0.0) AS usd
FROM calls GROUP BY role ORDER BY role
"""
# Prompt-cache tokens per model and mode (calls from before batch mode and cache writes have neither column).
_CACHE_SQL = """
SELECT model, coalesce(mode, 'online') AS mode, coalesce(sum(cached_tokens), 0) AS read,
       coalesce(sum(cache_write_tokens), 0) AS written
FROM calls WHERE coalesce(cached_tokens, 0) > 0 OR coalesce(cache_write_tokens, 0) > 0 GROUP BY ALL ORDER BY ALL
"""
# Distinct instruction ids per pool (an id's pool is its first row's).
_POOLS_SQL = "SELECT pool, count(*) AS n FROM instruction_pool GROUP BY pool ORDER BY pool"


@dataclass
class RunData:
    """Everything the report shows, read once from the run folder."""

    name: str
    config: dict[str, Any] | None
    metrics: dict[int, dict[str, float]]  # iteration -> name -> value
    calls: list[dict[str, Any]]
    statuses: dict[str, int]
    train_runs: list[dict[str, Any]]
    pools: dict[str, int]
    notes: list[str] = field(default_factory=list)
    proxy_stages: list[dict[str, Any]] = field(default_factory=list)
    parse_failures: list[dict[str, Any]] = field(default_factory=list)  # replies.parse_failures
    cache: list[dict[str, Any]] = field(default_factory=list)  # prompt-cache tokens by model and mode

    @property
    def iterations(self) -> list[int]:
        return sorted(self.metrics)

    def value(self, iteration: int, name: str) -> float | None:
        v = self.metrics.get(iteration, {}).get(name)
        return None if v is None or math.isnan(v) else v

    def spend(self, iteration: int) -> dict[str, float]:
        """USD by role in one iteration (roles the loop recorded, in SPEND_ROLES order first)."""
        row = self.metrics.get(iteration, {})
        roles = [r for r in SPEND_ROLES if f"usd/{r}" in row]
        roles += sorted(n[4:] for n in row if n.startswith("usd/") and n[4:] not in SPEND_ROLES)
        return {r: row[f"usd/{r}"] for r in roles}

    def usd_iteration(self, iteration: int) -> float | None:
        spend = self.spend(iteration)
        return sum(spend.values()) if spend else None

    def usd_cumulative(self, iteration: int) -> float | None:
        """The loop's usd_cumulative, else the running sum of per-role spend when every iteration has it."""
        stored = self.value(iteration, "usd_cumulative")
        if stored is not None:
            return stored
        parts = [self.usd_iteration(i) for i in self.iterations if i <= iteration]
        return None if any(p is None for p in parts) else sum(parts)


def load_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    store = open_run_store(run_dir)
    try:
        return _read(store, run_dir, config)
    finally:
        store.close_sync()


def _read(store: Store, run_dir: Path, config: dict[str, Any] | None) -> RunData:
    metrics: dict[int, dict[str, float]] = {}
    for iteration, name, value in store.query(_METRICS_SQL):
        if iteration is not None and value is not None:
            metrics.setdefault(int(iteration), {})[name] = float(value)
    statuses = dict(store.query("SELECT coalesce(status, '?'), count(*) FROM calls GROUP BY 1 ORDER BY 1"))
    train_runs = store.query_dicts(
        "SELECT iteration, objective, checkpoint, steps, examples, final_loss, seconds FROM train_runs "
        "ORDER BY iteration, created_at")
    has_proxy = store.query("SELECT count(*) FROM information_schema.tables WHERE table_name = 'proxy_stages'")[0][0]
    proxy_stages = store.query_dicts(  # files from before the proxy had a table of its own have none
        "SELECT iteration, stage, steps, examples, loss, seconds, proxy_logp, student_logp FROM proxy_stages "
        "ORDER BY created_at") if has_proxy else []
    name = (config or {}).get("run", {}).get("name") or run_dir.resolve().name
    has_cache = store.query("SELECT count(*) FROM information_schema.columns WHERE table_name = 'calls' "
                            "AND column_name IN ('mode', 'cache_write_tokens')")[0][0] == 2
    return RunData(name=name, config=config, metrics=metrics, calls=store.query_dicts(_CALLS_SQL),
                   statuses=statuses, train_runs=train_runs,
                   pools={p or "?": n for p, n in store.query(_POOLS_SQL)}, proxy_stages=proxy_stages,
                   parse_failures=parse_failures(store, _task(config)),
                   cache=store.query_dicts(_CACHE_SQL) if has_cache else [])


def _task(config: dict[str, Any] | None) -> TaskSection:
    """The run's task (the explainer's parse depends on its labels); the default if config.json lacks it."""
    try:
        return TaskSection.model_validate((config or {}).get("task") or {})
    except ValueError:
        return TaskSection()


def cache_saving(run: RunData) -> tuple[int, int, float | None]:
    """Prompt-cache tokens read and written over the run, and the USD the cache saved against the same
    tokens at the plain input price (reads at their discount, writes at their premium, in batch mode after
    the batch discount as billed). USD is None when the run's prices cannot be read from config.json."""
    read, written = sum(c["read"] for c in run.cache), sum(c["written"] for c in run.cache)
    try:
        config = RunConfig.model_validate(run.config or {})
        saved = 0.0
        for c in run.cache:  # the same tokens billed without the cache, minus as billed with it
            price, batch, n = config.price(c["model"]), c["mode"] == "batch", c["read"] + c["written"]
            saved += (cost_usd(price, Usage(n, 0), batch=batch)
                      - cost_usd(price, Usage(n, 0, c["read"], c["written"]), batch=batch))
    except (ValueError, ConfigError):
        return read, written, None
    return read, written, saved


def write_report(run_dir: Path) -> Path:
    """Write run_dir/report.md and run_dir/plots/*.png; returns the report path."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    drawn = draw_plots(run, plots_dir)
    path = run_dir / "report.md"
    path.write_text(render_markdown(run, drawn), encoding="utf-8")
    return path


# ---- plots -------------------------------------------------------------------------------------
def draw_plots(run: RunData, plots_dir: Path) -> dict[str, Path]:
    """Draw the plots that have data; returns {plot: path} of those written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    drawn: dict[str, Path] = {}
    for key, draw in (("spend", _plot_spend), ("hard", _plot_hard), ("score", _plot_score)):
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
        try:
            if draw(run, ax):
                fig.tight_layout()
                path = plots_dir / PLOTS[key]
                fig.savefig(path)
                drawn[key] = path
        finally:
            plt.close(fig)
    return drawn


def _iteration_axis(ax, iterations: list[int]) -> None:
    ax.set_xticks(iterations, [f"it {i}" for i in iterations])
    ax.set_xlim(min(iterations) - 0.5, max(iterations) + 0.5)
    ax.set_xlabel("Lion iteration (it 0 = before training)")
    ax.grid(axis="y", alpha=0.3)


def _plot_spend(run: RunData, ax) -> bool:
    """(a) USD spent per iteration, stacked by role."""
    spends = {i: run.spend(i) for i in run.iterations}
    roles = list(dict.fromkeys(r for s in spends.values() for r in s))
    if not roles:
        return False
    iterations = run.iterations
    bottom = [0.0] * len(iterations)
    for role in roles:
        heights = [spends[i].get(role, 0.0) for i in iterations]
        ax.bar(iterations, heights, bottom=bottom, label=role, color=ROLE_COLORS.get(role), width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("USD this iteration")
    ax.yaxis.set_major_formatter(_dollars())
    ax.set_title(f"{run.name}: teacher spend by role")
    _iteration_axis(ax, iterations)
    handles, labels = ax.get_legend_handles_labels()  # top of the stack first, as drawn
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return True


def _plot_hard(run: RunData, ax) -> bool:
    """(b) hard share, hard yield and unscored share per iteration."""
    series = (("hard_share", "hard share", "o"), ("hard_yield", "hard yield", "s"),
              ("unscored_share", "unscored", "^"))
    drew = False
    for name, label, marker in series:
        points = [(i, run.value(i, name)) for i in run.iterations if run.value(i, name) is not None]
        if points:
            ax.plot(*zip(*points), marker=marker, label=label)
            drew = True
    if not drew:
        return False
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(_percent())
    ax.set_ylabel("share")
    ax.set_title(f"{run.name}: hard instructions per iteration")
    _iteration_axis(ax, run.iterations)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.text(1.02, 0.0, "hard share: judged items\nlabelled hard\n\nhard yield: children of\nhard items judged hard\n"
            "the next iteration\n\nunscored: referee reply\nnot usable", transform=ax.transAxes, fontsize=8,
            va="bottom", color="0.35")
    return True


def _plot_score(run: RunData, ax) -> bool:
    """(c) student accuracy and capability ratio against cumulative USD, points labelled by iteration."""
    drew = False
    for name, label, marker in (("accuracy", "held-out accuracy", "o"), ("capability_ratio", "capability ratio", "s")):
        points = [(run.usd_cumulative(i), run.value(i, name), i) for i in run.iterations]
        points = [p for p in points if p[0] is not None and p[1] is not None]
        if not points:
            continue
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
        for x, y, i in points:
            ax.annotate(f"it {i}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8,
                        color=line.get_color())
        drew = True
    if not drew:
        return False
    ax.set_xlabel("cumulative teacher USD")
    ax.set_ylabel("student score")
    ax.margins(x=0.08, y=0.12)
    ax.xaxis.set_major_formatter(_dollars())
    ax.set_title(f"{run.name}: student vs spend")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return True


def _percent():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=0)


def _dollars():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"${v:.4g}")


# ---- markdown ----------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _usd(v: float | None) -> str:
    return "—" if v is None else f"${v:.4f}"


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    return f"{int(v):,}" if float(v).is_integer() else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _setup_lines(config: dict[str, Any] | None) -> list[str]:
    if config is None:
        return ["config.json is missing from the run folder: teacher and student are unknown."]
    teacher = config.get("teacher", {})
    lines = [f"- Teacher: provider `{teacher.get('provider', '?')}`, model `{teacher.get('model', '?')}`"]
    for role, override in sorted((config.get("roles") or {}).items()):
        if override.get("provider") or override.get("model"):
            lines.append(f"  - {role}: provider `{override.get('provider') or teacher.get('provider', '?')}`, "
                         f"model `{override.get('model') or teacher.get('model', '?')}`")
    lines.append(f"- Student: `{config.get('student', {}).get('spec', '?')}`, objective "
                 f"`{config.get('train', {}).get('objective', '?')}`")
    loop, budget = config.get("loop", {}), config.get("budget", {})
    lines.append(f"- Loop: {loop.get('iterations', '?')} iterations, {loop.get('new_per_iteration', '?')} new "
                 f"instructions per iteration, tau {loop.get('tau', '?')}")
    caps = [f"${budget['usd']}" if budget.get("usd") is not None else "",
            f"{budget['tokens']:,} tokens" if budget.get("tokens") is not None else ""]
    lines.append(f"- Budget: {', '.join(c for c in caps if c) or 'no cap'}")
    return lines


def render_markdown(run: RunData, drawn: dict[str, Path]) -> str:
    out = [f"# agentkd run report: {run.name}", ""] + _setup_lines(run.config) + [""]

    out += ["## Per iteration", ""]
    if not run.metrics:
        out += ["No metrics recorded yet: the loop has not finished iteration 0 (baseline evaluation).", ""]
    else:
        if run.iterations == [0]:
            out += ["Only iteration 0 (the untrained baseline) is recorded; no Lion iteration has finished.", ""]
        header = ["iter", "accuracy", "capability ratio", "hard share", "hard yield", "unscored",
                  "order disagreement", "accepted", "USD (iter)", "USD (cumulative)", "USD / hard",
                  "USD / accuracy point"]
        rows = []
        for i in run.iterations:
            v = lambda name, i=i: run.value(i, name)
            rows.append([str(i), _pct(v("accuracy")), _num(v("capability_ratio")), _pct(v("hard_share")),
                         _pct(v("hard_yield")), _pct(v("unscored_share")), _pct(v("order_disagreement_rate")),
                         _num(v("accepted")), _usd(run.usd_iteration(i)), _usd(run.usd_cumulative(i)),
                         _usd(v("usd_per_hard")), _usd(v("usd_per_accuracy_point"))])
        out += _table(header, rows) + [""]
        names = {n for values in run.metrics.values() for n in values}
        missing = [n for n in EXPECTED if n not in names]
        if missing:
            out += [f"Not measured in this run: {', '.join(f'`{n}`' for n in missing)}.", ""]
        out += [("Iteration 0 is the student before any training. Accuracy is on the held-out set; the "
                 "capability ratio is the sum of referee scores for the student over the teacher's."), ""]
        saved = [(run.value(i, "referee_usd_saved"), run.value(i, "referee_usd_saved_worst_case")) for i in run.iterations]
        saved = [(lo, hi) for lo, hi in saved if lo is not None and hi is not None]
        if saved:  # loop.discriminate = "label": hard/easy without the referee
            out += [(f"Hard/easy by label (the student's label against the teacher's): no referee calls; both "
                     f"orders would have cost ${sum(lo for lo, _ in saved):.4f} (input) .. "
                     f"${sum(hi for _, hi in saved):.4f} (worst case) over {len(saved)} iteration(s)."), ""]

    out += _spend_section(run) + _parse_section(run) + _train_section(run) + _proxy_section(run) + _plots_section(run, drawn)
    out += _notes_section(run)
    return "\n".join(out).rstrip() + "\n"


def _spend_section(run: RunData) -> list[str]:
    out = ["## Teacher calls and spend (calls table)", ""]
    if not run.calls:
        return out + ["No teacher calls recorded.", ""]
    rows = [[c["role"] or "?", f"{c['calls']:,}", f"{c['ok']:,}", f"{c['input_tokens']:,}",
             f"{c['output_tokens']:,}", f"{c['cached_tokens']:,}", _usd(c["usd"])] for c in run.calls]
    total = {k: sum(c[k] for c in run.calls) for k in ("calls", "ok", "input_tokens", "output_tokens",
                                                        "cached_tokens", "usd")}
    rows.append(["**total**", f"{total['calls']:,}", f"{total['ok']:,}", f"{total['input_tokens']:,}",
                 f"{total['output_tokens']:,}", f"{total['cached_tokens']:,}", _usd(total["usd"])])
    out += _table(["role", "calls", "ok", "input tokens", "output tokens", "cached tokens", "USD"], rows)
    out += ["", "Call status: " + ", ".join(f"{s} {n:,}" for s, n in run.statuses.items()) + "."]
    if run.cache:
        read, written, saved = cache_saving(run)
        worth = f": {_usd(saved)} saved against the plain input price" if saved is not None else ""
        out += ["", f"Prompt cache: {read:,} input tokens read from it, {written:,} written to it{worth}."]
    if run.pools:
        out += ["", "Instruction pools now: " + ", ".join(f"{p} {n:,}" for p, n in run.pools.items()) + "."]
    return out + [""]


def _parse_section(run: RunData) -> list[str]:
    """Each parsed role's stored replies that did not parse (every reply, re-asks included)."""
    if not run.parse_failures:
        return []
    rows = [[p["role"], f"{p['replies']:,}", f"{p['failures']:,}", _pct(p["share"])] for p in run.parse_failures]
    return ["## Replies that did not parse", ""] + _table(["role", "replies", "did not parse", "share"], rows) + [
        "", "Every stored reply of the role, re-asks included, read by the parser the run applies. A share above "
        "fail_fast.max_share within one stage stops the run (exit 5).", ""]


def _train_section(run: RunData) -> list[str]:
    out = ["## Training runs", ""]
    if not run.train_runs:
        return out + ["No training run recorded.", ""]
    rows = [[str(t["iteration"]), t["objective"] or "?", f"`{t['checkpoint']}`" if t["checkpoint"] else "—",
             _num(t["steps"]), _num(t["examples"]), _num(t["final_loss"], 4), _num(t["seconds"], 1)]
            for t in run.train_runs]
    return out + _table(["iter", "objective", "checkpoint", "steps", "examples", "final loss", "seconds"], rows) + [""]


def _proxy_section(run: RunData) -> list[str]:
    """The proxy's stages (posterior/proxy KD): its held-out log p per token should rise above the student's."""
    if not run.proxy_stages:
        return []
    rows = [[str(p["iteration"]), p["stage"], _num(p["steps"]), _num(p["examples"]), _num(p["loss"], 4),
             _num(p["seconds"], 1), _num(p["proxy_logp"]), _num(p["student_logp"])] for p in run.proxy_stages]
    header = ["iter", "stage", "steps", "examples", "loss", "seconds", "proxy log p / token", "student log p / token"]
    last_stage = {p["iteration"]: p for p in run.proxy_stages}  # stages come in order: the last one wins
    warnings = [f"**Iteration {t}:** {w}." for t, p in last_stage.items()
                if (w := weaker_than_student(p["proxy_logp"], p["student_logp"])) is not None]
    return ["## The proxy", ""] + _table(header, rows) + [
        "", "Log p per token of held-out teacher answers (the KD role, which the proxy never trains on).", ""] + (
        [*warnings, ""] if warnings else [])


def _plots_section(run: RunData, drawn: dict[str, Path]) -> list[str]:
    out = ["## Plots", ""]
    captions = {"spend": "Teacher spend by role per iteration", "hard": "Hard share, hard yield and unscored share",
                "score": "Student accuracy and capability ratio against cumulative USD"}
    for key, caption in captions.items():
        if key in drawn:
            out += [f"![{caption}](plots/{drawn[key].name})", ""]
        else:
            out += [f"{caption}: no data recorded, no plot.", ""]
    return out


def _notes_section(run: RunData) -> list[str]:
    out = ["## Notes", ""]
    config = run.config or {}
    if config.get("teacher", {}).get("provider") == "sim":
        out.append("- The teacher is the simulated teacher, a stand-in for testing the pipeline, not a real "
                   "teacher; USD for sim calls is at nominal prices, not money spent.")
        heldout = config.get("loop", {}).get("heldout")
        if heldout:
            out.append(f"- The held-out set is the file `{heldout}`; the sim judges it in its own world.")
        else:
            out.append("- The held-out set is drawn from the training distribution of the simulated teacher's "
                       "world, so accuracy measures in-distribution learning only.")
    elif not config.get("loop", {}).get("heldout") and run.config is not None:
        out.append("- The held-out set is a fixed split of the seeds (loop.heldout is unset and the teacher is "
                   "not the simulated one); accuracy is measured only on items with an `answer`, else only "
                   "the capability ratio.")
    out.append("- The capability ratio is judged by the referee (a teacher model), which may favour answers "
               "in its own style; the order-disagreement rate shows how often swapping answer order changed "
               "the verdict.")
    return out + [""]
