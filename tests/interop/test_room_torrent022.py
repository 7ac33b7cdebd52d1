"""Our rooms on ``wire="0.22"`` over a WebTorrent tracker, against real ``trystero@0.22.0``
torrent peers (Node, node-datachannel) and a real npm ``bittorrent-tracker`` on 127.0.0.1.

Trystero 0.22's torrent strategy (spec §9.5) announces 10 fresh offers per announce and answers
every offer the tracker forwards, whatever the ids; we answer too (one offer per peer at a time),
so both join orders connect at the first announce of whoever joins second. Cases: meet in either
order and id order, payloads, password, leave both ways, the announce frames on the tracker, and a
0.22 and a 0.25 torrent room in one session. Run in a loopback-only namespace (scripts/netns.sh).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pdiff.app import create_app
from signaling import Room, Session, Timeouts, crypto
from signaling.relays.torrent import TORRENT_022, TORRENT_025, TorrentRelay
from signaling.strategies.torrent import OfferBatches, TorrentRoomSignaller022
from tests.interop.jspeer import JsPeer
from tests.interop.test_helper_app import helper_config, poll
from tests.services import Tracker
from tests.support import SessionFactory, eventually, service_or_fail, session_pool

from .room_cases import JOIN_TIMEOUT, MIB, Rig, Watch, new_room_id, rig_factory
from .test_room_wire022 import (
    exchange_payloads,
    member_undisturbed,
    no_js_errors,
    one_room_per_wire,
    stranger_lines,
)

pytestmark = [
    pytest.mark.interop,
]

#: bittorrent-tracker tells WebSocket clients ceil(interval_ms / 5000) s; 0.22 never announces
#: faster than every 33.333 s anyway.
INTERVAL_MS = 200_000
#: Joins happen at the joiner's first announce; JS gathers for up to 5 s before it answers.
FAST_JOIN_S = 8.0


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracker]:
    """One tracker for the module, logging the frames clients send (rooms are unique per test)."""
    service = service_or_fail(
        Tracker, tmp_path_factory.mktemp("tracker022"), interval_ms=INTERVAL_MS, log_frames=True
    )
    service.start()
    yield service
    service.cleanup()


@pytest.fixture
async def sessions() -> AsyncIterator[SessionFactory]:
    """``sessions(order)``: a fresh Session whose id sorts "low" or "high" (or random: None)."""
    async with session_pool({"low": "00", "high": "zz"}) as make:
        yield make


@pytest.fixture
def torrent(tracker: Tracker, app_id: str) -> Rig:
    """JS and us on the module's tracker; our rooms on wire 0.22 unless a test says otherwise."""
    return rig_factory("torrent", [tracker.url], app_id)(wire="0.22")


async def meet(
    js: JsPeer, room_id: str, torrent: Rig, session: Session, *, js_first: bool
) -> tuple[Room, Watch, float]:
    """JS and we join ``room_id`` in the given order; returns once both see each other, and how
    long that took after the second joiner joined (seconds)."""
    if js_first:
        await torrent.js_join(js, room_id)
    since = js.mark()
    t0 = time.monotonic()
    room = session.join(torrent.make_config(), room_id)
    watch = Watch(room, "data")
    if not js_first:
        await asyncio.sleep(0.5)  # our first announce is in the swarm before JS arrives
        t0 = time.monotonic()
        await torrent.js_join(js, room_id)
    await watch.join_of(js.self_id, timeout=JOIN_TIMEOUT)
    await js.wait_peer_join(room_id, room.self_id, timeout=JOIN_TIMEOUT, since=since)
    return room, watch, time.monotonic() - t0


def our_tracker(session: Session, policy_name: str) -> TorrentRelay:
    (relay,) = [
        r for r in session.hub.relays() if isinstance(r, TorrentRelay) and r.policy.name == policy_name
    ]
    return relay


# --------------------------------------------------------------------------- (a) join and ping


@pytest.mark.parametrize("order", ["low", "high"], ids=["our-id-low", "our-id-high"])
@pytest.mark.parametrize("js_first", [True, False], ids=["js-first", "py-first"])
async def test_join_and_ping(js_first: bool, order: str, torrent: Rig, sessions: SessionFactory) -> None:
    session = sessions(order)
    async with JsPeer.start("node", wire="0.22") as js:
        room_id = new_room_id("tj22")
        room, _, took = await meet(js, room_id, torrent, session, js_first=js_first)
        # No tie-break on 0.22 torrent: the second joiner's first announce connects the pair,
        # whichever id is larger (0.25 may wait for the next announce, up to 120 s).
        assert took < FAST_JOIN_S
        assert set(room.peers) == {js.self_id}
        assert await js.peers(room_id) == [room.self_id]
        assert 0 <= await js.ping(room_id, room.self_id) < 2000
        assert 0 < await room.ping(js.self_id) < 2000
        assert room.relay_states == {torrent.urls[0]: "connected"}
        assert isinstance(room.signaller, TorrentRoomSignaller022)
        # One connection for the pair, even though both sides offered and both answer offers.
        await asyncio.sleep(1.0)
        assert len(session.links(torrent.app_id, room_id)) == 1
        assert await js.peers(room_id) == [room.self_id]
        assert room.stats["dropped"].get("decrypt_failed", 0) == 0
        no_js_errors(js)


# --------------------------------------------------------------------------- (b) payloads


async def test_payloads_both_ways(torrent: Rig, sessions: SessionFactory) -> None:
    async with JsPeer.start("node", wire="0.22") as js:
        room_id = new_room_id("td22")
        room, watch, _ = await meet(js, room_id, torrent, sessions(), js_first=True)
        await exchange_payloads(js, room, watch, room_id)
        assert room.stats["dropped"] == {}
        assert room.stats["bytes_in"] > MIB and room.stats["bytes_out"] > MIB
        no_js_errors(js)


# --------------------------------------------------------------------------- (c) password


async def test_password_room(torrent: Rig, sessions: SessionFactory) -> None:
    room_id = new_room_id("tp22")
    session = sessions()
    async with (
        JsPeer.start("node", wire="0.22", name="good") as good,
        JsPeer.start("node", wire="0.22", name="bad") as bad,
    ):
        await torrent.js_join(good, room_id, password="s3cret")
        room = session.join(torrent.make_config(password="s3cret"), room_id)
        watch = Watch(room, "data")
        await watch.join_of(good.self_id, timeout=JOIN_TIMEOUT)
        await good.wait_peer_join(room_id, room.self_id, timeout=JOIN_TIMEOUT)
        since = good.mark()
        await room.make_action("data").send({"secret": True})
        assert (await good.wait_action(room_id, "data", peer=room.self_id, since=since))["value"] == {
            "secret": True
        }

        # A wrong password only fails SDP decryption (0.22 has no password handshake): the bad
        # peer's join announce forwards its offers to us and to the good peer; neither can open it.
        await torrent.js_join(bad, room_id, password="wrong")
        await eventually(
            lambda: room.stats["dropped"].get("decrypt_failed", 0) > 0 and bool(good.events("join-error")),
            "decrypt failures on our side and the good peer's",
            JOIN_TIMEOUT,
        )
        await asyncio.sleep(2)
        assert set(room.peers) == {good.self_id} and bad.self_id not in watch.joined
        assert room.self_id not in await bad.peers(room_id)
        assert 0 < await room.ping(good.self_id) < 2000


# --------------------------------------------------------------------------- (d) leave


async def test_leave_both_ways(torrent: Rig, sessions: SessionFactory) -> None:
    session = sessions()
    async with JsPeer.start("node", wire="0.22") as js:
        room_id = new_room_id("tl22")
        room, watch, _ = await meet(js, room_id, torrent, session, js_first=False)
        first_link = session.links(torrent.app_id, room_id)[js.self_id]

        await js.leave(room_id)
        await watch.leave_of(js.self_id, timeout=5)
        assert room.peers == {}
        await eventually(lambda: first_link.closed, "the connection to close")

        # JS comes back: its join announce brings fresh offers, one of which we answer.
        since = js.mark()
        t0 = time.monotonic()
        await torrent.js_join(js, room_id)
        await watch.until(lambda: watch.joined.count(js.self_id) == 2, "second join", JOIN_TIMEOUT)
        await js.wait_peer_join(room_id, room.self_id, since=since, timeout=JOIN_TIMEOUT)
        assert time.monotonic() - t0 < FAST_JOIN_S
        assert session.links(torrent.app_id, room_id)[js.self_id] is not first_link

        since = js.mark()
        await room.leave()
        await js.wait_peer_leave(room_id, room.self_id, since=since, timeout=5)
        assert room.left and room.peers == {} and session.apps == {}
        no_js_errors(js)


# --------------------------------------------------------------------------- (e) on the tracker


async def test_announces_carry_ten_fresh_offers(
    tracker: Tracker, torrent: Rig, sessions: SessionFactory
) -> None:
    """What the tracker sees from us is what it sees from a 0.22 browser: numwant 10 and ten
    new offers every announce, SDPs without the trickle option, sealed with the room key."""
    session = sessions()
    room_id = new_room_id("tf22")
    async with JsPeer.start("node", wire="0.22") as js:
        await torrent.js_join(js, room_id)
        room = session.join(torrent.make_config(), room_id)
        await eventually(lambda: js.self_id in room.peers, "the join", JOIN_TIMEOUT)
        signaller = room.signaller
        assert isinstance(signaller, TorrentRoomSignaller022) and isinstance(signaller.pool, OfferBatches)
        relay = our_tracker(session, "0.22")
        assert relay.policy is TORRENT_022
        relay.announce_now(signaller.info_hash)  # a second announce without waiting 33 s
        await eventually(lambda: room.stats["announces_out"] >= 2, "a second announce")

        def ours(who: str) -> list[dict[str, Any]]:
            return [
                f
                for f in tracker.announces()
                if f.get("info_hash") == signaller.info_hash and f.get("peer_id") == who and "offers" in f
            ]

        await eventually(lambda: len(ours(room.self_id)) >= 2, "two announces on the tracker", 5)
        first, second = ours(room.self_id)[:2]
        for frame in (first, second):
            assert list(frame) == ["action", "info_hash", "peer_id", "numwant", "offers"]
            assert frame["numwant"] == 10 and len(frame["offers"]) == 10
            for offer in frame["offers"]:
                assert list(offer) == ["offer_id", "offer"] and len(offer["offer_id"]) == 20
                assert offer["offer"]["type"] == "offer"
                sdp = crypto.decrypt(signaller.key, offer["offer"]["sdp"])
                assert sdp.startswith("v=0") and "a=ice-options:trickle" not in sdp
        ids = [{o["offer_id"] for o in f["offers"]} for f in (first, second)]
        assert len(ids[0]) == len(ids[1]) == 10 and not ids[0] & ids[1]
        # The JS peer's frames have the same shape (the reference for the two checks above).
        (js_frame, *_) = ours(js.self_id)
        assert list(js_frame) == list(first) and js_frame["numwant"] == 10 and len(js_frame["offers"]) == 10
        # Only the latest batch is kept: superseded offers are closed.
        await eventually(lambda: signaller.pool.outstanding <= 10, "the old batch to close", 5)
        assert signaller.pool.made >= 20
        assert 0 < await room.ping(js.self_id) < 2000


# --------------------------------------------------------------------------- (f) both wires


async def test_a_022_and_a_025_torrent_room_in_one_session(torrent: Rig, sessions: SessionFactory) -> None:
    """Each wire gets its own tracker client (its own cadence and dedupe) on the same URL."""
    session = sessions()
    rooms = one_room_per_wire(session, torrent.js_join, torrent.make_config)
    async with rooms as (js022, js025, room022, room025, w022, w025):
        old_room, new_room = room022.room_id, room025.room_id
        assert our_tracker(session, "0.22").policy is TORRENT_022
        assert our_tracker(session, "0.25").policy is TORRENT_025

        since022, since025 = js022.mark(), js025.mark()
        await room022.make_action("data").send({"wire": "0.22"})
        await room025.make_action("data").send({"wire": "0.25"})
        assert (await js022.wait_action(old_room, "data", peer=session.self_id, since=since022))["value"] == {
            "wire": "0.22"
        }
        assert (await js025.wait_action(new_room, "data", peer=session.self_id, since=since025))["value"] == {
            "wire": "0.25"
        }
        await js022.send(old_room, "data", "from 0.22", target=session.self_id)
        await js025.send(new_room, "data", "from 0.25", target=session.self_id)
        assert (await w022.next_action("data", js022.self_id))[0] == "from 0.22"
        assert (await w025.next_action("data", js025.self_id))[0] == "from 0.25"
        no_js_errors(js022)
        no_js_errors(js025)


# --------------------------------------------------------------------------- (g) strangers


@pytest.mark.parametrize(
    ("wire", "foreign", "evidence"),
    [
        ("0.22", "0.25", "room frames on the data channel"),
        ("0.25", "0.22", "its channel opened but it sent nothing in 3 s"),
    ],
    ids=["025-in-022-room", "022-in-025-room"],
)
async def test_stranger_on_the_tracker(
    wire: str,
    foreign: str,
    evidence: str,
    torrent: Rig,
    sessions: SessionFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tracker frames look the same for both wires, so a browser of the other wire connects to
    our room; its data channel gives it away: a 0.25 peer's first message is a presence frame
    (caught before it ever joins a 0.22 room), a 0.22 peer never sends ``@_hsready`` (this one
    sends nothing at all). Not admitted, named once, disconnected, its next offers dropped."""
    caplog.set_level(logging.WARNING, logger="signaling.foreign_wire")
    session = sessions()
    room_id = new_room_id(f"tmix{wire}")
    config = torrent.make_config(wire=wire, timeouts=Timeouts(handshake=3.0))
    async with (
        JsPeer.start("node", wire=wire, name="member") as member,
        JsPeer.start("node", wire=foreign, name="stranger") as stranger,
    ):
        await torrent.js_join(member, room_id)
        room = session.join(config, room_id)
        watch = Watch(room, "data")
        await watch.join_of(member.self_id, timeout=JOIN_TIMEOUT)
        await torrent.js_join(stranger, room_id)
        await eventually(
            lambda: bool(stranger_lines(caplog, stranger.self_id)), "the stranger log line", JOIN_TIMEOUT
        )
        (line,) = stranger_lines(caplog, stranger.self_id)
        assert f"room {room_id} (Trystero wire {wire})" in line and f"wire {foreign} ({evidence})" in line
        await eventually(
            lambda: stranger.self_id not in session.links(torrent.app_id, room_id),
            "the stranger's connection to close",
        )
        await asyncio.sleep(3)  # its next announces bring more offers: dropped, not answered
        assert len(stranger_lines(caplog, stranger.self_id)) == 1
        assert stranger.self_id not in watch.joined and room.stats["foreign_wire_peers"] == 1
        assert stranger.self_id not in session.links(torrent.app_id, room_id)
        assert set(room.peers) == {member.self_id}
        await member_undisturbed(room, member, room_id, watch)
        no_js_errors(member)


# --------------------------------------------------------------------------- (h) the helper


async def test_helper_joins_a_022_torrent_room_over_rest(
    aiohttp_client: Any, tmp_path: Path, torrent: Rig
) -> None:
    """p2pdiff with ``strategy = "torrent"``: ``POST /api/join`` with ``{"wire": "0.22"}`` puts
    the helper in the room as a 0.22 tracker peer; a real 0.22 browser meets it and sees it go."""
    config = helper_config(tmp_path, "torrent", [torrent.urls[0]], torrent.app_id)
    room_id = new_room_id("rest22")
    async with JsPeer.start("node", wire="0.22") as js:
        await torrent.js_join(js, room_id)
        client = await aiohttp_client(create_app(config))
        since = js.mark()
        resp = await client.post(f"/api/join/{room_id}", json={"wire": "0.22"})
        assert resp.status == 202 and (await resp.json())["wire"] == "0.22"
        helper_id = (await js.wait_peer_join(room_id, since=since, timeout=JOIN_TIMEOUT))["peer"]

        async def helper_room() -> dict[str, Any] | None:
            health = await (await client.get("/api/health")).json()
            (room,) = [r for r in health["p2p"]["rooms"] if r["roomId"] == room_id]
            return room if [p["id"] for p in room["peers"]] == [js.self_id] else None

        room = await poll(helper_room)
        assert room["wire"] == "0.22"
        assert 0 <= await js.ping(room_id, helper_id) < 2000
        since = js.mark()
        await client.close()  # the helper leaves its rooms: @_leave to each peer
        await js.wait_peer_leave(room_id, helper_id, since=since, timeout=10)
        no_js_errors(js)
