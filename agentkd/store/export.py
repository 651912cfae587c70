"""Export a run's training data (instruction, teacher answer, rationale) as JSONL or Parquet.

The rows are the run database's training_examples view, the one training reads (training/run.py): every
pooled, teacher-answered instruction, never one that was ever held out, with the teacher answer, label
and rationale training uses. With loop.imitate_on = "cache_pool" the last iteration trained on exactly
these rows; with "train_pool", iteration t trained on the rows whose `iteration` is t. Order is
deterministic: iteration, then id.

A structured item (label tasks) also has `fields`: its fields as the seeds file has them (an object in
JSONL, its JSON text in Parquet); `instruction` is the item rendered as every prompt saw it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from agentkd.store.writer import Store, StoreError

DB_NAME = "agentkd.duckdb"
FIELDS = ("id", "instruction", "teacher_answer", "rationale", "label", "source", "parent_id", "iteration", "fields")

_ROWS_SQL = f"SELECT {', '.join(FIELDS)} FROM training_examples ORDER BY iteration NULLS LAST, id"


def open_run_store(run_dir: Path) -> Store:
    """Open runs/<name>/agentkd.duckdb read-only, with errors that say what to do."""
    path = Path(run_dir) / DB_NAME
    if not path.is_file():
        raise StoreError(f"{path}: no run database here; is {run_dir} a run folder (runs/<name>)?")
    return Store(path, read_only=True)  # a StoreLockedError says what works while a run writes


def accepted_rows(store: Store) -> list[dict[str, Any]]:
    """The rows training uses (the training_examples view), in export order."""
    return store.query_dicts(_ROWS_SQL)


def export_training_data(
    run_dir: Path, *, fmt: Literal["jsonl", "parquet"] = "jsonl", output: Path | None = None
) -> tuple[Path, int]:
    """Write the accepted training data of a run; returns (path, rows written)."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"--format: expected jsonl or parquet, got {fmt!r}")
    run_dir = Path(run_dir)
    store = open_run_store(run_dir)
    try:
        rows = accepted_rows(store)
    finally:
        store.close_sync()
    output = Path(output) if output is not None else run_dir / "export" / f"training_data.{fmt}"
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    if fmt == "jsonl":
        _write_jsonl(partial, rows)
    else:
        _write_parquet(partial, rows)
    os.replace(partial, output)  # a reader never sees a half-written file
    return output, len(rows)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            # a structured item's fields as an object (parquet keeps the JSON text)
            out = {k: row[k] for k in FIELDS}
            out["fields"] = json.loads(out["fields"]) if out["fields"] else None
            f.write(json.dumps(out, ensure_ascii=False) + "\n")


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.int32() if name == "iteration" else pa.string()) for name in FIELDS])
    table = pa.Table.from_pylist([{k: row[k] for k in FIELDS} for row in rows], schema=schema)
    pq.write_table(table, path)
