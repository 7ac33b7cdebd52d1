"""``/api/events`` with the helper in a room next to a real Trystero 0.25.4 peer and a real broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2pdiff.app import create_app
from tests.interop.jspeer import JsPeer
from tests.interop.test_helper_app import p2p_config
from tests.services import Mosquitto
from tests.sse_client import History, SSEStream


async def test_peer_and_relay_events_from_a_real_room(
    aiohttp_client: Any, tmp_path: Path, mosquitto: Mosquitto, app_id: str
) -> None:
    client = await aiohttp_client(create_app(p2p_config(tmp_path, mosquitto, app_id)))
    stream = SSEStream(await client.get("/api/events?room=lobby"))
    assert (await stream.event())["type"] == "hello"
    seen = History(stream)
    async with JsPeer.start(kind="node") as js:
        await js.join("lobby", app_id=app_id, relay_urls=[mosquitto.ws_url])
        assert (await client.post("/api/join/lobby")).status == 202
        joined = await seen.wait("peer.joined")
        assert joined["room"] == "lobby" and joined["data"]["peer"]["id"] == js.self_id
        # The relay connected before the peer could be met (the watcher may notice it later).
        seen.used = 0
        await seen.wait("relay.state", url=mosquitto.ws_url, state="connected")

        # The broker goes away and comes back: the relay state follows.
        mosquitto.kill()
        await seen.wait("relay.state", url=mosquitto.ws_url, state="reconnecting")
        mosquitto.restart()
        await seen.wait("relay.state", within=60, url=mosquitto.ws_url, state="connected")

        assert (await client.delete("/api/join/lobby")).status == 200
        await seen.wait("helper.left")
