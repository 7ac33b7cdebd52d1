"""Our signaling rooms (wire 0.25, MQTT) against real Trystero 0.25.4 peers (Node and Chromium).

Everything runs on 127.0.0.1 through a local mosquitto, without STUN. The Chromium test needs a
loopback-only network namespace (it fails, not skips, elsewhere):

    unshare -n -- bash -c 'ip link set lo up; .venv/bin/pytest tests/interop/test_room_mqtt.py'
"""

# Timeouts are parameters on purpose (ASYNC109): on expiry the helpers raise an AssertionError
# naming what was awaited and the room's counters, which a bare asyncio.timeout would lose.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiortc import RTCPeerConnection

import signaling
from signaling import Room, Timeouts
from signaling.framing import to_json
from tests.interop.jspeer import (
    JsPeer,
    action_bytes,
    js_json,
    loopback_only_problem,
    pattern_bytes,
    pattern_text,
    sha256_hex,
)
from tests.services import Mosquitto

from .conftest import RoomConfigFactory, SessionFactory

MIB = 1 << 20
JOIN_TIMEOUT = 20.0  # joins take 0.1-1.4 s; a failed attempt is retried within seconds
STEP = 15.0

pytestmark = [
    pytest.mark.interop,
]


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = STEP) -> None:
    """Poll state that has no event to wait on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        await asyncio.sleep(0.05)


def new_room_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


class Watch:
    """Records a room's peer joins/leaves and received actions; every wait has a timeout."""

    def __init__(self, room: Room, *actions: str) -> None:
        self.room = room
        self.joined: list[str] = []
        self.left: list[str] = []
        self.received: dict[str, list[tuple[Any, str, Any]]] = {name: [] for name in actions}
        self._read: dict[tuple[str, str], int] = {}
        self._changed = asyncio.Event()
        room.on_peer_join(self._record(self.joined))
        room.on_peer_leave(self._record(self.left))
        for name in actions:
            room.make_action(name).on_receive(self._record_action(self.received[name]))

    def _record(self, into: list[str]) -> Callable[[str], None]:
        def record(peer_id: str) -> None:
            into.append(peer_id)
            self._changed.set()

        return record

    def _record_action(self, into: list[tuple[Any, str, Any]]) -> Callable[[Any, str, Any], None]:
        def record(payload: Any, peer_id: str, metadata: Any) -> None:
            into.append((payload, peer_id, metadata))
            self._changed.set()

        return record

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = STEP) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"room {self.room.room_id}: no {what} within {timeout}s; stats {self.room.stats}"
            ) from None

    async def join_of(self, peer_id: str, timeout: float = JOIN_TIMEOUT) -> None:
        await self.until(lambda: peer_id in self.joined, f"join of {peer_id}", timeout)

    async def leave_of(self, peer_id: str, timeout: float = STEP) -> None:
        await self.until(lambda: peer_id in self.left, f"leave of {peer_id}", timeout)

    async def next_action(self, name: str, peer_id: str, timeout: float = 60.0) -> tuple[Any, str, Any]:
        """The next not yet consumed message of ``name`` from ``peer_id`` (in arrival order)."""
        inbox = self.received[name]

        def find() -> int | None:
            start = self._read.get((name, peer_id), 0)
            return next((i for i in range(start, len(inbox)) if inbox[i][1] == peer_id), None)

        await self.until(lambda: find() is not None, f"{name!r} from {peer_id}", timeout)
        index = find()
        assert index is not None
        self._read[(name, peer_id)] = index + 1
        return inbox[index]


async def js_join(js: JsPeer, room_id: str, mosquitto: Mosquitto, app_id: str, **kwargs: Any) -> None:
    await js.join(room_id, app_id=app_id, relay_urls=[mosquitto.ws_url], **kwargs)
    await js.make_action(room_id, "data")


async def meet(
    js: JsPeer,
    room_id: str,
    mosquitto: Mosquitto,
    room_config: RoomConfigFactory,
    *,
    js_first: bool,
    session: signaling.Session | None = None,
) -> tuple[Room, Watch, float]:
    """JS and we join ``room_id`` in the given order; returns once both see each other."""
    app_id = room_config().app_id
    if js_first:
        await js_join(js, room_id, mosquitto, app_id)
    since = js.mark()
    t0 = time.monotonic()
    room = signaling.join_room(room_config(), room_id, session=session)
    watch = Watch(room, "data")
    if not js_first:
        await js_join(js, room_id, mosquitto, app_id)
    await watch.join_of(js.self_id)
    join_ms = (time.monotonic() - t0) * 1000
    await js.wait_peer_join(room_id, room.self_id, timeout=JOIN_TIMEOUT, since=since)
    return room, watch, join_ms


# --------------------------------------------------------------------------- (a) join and ping


@pytest.mark.parametrize("role", ["offer", "answer"], ids=["we-offer", "we-answer"])
@pytest.mark.parametrize("js_first", [True, False], ids=["js-first", "py-first"])
async def test_join_and_ping(
    js_first: bool,
    role: str,
    mosquitto: Mosquitto,
    room_config: RoomConfigFactory,
    session_factory: SessionFactory,
) -> None:
    session = session_factory(role)
    async with JsPeer.start("node") as js:
        assert (session.self_id < js.self_id) == (role == "offer")
        room_id = new_room_id("join")
        room, _, join_ms = await meet(js, room_id, mosquitto, room_config, js_first=js_first, session=session)
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


async def exchange_payloads(
    js: JsPeer, room: Room, watch: Watch, room_id: str, *, big_json: bool = True
) -> None:
    """JSON (+meta), text, small binary (+meta) and 1 MiB binary both ways; big JSON optionally."""
    me, other = room.self_id, js.self_id
    data = room.make_action("data")

    # JS -> us
    value = {"n": 1, "s": "héllo ✓", "list": [1, 2.5, None, True], "nested": {"a": []}}
    await js.send(room_id, "data", value, meta={"seq": 1}, target=me)
    assert await watch.next_action("data", other) == (value, other, {"seq": 1})
    await js.send(room_id, "data", "plain text ✓", target=me)
    assert await watch.next_action("data", other) == ("plain text ✓", other, None)
    small = bytes(range(256)) * 5
    await js.send(room_id, "data", small, meta={"k": "bin"}, target=me)
    assert await watch.next_action("data", other) == (small, other, {"k": "bin"})
    sent = await js.send(room_id, "data", size=MIB, seed=7, target=me)
    payload, _, meta = await watch.next_action("data", other)
    assert isinstance(payload, bytes) and meta is None
    assert hashlib.sha256(payload).hexdigest() == sent["sha256"] == sha256_hex(pattern_bytes(MIB, 7))

    # us -> JS
    since = js.mark()
    await data.send(value, target=other, metadata={"seq": 2})
    ev = await js.wait_action(room_id, "data", peer=me, since=since)
    assert (ev["kind"], ev["value"], ev["meta"]) == ("json", value, {"seq": 2})
    assert ev["sha256"] == sha256_hex(js_json(value)) == sha256_hex(to_json(value))
    since = js.mark()
    await data.send("plain text ✓")
    ev = await js.wait_action(room_id, "data", peer=me, since=since)
    assert (ev["kind"], ev["value"], "meta" in ev) == ("text", "plain text ✓", False)
    since = js.mark()
    await data.send(small, metadata={"k": "bin"})
    ev = await js.wait_action(room_id, "data", peer=me, since=since)
    assert (ev["kind"], action_bytes(ev), ev["meta"]) == ("binary", small, {"k": "bin"})
    blob = pattern_bytes(MIB, 8)
    since = js.mark()
    await data.send(blob, target=[other])
    ev = await js.wait_action(room_id, "data", peer=me, since=since, timeout=60)
    assert (ev["kind"], ev["bytes"], ev["sha256"]) == ("binary", MIB, sha256_hex(blob))

    if not big_json:
        return
    # ~300 KB of JSON both ways (19 chunks): a structure, not one long string
    doc = {"rows": [{"i": i, "name": f"row {i} ✓", "tags": ["a", "b"], "v": i / 7} for i in range(4200)]}
    encoded = to_json(doc)
    assert 280_000 < len(encoded) < 330_000
    since = js.mark()
    await data.send(doc)
    ev = await js.wait_action(room_id, "data", peer=me, since=since, timeout=60)
    assert (ev["kind"], ev["len"], ev["sha256"]) == ("json", len(encoded), sha256_hex(encoded))
    await js.send(room_id, "data", doc, target=me)
    received, _, _ = await watch.next_action("data", other)
    assert received == doc
    text = pattern_text(300_000, 9)
    await js.send(room_id, "data", kind="text", size=300_000, seed=9, target=me)
    assert (await watch.next_action("data", other))[0] == text


async def test_payloads_both_ways(mosquitto: Mosquitto, room_config: RoomConfigFactory) -> None:
    async with JsPeer.start("node") as js:
        room_id = new_room_id("data")
        room, watch, _ = await meet(js, room_id, mosquitto, room_config, js_first=True)
        await exchange_payloads(js, room, watch, room_id)
        assert room.stats["dropped"] == {}
        assert room.stats["bytes_in"] > MIB + 500_000 and room.stats["bytes_out"] > MIB + 250_000


# --------------------------------------------------------------------------- (c) password


async def test_password_room(mosquitto: Mosquitto, room_config: RoomConfigFactory) -> None:
    app_id = room_config().app_id
    room_id = new_room_id("pw")
    async with JsPeer.start("node", name="good") as good, JsPeer.start("node", name="bad") as bad:
        await js_join(good, room_id, mosquitto, app_id, password="s3cret")
        room = signaling.join_room(room_config(password="s3cret"), room_id)
        watch = Watch(room, "data")
        await watch.join_of(good.self_id)
        await good.wait_peer_join(room_id, room.self_id, timeout=JOIN_TIMEOUT)
        since = good.mark()
        await room.make_action("data").send({"secret": True})
        ev = await good.wait_action(room_id, "data", peer=room.self_id, since=since)
        assert ev["value"] == {"secret": True}
        await good.send(room_id, "data", "back", target=room.self_id)
        assert (await watch.next_action("data", good.self_id))[0] == "back"

        # A peer with the wrong password: its SDPs do not decrypt; it must never get in.
        await js_join(bad, room_id, mosquitto, app_id, password="wrong")
        # Whoever offers, the other side fails to decrypt it (we count it, JS reports join-error).
        await eventually(
            lambda: room.stats["dropped"].get("decrypt_failed", 0) > 0 or bool(bad.events("join-error")),
            "a decrypt failure on either side",
        )
        await asyncio.sleep(3)
        assert set(room.peers) == {good.self_id}
        assert bad.self_id not in watch.joined
        assert await bad.peers(room_id) == []
        assert bad.self_id not in signaling.default_session().links(app_id)
        # the good peer is unaffected
        assert 0 < await room.ping(good.self_id) < 2000


# --------------------------------------------------------------------------- (d) leave


async def test_leave_both_ways(mosquitto: Mosquitto, room_config: RoomConfigFactory) -> None:
    async with JsPeer.start("node") as js:
        room_id = new_room_id("leave")
        room, watch, _ = await meet(js, room_id, mosquitto, room_config, js_first=False)
        session = signaling.default_session()
        link = session.links(room.app_id)[js.self_id]

        t0 = time.monotonic()
        await js.leave(room_id)
        await watch.leave_of(js.self_id, timeout=10)
        assert time.monotonic() - t0 < 10
        assert room.peers == {}

        # JS comes back: the idle connection is reused (presence + handshake, no new offer).
        since = js.mark()
        await js_join(js, room_id, mosquitto, room.app_id)
        await watch.until(lambda: watch.joined.count(js.self_id) == 2, "second join", JOIN_TIMEOUT)
        await js.wait_peer_join(room_id, room.self_id, since=since, timeout=JOIN_TIMEOUT)
        assert session.links(room.app_id)[js.self_id] is link

        since = js.mark()
        await room.leave()
        await js.wait_peer_leave(room_id, room.self_id, since=since, timeout=10)
        assert room.left and room.peers == {}
        assert session.links(room.app_id) == {}
        with pytest.raises(RuntimeError):
            await room.make_action("data").send("too late")


# --------------------------------------------------------------------------- (e) mesh


async def test_three_js_peers(mosquitto: Mosquitto, room_config: RoomConfigFactory) -> None:
    room_id = new_room_id("mesh")
    app_id = room_config().app_id
    async with (
        JsPeer.start("node", name="A") as a,
        JsPeer.start("node", name="B") as b,
        JsPeer.start("node", name="C") as c,
    ):
        peers = [a, b, c]
        # short keepalive so the crashed peer below is noticed quickly
        room = signaling.join_room(room_config(timeouts=Timeouts(keepalive=1.0, peer_timeout=3.0)), room_id)
        watch = Watch(room, "data")
        for js in peers:
            await js_join(js, room_id, mosquitto, app_id)
        ids = {js.self_id for js in peers}
        await watch.until(lambda: ids <= set(watch.joined), "all three joins", JOIN_TIMEOUT)
        assert set(room.peers) == ids
        for js in peers:
            expected = (ids - {js.self_id}) | {room.self_id}
            for other in expected:
                await js.wait_peer_join(room_id, other, timeout=JOIN_TIMEOUT)
            assert set(await js.peers(room_id)) == expected
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


async def test_broker_restart(mosquitto: Mosquitto, room_config: RoomConfigFactory) -> None:
    room_id = new_room_id("restart")
    async with JsPeer.start("node", name="before") as first:
        room, watch, _ = await meet(first, room_id, mosquitto, room_config, js_first=True)
        url = mosquitto.ws_url

        mosquitto.kill()
        await eventually(lambda: room.relay_states[url] != "connected", "relay drop", 10)
        mosquitto.start()  # same ports
        await eventually(lambda: room.relay_states[url] == "connected", "relay reconnect", 30)

        async with JsPeer.start("node", name="after") as second:
            since = second.mark()
            await js_join(second, room_id, mosquitto, room.app_id)
            await watch.join_of(second.self_id)
            await second.wait_peer_join(room_id, room.self_id, since=since, timeout=JOIN_TIMEOUT)
        # the data channel to the first peer never depended on the broker
        assert first.self_id in room.peers
        assert 0 < await room.ping(first.self_id) < 2000


# --------------------------------------------------------------------------- (g) two rooms


def open_peer_connections() -> list[RTCPeerConnection]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, RTCPeerConnection) and o.connectionState != "closed"]


async def test_two_rooms_one_connection(mosquitto: Mosquitto, room_config: RoomConfigFactory) -> None:
    r1, r2 = new_room_id("one"), new_room_id("two")
    app_id = room_config().app_id
    async with (
        JsPeer.start("node", name="both") as both,
        JsPeer.start("node", name="only1") as only1,
        JsPeer.start("node", name="only2") as only2,
    ):
        for js, rooms in ((both, (r1, r2)), (only1, (r1,)), (only2, (r2,))):
            for room_id in rooms:
                await js_join(js, room_id, mosquitto, app_id)
        room1 = signaling.join_room(room_config(), r1)
        room2 = signaling.join_room(room_config(), r2)
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
async def test_chromium_peer(
    role: str, mosquitto: Mosquitto, room_config: RoomConfigFactory, session_factory: SessionFactory
) -> None:
    if problem := loopback_only_problem():
        pytest.fail(problem, pytrace=False)
    session = session_factory(role)
    async with JsPeer.start("browser") as js:
        room_id = new_room_id("chromium")
        room, watch, _ = await meet(js, room_id, mosquitto, room_config, js_first=True, session=session)
        assert 0 <= await js.ping(room_id, room.self_id) < 2000
        assert 0 < await room.ping(js.self_id) < 2000
        await exchange_payloads(js, room, watch, room_id, big_json=False)
        # Chromium without media permission signals no candidate: aioice learned it peer-reflexive.
        link = session.links(room.app_id)[js.self_id]
        assert [c.type for c in link.peer.remote_candidates()] == ["prflx"]
