"""Our rooms over WebTorrent trackers (wire 0.25) against real Trystero 0.25.4 torrent peers.

The tracker is npm ``bittorrent-tracker`` on 127.0.0.1 (tests.services.Tracker), shared by the
module, with a 10 s announce interval (real trackers say 120 s): when our id sorts above the JS
peer's and it joined first, only its next announce brings an offer we may answer (spec §4), so
that case takes up to one interval. The cases mirror test_room_mqtt.py: (a) meet in either order
and role, (b) payloads, (c) password, (d) leave, (f) tracker restart; then bad input: a tracker
sending messages with missing or forged fields, one that never answers, one that closes
mid-session. Run in a loopback-only namespace (scripts/netns.sh).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

import signaling
from signaling import crypto
from signaling.relays.torrent import TorrentRelay
from signaling.strategies.torrent import TorrentRoomSignaller
from tests.interop.jspeer import JsPeer
from tests.services import Tracker, running
from tests.support import service_or_fail

from .conftest import SessionFactory
from .room_cases import (
    JOIN_TIMEOUT,
    RigFactory,
    eventually,
    join_and_ping,
    leave_both_ways,
    new_room_id,
    password,
    payloads,
    relay_restart,
    rig_factory,
    session_relay,
    silent_listener,
    still_fine,
)

#: bittorrent-tracker tells WebSocket clients ceil(interval_ms / 5000) s: 10 s, Trystero's minimum.
INTERVAL_MS = 50_000
TRACKER_INTERVAL_S = INTERVAL_MS / 5000
#: Trystero's announce warm-up (0, 0.233, 0.766, 2.099 s) and a margin.
WARMUP_S = 2.5

pytestmark = [
    pytest.mark.interop,
]


def _tracker(workdir: Path) -> Tracker:
    return service_or_fail(Tracker, workdir, interval_ms=INTERVAL_MS)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracker]:
    """A tracker shared by the module (unique app ids and rooms keep tests apart)."""
    with running(_tracker(tmp_path_factory.mktemp("tracker"))) as service:
        yield service


@pytest.fixture
def rig(tracker: Tracker, app_id: str, signaling_cleanup: None) -> RigFactory:
    """``rig(js_urls=None, our_urls=None)``: JS on ``js_urls`` (default: the shared tracker), us on
    ``our_urls`` (default: the same)."""
    return rig_factory("torrent", [tracker.url], app_id)


def our_tracker(url: str) -> TorrentRelay:
    return session_relay(url, TorrentRelay)


# --------------------------------------------------------------------------- (a) - (f)


@pytest.mark.parametrize("role", ["offer", "answer"], ids=["we-offer", "we-answer"])
@pytest.mark.parametrize("js_first", [True, False], ids=["js-first", "py-first"])
async def test_join_and_ping(js_first: bool, role: str, rig: RigFactory, sessions: SessionFactory) -> None:
    # JS first: we join once its warm-up announces are over, as with a browser already waiting.
    settle = WARMUP_S if js_first else 0.0
    join_ms = await join_and_ping(rig(), sessions(role), js_first=js_first, role=role, settle=settle)
    if role == "offer" or not js_first:
        # Our announce (or its join announce) brings an offer the right side answers at once.
        assert join_ms < 5000
    else:
        # Only JS's next announce brings an offer we may answer: up to one tracker interval.
        assert join_ms < TRACKER_INTERVAL_S * 1000 + 5000


async def test_payloads_both_ways(rig: RigFactory) -> None:
    await payloads(rig())


async def test_password_room(rig: RigFactory) -> None:
    await password(rig())


async def test_leave_both_ways(rig: RigFactory) -> None:
    await leave_both_ways(rig())


async def test_tracker_restart(tmp_path: Path, rig: RigFactory) -> None:
    with running(_tracker(tmp_path / "tracker")) as own:
        await relay_restart(rig(js_urls=[own.url]), own)
        assert our_tracker(own.url).connect_attempts >= 2


async def test_offer_pool_is_bounded_and_reused(rig: RigFactory, sessions: SessionFactory) -> None:
    """Three offers per room, re-announced with the same ids, one taken per answer."""
    async with JsPeer.start("node") as js:
        r = rig()
        room_id = new_room_id("pool")
        room, _, _ = await r.meet(js, room_id, js_first=True, session=sessions("offer"))
        signaller = room.signaller
        assert isinstance(signaller, TorrentRoomSignaller)
        pool = signaller.pool
        await eventually(lambda: room.stats["announces_out"] >= 4, "the warm-up announces")
        assert pool.outstanding == 3
        # one answered offer was replaced; the re-announces did not make new ones
        assert pool.made == 4, pool.made


# --------------------------------------------------------------------------- bad input


class FakeTracker:
    """A scripted WebSocket tracker: ``on_announce(ws, frame)`` runs for every frame we send."""

    def __init__(self, on_frame: Callable[[web.WebSocketResponse, dict[str, Any]], Any]) -> None:
        self.on_frame = on_frame
        self.frames: list[dict[str, Any]] = []
        self.connections = 0
        self.sockets: list[web.WebSocketResponse] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        self.connections += 1
        ws = web.WebSocketResponse()
        self.sockets.append(ws)
        await ws.prepare(request)
        async for msg in ws:
            frame = orjson.loads(msg.data)
            self.frames.append(frame)
            if await self.on_frame(ws, frame) is False:
                break
        await ws.close()
        return ws


@contextlib.asynccontextmanager
async def fake_tracker(aiohttp_server: Any, on_frame: Any) -> AsyncIterator[FakeTracker]:
    fake = FakeTracker(on_frame)
    app = web.Application()
    app.router.add_get("/", fake.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    fake.url = f"ws://127.0.0.1:{server.port}/"
    try:
        yield fake
    finally:
        for ws in fake.sockets:
            await ws.close()


def _ghost(first: str) -> str:
    """A Trystero-shaped peer id that sorts before ("!") or after ("~") any generated one."""
    return first + crypto.gen_id(19)


async def test_tracker_messages_with_missing_fields(
    rig: RigFactory,
    tracker: Tracker,
    app_id: str,
    aiohttp_server: Any,
    loop_errors: list[dict[str, Any]],
) -> None:
    """A second tracker of ours answers an announce with broken and forged messages; the peer
    connected through the real tracker is not disturbed and nothing forged connects."""
    room_id = new_room_id("hostile")
    key = crypto.derive_key("", app_id, room_id)
    armed = asyncio.Event()  # strike once JS is connected (see the last forged answer)
    struck: list[str] = []

    async def hostile(ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        offers = frame.get("offers") or []
        if not offers or struck or not armed.is_set():
            await ws.send_str(orjson.dumps({"action": "announce", "interval": 10, **_ih(frame)}).decode())
            return
        ih, ours = frame["info_hash"], offers[0]["offer_id"]
        struck.append(ours)

        def offer(peer: str, sdp: Any) -> dict[str, Any]:
            msg = {"action": "announce", "offer": sdp, "offer_id": crypto.gen_id(20)}
            return {**msg, "peer_id": peer, "info_hash": ih}

        def answer(peer: str, sdp: Any, offer_id: str | None = ours) -> dict[str, Any]:
            msg = {"action": "announce", "answer": sdp, "peer_id": peer, "info_hash": ih}
            return {**msg, "offer_id": offer_id} if offer_id else msg

        def without(msg: dict[str, Any], field: str) -> dict[str, Any]:
            return {k: v for k, v in msg.items() if k != field}

        sealed_junk = crypto.encrypt(key, "v=0 not an sdp")
        good = {"type": "offer", "sdp": sealed_junk}
        garbage: list[Any] = [
            "not json",
            [1, 2],
            {"action": "scrape", "info_hash": ih},
            {"failure reason": "nope", "info_hash": ih},
            without(offer(_ghost("!"), good), "info_hash"),
            without(offer(_ghost("!"), good), "peer_id"),
            without(offer(_ghost("!"), good), "offer_id"),
            offer(_ghost("!"), {"type": "offer"}),  # no sdp
            offer(_ghost("!"), "an sdp as a string"),
            offer(_ghost("!"), {"type": "answer", "sdp": "x"}),
            offer("short", good),  # not a Trystero id
            offer(_ghost("!"), {"type": "offer", "sdp": "not sealed"}),  # answered: cannot decrypt
            offer(_ghost("!"), good),  # answered: decrypts, but is no SDP
            offer(_ghost("~"), good),  # not answered: its id sorts above ours
            answer(_ghost("!"), {"type": "answer", "sdp": "x"}, offer_id=None),
            answer(_ghost("!"), {"type": "answer", "sdp": "x"}, offer_id="unknown-offer-id-000"),
            answer(_ghost("!"), {"type": "answer", "sdp": "not sealed"}),  # forged: the offer stays
            answer("short", {"type": "answer", "sdp": sealed_junk}),
            # Takes the offer, then fails. (Offers go to every tracker of the room, as in Trystero,
            # so a hostile tracker can burn one a real peer got elsewhere: hence `armed`.)
            answer(_ghost("!"), {"type": "answer", "sdp": sealed_junk}),
        ]
        for item in garbage:
            await ws.send_str(item if isinstance(item, str) else orjson.dumps(item).decode())
        await ws.send_bytes(b"\x00binary")

    async with fake_tracker(aiohttp_server, hostile) as fake:
        r = rig(js_urls=[tracker.url], our_urls=[tracker.url, fake.url])
        async with JsPeer.start("node") as js:
            room, watch, _ = await r.meet(js, room_id, js_first=True)
            ours = our_tracker(fake.url)
            armed.set()
            ours.announce_now(room.signaller.info_hash)  # type: ignore[attr-defined]
            await eventually(lambda: bool(struck), "the hostile tracker to strike")
            await eventually(lambda: room.stats["dropped"].get("bad_sdp", 0) >= 2, "the forged SDPs to fail")
            await still_fine(room, js, room_id, watch)
            dropped = room.stats["dropped"]
            assert dropped.get("decrypt_failed", 0) >= 2, dropped  # the unsealed offer and answer
            assert dropped.get("relay_bad_peer_id", 0) >= 2, dropped  # the short ids
            assert room.stats["offers_left_to_peer"] >= 1  # the high id's offer
            relay_drops = {k: v for k, v in ours.counters.items() if k.startswith("dropped:")}
            assert relay_drops.get("dropped:bad_field", 0) >= 5, relay_drops
            assert {"dropped:not_json", "dropped:not_object", "dropped:bad_action"} <= set(relay_drops)
            assert {"dropped:unknown_room", "dropped:unknown_offer"} <= set(relay_drops)
            assert ours.counters["failure"] >= 1
            assert ours.state == "connected" and fake.connections == 1  # garbage is not fatal
            app = signaling.default_session().apps[r.app_id]
            await eventually(lambda: not app.negotiator.pending, "forged negotiations to end", JOIN_TIMEOUT)
            assert set(signaling.default_session().links(r.app_id)) == {js.self_id}
    assert loop_errors == []


def _ih(frame: dict[str, Any]) -> dict[str, Any]:
    return {"info_hash": frame["info_hash"]} if "info_hash" in frame else {}


@contextlib.asynccontextmanager
async def _mute_tracker(how: str, aiohttp_server: Any) -> AsyncIterator[str]:
    if how == "tcp":
        with silent_listener() as url:
            yield url
        return

    async def silent(ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        return None  # read everything, answer nothing

    async with fake_tracker(aiohttp_server, silent) as fake:
        yield fake.url


@pytest.mark.parametrize("how", ["tcp", "websocket"])
async def test_tracker_that_never_answers(
    how: str, rig: RigFactory, tracker: Tracker, aiohttp_server: Any, loop_errors: list[dict[str, Any]]
) -> None:
    async with _mute_tracker(how, aiohttp_server) as dead:
        r = rig(js_urls=[tracker.url], our_urls=[dead, tracker.url])
        async with JsPeer.start("node") as js:
            room_id = new_room_id("mute")
            room, watch, join_ms = await r.meet(js, room_id, js_first=True)
            assert join_ms < 5000
            assert room.relay_states[tracker.url] == "connected"
            if how == "tcp":
                assert room.relay_states[dead] != "connected"
            await still_fine(room, js, room_id, watch)
    assert loop_errors == []


async def test_tracker_that_closes_mid_session(
    rig: RigFactory, tracker: Tracker, aiohttp_server: Any, loop_errors: list[dict[str, Any]]
) -> None:
    """A tracker replies to the first announce, then drops the socket, every time."""

    async def flaky(ws: web.WebSocketResponse, frame: dict[str, Any]) -> bool:
        await ws.send_str(orjson.dumps({"action": "announce", "interval": 10, **_ih(frame)}).decode())
        await asyncio.sleep(0.2)
        return False  # close

    async with fake_tracker(aiohttp_server, flaky) as fake:
        r = rig(js_urls=[tracker.url], our_urls=[fake.url, tracker.url])
        async with JsPeer.start("node") as js:
            room_id = new_room_id("flaky")
            room, watch, _ = await r.meet(js, room_id, js_first=True)
            await eventually(lambda: fake.connections >= 2, "a reconnect to the flaky tracker")
            await asyncio.sleep(1)
            await still_fine(room, js, room_id, watch)
            assert fake.connections <= 6, fake.connections  # backoff, not a tight loop
            assert room.relay_states[tracker.url] == "connected"
    assert loop_errors == []
