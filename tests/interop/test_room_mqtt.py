"""Our signaling rooms (wire 0.25, MQTT) against real Trystero 0.25.4 peers (Node and Chromium).

Everything runs on 127.0.0.1 through a local mosquitto, without STUN. The Chromium test needs a
loopback-only network namespace (it fails, not skips, elsewhere):

    unshare -n -- bash -c 'ip link set lo up; .venv/bin/pytest tests/interop/test_room_mqtt.py'
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

import signaling
from signaling import Timeouts
from tests.interop.jspeer import JsPeer
from tests.services import Mosquitto
from tests.support import open_peer_connections

from .conftest import RoomConfigFactory, SessionFactory, require_loopback_netns
from .room_cases import (
    JOIN_TIMEOUT,
    MIB,
    STEP,
    Rig,
    Watch,
    eventually,
    exchange_payloads,
    new_room_id,
    password,
    rejoin_then_we_leave,
)

pytestmark = [
    pytest.mark.interop,
]


@pytest.fixture
def rig(mosquitto: Mosquitto, room_config: RoomConfigFactory) -> Rig:
    """JS peers and our rooms on the test's broker (JS with its default strategy, MQTT)."""
    return Rig(None, [mosquitto.ws_url], room_config)


# --------------------------------------------------------------------------- (a) join and ping


@pytest.mark.parametrize("role", ["offer", "answer"], ids=["we-offer", "we-answer"])
@pytest.mark.parametrize("js_first", [True, False], ids=["js-first", "py-first"])
async def test_join_and_ping(
    js_first: bool,
    role: str,
    mosquitto: Mosquitto,
    rig: Rig,
    session_factory: SessionFactory,
) -> None:
    session = session_factory(role)
    async with JsPeer.start("node") as js:
        assert (session.self_id < js.self_id) == (role == "offer")
        room_id = new_room_id("join")
        room, _, join_ms = await rig.meet(js, room_id, js_first=js_first, session=session)
        assert join_ms < JOIN_TIMEOUT * 1000
        assert set(room.peers) == {js.self_id}
        assert await js.peers(room_id) == [room.self_id]

        # JS's ping needs us to answer @_ping; ours needs JS to answer.
        assert 0 <= await js.ping(room_id, room.self_id) < 2000
        assert 0 < await room.ping(js.self_id) < 2000
        info = room.peers[js.self_id]
        assert info.rtt_ms is not None and info.joined_at <= time.time() and info.last_seen >= info.joined_at
        assert room.relay_states == {mosquitto.ws_url: "connected"}
        with pytest.raises(signaling.PeerNotFound):
            await room.ping("nobody")

        # async iteration over an action, and async peer callbacks
        left = asyncio.Event()

        async def on_leave(peer_id: str) -> None:
            await asyncio.sleep(0)
            left.set()

        room.on_peer_leave(on_leave)
        for n in range(3):
            await js.send(room_id, "iter", {"n": n}, target=room.self_id)
        got = []
        async with asyncio.timeout(STEP):
            async for payload, peer_id, metadata in room.make_action("iter"):
                got.append((payload["n"], peer_id, metadata))
                if len(got) == 3:
                    break
        assert got == [(n, js.self_id, None) for n in range(3)]
        await js.leave(room_id)
        async with asyncio.timeout(STEP):
            await left.wait()


# --------------------------------------------------------------------------- (b) payloads


async def test_payloads_both_ways(rig: Rig) -> None:
    async with JsPeer.start("node") as js:
        room_id = new_room_id("data")
        room, watch, _ = await rig.meet(js, room_id, js_first=True)
        await exchange_payloads(js, room, watch, room_id)
        assert room.stats["dropped"] == {}
        assert room.stats["bytes_in"] > MIB + 500_000 and room.stats["bytes_out"] > MIB + 250_000


# --------------------------------------------------------------------------- (c) password


async def test_password_room(rig: Rig) -> None:
    await password(rig, timeout=STEP, quiet=3.0)


# --------------------------------------------------------------------------- (d) leave


async def test_leave_both_ways(rig: Rig) -> None:
    async with JsPeer.start("node") as js:
        room_id = new_room_id("leave")
        room, watch, _ = await rig.meet(js, room_id, js_first=False)
        session = signaling.default_session()
        link = session.links(room.app_id)[js.self_id]

        t0 = time.monotonic()
        await js.leave(room_id)
        await watch.leave_of(js.self_id, timeout=10)
        assert time.monotonic() - t0 < 10
        assert room.peers == {}

        # JS comes back: the idle connection is reused (presence + handshake, no new offer).
        await rejoin_then_we_leave(rig, js, room_id, watch, link)
        with pytest.raises(RuntimeError):
            await room.make_action("data").send("too late")


# --------------------------------------------------------------------------- (e) mesh


async def test_three_js_peers(rig: Rig) -> None:
    room_id = new_room_id("mesh")
    async with (
        JsPeer.start("node", name="A") as a,
        JsPeer.start("node", name="B") as b,
        JsPeer.start("node", name="C") as c,
    ):
        peers = [a, b, c]
        # short keepalive so the crashed peer below is noticed quickly
        config = rig.make_config(timeouts=Timeouts(keepalive=1.0, peer_timeout=3.0))
        room = signaling.join_room(config, room_id)
        watch = Watch(room, "data")
        for js in peers:
            await rig.js_join(js, room_id)
        ids = {js.self_id for js in peers}
        await watch.until(lambda: ids <= set(watch.joined), "all three joins", JOIN_TIMEOUT)
        assert set(room.peers) == ids
        # Each JS peer meets us. Whether the JS peers also meet each other is node-datachannel's
        # business, not ours (it fails now and then on loopback): not asserted here.
        for js in peers:
            await js.wait_peer_join(room_id, room.self_id, timeout=JOIN_TIMEOUT)
            assert room.self_id in await js.peers(room_id)
        sinces = {js.self_id: js.mark() for js in peers}
        await room.make_action("data").send({"to": "all"})
        for js in peers:
            ev = await js.wait_action(room_id, "data", peer=room.self_id, since=sinces[js.self_id])
            assert ev["value"] == {"to": "all"}

        # A peer that vanishes without a word (no @_leave, no SCTP shutdown) still leaves.
        os.killpg(c.proc.pid, signal.SIGKILL)
        await watch.leave_of(c.self_id, timeout=10)
        assert set(room.peers) == {a.self_id, b.self_id}
        assert room.stats["app"]["dropped_peers"] == 1


# --------------------------------------------------------------------------- (f) broker restart


async def test_broker_restart(mosquitto: Mosquitto, rig: Rig) -> None:
    room_id = new_room_id("restart")
    async with JsPeer.start("node", name="before") as first:
        room, watch, _ = await rig.meet(first, room_id, js_first=True)
        url = mosquitto.ws_url

        mosquitto.kill()
        await eventually(lambda: room.relay_states[url] != "connected", "relay drop", 10)
        mosquitto.start()  # same ports
        await eventually(lambda: room.relay_states[url] == "connected", "relay reconnect", 30)

        async with JsPeer.start("node", name="after") as second:
            since = second.mark()
            await rig.js_join(second, room_id)
            await watch.join_of(second.self_id)
            await second.wait_peer_join(room_id, room.self_id, since=since, timeout=JOIN_TIMEOUT)
        # the data channel to the first peer never depended on the broker
        assert first.self_id in room.peers
        assert 0 < await room.ping(first.self_id) < 2000


# --------------------------------------------------------------------------- (g) two rooms


async def test_two_rooms_one_connection(rig: Rig) -> None:
    r1, r2 = new_room_id("one"), new_room_id("two")
    app_id = rig.app_id
    async with (
        JsPeer.start("node", name="both") as both,
        JsPeer.start("node", name="only1") as only1,
        JsPeer.start("node", name="only2") as only2,
    ):
        for js, rooms in ((both, (r1, r2)), (only1, (r1,)), (only2, (r2,))):
            for room_id in rooms:
                await rig.js_join(js, room_id)
        room1 = signaling.join_room(rig.make_config(), r1)
        room2 = signaling.join_room(rig.make_config(), r2)
        w1, w2 = Watch(room1, "data"), Watch(room2, "data")
        await w1.until(
            lambda: {both.self_id, only1.self_id} <= set(w1.joined), "joins in room 1", JOIN_TIMEOUT
        )
        await w2.until(
            lambda: {both.self_id, only2.self_id} <= set(w2.joined), "joins in room 2", JOIN_TIMEOUT
        )
        assert set(room1.peers) == {both.self_id, only1.self_id}
        assert set(room2.peers) == {both.self_id, only2.self_id}
        for room_id in (r1, r2):
            await both.wait_peer_join(room_id, room1.self_id, timeout=JOIN_TIMEOUT)

        session = signaling.default_session()
        app = session.apps[app_id]
        await eventually(lambda: not app.negotiator.pending, "negotiations to settle")
        links = session.links(app_id)
        assert set(links) == {both.self_id, only1.self_id, only2.self_id}
        shared = links[both.self_id]
        assert set(shared.bindings) == {room1.token, room2.token}
        assert room1.bindings[both.self_id].link is room2.bindings[both.self_id].link is shared
        # one RTCPeerConnection per remote peer, the shared one included
        assert len(open_peer_connections()) == 3

        # room tokens keep the rooms apart on the shared connection
        await both.send(r2, "data", "for room 2", target=room2.self_id)
        assert (await w2.next_action("data", both.self_id))[0] == "for room 2"
        await both.send(r1, "data", "for room 1", target=room1.self_id)
        assert (await w1.next_action("data", both.self_id))[0] == "for room 1"
        assert [p for p, _, _ in w1.received["data"]] == ["for room 1"]
        assert [p for p, _, _ in w2.received["data"]] == ["for room 2"]
        since = both.mark()
        await room2.make_action("data").send("from us in 2", target=both.self_id)
        ev = await both.wait_action(r2, "data", peer=room2.self_id, since=since)
        assert ev["value"] == "from us in 2"

        # leaving one room keeps the shared connection for the other
        since = both.mark()
        await room1.leave()
        await both.wait_peer_leave(r1, room1.self_id, since=since, timeout=10)
        assert session.links(app_id)[both.self_id] is shared
        assert set(shared.bindings) == {room2.token}
        assert 0 < await room2.ping(both.self_id) < 2000


# --------------------------------------------------------------------------- (h) Chromium


@pytest.mark.parametrize("role", ["offer", "answer"], ids=["we-offer", "we-answer"])
async def test_chromium_peer(role: str, rig: Rig, session_factory: SessionFactory) -> None:
    require_loopback_netns()
    session = session_factory(role)
    async with JsPeer.start("browser") as js:
        room_id = new_room_id("chromium")
        room, watch, _ = await rig.meet(js, room_id, js_first=True, session=session)
        # Chromium now and then never sends a byte on a fresh connection (presence and @_hsready
        # never reach the wire); we close such a connection after the handshake timeout and meet
        # again on a new one, within rig.meet's wait. The peer's offer or answer showed its wire,
        # so it is never taken for a 0.22 stranger.
        assert room.stats.get("foreign_wire_peers", 0) == 0
        assert "foreign_wire_connection" not in room.stats["app"]["dropped"]
        assert 0 <= await js.ping(room_id, room.self_id) < 2000
        assert 0 < await room.ping(js.self_id) < 2000
        await exchange_payloads(js, room, watch, room_id, big_json=False)
        # Chromium without media permission signals no candidate: aioice learned it peer-reflexive.
        link = session.links(room.app_id)[js.self_id]
        assert [c.type for c in link.peer.remote_candidates()] == ["prflx"]
