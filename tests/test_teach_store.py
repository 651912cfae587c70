"""`agentkd teach` stores each role's results in the loop's tables (issue 16, problem 3): the SQL that reads
a loop run reads a teach run, and a re-run stores nothing twice."""

from __future__ import annotations

from collections import Counter

from agentkd.cli import main
from agentkd.lion.dedup import instruction_id
from agentkd.store.writer import Store
from agentkd.teachers.sim.world import sample_problems
from tests.test_cli import problems, read_rows, write_config, write_rows


def _store(tmp_path) -> Store:
    return Store(tmp_path / "runs" / "t" / "agentkd.duckdb", read_only=True)


def _teach(config, role, data, out, *extra) -> None:
    assert main(["teach", str(config), "--role", role, "--input", str(data), "--output", str(out),
                 "--no-progress", *extra]) == 0


def test_teach_referee_stores_judgments_and_verdicts_as_the_loop_does(tmp_path):
    config = write_config(tmp_path)
    items = sample_problems(8, seed=5)
    data = write_rows(tmp_path / "j.jsonl", [
        {"instruction": p.text, "teacher_answer": f"The answer is {p.answer}.",
         "student_answer": "The answer is 99999."} for p in items])
    out = tmp_path / "j_out.jsonl"
    _teach(config, "referee", data, out)
    _teach(config, "referee", data, out)  # a re-run over the same rows stores nothing again
    printed = {instruction_id(r["instruction"]): r for r in read_rows(out)}
    store = _store(tmp_path)
    try:
        # The loop test's own queries (test_loop.py) find the referee's work.
        labels = {r[0] for r in store.query("SELECT label FROM verdicts")}
        assert labels <= {"hard", "easy", "unscored"} and "hard" in labels
        assert store.query("SELECT count(DISTINCT \"order\") FROM judgments")[0][0] == 2
        verdicts = store.query_dicts("SELECT * FROM verdicts")
        assert len(verdicts) == len(printed) == 8  # one per row, not one per session
        for v in verdicts:
            row = printed[v["instruction_id"]]
            assert v["iteration"] == 0 and v["label"] == row["verdict"]
            assert (v["teacher_score"], v["student_score"]) == (row["teacher_score"], row["student_score"])
        judgments = store.query_dicts("SELECT j.*, c.role FROM judgments j LEFT JOIN calls c ON c.key = j.call_key")
        assert len(judgments) == 16 and all(j["role"] == "referee" for j in judgments)
        per_item = Counter((j["instruction_id"], j["order"]) for j in judgments)
        assert set(per_item.values()) == {1} and {i for i, _ in per_item} == set(printed)
        # the student's wrong answer scores below the teacher's in both orders
        hard = [j for j in judgments if printed[j["instruction_id"]]["verdict"] == "hard"]
        assert hard and all(j["teacher_score"] > j["student_score"] for j in hard)
        spend = store.query_dicts("SELECT * FROM spend")
        assert [s["role"] for s in spend] == ["referee"] and spend[0]["calls"] >= 16 and spend[0]["usd"] > 0
    finally:
        store.close_sync()


def test_teach_generator_stores_new_instructions_with_source_parent_and_filter_verdict(tmp_path):
    config = write_config(tmp_path)
    seeds = problems(12)
    data = write_rows(tmp_path / "s.jsonl", seeds + [{"instruction": seeds[0]["instruction"], "mode": "hard"}])
    out = tmp_path / "g_out.jsonl"
    _teach(config, "generator", data, out, "--mode", "easy")
    first = read_rows(out)
    _teach(config, "generator", data, out, "--mode", "easy")  # resumed: the same decisions, no new rows
    rows = read_rows(out)
    assert [(r["new_instruction"], r["accepted"], r["reject_reason"]) for r in rows] == \
        [(r["new_instruction"], r["accepted"], r["reject_reason"]) for r in first]
    store = _store(tmp_path)
    try:
        # The loop test's query for children finds the accepted ones.
        children = store.query("SELECT count(*) FROM instructions WHERE source IN ('hard', 'easy') "
                               "AND parent_id IS NOT NULL AND pool = 'train'")[0][0]
        assert children == sum(r["accepted"] for r in rows) > 0
        ids = [r[0] for r in store.query("SELECT id FROM instructions")]
        assert len(ids) == len(set(ids))  # an instruction is stored once
        stored = {r["id"]: r for r in store.query_dicts(
            "SELECT i.*, c.role FROM instructions i LEFT JOIN calls c ON c.key = i.call_key")}
        seed_ids = {instruction_id(s["instruction"]) for s in seeds}
        assert {i for i, r in stored.items() if r["source"] == "seed"} == seed_ids
        assert all(stored[i]["pool"] == "train" and stored[i]["iteration"] == 1 for i in seed_ids)
        for row in rows:
            if row["new_instruction"] is None:
                continue
            child = stored[instruction_id(row["new_instruction"])]
            if row["accepted"]:
                assert child["pool"] == "train" and child["iteration"] == 2 and child["rejected_reason"] is None
                assert child["parent_id"] == instruction_id(row["instruction"]) and child["role"] == "generator"
                assert child["source"] == (row.get("mode") or "easy")
            elif child["source"] != "seed":  # a copy of a seed keeps the seed's row
                assert child["pool"] == "rejected" and child["rejected_reason"]
    finally:
        store.close_sync()


def test_the_failures_view_lists_unparsed_judgments_and_filtered_generations_with_their_model(tmp_path):
    config = write_config(tmp_path, "[sim]\nreferee_unparseable_rate = 0.5\ngenerator_bad_rate = 0.5\n")
    items = sample_problems(10, seed=8)
    judged = write_rows(tmp_path / "j.jsonl", [
        {"instruction": p.text, "teacher_answer": f"The answer is {p.answer}.", "student_answer": "The answer is 7."}
        for p in items])
    _teach(config, "referee", judged, tmp_path / "j_out.jsonl")
    _teach(config, "generator", write_rows(tmp_path / "s.jsonl", problems(12)), tmp_path / "g_out.jsonl")
    generated = read_rows(tmp_path / "g_out.jsonl")
    store = _store(tmp_path)
    try:
        failures = store.query_dicts("SELECT * FROM failures")
        unparsed_judgments = store.query("SELECT count(*) FROM judgments WHERE NOT parsed_ok")[0][0]
        model = store.query("SELECT DISTINCT model FROM calls")[0][0]
    finally:
        store.close_sync()
    by_kind = Counter((f["kind"], f["role"], f["class"]) for f in failures)
    filtered = [r for r in generated if not r["accepted"] and not r["reject_reason"].startswith("near-duplicate")]
    assert unparsed_judgments > 0 and filtered  # the faults happened
    assert by_kind == {("unparsed", "referee", "referee_unparsed"): unparsed_judgments,
                       ("rejected", "generator", "generator_rejected"): len(filtered)}
    assert all(f["model"] == model and f["detail"] and f["call_key"] for f in failures)
    assert sorted(f["detail"] for f in failures if f["kind"] == "rejected") == sorted(r["reject_reason"] for r in filtered)
