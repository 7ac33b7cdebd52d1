"""The access log: one JSON line per request, written straight to the log handler, with ``bytes`` the
body bytes the response really sent (aiohttp's own count adds the headers, and misses files sent
with sendfile() and streams)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from p2pdiff.app import create_app
from p2pdiff.appkeys import EVENTS
from p2pdiff.config import Config
from p2pdiff.ops.logs import AccessLogger, LineHandler, setup_logging
from p2pdiff.rest.dashboard import FILES

ACCESS = logging.getLogger("aiohttp.access")


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """JSON logging set up as the server does, into a string."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("info", "json", stream)
    try:
        yield stream
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def as_in_the_server() -> None:
    """Only our handler on the root logger: pytest adds its capture handler for each test, and a
    second handler makes the access logger go through logging (both must see every record)."""
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if isinstance(h, LineHandler)]


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    for handler in logging.getLogger().handlers:
        handler.flush()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def access_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [line["http"] for line in lines(stream) if line["logger"] == "aiohttp.access"]


@pytest.fixture
async def logged_client(
    aiohttp_client: Any, config: Config, log_stream: io.StringIO
) -> AsyncIterator[TestClient]:
    """The app served with its access log, as ``python -m p2pdiff`` serves it."""
    server = TestServer(create_app(config))
    # Started here: the test client starts a server without these.
    await server.start_server(access_log_class=AccessLogger, access_log=ACCESS)
    yield await aiohttp_client(server)


async def test_bytes_is_the_body_sent_for_every_kind_of_response(
    logged_client: TestClient, log_stream: io.StringIO
) -> None:
    as_in_the_server()
    client = logged_client
    sent: list[tuple[str, str, int]] = []

    async def request(method: str, path: str, **kwargs: Any) -> web.Response:
        async with client.request(method, path, **kwargs) as resp:
            sent.append((method, path, len(await resp.read())))
        return resp  # type: ignore[return-value]

    assert (await request("POST", "/api/queue/r", json={"prompt": "a lighthouse"})).status == 201
    assert (await request("GET", "/api/queue/r")).status == 200
    assert (await request("GET", "/api/health")).status == 200
    assert (await request("GET", "/nope")).status == 404
    bad_json = {"data": b"{", "headers": {"Content-Type": "application/json"}}
    assert (await request("POST", "/api/queue/r", **bad_json)).status == 400
    css = await request("GET", "/static/style.css")  # a file: aiohttp sends it with sendfile()
    assert sent[-1][2] == FILES["style.css"].stat().st_size > 0
    assert (await request("HEAD", "/static/style.css")).status == 200  # no body
    revalidate = {"If-None-Match": css.headers["ETag"]}
    assert (await request("GET", "/static/style.css", headers=revalidate)).status == 304
    # A stream: what it wrote until it ended (here: the server closing its event streams).
    async with client.get("/api/events") as stream:
        received = await stream.content.readany()  # retry and hello
        client.server.app[EVENTS].close()
        received += await stream.content.read()
    sent.append(("GET", "/api/events", len(received)))
    await asyncio.sleep(0)  # the stream's line is logged once its handler has returned

    assert [(h["method"], h["path"], h["bytes"]) for h in access_lines(log_stream)] == sent
    assert [size for method, _, size in sent if method == "HEAD"] == [0] and sent[-1][2] > 0


def test_a_direct_line_is_the_line_logging_would_write(log_stream: io.StringIO) -> None:
    """With JSON logs the access logger writes its line itself; the same line as through logging."""
    as_in_the_server()
    request = make_mocked_request("GET", "/api/health?x=1", headers={"User-Agent": "probe"})
    response = web.Response(body=b"{}")
    AccessLogger(ACCESS, "").log(request, response, 0.0123)
    other = logging.NullHandler()  # a second handler: the logger no longer writes lines itself
    ACCESS.addHandler(other)
    try:
        AccessLogger(ACCESS, "").log(request, response, 0.0123)
    finally:
        ACCESS.removeHandler(other)
    direct, through_logging = lines(log_stream)
    assert direct.pop("ts") and through_logging.pop("ts")
    assert list(direct) == list(through_logging) and direct == through_logging
    assert direct["msg"] == "GET /api/health 200 12.3ms"
    assert direct["http"] == {
        "method": "GET",
        "path": "/api/health",
        "status": 200,
        "duration_ms": 12.3,
        "bytes": 0,  # never sent
        "remote": None,
        "user_agent": "probe",
    }


async def test_lines_go_out_at_the_end_of_the_loop_round_warnings_at_once(log_stream: io.StringIO) -> None:
    log = logging.getLogger("p2pdiff.test_access_log")
    log.info("first")
    log.info("second")
    assert log_stream.getvalue() == ""  # one write for the round
    await asyncio.sleep(0)
    assert [line["msg"] for line in lines(log_stream)] == ["first", "second"]
    log.info("third")
    log.warning("fourth")  # with everything before it, in order
    assert [json.loads(line)["msg"] for line in log_stream.getvalue().splitlines()] == [
        "first",
        "second",
        "third",
        "fourth",
    ]


def test_outside_the_event_loop_lines_go_out_at_once(log_stream: io.StringIO) -> None:
    logging.getLogger("p2pdiff.test_access_log").info("now")
    assert json.loads(log_stream.getvalue())["msg"] == "now"
