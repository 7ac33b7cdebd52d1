"""Operations: structured logs with request ids, X-Request-Id, graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from p2pdiff.logs import REQUEST_ID, JsonFormatter, RequestIdFilter, setup_logging
from tests.server_process import ServerProcess


async def test_every_response_has_a_request_id(client: TestClient) -> None:
    ids = set()
    for path in ("/api/health", "/api/queue/r", "/nope", "/api/docs"):
        resp = await client.get(path)
        ids.add(resp.headers["X-Request-Id"])
    assert len(ids) == 4
    resp = await client.post("/api/queue/r", data=b"{", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and resp.headers["X-Request-Id"]
    # A caller's plain id is kept (one id across systems); anything else is replaced.
    resp = await client.get("/api/health", headers={"X-Request-Id": "lb-1234.abc"})
    assert resp.headers["X-Request-Id"] == "lb-1234.abc"
    resp = await client.get("/api/health", headers={"X-Request-Id": "bad id\u00e9" + "x" * 100})
    assert resp.headers["X-Request-Id"] != "bad id" and " " not in resp.headers["X-Request-Id"]


def test_json_formatter_writes_one_object_per_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("p2pdiff.test_json")
    log.addHandler(handler)
    log.propagate = False
    try:
        token = REQUEST_ID.set("req-7")
        log.warning("hello %s\nsecond line", "world", extra={"http": {"status": 200}})
        REQUEST_ID.reset(token)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # newlines in messages and tracebacks stay inside one JSON line
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "hello world\nsecond line" and first["level"] == "warning"
    assert first["request_id"] == "req-7" and first["http"] == {"status": 200}
    assert first["logger"] == "p2pdiff.test_json" and first["ts"].endswith("Z")
    assert "request_id" not in second and "ValueError: boom" in second["exc"]


def test_setup_logging_text_format_has_the_request_id() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info", "text", stream)
        token = REQUEST_ID.set("abc-1")
        logging.getLogger("p2pdiff.x").info("in a request")
        REQUEST_ID.reset(token)
        logging.getLogger("p2pdiff.x").debug("hidden")
    finally:
        root.handlers[:], _ = saved[0], None
        root.setLevel(saved[1])
    text = stream.getvalue()
    assert "[abc-1]: in a request" in text and "hidden" not in text


def _log_records(server: ServerProcess) -> list[dict[str, object]]:
    records = []
    for line in server.log().splitlines():
        line = line.strip()
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


@pytest.mark.slow
async def test_server_logs_json_with_request_ids(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, env={"P2PDIFF_STORE_PATH": str(tmp_path / "db.sqlite3")})
    await server.start()
    try:
        async with (
            aiohttp.ClientSession(server.url) as http,
            http.post(
                "/api/queue/logs", json={"id": "t1", "prompt": "x"}, headers={"X-Request-Id": "rq-42"}
            ) as resp,
        ):
            assert resp.status == 201
    finally:
        assert await server.stop() == 0
    records = _log_records(server)
    # Every line is JSON (the server's own lines; the stderr of a crash would not be).
    assert len(records) == len([x for x in server.log().splitlines() if x.strip()])
    in_request = [r for r in records if r.get("request_id") == "rq-42"]
    assert {r["logger"] for r in in_request} >= {"p2pdiff.api", "aiohttp.access"}
    access = next(r for r in in_request if r["logger"] == "aiohttp.access")
    assert access["http"]["status"] == 201 and access["http"]["path"] == "/api/queue/logs"  # type: ignore[index]


@pytest.mark.slow
async def test_sigterm_with_open_stream_and_stalled_upload_exits_cleanly(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    server = ServerProcess(tmp_path, env={"P2PDIFF_STORE_PATH": str(db)})
    await server.start()
    assert server.proc is not None
    async with aiohttp.ClientSession(server.url) as http:
        # An open event stream (a dashboard), ...
        stream = await http.get("/api/events")
        assert stream.status == 200
        # ... an upload stuck half-way (headers and part of the body sent), ...
        stalled_reader, stalled_writer = await asyncio.open_connection("127.0.0.1", server.port)
        stalled_writer.write(
            b"POST /api/queue/slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": "never fin'
        )
        await stalled_writer.drain()
        # ... and a task POSTed just before the signal.
        async with http.post("/api/queue/last", json={"id": "last-task", "prompt": "keep me"}) as resp:
            assert resp.status == 201
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # The stream ends (EOF) at once: it is closed on shutdown instead of holding it up.
        async with asyncio.timeout(3):
            while await stream.content.readany():
                pass
        stream_closed = time.monotonic() - started
        await asyncio.sleep(0.2)
        with pytest.raises(OSError):  # no new connections once shutdown began
            await asyncio.open_connection("127.0.0.1", server.port)
        # aiohttp reads nothing more once shutdown began, so the upload cannot finish: it is cut
        # after [server] shutdown_timeout_seconds.
        assert await asyncio.wait_for(stalled_reader.read(), 10) == b""
        code = await asyncio.wait_for(server.proc.wait(), 10)
        elapsed = time.monotonic() - started
        stream.close()
        stalled_writer.close()
    print(f"\nSIGTERM: event stream closed after {stream_closed:.2f}s, exit {code} after {elapsed:.2f}s")
    assert code == 0, server.log()
    assert stream_closed < 1
    assert elapsed < 10, f"shutdown took {elapsed:.1f}s"
    log = server.log()
    assert "shutting down" in log and '"stopped"' in log
    with sqlite3.connect(db) as conn:
        ids = {row[0] for row in conn.execute("SELECT id FROM tasks")}
    assert ids == {"last-task"}
    again = ServerProcess(tmp_path, env={"P2PDIFF_STORE_PATH": str(db)})
    await again.start()
    try:
        async with aiohttp.ClientSession(again.url) as http, http.get("/api/queue/last/last-task") as resp:
            assert resp.status == 200
    finally:
        await again.stop()
