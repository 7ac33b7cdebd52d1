"""The helper in a room whose relay is its own server's: an in-process client of the relay.

The relay is named by a public URL whose host does not resolve (and the tests run on loopback
only), so a helper that tried a socket to it would never connect: being in the room at all proves
it took the in-process link.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from p2pdiff.config import Config
from p2pdiff.relay import RELAY, LocalEndpoint, RelayServer
from signaling.crypto import root_topic
from signaling.relays import local
from tests.conftest import ClientFactory
from tests.relay.conftest import metric
from tests.relay.nostr_client import NostrClient, topic_filter
from tests.support import LOOPBACK_ICE

PUBLIC = "wss://relay.example.invalid/nostr"
APP_ID = "p2pdiff-in-process-test"
ROOM = "lobby"


@pytest.fixture
def helper_config(config: Config, tmp_path: Path) -> Config:
    config.relay.enabled = True
    config.relay.public_urls = [PUBLIC]
    config.p2p.enabled = True
    config.p2p.strategy = "nostr"
    config.p2p.app_id = APP_ID
    config.p2p.relay_urls = [PUBLIC]
    config.p2p.rooms = [ROOM]
    config.p2p.ice_servers = []
    config.p2p.ice_host_addresses = LOOPBACK_ICE
    return config


def serves(server: local.LocalServer | None, relay: RelayServer) -> bool:
    return isinstance(server, LocalEndpoint) and server.relay is relay


async def health(client: TestClient) -> Any:
    return await (await client.get("/api/health")).json()


async def test_the_helper_joins_its_own_relay_without_a_socket(
    make_client: ClientFactory, helper_config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = await make_client(helper_config)
    assert f"helper: uses this server's relay in process, without a socket ({PUBLIC})" in caplog.text
    assert serves(local.lookup(PUBLIC), client.app[RELAY])
    deadline = time.monotonic() + 30
    while set((rooms := (await health(client))["p2p"]["rooms"])[0]["relays"].values()) != {"connected"}:
        assert time.monotonic() < deadline, rooms
        await asyncio.sleep(0.05)
    helper_id = rooms[0]["selfId"]

    # A browser on the same relay hears the helper's announces on the room's root topic.
    browser = await NostrClient.connect(client)
    assert await browser.req("b", topic_filter(root_topic(APP_ID, ROOM))) == ["EOSE", "b"]
    frame = await browser.recv(wait=30)
    assert frame[0] == "EVENT" and helper_id in frame[2]["content"]

    page = await (await client.get("/metrics")).text()
    assert metric(page, "p2pdiff_relay_connections", protocol="nostr") == 2  # the helper and the browser
    await browser.close()
    await client.close()
    assert local.lookup(PUBLIC) is None  # unregistered when the app stopped


async def test_a_url_held_by_another_app_of_the_process_stays_with_it(
    make_client: ClientFactory, helper_config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    first = await make_client(helper_config)
    held = local.lookup(PUBLIC)
    caplog.set_level(logging.WARNING)
    second = await make_client(helper_config)
    assert "is already served in this process" in caplog.text
    assert local.lookup(PUBLIC) is held
    await second.close()
    assert local.lookup(PUBLIC) is held
    await first.close()
    assert local.lookup(PUBLIC) is None


async def test_the_helper_joins_its_own_ws_relay_without_a_socket(
    make_client: ClientFactory, helper_config: Config
) -> None:
    ws_relay = "wss://relay.example.invalid/ws-relay"
    helper_config.relay.public_urls = [PUBLIC, ws_relay]
    helper_config.p2p.strategy = "ws-relay"
    helper_config.p2p.wire = "0.25"
    helper_config.p2p.relay_urls = [ws_relay]
    client = await make_client(helper_config)
    relay = client.app[RELAY]
    assert serves(local.lookup(ws_relay), relay) and serves(local.lookup(PUBLIC), relay)
    assert local.lookup(ws_relay) is not local.lookup(PUBLIC)  # one endpoint per protocol
    port = helper_config.server.port  # the configured one: what a deployer names
    assert serves(local.lookup(f"ws://localhost:{port}/ws-relay"), relay)
    deadline = time.monotonic() + 30
    while set((rooms := (await health(client))["p2p"]["rooms"])[0]["relays"].values()) != {"connected"}:
        assert time.monotonic() < deadline, rooms
        await asyncio.sleep(0.05)

    # A browser on the ws-relay endpoint hears the helper's announces on the room's root topic.
    browser = await client.ws_connect("/ws-relay")
    topic = root_topic(APP_ID, ROOM)
    await browser.send_str(orjson.dumps({"type": "subscribe", "topic": topic}).decode())
    frame = orjson.loads((await browser.receive(timeout=30)).data)
    assert frame["topic"] == topic and rooms[0]["selfId"] in frame["payload"]
    page = await (await client.get("/metrics")).text()
    assert metric(page, "p2pdiff_relay_connections", protocol="ws-relay") == 2
    assert metric(page, "p2pdiff_relay_connections", protocol="nostr") == 0
    await browser.close()
