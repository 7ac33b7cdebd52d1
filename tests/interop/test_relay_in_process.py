"""Real Trystero peers (Node: 0.25 and 0.22 on the Nostr endpoint, 0.25 on the ws-relay one) meet the
helper on the relay its own server hosts, the helper being an in-process client of that relay: no
WebSocket from the server to itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from p2pdiff.app import create_app
from p2pdiff.relay import RELAY, LocalEndpoint
from signaling.relays import local
from tests.interop.jspeer import JsPeer
from tests.interop.test_helper_app import helper_config, poll
from tests.relay.conftest import metric
from tests.server_process import free_port

pytestmark = [pytest.mark.slow, pytest.mark.interop]

ROOM = "lobby"


@pytest.mark.parametrize(
    ("strategy", "wire", "path"),
    [("nostr", "0.25", "/nostr"), ("nostr", "0.22", "/nostr"), ("ws-relay", "0.25", "/ws-relay")],
)
async def test_a_trystero_peer_meets_the_helper_in_its_servers_relay(
    aiohttp_client: Any, tmp_path: Path, app_id: str, strategy: str, wire: str, path: str
) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}{path}"
    config = helper_config(tmp_path, strategy, [url], app_id)
    config.server.port = port
    config.relay.enabled = True
    config.p2p.wire = wire
    config.p2p.rooms = [ROOM]
    client = await aiohttp_client(create_app(config), server_kwargs={"host": "127.0.0.1", "port": port})
    relay = client.app[RELAY]
    endpoint = local.lookup(url)
    assert isinstance(endpoint, LocalEndpoint) and endpoint.relay is relay

    async def helper_id() -> str | None:
        rooms = (await (await client.get("/api/health")).json())["p2p"]["rooms"]
        return rooms[0]["selfId"] if set(rooms[0]["relays"].values()) == {"connected"} else None

    helper = await poll(helper_id)
    async with JsPeer.start("node", wire) as js:
        await js.join(ROOM, app_id=app_id, relay_urls=[url], strategy=strategy)
        await js.wait_peer_join(ROOM, helper, timeout=60)
        assert await js.ping(ROOM, helper) < 5000

        async def js_listed() -> bool:
            rooms = (await (await client.get("/api/health")).json())["p2p"]["rooms"]
            return [p["id"] for p in rooms[0]["peers"]] == [js.self_id]

        await poll(js_listed)
        # Sockets: the JS peer's only (the book enters no in-process client); connections: one more,
        # the helper's in-process one.
        page = await (await client.get("/metrics")).text()
        assert relay.book.total == 1
        assert metric(page, "p2pdiff_relay_connections", protocol=strategy) == 2
