"""Training-data export: accepted rows only, never the held-out set, JSONL and Parquet agree."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from agentkd.store.export import FIELDS, export_training_data
from agentkd.store.writer import Store, StoreError
from tests.test_report import SIM_KEY, make_run


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_jsonl_export_has_accepted_rows_in_iteration_then_id_order(tmp_path):
    run_dir = make_run(tmp_path / "demo")
    path, count = export_training_data(run_dir, fmt="jsonl", output=None)
    assert path == run_dir / "export" / "training_data.jsonl"
    rows = _jsonl(path)
    assert count == len(rows) == 4
    assert [r["id"] for r in rows] == ["s1", "s2", "e1", "h1"]  # it 0: s1, s2; it 1: e1, h1
    assert all(tuple(r) == FIELDS for r in rows)
    by_id = {r["id"]: r for r in rows}
    # s1: first seen in iteration 0, latest teacher answer, the parsed rationale (not the later failed one)
    assert by_id["s1"] == {"id": "s1", "instruction": "What is 2+3?", "teacher_answer": "5",
                           "rationale": "Two plus three makes five.", "label": "5", "source": "seed",
                           "parent_id": None, "iteration": 0, "fields": None}  # a plain, unstructured item
    assert by_id["h1"]["source"] == "hard" and by_id["h1"]["parent_id"] == "s2"
    assert by_id["e1"]["rationale"] is None and by_id["e1"]["label"] is None


def test_heldout_rejected_and_unanswered_instructions_are_not_exported(tmp_path):
    path, _ = export_training_data(make_run(tmp_path / "demo"), fmt="jsonl", output=None)
    text = path.read_text(encoding="utf-8")
    ids = {r["id"] for r in _jsonl(path)}
    assert "x1" not in ids and "Held-out" not in text  # the evaluation set never becomes training data
    assert "r1" not in ids  # rejected (ROUGE-L duplicate)
    assert "n1" not in ids  # no teacher answer yet
    assert SIM_KEY not in text


def test_parquet_export_matches_jsonl(tmp_path):
    run_dir = make_run(tmp_path / "demo")
    jsonl_path, n_jsonl = export_training_data(run_dir, fmt="jsonl", output=None)
    out = tmp_path / "elsewhere" / "data.parquet"
    parquet_path, n_parquet = export_training_data(run_dir, fmt="parquet", output=out)
    assert parquet_path == out and n_parquet == n_jsonl
    table = pq.read_table(out)
    assert table.column_names == list(FIELDS)
    assert table.to_pylist() == _jsonl(jsonl_path)
    assert not out.with_name(out.name + ".partial").exists()


def test_export_of_a_run_with_no_instructions_writes_empty_files(tmp_path):
    Store(tmp_path / "agentkd.duckdb").close_sync()
    path, count = export_training_data(tmp_path, fmt="jsonl", output=None)
    assert count == 0 and path.read_text() == ""
    path, count = export_training_data(tmp_path, fmt="parquet", output=None)
    assert count == 0 and pq.read_table(path).column_names == list(FIELDS)


def test_export_rejects_unknown_format_and_missing_database(tmp_path):
    with pytest.raises(ValueError, match="--format"):
        export_training_data(tmp_path, fmt="csv", output=None)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="no run database"):
        export_training_data(tmp_path, fmt="jsonl", output=None)
