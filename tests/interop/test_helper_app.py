"""The server's REST surface with the helper in a room next to a real Trystero 0.25.4 peer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from p2pdiff.app import create_app
from p2pdiff.config import Config
from tests.interop.conftest import LOOPBACK_ICE
from tests.interop.jspeer import JsPeer
from tests.services import Mosquitto


def helper_config(tmp_path: Path, strategy: str, relay_urls: list[str], app_id: str) -> Config:
    """The server's config with the helper on ``relay_urls`` and ICE on loopback, no STUN."""
    config = Config()
    config.store.path = str(tmp_path / "db.sqlite3")
    config.p2p.strategy = strategy
    config.p2p.app_id = app_id
    config.p2p.relay_urls = relay_urls
    config.p2p.ice_servers = []
    config.p2p.ice_host_addresses = LOOPBACK_ICE
    return config


def p2p_config(tmp_path: Path, mosquitto: Mosquitto, app_id: str) -> Config:
    return helper_config(tmp_path, "mqtt", [mosquitto.ws_url], app_id)


async def poll(check: Any, within: float = 20.0) -> Any:
    """Call ``check()`` until it returns something truthy (REST state converges asynchronously)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s; last: {result!r}")
        await asyncio.sleep(0.1)


async def relays_are(client: Any, state: str) -> bool:
    """Whether /api/health shows every relay of the helper's (first) room in ``state``."""
    health = await (await client.get("/api/health")).json()
    return set(health["p2p"]["rooms"][0]["relays"].values()) == {state}


async def test_rest_join_meets_a_trystero_peer_and_leave_is_seen(
    aiohttp_client: Any, tmp_path: Path, mosquitto: Mosquitto, app_id: str
) -> None:
    client = await aiohttp_client(create_app(p2p_config(tmp_path, mosquitto, app_id)))
    async with JsPeer.start(kind="node") as js:
        await js.join("lobby", app_id=app_id, relay_urls=[mosquitto.ws_url])
        resp = await client.post("/api/join/lobby")
        assert resp.status == 202
        assert (await resp.json())["mode"] == "p2p"

        joined = await js.wait_peer_join("lobby", timeout=30)
        helper_id = joined["peer"]

        async def helper_lists_js() -> Any:
            health = await (await client.get("/api/health")).json()
            rooms = health["p2p"]["rooms"]
            return health if rooms and [p["id"] for p in rooms[0]["peers"]] == [js.self_id] else None

        health = await poll(helper_lists_js)
        assert health["p2pEnabled"] is True and health["p2p"]["mode"] == "p2p"
        room = health["p2p"]["rooms"][0]
        assert room["selfId"] == helper_id
        assert set(room["relays"].values()) == {"connected"}
        peer = room["peers"][0]
        assert {"id", "joinedAt", "lastSeen", "rttMs"} <= set(peer)

        # The helper answers Trystero's ping, and its peer list shows up in the queue and stats views.
        assert await js.ping("lobby", helper_id) < 5000
        queue = await (await client.get("/api/queue/lobby")).json()
        assert [p["id"] for p in queue["peers"]] == [js.self_id]
        stats = await (await client.get("/api/stats")).json()
        assert stats["peers"] == 1 and stats["helperRooms"] == ["lobby"]
        assert [p["id"] for p in stats["rooms"]["lobby"]["peers"]] == [js.self_id]
        # /metrics reads the real signaling.Room: peers, relay state, data-channel traffic (the ping).
        metrics = await (await client.get("/metrics")).text()
        assert 'p2pdiff_peers{room="lobby"} 1.0' in metrics
        relay = mosquitto.ws_url
        assert f'p2pdiff_relay_state{{relay="{relay}",room="lobby",state="connected"}} 1.0' in metrics
        traffic = {
            direction: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith('p2pdiff_datachannel_bytes_total{direction="')
            for direction in ("in", "out")
            if f'direction="{direction}"' in line
        }
        # In: the ping's frames; out counts app actions only (the helper has sent none yet).
        assert traffic["in"] > 0 and traffic["out"] >= 0, traffic

        resp = await client.delete("/api/join/lobby")
        assert resp.status == 200
        await js.wait_peer_leave("lobby", helper_id, timeout=10)
        health = await (await client.get("/api/health")).json()
        assert health["p2p"]["rooms"] == []


async def test_rest_keeps_serving_while_the_broker_is_down(
    aiohttp_client: Any, tmp_path: Path, mosquitto: Mosquitto, app_id: str
) -> None:
    client = await aiohttp_client(create_app(p2p_config(tmp_path, mosquitto, app_id)))
    assert (await client.post("/api/join/lobby")).status == 202

    await poll(lambda: relays_are(client, "connected"))
    mosquitto.kill()
    await poll(lambda: relays_are(client, "reconnecting"))
    for i in range(20):
        resp = await client.post("/api/queue/lobby", json={"id": f"t{i}", "prompt": "still here"})
        assert resp.status == 201
    mosquitto.restart()
    await poll(lambda: relays_are(client, "connected"), within=60)
    queue = await (await client.get("/api/queue/lobby")).json()
    assert len(queue["queue"]) == 20
