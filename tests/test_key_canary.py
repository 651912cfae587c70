"""The API key never leaks, on every way a keyed call can fail (RELIABILITY.md: "no API key appears anywhere").

A canary key goes in through the env var the config names, and every failure path of a keyed call is
driven on loopback only: a closed port (refused), a server that resets the connection, one that accepts
and never answers (timeout), https to a plain-HTTP port (TLS error), an unresolvable host (DNS), 401,
403, 500 and malformed 200 bodies. The HTTP server is hostile: every body it sends quotes the key it was
sent, as providers' 401 messages and some proxies' error pages do. Each path runs through the gateway
in-process (the exception and its whole chain are checked) and through `agentkd teach`; then `agentkd
report` and `agentkd export` run on the same folder. The key must be in no log record, captured
stdout/stderr, exception, row of any table, WAL byte, output, export, report or other file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import threading
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agentkd.cli import main
from agentkd.config import load_config
from agentkd.gateway.core import CallFailed
from agentkd.roles import calls
from agentkd.session import teacher_session
from agentkd.store.writer import Store
from agentkd.teachers.base import REDACTED, ServerError, TeacherError, key_redacted

KEY_ENV = "AGENTKD_CANARY_KEY"
LIBRARY_LOGGERS = ("", "openai", "anthropic", "httpx", "httpx2", "httpcore", "httpcore2", "aiohttp",
                   "aiohttp.client", "aiohttp.internal", "asyncio", "agentkd", "duckdb", "urllib3")
# (path, what the gateway's error is): refused and DNS never reach a server; the rest do.
PATHS = {
    "refused": "ConnectFailed", "reset": "MalformedResponse", "timeout": "ReadTimeout",
    "tls": "ConnectFailed", "dns": "ConnectFailed", "401": "AuthError", "403": "AuthError",
    "500": "ServerError", "html": "MalformedResponse", "truncated": "MalformedResponse",
}
FATAL = {"401", "403"}


class EchoingHandler(BaseHTTPRequestHandler):
    """Answers as `server.mode` says, quoting the key it was sent in every body."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        key = (self.headers.get("authorization") or "").removeprefix("Bearer ") or self.headers.get("x-api-key")
        mode = self.server.mode  # type: ignore[attr-defined]
        if mode == "reset":  # RST before any byte of a reply
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if mode in ("401", "403", "500"):
            message = {"401": f"Incorrect API key provided: {key}.", "403": f"Key {key} may not use this model.",
                       "500": f"The server had an error processing the request with key {key}."}[mode]
            self._reply(int(mode), json.dumps({"error": {"message": message, "type": "error"}}), "application/json")
        elif mode == "html":
            self._reply(200, f"<html><body><h1>502 Bad Gateway</h1>Authorization: Bearer {key}</body></html>",
                        "text/html")
        elif mode == "truncated":
            self._reply(200, '{"id": "chatcmpl-1", "choices": [{"message": {"content": "echo ' + str(key),
                        "application/json")
        else:
            raise AssertionError(mode)

    def _reply(self, status: int, body: str, content_type: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class EchoingServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a reset connection is the point, not a server error


@contextmanager
def loopback_targets() -> Iterator[tuple[EchoingServer, dict[str, str]]]:
    """The echoing HTTP server, a port that accepts and never answers, and a closed port."""
    server = EchoingServer(("127.0.0.1", 0), EchoingHandler)
    server.mode = "500"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes the handshake; nobody ever reads or answers
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]  # bound, never listened on, then released: refused
    port = server.server_address[1]
    hosts = {"refused": f"http://127.0.0.1:{closed_port}", "timeout": f"http://127.0.0.1:{silent.getsockname()[1]}",
             "tls": f"https://127.0.0.1:{port}", "dns": "http://nonexistent.invalid:8080"}
    for mode in ("reset", "401", "403", "500", "html", "truncated"):
        hosts[mode] = f"http://127.0.0.1:{port}"
    try:
        yield server, hosts
    finally:
        server.shutdown()
        server.server_close()
        silent.close()


def write_config(tmp_path: Path, provider: str, transport: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(
        f'[run]\nname = "canary"\ndir = "{tmp_path / "runs"}"\n'
        f'[teacher]\nprovider = "{provider}"\nmodel = "canary-model"\napi_key_env = "{KEY_ENV}"\n'
        f'transport = "{transport}"\nbase_url = "http://127.0.0.1:1"\n'
        # Two attempts with a short backoff: every path is also retried once where it is retryable.
        "[limits]\ntimeout_s = 0.5\nmax_attempts = 2\nbackoff_base_s = 0.01\nbackoff_max_s = 0.02\n"
        '[budget]\nusd = 1.0\n[prices."canary-model"]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n')
    return path


def base_url(host: str, provider: str) -> str:
    return host + "/v1" if provider == "openai_compatible" else host


def chain(error: BaseException) -> Iterator[BaseException]:
    """An exception and everything reachable from it: cause, context (kept even under `from None`), .error."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [item.__cause__, item.__context__, getattr(item, "error", None)]


def assert_no_key_in_error(error: BaseException, key: str) -> None:
    for item in chain(error):
        texts = [str(item), repr(item), "".join(traceback.format_exception(item)), repr(item.args),
                 repr(getattr(item, "snippet", None)), repr(getattr(item, "headers", None))]
        assert not [t for t in texts if key in t], f"{type(item).__name__} shows the key"


def assert_no_key_in_tables(db: Path, key: str) -> None:
    store = Store(db, read_only=True)
    try:
        tables = [r[0] for r in store.query("SELECT table_name FROM information_schema.tables")]
        assert {"calls", "reservations", "instructions", "responses"} <= set(tables)
        for table in tables:
            columns = [r[0] for r in store.query(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table])]
            hits = store.query(f'SELECT count(*) FROM "{table}" WHERE ' + " OR ".join(
                f'contains(CAST("{c}" AS VARCHAR), ?)' for c in columns), [key] * len(columns))[0][0]
            assert hits == 0, f"table {table}: {hits} row(s) hold the key"
    finally:
        store.close_sync()


def assert_no_key_in_files(root: Path, key: str) -> list[Path]:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in files if key.encode() in p.read_bytes()]
    return files


async def call_through_gateway(config_path: Path, url: str, key: str) -> tuple[BaseException, int]:
    """One answerer call on this path; returns the error and the WAL's size while the store was open."""
    config = load_config(config_path, [f"teacher.base_url={url}"])
    async with teacher_session(config) as session:
        with pytest.raises((CallFailed, TeacherError)) as info:
            await calls.answer(session.gateway, session.prompts, f"Tom has 3 apples, path {uuid.uuid4().hex}.")
        # The call row is committed before the error is raised: the WAL holds it now, uncheckpointed.
        wal = config.run_dir / "agentkd.duckdb.wal"
        wal_bytes = wal.read_bytes() if wal.exists() else b""
        assert key.encode() not in wal_bytes
    return info.value, len(wal_bytes)


@pytest.mark.parametrize("provider", ["openai_compatible", "anthropic"])
@pytest.mark.parametrize("transport", ["aiohttp", "sdk"])
def test_no_failure_path_of_a_keyed_call_shows_the_key(tmp_path, monkeypatch, caplog, capfd, provider, transport):
    key = "sk-canary-" + uuid.uuid4().hex
    monkeypatch.setenv(KEY_ENV, f" {key}\n")  # stripped at load (RELIABILITY.md 27)
    for name in LIBRARY_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    config = write_config(tmp_path, provider, transport)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Ann has {i} pens and finds 3 more."}) + "\n"
                            for i in range(2)))
    db = tmp_path / "runs" / "canary" / "agentkd.duckdb"
    wal_sizes = []
    with loopback_targets() as (server, hosts):
        for path, error_class in PATHS.items():
            server.mode = path  # type: ignore[attr-defined]
            url = base_url(hosts[path], provider)
            error, wal_size = asyncio.run(call_through_gateway(config, url, key))
            wal_sizes.append(wal_size)
            cause = error.error if isinstance(error, CallFailed) else error
            assert cause.error_class == error_class, (path, error)
            assert_no_key_in_error(error, key)
            out = tmp_path / f"out-{path}.jsonl"
            code = main(["teach", str(config), "--role", "answerer", "--input", str(data), "--output", str(out),
                         "--no-progress", "--set", f"teacher.base_url={url}"])
            assert code == (4 if path in FATAL else 0), path
            if path not in FATAL:
                assert [r["error"] for r in map(json.loads, out.read_text().splitlines())] == [error_class] * 2
    assert all(size > 0 for size in wal_sizes)  # the WAL check above saw the rows, not an empty file
    assert main(["report", str(db.parent)]) == 0
    assert main(["export", str(db.parent), "--format", "jsonl"]) == 0
    assert main(["export", str(db.parent), "--format", "parquet"]) == 0
    assert_no_key_in_tables(db, key)
    files = assert_no_key_in_files(tmp_path, key)
    assert {"report.md", "training_data.jsonl", "training_data.parquet", "config.json"} <= {p.name for p in files}
    stdout, stderr = capfd.readouterr()
    assert "the provider refused" in stderr and KEY_ENV in stderr  # the 401/403 message names the variable
    assert key not in stdout and key not in stderr
    assert caplog.records, "DEBUG logging captured nothing: the check would be vacuous"
    for record in caplog.records:
        rendered = [logging.Formatter("%(name)s %(message)s").format(record), repr(record.args),
                    repr(record.__dict__)]
        assert not [t for t in rendered if key in t], record.name


def test_key_redacted_cuts_a_real_key_but_not_a_placeholder():
    key = "sk-canary-" + uuid.uuid4().hex
    with pytest.raises(ServerError) as info, key_redacted(key):
        raise ServerError(f"HTTP 500: bad key {key}", status=500, snippet=f'{{"key": "{key}"}}')
    assert key not in str(info.value) and key not in info.value.snippet and REDACTED in info.value.snippet
    # A local server's dummy key ("x", "unused") is no secret; cutting it out would garble the message.
    with pytest.raises(ServerError) as info, key_redacted("x"):
        raise ServerError("HTTP 500: xyz", status=500)
    assert str(info.value) == "HTTP 500: xyz"
