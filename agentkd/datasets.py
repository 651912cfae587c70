"""JSONL in and out: every input line is checked before anything is sent to a teacher."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from agentkd.config import ConfigError


def read_jsonl(path: str | Path, required: Sequence[str], *, fields_hint: str | None = None,
               prepare: Callable[[dict[str, Any], str], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a bad line is a ConfigError naming the file and the line number. A line
    lacking fields names all of them at once (and `fields_hint`, what the caller reads). `prepare(row,
    "file:line")` may derive fields before they are checked (and raise a ConfigError naming the line)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: input file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; give the input JSONL file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the input ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 ({err.reason} at byte {err.start})") from None
    rows = []
    lacking: list[tuple[int, list[str]]] = []  # (line, its field problems): reported together
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if lacking:
                break  # an earlier line's fields are the first problem
            # json's messages may end in "at" ("Unterminated string starting at"): one "at" only
            raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg.removesuffix(' at')} at column "
                              f"{err.colno})") from None
        if not isinstance(row, dict):
            if lacking:
                break
            raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        if prepare is not None:
            row = prepare(row, f"{path}:{number}")
        problems = [f"field {name!r} is {'missing' if name not in row else 'not a non-empty string'}"
                    for name in required if not isinstance(row.get(name), str) or not row[name].strip()]
        if problems:
            lacking.append((number, problems))
        rows.append(row)
    if lacking:
        number, problems = lacking[0]
        more = f" ({len(lacking) - 1} more line(s) lack fields too)" if len(lacking) > 1 else ""
        hint = f"\n  {fields_hint}" if fields_hint else ""
        raise ConfigError(f"{path}:{number}: {', '.join(problems)}{more}{hint}")
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


class JsonlAppender:
    """Rows appended to a JSONL file as they come, in batches: one write for the rows of each batch,
    at the latest `delay_s` after the first of them. A written line is in the OS's page cache, so
    kill -9 of this process does not lose it."""

    def __init__(self, path: str | Path, *, delay_s: float = 0.2) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._pending: list[str] = []
        self._delay_s = delay_s
        self._timer: asyncio.TimerHandle | None = None

    def add(self, row: dict[str, Any]) -> None:
        self._pending.append(json.dumps(row, ensure_ascii=False) + "\n")
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending or self._fd is None:
            return
        data = "".join(self._pending).encode("utf-8")
        self._pending.clear()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
