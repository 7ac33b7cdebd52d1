"""Our rooms on ``wire="0.22"`` against real ``trystero@0.22.0`` Node peers (and 0.25.4 ones).

Mirrors test_room_mqtt.py (the 0.25 cases) over a local mosquitto and local NIP-01 nostr relays
(PyPI ``nostr-relay`` and p2pdiff's own: ids ``[pypi-relay]``, ``[p2pdiff-relay]``), without
STUN, plus what only a dual-wire helper has: a 0.22 and a 0.25 room in one session, and peers of
the other wire landing in a room (not admitted, logged once, harmless). Run it in a loopback-only
network namespace:

    scripts/netns.sh .venv/bin/pytest -q tests/interop/test_room_wire022.py

Who offers on 0.22 (signaling.negotiation022): the larger id offers, the smaller asks for an offer, so
"we-offer" sessions get a ``zz`` selfId prefix and "we-answer" ones ``00`` (the reverse of 0.25).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from p2pdiff.app import create_app
from signaling import Room, RoomConfig, Session
from signaling.framing import to_json
from tests.conftest import NOSTR_RELAYS, NostrRelayService
from tests.interop.jspeer import JsPeer, js_json, pattern_bytes, sha256_hex
from tests.interop.test_helper_app import helper_config
from tests.services import Mosquitto
from tests.support import SessionFactory, config_factory, session_pool

from .room_cases import (
    JOIN_TIMEOUT,
    MIB,
    Rig,
    Watch,
    big_payloads_both_ways,
    binary_to_js,
    eventually,
    meet_with_password,
    new_room_id,
    text_and_binary_from_js,
    wrong_password_stays_out,
)

STRANGER_LOG = "seems to speak Trystero wire"

pytestmark = [
    pytest.mark.interop,
]

#: selfId prefixes that make us offer or answer against any JS 0.22 peer (larger id offers).
PREFIX = {"offer": "zz", "answer": "00"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
async def sessions() -> AsyncIterator[SessionFactory]:
    """``sessions(role)``: a fresh Session that offers ("offer") or answers ("answer") on 0.22,
    or has a random id (None). Closed after the test, before the services stop."""
    async with session_pool(PREFIX) as make:
        yield make


class Relays(Rig):
    """Where the rooms of one test meet: ``strategy`` plus the one local relay URL; our rooms are
    on wire 0.22 unless ``config`` says otherwise."""

    def __init__(self, strategy: str, url: str, app_id: str) -> None:
        super().__init__(strategy, [url], config_factory(app_id, [url], strategy=strategy, wire="0.22"))

    @property
    def url(self) -> str:
        return self.urls[0]

    def config(self, **overrides: Any) -> RoomConfig:
        return self.make_config(**overrides)


@pytest.fixture(params=["mqtt", *NOSTR_RELAYS])
def relays(
    request: pytest.FixtureRequest,
    mosquitto: Mosquitto,
    nostr_relays: Callable[[str], NostrRelayService],
    app_id: str,
) -> Relays:
    """MQTT, or nostr through each relay of NOSTR_RELAYS (the module's shared one of that kind)."""
    if request.param == "mqtt":
        return Relays("mqtt", mosquitto.ws_url, app_id)
    return Relays("nostr", nostr_relays(request.param).url, app_id)


@pytest.fixture
def mqtt(mosquitto: Mosquitto, app_id: str) -> Relays:
    return Relays("mqtt", mosquitto.ws_url, app_id)


async def meet(
    js: JsPeer, room_id: str, relays: Relays, session: Session, *, js_first: bool, **config: Any
) -> tuple[Room, Watch, float]:
    """JS and we join ``room_id`` in the given order; returns once both see each other."""
    return await relays.meet(js, room_id, js_first=js_first, session=session, config=relays.config(**config))


def no_js_errors(*peers: JsPeer) -> None:
    for js in peers:
        assert js.events("error") == [], js.describe()


# --------------------------------------------------------------------------- (a) join and ping


@pytest.mark.parametrize("role", ["offer", "answer"], ids=["we-offer", "we-answer"])
@pytest.mark.parametrize("js_first", [True, False], ids=["js-first", "py-first"])
async def test_join_and_ping(js_first: bool, role: str, relays: Relays, sessions: Any) -> None:
    session = sessions(role)
    async with JsPeer.start("node", wire="0.22") as js:
        assert (session.self_id > js.self_id) == (role == "offer")
        room_id = new_room_id("join22")
        room, _, join_ms = await meet(js, room_id, relays, session, js_first=js_first)
        assert join_ms < JOIN_TIMEOUT * 1000
        assert set(room.peers) == {js.self_id}
        assert await js.peers(room_id) == [room.self_id]
        link = session.links(relays.app_id, room_id)[js.self_id]
        if role == "answer":
            assert not link.peer.initiator  # the smaller id never offers (it asks for an offer)
        elif not js_first:
            assert link.peer.initiator  # we heard JS's first announce and offered at once

        # @_ping / @_pong both ways, same names as 0.25
        assert 0 <= await js.ping(room_id, room.self_id) < 2000
        assert 0 < await room.ping(js.self_id) < 2000
        assert room.relay_states == {relays.url: "connected"}
        # no admission, no presence: nothing pending, nothing dropped
        stats = room.stats
        assert stats["pending_peers"] == 0 and stats["dropped"] == {} and stats["app"]["dropped"] == {}
        no_js_errors(js)


# --------------------------------------------------------------------------- (b) payloads


async def exchange_payloads(js: JsPeer, room: Room, watch: Watch, room_id: str) -> None:
    """JSON, text, small binary + metadata, 1 MiB binary and ~300 KB JSON/text both ways."""
    me, other = room.self_id, js.self_id
    data = room.make_action("data")

    # JS -> us (0.22 only allows metadata with binary data)
    value = {"n": 1, "s": "héllo ✓", "list": [1, 2.5, None, True], "nested": {"a": []}}
    await js.send(room_id, "data", value, target=me)
    assert await watch.next_action("data", other) == (value, other, None)
    await text_and_binary_from_js(js, watch, room_id)

    # us -> JS
    with pytest.raises(ValueError, match="only with binary"):
        await data.send(value, metadata={"seq": 2})  # JS 0.22 would throw too; nothing is sent
    since = js.mark()
    await data.send(value, target=other)
    ev = await js.wait_action(room_id, "data", peer=me, since=since)
    assert (ev["kind"], ev["value"], "meta" in ev) == ("json", value, False)
    assert ev["sha256"] == sha256_hex(js_json(value)) == sha256_hex(to_json(value))
    since = js.mark()
    await data.send("plain text ✓")
    ev = await js.wait_action(room_id, "data", peer=me, since=since)
    assert (ev["kind"], ev["value"]) == ("text", "plain text ✓")
    await binary_to_js(js, data, room_id)

    # ~300 KB of JSON (19 chunks of 16369 bytes) and of text, both ways
    await big_payloads_both_ways(js, data, watch, room_id)


async def test_payloads_both_ways(relays: Relays, sessions: Any) -> None:
    async with JsPeer.start("node", wire="0.22") as js:
        room_id = new_room_id("data22")
        room, watch, _ = await meet(js, room_id, relays, sessions(), js_first=True)
        await exchange_payloads(js, room, watch, room_id)
        assert room.stats["dropped"] == {}
        assert room.stats["bytes_in"] > MIB + 500_000 and room.stats["bytes_out"] > MIB + 250_000
        no_js_errors(js)


# --------------------------------------------------------------------------- (c) password


@pytest.mark.parametrize("role", ["offer", "answer"], ids=["we-offer", "we-answer"])
async def test_password_room(role: str, mqtt: Relays, sessions: Any) -> None:
    room_id = new_room_id("pw22")
    session = sessions(role)
    async with (
        JsPeer.start("node", wire="0.22", name="good") as good,
        JsPeer.start("node", wire="0.22", name="bad") as bad,
    ):
        await mqtt.js_join(good, room_id, password="s3cret")
        room = session.join(mqtt.config(password="s3cret"), room_id)
        watch = await meet_with_password(good, room, room_id)

        # 0.22 has no password handshake: a wrong password only fails SDP decryption, on our
        # side (we count it) or on JS's (join-error), whoever received the offer.
        await mqtt.js_join(bad, room_id, password="wrong")
        await wrong_password_stays_out(watch, good, bad, quiet=3.0)
        assert room.self_id not in await bad.peers(room_id)
        assert bad.self_id not in session.links(mqtt.app_id, room_id)
        assert 0 < await room.ping(good.self_id) < 2000  # the good peer is unaffected


# --------------------------------------------------------------------------- (d) leave


async def test_leave_both_ways(relays: Relays, sessions: Any) -> None:
    session = sessions()
    async with JsPeer.start("node", wire="0.22") as js:
        room_id = new_room_id("leave22")
        room, watch, _ = await meet(js, room_id, relays, session, js_first=False)
        first_link = session.links(relays.app_id, room_id)[js.self_id]

        # JS leaves: @_leave makes it gone at once, and its connection with it (one per room).
        t0 = time.monotonic()
        await js.leave(room_id)
        await watch.leave_of(js.self_id, timeout=5)
        assert time.monotonic() - t0 < 5
        assert room.peers == {}
        await eventually(lambda: first_link.closed, "the connection to close")
        assert session.links(relays.app_id, room_id) == {}

        # JS comes back: a new connection (0.22 keeps no idle connection to reuse).
        since = js.mark()
        await relays.js_join(js, room_id)
        await watch.until(lambda: watch.joined.count(js.self_id) == 2, "second join", JOIN_TIMEOUT)
        await js.wait_peer_join(room_id, room.self_id, since=since, timeout=JOIN_TIMEOUT)
        assert session.links(relays.app_id, room_id)[js.self_id] is not first_link

        # We leave: JS sees us go at once (@_leave, then we close after 99 ms).
        since = js.mark()
        await room.leave()
        await js.wait_peer_leave(room_id, room.self_id, since=since, timeout=5)
        assert room.left and room.peers == {}
        assert session.links(relays.app_id, room_id) == {} and session.apps == {}
        with pytest.raises(RuntimeError):
            await room.make_action("data").send("too late")
        no_js_errors(js)


# --------------------------------------------------------------------------- (e) both wires


class WireRooms(NamedTuple):
    """A 0.22 and a 0.25 room of one session, each with its JS peer of that wire."""

    js022: JsPeer
    js025: JsPeer
    room022: Room
    room025: Room
    w022: Watch
    w025: Watch


@contextlib.asynccontextmanager
async def one_room_per_wire(
    session: Session,
    js_join: Callable[[JsPeer, str], Awaitable[None]],
    config: Callable[..., RoomConfig],
) -> AsyncIterator[WireRooms]:
    """A JS 0.22 peer in room "old-…" and a JS 0.25 peer in "new-…", then ``session`` in both
    with the matching wire; yields once all four sides see each other."""
    old_room, new_room = new_room_id("old"), new_room_id("new")
    async with (
        JsPeer.start("node", wire="0.22", name="js022") as js022,
        JsPeer.start("node", wire="0.25", name="js025") as js025,
    ):
        await js_join(js022, old_room)
        await js_join(js025, new_room)
        room022 = session.join(config(wire="0.22"), old_room)
        room025 = session.join(config(wire="0.25"), new_room)
        w022, w025 = Watch(room022, "data"), Watch(room025, "data")
        await w022.join_of(js022.self_id, timeout=JOIN_TIMEOUT)
        await w025.join_of(js025.self_id, timeout=JOIN_TIMEOUT)
        await js022.wait_peer_join(old_room, session.self_id, timeout=JOIN_TIMEOUT)
        await js025.wait_peer_join(new_room, session.self_id, timeout=JOIN_TIMEOUT)
        assert set(room022.peers) == {js022.self_id} and set(room025.peers) == {js025.self_id}
        yield WireRooms(js022, js025, room022, room025, w022, w025)


async def test_two_wires_one_session(mqtt: Relays, sessions: Any) -> None:
    """A 0.22 room and a 0.25 room of the same app id at once, on one session (one selfId)."""
    session = sessions()
    rooms = one_room_per_wire(session, mqtt.js_join, mqtt.config)
    async with rooms as (js022, js025, room022, room025, w022, w025):
        old_room, new_room = room022.room_id, room025.room_id
        # the 0.25 room shares connections per app id, the 0.22 room has its own context
        assert set(session.apps) == {mqtt.app_id, (mqtt.app_id, "0.22", old_room)}
        with pytest.raises(ValueError, match=r"already joined with wire 0\.22"):
            session.join(mqtt.config(wire="0.25"), old_room)

        for js, room, watch, room_id in ((js022, room022, w022, old_room), (js025, room025, w025, new_room)):
            since = js.mark()
            await room.make_action("data").send({"wire": room.config.wire})
            ev = await js.wait_action(room_id, "data", peer=session.self_id, since=since)
            assert ev["value"] == {"wire": room.config.wire}
            blob = pattern_bytes(200_000, 3)
            await js.send(room_id, "data", blob, target=session.self_id)
            assert (await watch.next_action("data", js.self_id))[0] == blob
            assert 0 < await room.ping(js.self_id) < 2000

        # leaving the 0.22 room leaves the 0.25 one alone
        await room022.leave()
        assert set(session.apps) == {mqtt.app_id}
        assert 0 < await room025.ping(js025.self_id) < 2000
        no_js_errors(js022, js025)


# --------------------------------------------------------------------------- (f) strangers


async def member_undisturbed(room: Room, member: JsPeer, room_id: str, watch: Watch) -> None:
    """The member JS peer stays connected: a ping, data both ways, no leave."""
    assert 0 < await room.ping(member.self_id) < 2000
    since = member.mark()
    await room.make_action("data").send({"still": "here"})
    ev = await member.wait_action(room_id, "data", peer=room.self_id, since=since)
    assert ev["value"] == {"still": "here"}
    await member.send(room_id, "data", "and back", target=room.self_id)
    assert (await watch.next_action("data", member.self_id))[0] == "and back"
    assert watch.left == []


def stranger_lines(caplog: pytest.LogCaptureFixture, peer_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "signaling.foreign_wire" and STRANGER_LOG in r.getMessage() and peer_id in r.getMessage()
    ]


async def test_022_peer_in_025_room(
    mqtt: Relays, sessions: Any, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    """A 0.22 browser lands in our 0.25 room: not admitted, logged once, the room carries on."""
    caplog.set_level(logging.WARNING, logger="signaling.foreign_wire")
    room_id = new_room_id("mix25")
    session = sessions()
    async with (
        JsPeer.start("node", wire="0.25", name="member") as member,
        JsPeer.start("node", wire="0.22", name="stranger") as stranger,
    ):
        room, watch, _ = await meet(member, room_id, mqtt, session, js_first=True, wire="0.25")
        await mqtt.js_join(stranger, room_id)
        # Every 0.22 peer offers to every peer it hears (object-shaped): that gives it away.
        await eventually(lambda: bool(stranger_lines(caplog, stranger.self_id)), "the stranger log line")
        line = stranger_lines(caplog, stranger.self_id)[0]
        assert f"room {room_id} (Trystero wire 0.25)" in line and "wire 0.22 (object-shaped offer)" in line
        await asyncio.sleep(7)  # more than one 0.22 announce period: it keeps offering
        assert len(stranger_lines(caplog, stranger.self_id)) == 1
        stats = room.stats
        assert stats["foreign_wire_peers"] == 1 and stats["dropped"]["foreign_wire"] >= 1
        assert set(room.peers) == {member.self_id}
        assert stranger.self_id not in session.links(mqtt.app_id) and stranger.self_id not in watch.joined
        assert await stranger.peers(room_id) == []

        # the member is undisturbed: same connection, data and pings both ways
        await member_undisturbed(room, member, room_id, watch)
        no_js_errors(member, stranger)
    assert loop_errors == []


async def test_025_peer_in_022_room(
    mqtt: Relays, sessions: Any, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    """A 0.25 browser lands in our 0.22 room: not admitted, logged once, the room carries on.

    The 0.25 peer reveals its wire only when it leads (its id is smaller than ours): it then
    sends string-shaped offers with an offerId. Our ``zz`` selfId makes sure it does.
    """
    caplog.set_level(logging.WARNING, logger="signaling.foreign_wire")
    room_id = new_room_id("mix22")
    session = sessions("offer")
    async with (
        JsPeer.start("node", wire="0.22", name="member") as member,
        JsPeer.start("node", wire="0.25", name="stranger") as stranger,
    ):
        assert stranger.self_id < session.self_id
        room, watch, _ = await meet(member, room_id, mqtt, session, js_first=True)
        await mqtt.js_join(stranger, room_id)
        await eventually(lambda: bool(stranger_lines(caplog, stranger.self_id)), "the stranger log line")
        line = stranger_lines(caplog, stranger.self_id)[0]
        assert f"room {room_id} (Trystero wire 0.22)" in line and "wire 0.25 (string-shaped offer" in line
        await asyncio.sleep(7)
        assert len(stranger_lines(caplog, stranger.self_id)) == 1
        stats = room.stats
        assert stats["foreign_wire_peers"] == 1 and stats["dropped"]["foreign_wire"] >= 1
        assert set(room.peers) == {member.self_id}
        assert stranger.self_id not in session.links(mqtt.app_id, room_id)
        assert stats["app"]["negotiations"] == 0  # our offer to it was abandoned when it was found
        assert await stranger.peers(room_id) == []

        await member_undisturbed(room, member, room_id, watch)
        no_js_errors(member, stranger)
    assert loop_errors == []


# --------------------------------------------------------------------------- (g) the helper


async def test_helper_serves_both_wires_and_keeps_them_across_restart(
    aiohttp_client: Any, tmp_path: Path, mqtt: Relays
) -> None:
    """p2pdiff over REST: one room joined with wire 0.22, one with the default 0.25; a restart
    rejoins each with its wire (stored), and real peers of each version meet the helper."""
    config = helper_config(tmp_path, "mqtt", [mqtt.url], mqtt.app_id)  # the default is nostr now

    async def helper_rooms(client: Any) -> dict[str, Any]:
        health = await (await client.get("/api/health")).json()
        return {room["roomId"]: room for room in health["p2p"]["rooms"]}

    async with (
        JsPeer.start("node", wire="0.22", name="js022") as js022,
        JsPeer.start("node", wire="0.25", name="js025") as js025,
    ):
        await mqtt.js_join(js022, "old")
        await mqtt.js_join(js025, "new")
        for restart in (False, True):
            client = await aiohttp_client(create_app(config))
            since022, since025 = js022.mark(), js025.mark()
            if not restart:
                resp = await client.post("/api/join/old", json={"wire": "0.22"})
                assert resp.status == 202 and (await resp.json())["wire"] == "0.22"
                assert (await client.post("/api/join/new")).status == 202
            helper_id = (await js022.wait_peer_join("old", since=since022, timeout=JOIN_TIMEOUT))["peer"]
            assert (await js025.wait_peer_join("new", since=since025, timeout=JOIN_TIMEOUT))[
                "peer"
            ] == helper_id
            deadline = time.monotonic() + JOIN_TIMEOUT
            while True:
                rooms = await helper_rooms(client)
                peers = {rid: [p["id"] for p in room["peers"]] for rid, room in rooms.items()}
                if peers == {"old": [js022.self_id], "new": [js025.self_id]}:
                    break
                assert time.monotonic() < deadline, rooms
                await asyncio.sleep(0.1)
            assert {rid: room["wire"] for rid, room in rooms.items()} == {"old": "0.22", "new": "0.25"}
            assert await js022.ping("old", helper_id) < 2000 and await js025.ping("new", helper_id) < 2000
            since022 = js022.mark()
            await client.close()  # the helper leaves its rooms: @_leave to each peer
            await js022.wait_peer_leave("old", helper_id, since=since022, timeout=10)
        no_js_errors(js022, js025)


# --------------------------------------------------------------------------- (h) two offers at once


async def test_page_that_offers_twice_joins_at_the_first_try(relays: Relays, sessions: Any) -> None:
    """Issue 11: a 0.22 page that gets two announcements from us together (our announce and our
    offer request) offers twice: it looks for its pending offer to us before an ``await`` and
    records the new one after. It applies whatever answer comes to the offer it recorded last, so
    we must answer that one; answering the first left both dead (Chromium checked ICE with the
    other offer's credentials) until we gave up 6 s later and the next announce connected.

    The page's ``hold`` hands it our first two messages in one go, so it offers twice every time
    (whichever two they are: if the page subscribes just after our first announce, two requests)."""
    session = sessions("answer")  # the smaller id: we ask the page for its offer
    async with JsPeer.start("browser", wire="0.22") as page:
        assert session.self_id < page.self_id
        room_id = new_room_id("twice22")
        await relays.js_join(page, room_id)
        await page.hold(session.self_id, count=2)
        since = page.mark()
        room = session.join(relays.config(), room_id)
        watch = Watch(room, "data")
        # Our announce (root topic) at once; our request when we hear the page's next announce.
        released = await page.wait_for("released", since=since, timeout=JOIN_TIMEOUT)
        assert released["matched"] == 2
        await watch.join_of(page.self_id)
        await page.wait_peer_join(room_id, room.self_id, since=since, timeout=JOIN_TIMEOUT)

        stats = room.stats
        # The newer offer replaced the first before we answered, and that negotiation connected.
        assert stats["offers_superseded"] == 1, stats
        assert "negotiation_timeouts" not in stats and "negotiation_failures" not in stats, stats
        assert watch.joined == [page.self_id] and watch.left == []
        assert [e["peer"] for e in page.events("peer-join") if e["room"] == room_id] == [room.self_id]
        assert 0 < await room.ping(page.self_id) < 2000
        no_js_errors(page)
