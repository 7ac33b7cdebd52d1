"""Operations: structured logs with request ids, X-Request-Id, repeated warnings counted.

The SIGTERM bound and a connection flood against the real process are in tests/chaos/.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from p2pdiff.ops.logs import REQUEST_ID, JsonFormatter, RepeatFilter, RequestIdFilter, setup_logging
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


def test_repeated_warnings_are_counted_not_repeated() -> None:
    now = [100.0]
    passed: list[logging.LogRecord] = []
    repeats = RepeatFilter(passed.append, window=10.0, max_kinds=3, clock=lambda: now[0])

    def log(msg: str, *args: object, level: int = logging.ERROR, name: str = "asyncio") -> None:
        record = logging.LogRecord(name, level, __file__, 1, msg, args, None)
        if repeats.filter(record):
            passed.append(record)

    for i in range(5000):  # a flood: one line, then silence until the window has passed
        log("socket.accept() out of system resource")
        log("lease expired: task %s", f"t{i}", level=logging.WARNING, name="p2pdiff.app")
        log(f"Exception in callback _start_serving()\nhandle: <TimerHandle when={i}>")  # as asyncio does
        log("GET %s", "/api/health", level=logging.INFO, name="aiohttp.access")  # below: all pass
        now[0] += 0.001
    assert [r.getMessage() for r in passed if r.levelno > logging.INFO] == [
        "socket.accept() out of system resource",
        "lease expired: task t0",
        "Exception in callback _start_serving()\nhandle: <TimerHandle when=0>",
    ]
    assert sum(r.levelno == logging.INFO for r in passed) == 5000
    passed.clear()
    now[0] += 10.0
    log("something else", level=logging.WARNING)  # any record closes the windows that are due
    summaries = [r for r in passed if hasattr(r, "repeated")]
    assert [(r.name, r.levelno, r.repeated) for r in summaries] == [  # type: ignore[attr-defined]
        ("asyncio", logging.ERROR, 4999),
        ("p2pdiff.app", logging.WARNING, 4999),
        ("asyncio", logging.ERROR, 4999),
    ]
    assert (
        summaries[0].getMessage()
        == "socket.accept() out of system resource (repeated 4999 more times in 5 s)"
    )
    # The next occurrence starts a new window and passes.
    passed.clear()
    log("socket.accept() out of system resource")
    assert len(passed) == 1 and not hasattr(passed[0], "repeated")
    # At most max_kinds windows: a new kind closes the oldest early, with its count so far.
    log("socket.accept() out of system resource")
    for kind in ("a", "b", "c"):
        log(kind)
    assert [getattr(r, "repeated", None) for r in passed][-4:] == [None, None, 1, None]
    # flush() reports what is left (at exit); a window without repeats says nothing.
    passed.clear()
    log("c")
    repeats.flush()
    assert [r.getMessage() for r in passed] == ["c (repeated 1 more times in 1 s)"]


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
    assert {r["logger"] for r in in_request} >= {"p2pdiff.rest.api", "aiohttp.access"}
    access = next(r for r in in_request if r["logger"] == "aiohttp.access")
    assert access["http"]["status"] == 201 and access["http"]["path"] == "/api/queue/logs"  # type: ignore[index]
