"""JSONL in and out: every input line is checked before anything is sent to a teacher."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from agentkd.config import ConfigError


def read_jsonl(path: str | Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a bad line is a ConfigError naming the file and the line number."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: input file not found") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 ({err.reason} at byte {err.start})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        for field in required:
            value = row.get(field)
            if not isinstance(value, str) or not value.strip():
                problem = "missing" if field not in row else "not a non-empty string"
                raise ConfigError(f"{path}:{number}: field {field!r} is {problem}")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no rows (the file is empty)")
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write atomically (temp file + rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count
