"""Rooms over ws-relay, Trystero's self-hosted relay protocol (wire 0.25), through p2pdiff's own
ws-relay endpoint (``[relay] ws_relay_path``; tests.services.P2pdiffRelay, shared by the module).

The JS peers are real Trystero 0.25.4 (``@trystero-p2p/core``) with our ws-relay strategy module
(tests/interop/ws_relay_strategy.mjs: ``@trystero-p2p/ws-relay`` is not on npm). First two of them
meet each other through the endpoint; then the cases of test_room_mqtt.py run from room_cases.py
with our rooms (strategy ``ws-relay``): (a) meet in either order and role, (b) payloads, (c)
password, (d) leave and rejoin, (f) the relay restarts; last, a Chromium page with the same module
meets us and a Node peer. The helper of a whole p2pdiff server on
ws-relay (``[p2p] strategy = "ws-relay"``) meets these peers in test_app_protocol.py, whose cases
run on that route too.
Run them in a loopback-only namespace:
``scripts/netns.sh .venv/bin/pytest tests/interop/test_room_wsrelay.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from signaling.relays import WsRelay
from tests.interop.jspeer import JsPeer, meet
from tests.services import P2pdiffRelay, running
from tests.support import service_or_fail

from .conftest import SessionFactory, require_loopback_netns
from .room_cases import (
    JOIN_TIMEOUT,
    RigFactory,
    join_and_ping,
    leave_both_ways,
    new_room_id,
    password,
    payloads,
    relay_restart,
    rig_factory,
    session_relay,
)

pytestmark = [
    pytest.mark.interop,
]


@dataclass
class WsRelayEndpoint:
    """A p2pdiff relay seen as its ws-relay endpoint (room_cases.Restartable)."""

    service: P2pdiffRelay

    @property
    def url(self) -> str:
        return self.service.ws_relay_url

    def kill(self) -> None:
        self.service.kill()

    def start(self) -> None:
        self.service.start()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WsRelayEndpoint]:
    with running(service_or_fail(P2pdiffRelay, tmp_path_factory.mktemp("p2pdiff-relay"))) as service:
        yield WsRelayEndpoint(service)


@pytest.fixture
def rig(relay: WsRelayEndpoint, app_id: str, signaling_cleanup: None) -> RigFactory:
    """``rig(js_urls=None, our_urls=None, **config)``: JS and us on the module's endpoint."""
    return rig_factory("ws-relay", [relay.url], app_id)


async def test_two_trystero_peers_meet_through_our_endpoint(relay: WsRelayEndpoint, app_id: str) -> None:
    room_id = new_room_id("js-js")
    async with JsPeer.start("node", name="A") as a, JsPeer.start("node", name="B") as b:
        # rejoins when node-datachannel's loopback ICE between the two fails (see meet)
        await meet(a, b, room_id, relay.url, app_id, strategy="ws-relay")
        since = b.mark()
        await a.send(room_id, "data", {"hello": "through p2pdiff"}, target=b.self_id)
        ev = await b.wait_action(room_id, "data", peer=a.self_id, since=since)
        assert ev["value"] == {"hello": "through p2pdiff"}
        since = a.mark()
        await b.send(room_id, "data", "and back", target=a.self_id)
        assert (await a.wait_action(room_id, "data", peer=b.self_id, since=since))["value"] == "and back"
        for js in (a, b):
            assert js.events("error") == [], js.describe()


@pytest.mark.parametrize("role", ["offer", "answer"], ids=["we-offer", "we-answer"])
@pytest.mark.parametrize("js_first", [True, False], ids=["js-first", "py-first"])
async def test_join_and_ping(js_first: bool, role: str, rig: RigFactory, sessions: SessionFactory) -> None:
    join_ms = await join_and_ping(rig(), sessions(role), js_first=js_first, role=role)
    assert join_ms < 5000  # announces and answers are immediate through a relay


async def test_payloads_both_ways(rig: RigFactory) -> None:
    room = await payloads(rig())
    relay = session_relay(room.config.relay_urls[0], WsRelay)
    assert not any(k.startswith("dropped") for k in relay.counters), relay.counters


async def test_password_room(rig: RigFactory) -> None:
    await password(rig())


async def test_leave_both_ways(rig: RigFactory) -> None:
    await leave_both_ways(rig())


async def test_relay_restart(tmp_path: Path, rig: RigFactory) -> None:
    with running(service_or_fail(P2pdiffRelay, tmp_path / "p2pdiff-relay")) as service:
        own = WsRelayEndpoint(service)
        room = await relay_restart(rig(js_urls=[own.url]), own)
        # Subscriptions sent again on the new connection (Trystero's own client never does that).
        assert session_relay(own.url, WsRelay).counters["subscribed"] >= 4
        assert room.relay_states == {own.url: "connected"}


async def test_chromium_page_meets_us_and_a_node_peer(
    relay: WsRelayEndpoint, rig: RigFactory, sessions: SessionFactory
) -> None:
    """The strategy module bundled into a real Chromium page: it meets our room and a Node peer."""
    require_loopback_netns()
    r = rig()
    async with JsPeer.start("browser", name="page") as page, JsPeer.start("node", name="node") as node:
        room_id = new_room_id("chromium")
        room, _, _ = await r.meet(page, room_id, js_first=True, session=sessions("offer"))
        await r.js_join(node, room_id)
        for js, other in ((page, node), (node, page)):
            await js.wait_peer_join(room_id, other.self_id, timeout=JOIN_TIMEOUT)
        assert 0 <= await page.ping(room_id, room.self_id) < 2000
        assert 0 < await room.ping(page.self_id) < 2000
        since = node.mark()
        await page.send(room_id, "data", {"from": "chromium"}, target=node.self_id)
        assert (await node.wait_action(room_id, "data", peer=page.self_id, since=since))["value"] == {
            "from": "chromium"
        }
