"""Two server processes on one PostgreSQL, each hosting the room relay: real Trystero 0.25 peers on
different nodes' relays meet, and the helper of the node holding the room (an in-process client of
its own relay) meets a peer on the other node's relay. The relays' events cross through the
database (PgRelayBus); no other relay is configured anywhere."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.interop.jspeer import JsPeer, meet
from tests.interop.test_helper_app import poll
from tests.server_process import ServerProcess, app_helper_env

pytestmark = [pytest.mark.slow, pytest.mark.interop]

ROOM = "studio"


def node(workdir: Path, name: str, pg_url: str, app_id: str, rooms: list[str]) -> ServerProcess:
    """A node whose helper (wire 0.25) sits in ``rooms`` on the node's own relay."""
    workdir.mkdir()
    server = ServerProcess(workdir)
    own_relay = f"ws://127.0.0.1:{server.port}/nostr"
    server.env.update(
        {
            **app_helper_env(own_relay, app_id, rooms),
            "P2PDIFF_P2P_WIRE": "0.25",
            "P2PDIFF_STORE_URL": pg_url,
            "P2PDIFF_CLUSTER_NODE_ID": name,
            "P2PDIFF_RELAY_ENABLED": "true",
        }
    )
    return server


def relay_url(server: ServerProcess) -> str:
    return f"ws://127.0.0.1:{server.port}/nostr"


async def test_peers_on_two_nodes_relays_meet_each_other_and_the_helper(
    tmp_path: Path, pg_url: str, app_id: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        n1 = await stack.enter_async_context(node(tmp_path / "n1", "n1", pg_url, app_id, [ROOM]))
        n2 = await stack.enter_async_context(node(tmp_path / "n2", "n2", pg_url, app_id, []))

        async def health(server: ServerProcess) -> Any:
            async with http.get(f"{server.url}/api/health") as resp:
                return await resp.json()

        async def helper_on_n1() -> str | None:
            rooms = (await health(n1))["p2p"]["rooms"]
            return rooms[0]["selfId"] if rooms and set(rooms[0]["relays"].values()) == {"connected"} else None

        helper = await poll(helper_on_n1, within=20)
        assert "helper: uses this server's relay in process" in n1.log()
        on_1 = await stack.enter_async_context(JsPeer.start("node", "0.25", name="on-n1"))
        on_2 = await stack.enter_async_context(JsPeer.start("node", "0.25", name="on-n2"))
        started = time.monotonic()
        # rejoins when node-datachannel's loopback ICE between the two JS peers fails (see meet)
        await meet(on_1, on_2, ROOM, relay_url(n1), app_id, b_url=relay_url(n2), strategy="nostr")
        peers_met = time.monotonic() - started
        await on_2.wait_peer_join(ROOM, helper, timeout=60)
        helper_met = time.monotonic() - started
        assert await on_2.ping(ROOM, helper) < 5000
        assert await on_2.ping(ROOM, on_1.self_id) < 5000

        async with http.get(f"{n1.url}/metrics") as resp:
            page = await resp.text()
        sent = next(
            float(line.rsplit(" ", 1)[1])
            for line in page.splitlines()
            if line.startswith('p2pdiff_relay_bus_texts_total{result="sent"}')
        )
        assert sent > 0
    print(f"\nacross nodes: the JS peers met after {peers_met:.2f} s, the helper after {helper_met:.2f} s")
