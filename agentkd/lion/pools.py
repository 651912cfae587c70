"""Lion's pools as queries over the run database (the tables are append-only; readers de-duplicate).

An instruction's `iteration` is the iteration whose Train Pool it joins: seeds join iteration 1,
children generated during iteration t join t + 1. So
    Train Pool A(t) = accepted instructions with iteration == t
    Cache Pool B(t) = accepted instructions with iteration <= t   (seeds + every accepted child)
The held-out set has pool 'heldout' and is never trained on. An instruction's pool is decided once, by
its first row (the instruction_pool view; the store writes an id once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from agentkd.config import ConfigError, RunConfig
from agentkd.datasets import read_jsonl
from agentkd.lion.dedup import instruction_id
from agentkd.store.writer import Store


@dataclass(frozen=True)
class Item:
    id: str
    text: str  # the rendered item (agentkd/roles/items.py): what every prompt, the student and dedup see
    iteration: int
    source: str
    answer: str | None = None  # the checkable answer (gold label) of a held-out item, if known
    fields: dict | None = None  # a structured item's fields; None: the text is the whole item

    @property
    def options(self) -> list[str] | None:
        """A multiple-choice item's options (they go into the explainer's prompt)."""
        value = (self.fields or {}).get("options")
        return value if isinstance(value, list) else None

    def fields_json(self) -> str | None:
        return None if self.fields is None else json.dumps(self.fields, ensure_ascii=False)


def initial_items(config: RunConfig) -> tuple[list[Item], list[Item]]:
    """Seeds and the held-out set.

    Seeds: loop.seeds, else drawn from the sim's world. Held-out: loop.heldout; else, when every role
    is played by the simulated teacher, drawn from its world; else a fixed split of the seeds (a real
    teacher knows nothing of the sim's world, so its problems would measure nothing the user asked for).
    """
    if config.task.has_labels:
        return _unique_sets(*_label_items(config))
    from agentkd.teachers.sim.world import sample_problems

    loop = config.loop
    drawn = None
    if loop.seeds is None or _world_heldout(config):
        drawn = sample_problems(loop.seed_count + loop.heldout_count, seed=config.run.seed,
                                steps=tuple(loop.world_steps), digits=tuple(loop.world_digits))  # type: ignore[arg-type]
    if loop.seeds is not None:
        seed_texts = [(r["instruction"], _answer(r))
                      for r in read_jsonl(config.resolve_path(loop.seeds), ("instruction",))]
    else:
        seed_texts = [(p.text, str(p.answer)) for p in drawn[: loop.seed_count]]
    seeds = [Item(instruction_id(t), t, 1, "seed", a) for t, a in seed_texts]
    if loop.heldout is not None:
        rows = read_jsonl(config.resolve_path(loop.heldout), ("instruction",))
        heldout = [Item(instruction_id(r["instruction"]), r["instruction"], 0, "heldout", _answer(r)) for r in rows]
    elif drawn is not None and _world_heldout(config):
        heldout = [Item(instruction_id(p.text), p.text, 0, "heldout", str(p.answer)) for p in drawn[loop.seed_count:]]
    else:
        seeds, heldout = split_heldout(seeds, loop.heldout_count)
    return _unique_sets([replace(i, answer=None) for i in seeds], heldout)


def teacher_is_sim(config: RunConfig) -> bool:
    """Every role is played by the simulated teacher, so its world is the task."""
    providers = {config.teacher.provider} | {r.provider for r in config.roles.values() if r.provider}
    return providers == {"sim"}


def _world_heldout(config: RunConfig) -> bool:
    return config.loop.heldout is None and teacher_is_sim(config)


HELDOUT_SPLIT_MAX = 0.2  # of the seeds, at most, when the held-out set is split off them


def split_heldout(seeds: list[Item], count: int) -> tuple[list[Item], list[Item]]:
    """(seeds kept, held out): min(count, a fifth of the seeds), chosen by each item's id (a hash of its
    text), so the split does not depend on the file's order and a resumed or repeated run draws the same."""
    ids = sorted({i.id for i in seeds})
    chosen = set(ids[: min(count, int(len(ids) * HELDOUT_SPLIT_MAX))])
    kept = [replace(i, iteration=1, source="seed") for i in seeds if i.id not in chosen]
    held = [replace(i, iteration=0, source="heldout") for i in seeds if i.id in chosen]
    return kept, held


def _answer(row: dict) -> str | None:
    return str(row["answer"]) if row.get("answer") is not None else None


def _unique_sets(seeds: list[Item], heldout: list[Item]) -> tuple[list[Item], list[Item]]:
    seed_ids = {i.id for i in seeds}
    # An item in both sets would be trained on and then scored: keep it out of the held-out set.
    return _unique(seeds), _unique([i for i in heldout if i.id not in seed_ids])


def _label_items(config: RunConfig) -> tuple[list[Item], list[Item]]:
    """Label tasks: items of task.input_fields from the files (held-out rows with a gold "label"), else
    NLI or multiple-choice items of the sim's label world (teachers/sim/label_world.py)."""
    from agentkd.roles.items import fields_of_row, item_schema, render
    from agentkd.roles.explainer import task_definition

    loop, schema, task = config.loop, item_schema(config.task), task_definition(config.task)

    def from_file(path: str, *, gold: bool) -> list[Item]:
        file = config.resolve_path(path)
        out = []
        for number, row in enumerate(read_jsonl(file, ()), start=1):
            where = f"{file}:{number}"
            fields = fields_of_row(row, schema, where)
            answer = None
            if gold and row.get("label") is not None:
                options = fields.get("options")
                answer, why = (task.with_options(options) if isinstance(options, list) else task).canonical(
                    str(row["label"]))
                if answer is None:
                    raise ConfigError(f"{where}: field 'label': {why} (labels: {task.labels_text})")
            text = render(fields, schema)
            out.append(Item(instruction_id(text), text, 1 if not gold else 0, "seed" if not gold else "heldout",
                            answer, fields))
        return out

    drawn: list = []
    split = loop.heldout is None and not teacher_is_sim(config)
    if loop.seeds is None or _world_heldout(config):
        if config.task.kind not in ("nli", "multiple_choice"):
            raise ConfigError("loop.seeds / loop.heldout: a custom label task needs both files (the sim's label "
                              "world has nli and multiple_choice items only)")
        from agentkd.teachers.sim.label_world import sample_items

        drawn = sample_items(config.task.kind, loop.seed_count + loop.heldout_count, seed=config.run.seed,
                             sizes=tuple(loop.world_steps), digits=tuple(loop.world_digits))  # type: ignore[arg-type]

    def world(items: list, *, gold: bool) -> list[Item]:
        out = []
        for it in items:
            text = render(it.fields, schema)
            out.append(Item(instruction_id(text), text, 0 if gold else 1, "heldout" if gold else "seed",
                            it.label if gold else None, dict(it.fields)))
        return out

    if split:  # seeds read with their gold labels: the held-out part is scored on them
        seeds = from_file(loop.seeds, gold=True) if loop.seeds is not None else world(drawn[: loop.seed_count], gold=True)
        seeds, heldout = split_heldout(seeds, loop.heldout_count)
        return [replace(i, answer=None) for i in seeds], heldout
    seeds = from_file(loop.seeds, gold=False) if loop.seeds is not None else world(drawn[: loop.seed_count], gold=False)
    heldout = (from_file(loop.heldout, gold=True) if loop.heldout is not None
               else world(drawn[loop.seed_count:], gold=True))
    return seeds, heldout


def _unique(items: list[Item]) -> list[Item]:
    seen: set[str] = set()
    return [i for i in items if not (i.id in seen or seen.add(i.id))]


_POOL_SQL = """
SELECT id, text, iteration, source, NULL, fields FROM instruction_pool
WHERE pool = 'train' AND rejected_reason IS NULL AND {where} ORDER BY iteration, id
"""


def _item(row) -> Item:
    *head, fields = row
    return Item(*head, fields=json.loads(fields) if fields else None)


def train_pool(store: Store, iteration: int) -> list[Item]:
    return [_item(r) for r in store.query(_POOL_SQL.format(where="iteration = ?"), [iteration])]


def cache_pool(store: Store, iteration: int) -> list[Item]:
    return [_item(r) for r in store.query(_POOL_SQL.format(where="iteration <= ?"), [iteration])]


def heldout(store: Store) -> list[Item]:
    rows = store.query("SELECT id, text, 0, 'heldout', answer, fields FROM instruction_pool WHERE pool = 'heldout' "
                       "ORDER BY id")
    return [_item(r) for r in rows]


def all_texts(store: Store) -> list[str]:
    """Every instruction a new one must not near-duplicate: pools, held-out set, earlier rejects excluded."""
    return [r[0] for r in store.query("SELECT DISTINCT text FROM instruction_pool WHERE pool IN ('train', 'heldout')")]


@dataclass(frozen=True)
class Stored:
    """How the store holds an instruction id (its first row)."""

    pool: str
    iteration: int | None
    parent_id: str | None
    rejected_reason: str | None
    rouge_nearest: float | None


def stored_instructions(store: Store) -> dict[str, Stored]:
    rows = store.query("SELECT id, pool, iteration, parent_id, rejected_reason, rouge_nearest FROM instruction_pool")
    return {r[0]: Stored(*r[1:]) for r in rows}


def responses(store: Store, actor: str, iteration: int | None = None) -> dict[str, str]:
    """instruction id -> latest response text of `actor` (for one iteration, or any)."""
    sql = "SELECT instruction_id, arg_max(text, created_at) FROM responses WHERE actor = ?"
    params: list = [actor]
    if iteration is not None:
        sql += " AND iteration = ?"
        params.append(iteration)
    return dict(store.query(sql + " GROUP BY instruction_id", params))


def verdict_labels(store: Store, iteration: int) -> dict[str, str]:
    return dict(store.query("SELECT instruction_id, arg_max(label, created_at) FROM verdicts WHERE iteration = ? "
                            "GROUP BY instruction_id", [iteration]))


def ever_hard(store: Store, before: int) -> set[str]:
    return {r[0] for r in store.query("SELECT DISTINCT instruction_id FROM verdicts WHERE label = 'hard' "
                                      "AND iteration < ?", [before])}


def spend_by_role(store: Store) -> dict[str, float]:
    return {r[0]: float(r[1] or 0.0) for r in store.query("SELECT role, sum(cost_usd) FROM calls GROUP BY role")}


def metric(store: Store, iteration: int, name: str) -> float | None:
    rows = store.query("SELECT arg_max(value, created_at) FROM metrics WHERE iteration = ? AND name = ?",
                       [iteration, name])
    return rows[0][0] if rows and rows[0][0] is not None else None
