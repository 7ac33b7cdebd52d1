"""SIGTERM while clients do their worst: event streams that stopped reading, a stalled upload, half a
request, idle keep-alive connections, POSTs racing the signal and a GPU peer working dispatched
tasks. The server exits 0 within ``shutdown_timeout_seconds`` + 1 s, every task it answered 201
for is in the store, and the peer sees the helper go.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.chaos.conftest import Serve
from tests.interop.jspeer import JsPeer
from tests.interop.test_helper_app import poll
from tests.server_process import app_helper_env
from tests.services import NostrRelay, running
from tests.support import service_or_fail

pytestmark = [pytest.mark.slow, pytest.mark.interop]

# shutdown_timeout_seconds. Long enough that waiting it out twice (what aiohttp alone does with a
# response stuck on a client that reads nothing: 6.2 s at the default 3 s) fails the bound below.
GRACE = 4.0
# Added to the promised bound (GRACE + 1 s) for a loaded machine; the old behaviour needs 2 * GRACE.
SLACK = 2.0
ROOM = "studio"
GPU = {"hasGPU": True, "gpuName": "test GPU", "memory": 8, "cores": 4}
# Fat task.created events (options up to 16 KiB), so a stream that stops reading soon fills the
# socket buffers and its handler blocks in a write.
OPTIONS = {"steps": 4, "padding": "x" * 12_000}


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[NostrRelay]:
    with running(service_or_fail(NostrRelay, tmp_path / "nostr")) as service:
        yield service


def raw(port: int, request: bytes, *, small_buffer: bool = False) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(30)
    if small_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


async def post_until_stopped(http: aiohttp.ClientSession, acked: list[str], worker: int) -> None:
    """POST tasks until the server is gone; ``acked`` gets every id answered 201."""
    for n in range(100_000):
        task_id = f"w{worker}-{n}"
        try:
            async with http.post(
                f"/api/queue/{ROOM}", json={"id": task_id, "prompt": "p", "options": OPTIONS}
            ) as resp:
                if resp.status == 201:
                    acked.append(task_id)
                elif resp.status != 400:  # 400: the body was cut by the shutdown
                    raise AssertionError(f"POST {task_id}: {resp.status} {await resp.text()}")
        except (TimeoutError, aiohttp.ClientConnectionError):
            return


async def stats(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.get("/api/stats") as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def test_sigterm_exits_within_the_bound_whatever_clients_do(
    tmp_path: Path, relay: NostrRelay, serve: Serve
) -> None:
    app_id = f"p2pdiff-chaos-{uuid.uuid4().hex[:10]}"
    db = tmp_path / "db.sqlite3"
    server = await serve(
        tmp_path,
        env={
            "P2PDIFF_STORE_PATH": str(db),
            "P2PDIFF_STORE_SYNCHRONOUS": "normal",  # hundreds of POSTs below; durability is the same
            "P2PDIFF_SERVER_SHUTDOWN_TIMEOUT_SECONDS": str(GRACE),
            # A stream that stopped reading stays (is not dropped as too slow), stuck in a write.
            "P2PDIFF_SERVER_SSE_CLIENT_BUFFER": "100000",
            **app_helper_env(relay.url, app_id, [ROOM]),
        },
    )
    assert server.proc is not None
    port = server.port
    acked: list[str] = []
    sockets: list[socket.socket] = []
    async with (
        JsPeer.start("node", "0.22", name="gpu") as page,
        aiohttp.ClientSession(server.url) as http,
        aiohttp.ClientSession(server.url) as posting,
    ):
        await page.join(ROOM, app_id=app_id, relay_urls=[relay.url], strategy="nostr")
        await page.behave_like_app(ROOM, GPU, step_ms=50)
        await poll(lambda: _gpu_peers(http), within=60)
        helper_id = next(r["selfId"] for r in (await (await http.get("/api/health")).json())["p2p"]["rooms"])

        reading = [await http.get("/api/events") for _ in range(2)]
        sockets += [
            raw(port, b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n", small_buffer=True) for _ in range(3)
        ]
        for _ in range(3):  # idle keep-alive connections
            sock = raw(port, b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(65536)
            sockets.append(sock)
        sockets += [raw(port, b"GET /api/health HTTP/1.1\r\nHost:") for _ in range(2)]  # half a request
        upload = (
            b"POST /api/queue/r HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": "never'
        )
        sockets += [raw(port, upload) for _ in range(2)]  # stalled uploads

        posters = [asyncio.create_task(post_until_stopped(posting, acked, n)) for n in range(4)]
        # Until a stream that reads nothing has a backlog: its handler is blocked writing to it.
        await poll(lambda: _stuck_stream(http), within=120)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(server.proc.wait(), GRACE + 30)
        elapsed = time.monotonic() - started
        await asyncio.gather(*posters)
        # The peer sees the helper go (its goodbye, or its connection closing with the process).
        await page.wait_peer_leave(ROOM, helper_id, timeout=60)
        for stream in reading:
            stream.close()
    for sock in sockets:
        sock.close()
    print(f"\nSIGTERM -> exit {code} in {elapsed:.2f} s (bound {GRACE + 1:.1f} s), {len(acked)} tasks acked")
    assert code == 0, server.log()
    assert elapsed <= GRACE + 1 + SLACK, f"shutdown took {elapsed:.2f} s"
    log = server.log()
    assert "connections still busy" in log and '"stopped"' in log, log
    assert acked
    with contextlib.closing(sqlite3.connect(db)) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM tasks WHERE room_id = ?", (ROOM,))}
    assert set(acked) <= stored, sorted(set(acked) - stored)[:10]
    # And a new server process finds them.
    again = await serve(tmp_path, env={"P2PDIFF_STORE_PATH": str(db)})
    async with aiohttp.ClientSession(again.url) as http, http.get(f"/api/queue/{ROOM}/{acked[-1]}") as resp:
        assert resp.status == 200
    assert await again.stop() == 0


async def _gpu_peers(http: aiohttp.ClientSession) -> bool:
    return bool((await stats(http))["rooms"].get(ROOM, {}).get("gpuPeers"))


async def _stuck_stream(http: aiohttp.ClientSession) -> bool:
    return bool((await stats(http))["events"]["maxBuffered"] >= 50)
