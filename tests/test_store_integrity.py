"""One pool per instruction, export == what was trained on, report counts of distinct ids (issue 16,
problem 4), and files written before these rules: migrated with nothing lost."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from collections import Counter

import duckdb
import pytest

from agentkd.cli import main
from agentkd.config import SimSection
from agentkd.lion.dedup import instruction_id
from agentkd.store.export import accepted_rows, export_training_data
from agentkd.lion.dedup import InstructionIndex
from agentkd.roles.items import GeneratedItem
from agentkd.lion.pools import all_texts, stored_instructions, train_pool
from agentkd.lion.role_rows import GeneratedIntake
from agentkd.lion.report import load_run
from agentkd.roles.generator import parse_generated
from agentkd.store.writer import SCHEMA, Store
from agentkd.teachers.sim import roles, sim_in_thread
from agentkd.teachers.sim.protocol import ModelRequest
from agentkd.teachers.sim.roles import data_blocks
from agentkd.teachers.sim.server import Generation
from agentkd.teachers.sim.world import sample_problems
from agentkd.training.run import examples_from_store
from tests.test_loop import SMALL, open_store


def test_an_instruction_id_is_stored_once_whatever_path_writes_it(tmp_path):
    path = tmp_path / "run.duckdb"
    store = Store(path)
    store.append_now("instructions", [{"id": "a", "text": "A", "pool": "train", "iteration": 1},
                                      {"id": "a", "text": "A", "pool": "rejected", "iteration": 2}])

    async def later_writes():
        await store.start()
        store.enqueue("instructions", [{"id": "a", "text": "A", "pool": "heldout"}])
        await store.write_many("instructions", [{"id": "b", "text": "B", "pool": "train"},
                                                {"id": "a", "text": "A", "pool": "rejected"}])
        await store.close()

    asyncio.run(later_writes())
    again = Store(path)  # a later session knows the ids the file holds
    again.append_now("instructions", [{"id": "b", "text": "B", "pool": "rejected"}])
    assert again.query("SELECT id, pool FROM instructions ORDER BY id") == [("a", "train"), ("b", "train")]
    again.close_sync()


def test_a_generate_stage_redone_after_its_rows_were_stored_decides_the_same_and_adds_no_row(tmp_path):
    """kill -9 between a stage's instructions and its loop_state marker: the redone stage reads what it
    had decided (the copies of its own acceptances are not near-duplicates of themselves)."""
    store = Store(tmp_path / "run.duckdb")
    store.append_now("instructions", [{"id": instruction_id("What is 2+3?"), "text": "What is 2+3?",
                                       "source": "seed", "iteration": 1, "pool": "train"}])
    seed = instruction_id("What is 2+3?")
    replies = [GeneratedItem({"instruction": t}, t, True, None) for t in
               ("Ann has 4 pens and buys 3 more. How many pens?", "What is 2+3?",
                "Ann has 4 pens and buys 3 more. How many pens?", "Leo has 9 cards and gives away 2. How many left?")]
    replies.append(GeneratedItem(None, None, False, "JSON object without an 'instruction' field"))

    def stage():
        intake = GeneratedIntake(InstructionIndex(threshold=0.7, texts=all_texts(store)), stored_instructions(store))
        decisions = [intake.decide(g, parent_id=seed, source="hard", iteration=2, call_key=f"k{n}",
                                   fallback_id=f"{seed}:1:{n}") for n, g in enumerate(replies)]
        return decisions, intake.accepted_ids()

    first, accepted = stage()
    store.append_now("instructions", [d.row for d in first if d.row is not None])
    stored = store.count("instructions")
    again, accepted_again = stage()
    assert [(d.accepted, d.reason) for d in again] == [(d.accepted, d.reason) for d in first]
    assert [d.accepted for d in first] == [True, False, False, True, False]
    assert first[1].reason == first[2].reason == "near-duplicate (ROUGE-L 1.00)"  # a seed's copy, a repeat
    assert accepted_again == accepted and len(accepted) == 2
    assert all(d.row is None for d in again) and store.count("instructions") == stored == 4
    store.close_sync()


def _legacy_file(path):
    """A run file as agentkd wrote it before instructions were stored once: the issue's case, an id in the
    Train Pool and again as 'rejected' when a later copy of it was generated; no call_key column."""
    t0 = dt.datetime(2026, 1, 1)
    con = duckdb.connect(str(path))
    for table, cols in SCHEMA.items():  # every table of this version, instructions as it was
        cols = [(c, t) for c, t in cols if (table, c) != ("instructions", "call_key")]
        body = ", ".join(f'"{c}" {t}' for c, t in cols)
        con.execute(f'CREATE TABLE "{table}" ({body})')
    rows = [("s1", "What is 2+3?", "seed", None, 1, "train", None, None, None, t0),
            ("c1", "What is 4+4?", "hard", "s1", 2, "train", None, None, None, t0 + dt.timedelta(1)),
            ("c1", "What is 4+4?", "easy", "s1", 3, "rejected", 1.0, "near-duplicate (ROUGE-L 1.00)", None,
             t0 + dt.timedelta(2)),
            ("h1", "What is 9-4?", "heldout", None, 0, "heldout", None, None, "5", t0)]
    con.executemany("INSERT INTO instructions (id, text, source, parent_id, iteration, pool, rouge_nearest, "
                    "rejected_reason, answer, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    con.executemany("INSERT INTO responses (instruction_id, actor, iteration, text, created_at) "
                    "VALUES (?, 'teacher', ?, ?, ?)",
                    [("s1", 1, "5", t0), ("c1", 2, "8", t0 + dt.timedelta(1)), ("h1", 0, "5", t0)])
    con.close()
    return len(rows)


@pytest.mark.parametrize("read_only_first", [True, False])
def test_a_file_with_an_id_in_two_pools_reads_as_one_pool_and_migrates_losing_nothing(tmp_path, read_only_first):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stored_rows = _legacy_file(run_dir / "agentkd.duckdb")
    if read_only_first:  # not yet opened for writing by this version: temporary views, nothing written
        store = Store(run_dir / "agentkd.duckdb", read_only=True)
        assert [r["id"] for r in accepted_rows(store)] == ["s1", "c1"]
        store.close_sync()
    store = Store(run_dir / "agentkd.duckdb")  # what teach/run/train do: the schema of this version
    try:
        assert store.count("instructions") == stored_rows  # every stored row kept
        assert "call_key" in {r[0] for r in store.query("SELECT column_name FROM information_schema.columns "
                                                         "WHERE table_name = 'instructions'")}
        # c1's pool is the one first decided: trained on, exported, counted once.
        assert [i.id for i in train_pool(store, 2)] == ["c1"]
        trained = [(e.instruction, e.response) for e in examples_from_store(store)]
        assert trained == [("What is 2+3?", "5"), ("What is 4+4?", "8")]
        store.append_now("instructions", [{"id": "c1", "text": "What is 4+4?", "pool": "rejected"}])
        assert store.count("instructions") == stored_rows  # and no third row
    finally:
        store.close_sync()
    path, n = export_training_data(run_dir, fmt="jsonl")
    exported = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["instruction"], r["teacher_answer"]) for r in exported] == trained and n == 2
    assert load_run(run_dir).pools == {"heldout": 1, "train": 2}
    con = duckdb.connect(str(run_dir / "agentkd.duckdb"), read_only=True)  # the views, for the duckdb CLI
    assert con.execute("SELECT count(*) FROM training_examples").fetchone() == (2,)
    con.close()


async def _copying_generator(req: ModelRequest) -> Generation:
    """The sim's replies, except that its generator often copies: a third of its instructions are the seed
    itself, a third one fixed question (so a stage meets it again), as a real model may."""
    blocks = {**data_blocks(req.system)[0], **data_blocks(req.user)[0]}
    reply = roles.reply(req.system, req.user, json_mode=req.json_mode, rng=random.Random(req.key), phrasing=None,
                        error_rate=0.0)
    text = reply.text
    if reply.role == "generator":
        copy = (blocks["seed_instruction"], FIXED_QUESTION, None)[int(req.key[:8], 16) % 3]
        text = json.dumps({"instruction": copy}) if copy else text
    return Generation(*roles.truncate(text, req.max_tokens))


FIXED_QUESTION = sample_problems(1, seed=99, steps=(1, 1), digits=(1, 1))[0].text


@pytest.mark.slow
def test_loop_run_exports_exactly_what_its_last_iteration_trained_on(tmp_path):
    """The quickstart's case, made common: generated copies of instructions already pooled (or already
    generated in the same stage) once put an id in `instructions` twice, so export (2,625 rows) was not
    what iteration 3 trained on (2,640) and the report's pool counts were not the table's."""
    with sim_in_thread(SimSection(), seed=3, responder=_copying_generator) as sim:
        config = tmp_path / "loop.toml"
        config.write_text(SMALL.format(runs=tmp_path / "runs", usd=1.0, base_url=f'base_url = "{sim.base_url}"')
                          .replace("[loop]\n", '[loop]\nimitate_on = "cache_pool"\n')
                          .replace("max_seconds = 3", "max_seconds = 1"))
        assert main(["run", str(config), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "loop"
    store = open_store(tmp_path)
    try:
        generated = [parse_generated(r[0]).instruction for r in store.query(
            "SELECT response_text FROM calls WHERE role = 'generator' AND status = 'ok'")]
        seeds = {r[0] for r in store.query("SELECT id FROM instructions WHERE source = 'seed'")}
        copies = Counter(instruction_id(g) for g in generated if g)
        assert len(set(copies) & seeds) > 0 and copies[instruction_id(FIXED_QUESTION)] > 1  # the case arose
        ids = Counter(r[0] for r in store.query("SELECT id FROM instructions"))
        assert max(ids.values()) == 1  # ... and no id is stored twice
        pools = dict(store.query("SELECT pool, count(DISTINCT id) FROM instructions GROUP BY pool"))
        last = store.query_dicts("SELECT examples FROM train_runs WHERE iteration = 2")[0]["examples"]
        trained = [(e.instruction, e.response, e.label, e.rationale)
                   for e in examples_from_store(store, iteration=2, up_to=True)]
        accepted = dict(store.query("SELECT iteration, value FROM metrics WHERE name = 'accepted'"))
        joined = dict(store.query("SELECT iteration - 1, count(*) FROM instructions WHERE pool = 'train' "
                                  "AND iteration > 1 GROUP BY iteration"))
    finally:
        store.close_sync()
    assert {t: int(v) for t, v in accepted.items()} == {t: joined.get(t, 0) for t in accepted}
    _, n = export_training_data(run_dir, fmt="jsonl")
    exported = [json.loads(line) for line in (run_dir / "export" / "training_data.jsonl").read_text().splitlines()]
    assert n == len(exported) == last == len(trained)
    assert [(r["instruction"], r["teacher_answer"], r["label"], r["rationale"]) for r in exported] == trained
    assert load_run(run_dir).pools == pools  # the report counts distinct ids, as the table holds them
    assert f"train {pools['train']:,}" in (run_dir / "report.md").read_text()
