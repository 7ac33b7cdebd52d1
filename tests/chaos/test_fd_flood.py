"""A connection flood against a server at its open-file limit: the log stays small, the server
recovers, and it raised its soft limit to the hard one at start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from tests.chaos.conftest import Serve
from tests.server_process import ServerProcess
from tests.support import eventually

pytestmark = pytest.mark.slow

SOFT, HARD = 64, 128
FLOOD = 400  # connections, well past HARD
EMFILE_LINE = "socket.accept() out of system resource"


def _records(server: ServerProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in (server.workdir / "server.log").read_text().splitlines()]


def _limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


def _open_flood(port: int) -> list[socket.socket]:
    socks = []
    for _ in range(FLOOD):
        sock = socket.socket()
        sock.setblocking(False)
        # Past the listen backlog the kernel drops the SYN and connect() stays pending: still a
        # client holding a descriptor here, which is all the flood needs.
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        socks.append(sock)
    return socks


async def test_connection_flood_at_the_open_file_limit(tmp_path: Path, serve: Serve) -> None:
    server = await serve(
        tmp_path, env={"P2PDIFF_STORE_PATH": str(tmp_path / "db.sqlite3")}, nofile=(SOFT, HARD)
    )
    assert server.proc is not None
    assert _limits(server.proc.pid) == (HARD, HARD)
    socks = _open_flood(server.port)
    try:
        # asyncio logs every refused accept, many times per second while the flood lasts.
        await eventually(
            lambda: any(EMFILE_LINE in str(r["msg"]) for r in _records(server)), "EMFILE", timeout=30
        )
        await asyncio.sleep(2)  # the flood goes on (load, not synchronisation)
    finally:
        for sock in socks:
            sock.close()
    # Once the flood is gone the server accepts again (asyncio retries accept every second).
    async with aiohttp.ClientSession(server.url) as http:
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get("/api/health") as resp:
                    if resp.status == 200:
                        break
            assert asyncio.get_running_loop().time() < deadline, "the server did not recover"
            await asyncio.sleep(0.1)
    server.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(server.proc.wait(), 30) == 0
    records = _records(server)
    assert any(r["msg"] == f"open-file limit raised from {SOFT} to {HARD}" for r in records)
    floods = [r for r in records if EMFILE_LINE in str(r["msg"])]
    # One line when it starts, then one count per 10 s window (and at exit), not one per accept.
    assert 2 <= len(floods) <= 6, [r["msg"] for r in floods]
    repeated = sum(int(r.get("repeated", 0)) for r in floods)  # type: ignore[call-overload]
    assert repeated >= 100, floods
    assert len(records) < 100, f"{len(records)} log lines"
