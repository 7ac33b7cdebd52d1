"""TorrentRelay: spec vectors, the real npm bittorrent-tracker, scripted fake trackers, and a real
Trystero torrent peer at the relay level.

Offer/answer flow, intervals and restarts run against the real tracker (``tests.services.Tracker``);
what a real tracker will not do on demand (send garbage, stay silent, close mid-session, name odd
intervals, flood) is scripted with a small aiohttp WebSocket server in this file.
"""

# Timeouts are parameters on purpose (ASYNC109): helpers raise with context on expiry.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from signaling.crypto import decrypt, derive_key, encrypt, gen_id, root_topic, torrent_info_hash
from signaling.relays import Backoff, RelayState
from signaling.relays.torrent import (
    DEDUPE_CAPACITY,
    TORRENT_022,
    TORRENT_025,
    TorrentOffer,
    TorrentRelay,
    announce_message,
    answer_message,
    passive_announce_message,
    stopped_message,
)
from tests.services import INTEROP_DIR, Tracker, running
from tests.support import changed_until, service_or_fail, service_pool

from . import relay_helpers
from .relay_helpers import (
    FakeServer,
    Ticker,
    close_before_start_and_while_retrying,
    heartbeat_finds_dead_server,
    relays_closed_after,
    servers_stopped_after,
    until,
    wait_state,
)

# §10 vectors: appId harness-app, roomId r1, peer AbCdEfGhIjKlMnOpQrSt.
SPEC_ROOT = "575i5ptb234329582o5d374u6f1s95l92g63"
SPEC_IH = "2j432q6wtm54z4742363"
SPEC_PEER = "AbCdEfGhIjKlMnOpQrSt"


def ih(n: int) -> str:
    return torrent_info_hash(root_topic("p2pdiff-test", f"room-{n}"))


def pid(prefix: str = "") -> str:
    return prefix + gen_id(20 - len(prefix))


def offers(n: int, tag: str = "sdp") -> list[TorrentOffer]:
    return [TorrentOffer(gen_id(20), f"{tag}-{i}") for i in range(n)]


# ---------------------------------------------------------------------- helpers


class Signals:
    """An on_offer/on_answer callback that records (info_hash, peer_id, offer_id, sdp)."""

    def __init__(self, then: Callable[[str, str, str, str], None] | None = None) -> None:
        self.items: list[tuple[str, str, str, str]] = []
        self.then = then
        self._changed = asyncio.Event()

    def __call__(self, info_hash: str, peer_id: str, offer_id: str, sdp: str) -> None:
        self.items.append((info_hash, peer_id, offer_id, sdp))
        self._changed.set()
        if self.then is not None:
            self.then(info_hash, peer_id, offer_id, sdp)

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[tuple[str, str, str, str]]:
        try:
            await changed_until(self._changed, lambda: len(self.items) >= count, timeout)
        except TimeoutError:
            raise AssertionError(f"{count} signals expected, got {self.items}") from None
        return self.items


RelayFactory = Callable[..., TorrentRelay]


@pytest.fixture
async def make_relay() -> AsyncIterator[RelayFactory]:
    async with relays_closed_after(TorrentRelay, peer_id=pid) as make:
        yield make


@pytest.fixture(scope="module")
def shared_tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracker]:
    """One tracker for tests that neither restart nor reconfigure it (rooms keep tests apart)."""
    with running(service_or_fail(Tracker, tmp_path_factory.mktemp("tracker"), log_frames=True)) as tracker:
        yield tracker


TrackerFactory = Callable[..., Tracker]


@pytest.fixture
def tracker_factory(tmp_path: Path) -> Iterator[TrackerFactory]:
    with service_pool(Tracker, tmp_path, "tracker") as make:
        yield make


class OfferPool:
    """A strategy-like offer pool: three outstanding offers; an answered one is replaced by a
    fresh one (as JS claims it), so re-announces repeat only the unanswered offer ids."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.issued: list[TorrentOffer] = []  # every offer ever handed out
        self.pool: list[TorrentOffer] = []
        self._fill()

    def _fill(self) -> None:
        while len(self.pool) < 3:
            offer = TorrentOffer(gen_id(20), f"{self.tag}-{len(self.issued)}")
            self.issued.append(offer)
            self.pool.append(offer)

    def __call__(self) -> list[TorrentOffer]:
        return list(self.pool)

    def claim(self, offer_id: str) -> None:
        self.pool = [o for o in self.pool if o.offer_id != offer_id]
        self._fill()


def swarm_pair(
    url: str, make_relay: RelayFactory, info_hash: str, **kwargs: Any
) -> tuple[TorrentRelay, TorrentRelay, Signals, Signals, OfferPool, OfferPool]:
    """Two relays in one swarm, each answering every offer it gets with ``answer-to-<sdp>``."""
    a, b = make_relay(url, **kwargs), make_relay(url, **kwargs)
    a_pool, b_pool = OfferPool("a"), OfferPool("b")

    def answerer(relay: TorrentRelay) -> Callable[[str, str, str, str], None]:
        return lambda h, peer, oid, sdp: relay.send_answer(h, peer, oid, f"answer-to-{sdp}")

    def claimer(pool: OfferPool) -> Callable[[str, str, str, str], None]:
        return lambda h, peer, oid, sdp: pool.claim(oid)

    a.on_offer, b.on_offer = Signals(answerer(a)), Signals(answerer(b))
    a.on_answer, b.on_answer = Signals(claimer(a_pool)), Signals(claimer(b_pool))
    a.set_announce(info_hash, a_pool)
    b.set_announce(info_hash, b_pool)
    return a, b, a.on_offer, b.on_offer, a_pool, b_pool  # type: ignore[return-value]


# ---------------------------------------------------------------------- a scripted tracker

Hook = Callable[["FakeConn", dict[str, Any]], Awaitable[None]]


class FakeConn(relay_helpers.FakeConn):
    def announces(self, info_hash: str | None = None) -> list[dict[str, Any]]:
        return [
            f
            for f in self.frames
            if "answer" not in f and "event" not in f and info_hash in (None, f.get("info_hash"))
        ]


def bt_reply(interval: Any = 120) -> Hook:
    """Reply to announces as bittorrent-tracker does (answers get no reply)."""

    async def reply(conn: FakeConn, frame: dict[str, Any]) -> None:
        if "answer" in frame:
            return
        iv = interval(frame["info_hash"]) if callable(interval) else interval
        await conn.send(
            {
                "complete": 0,
                "incomplete": 1,
                "action": "announce",
                "interval": iv,
                "info_hash": frame["info_hash"],
            }
        )

    return reply


class FakeTracker(FakeServer[FakeConn]):
    """A WebSocket tracker on 127.0.0.1 whose answers are scripted; records every frame."""

    conn_class = FakeConn

    def __init__(self, *, read: bool = True, on_frame: Hook | None = None) -> None:
        super().__init__(read=read)
        self.hook = on_frame if on_frame is not None else bt_reply()

    async def on_frame(self, conn: FakeConn, frame: dict[str, Any]) -> None:
        await self.hook(conn, frame)


FakeFactory = Callable[..., Awaitable[FakeTracker]]


@pytest.fixture
async def fake_tracker() -> AsyncIterator[FakeFactory]:
    async with servers_stopped_after(FakeTracker) as make:
        yield make


async def connected_with_room(
    server: FakeTracker, make_relay: RelayFactory, room_offers: list[TorrentOffer], **kwargs: Any
) -> tuple[TorrentRelay, FakeConn]:
    relay = make_relay(server.url, **kwargs)
    relay.set_announce(SPEC_IH, lambda: room_offers)
    await relay.start()
    await server.wait(lambda: bool(server.frames))
    await until(lambda: relay.counters.get("reply", 0) >= 1)
    return relay, server.connections[0]


def forwarded(kind: str, peer: str, offer_id: str, sdp: str, info_hash: str) -> dict[str, Any]:
    """What bittorrent-tracker forwards of an offer or answer ``kind`` to its receiver."""
    return {
        "action": "announce",
        kind: {"type": kind, "sdp": sdp},
        "offer_id": offer_id,
        "peer_id": peer,
        "info_hash": info_hash,
    }


def offer_frame(peer: str, offer_id: str, sdp: str = "sealed", info_hash: str = SPEC_IH) -> dict[str, Any]:
    return forwarded("offer", peer, offer_id, sdp, info_hash)


def answer_frame(peer: str, offer_id: str, sdp: str = "sealed", info_hash: str = SPEC_IH) -> dict[str, Any]:
    return forwarded("answer", peer, offer_id, sdp, info_hash)


# ---------------------------------------------------------------------- vectors (no network)


def test_info_hash_vector() -> None:
    assert root_topic("harness-app", "r1") == SPEC_ROOT
    assert torrent_info_hash(SPEC_ROOT) == SPEC_IH


def test_frames_are_byte_exact() -> None:
    sealed = "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15$AiHPHWSHia2ffxoTLPmPQeKsivlwHDTmoPdihbw6"
    offer_ids = ["OfferIdOfferIdOffer1", "OfferIdOfferIdOffer2"]
    assert announce_message(
        SPEC_IH, SPEC_PEER, [(offer_ids[0], sealed), TorrentOffer(offer_ids[1], "x")]
    ) == (
        '{"action":"announce","info_hash":"2j432q6wtm54z4742363","peer_id":"AbCdEfGhIjKlMnOpQrSt",'
        '"numwant":3,"offers":[{"offer_id":"OfferIdOfferIdOffer1","offer":{"type":"offer","sdp":"'
        + sealed
        + '"}},{"offer_id":"OfferIdOfferIdOffer2","offer":{"type":"offer","sdp":"x"}}]}'
    )
    assert passive_announce_message(SPEC_IH, SPEC_PEER) == (
        '{"action":"announce","info_hash":"2j432q6wtm54z4742363","peer_id":"AbCdEfGhIjKlMnOpQrSt",'
        '"left":0,"numwant":3,"offers":[]}'
    )
    assert answer_message(SPEC_IH, SPEC_PEER, "ZzZzZzZzZzZzZzZzZzZz", offer_ids[0], sealed) == (
        '{"action":"announce","info_hash":"2j432q6wtm54z4742363","peer_id":"AbCdEfGhIjKlMnOpQrSt",'
        '"answer":{"type":"answer","sdp":"' + sealed + '"},"offer_id":"OfferIdOfferIdOffer1",'
        '"to_peer_id":"ZzZzZzZzZzZzZzZzZzZz"}'
    )
    assert stopped_message(SPEC_IH, SPEC_PEER) == (
        '{"action":"announce","info_hash":"2j432q6wtm54z4742363","peer_id":"AbCdEfGhIjKlMnOpQrSt",'
        '"event":"stopped","numwant":0,"offers":[]}'
    )
    # The sealed SDP is the §10 ciphertext of "hello trystero"; it survives the frame untouched.
    sdp = json.loads(announce_message(SPEC_IH, SPEC_PEER, [(offer_ids[0], sealed)]))["offers"][0]["offer"][
        "sdp"
    ]
    assert decrypt(derive_key(None, "harness-app", "r1"), sdp) == "hello trystero"


def test_policies() -> None:
    assert [TORRENT_025.next_interval(10, v) for v in (1, 10, 30, 120, 500)] == [10, 10, 30, 120, 120]
    # 0.22: only raises (from 33.333 s), capped at 120.333 s.
    assert TORRENT_022.next_interval(33.333, 10) == 33.333
    assert TORRENT_022.next_interval(33.333, 60) == 60
    assert TORRENT_022.next_interval(60, 40) == 60
    assert TORRENT_022.next_interval(60, 600) == 120.333
    assert (TORRENT_025.numwant, TORRENT_025.max_offers, TORRENT_022.numwant) == (3, 3, 10)
    with pytest.raises(ValueError):
        dataclasses.replace(TORRENT_025, min_interval=0)
    with pytest.raises(ValueError):
        dataclasses.replace(TORRENT_025, dedupe_window=0)


async def test_rejects_bad_arguments(make_relay: RelayFactory) -> None:
    for url in ("http://127.0.0.1:1/", "ws:///nohost", "ws://127.0.0.1:99999/"):
        with pytest.raises(ValueError):
            TorrentRelay(url, peer_id=SPEC_PEER)
    for peer in ("short", "x" * 21, "é" * 20, "a b\nccccccccccccccccc"):
        with pytest.raises(ValueError):
            TorrentRelay("ws://127.0.0.1:1/", peer_id=peer)
    relay = make_relay("ws://127.0.0.1:1/", max_rooms=2)
    for bad in ("", "2j432q6wtm54z474236", SPEC_ROOT):
        with pytest.raises(ValueError):
            relay.set_announce(bad, None)
    relay.set_announce(ih(1), None)
    relay.set_announce(ih(2), None)
    relay.set_announce(ih(2), None)  # replacing is fine
    with pytest.raises(ValueError):
        relay.set_announce(ih(3), None)
    assert relay.rooms == (ih(1), ih(2))
    with pytest.raises(ValueError):
        relay.send_answer(ih(1), "too short", "o" * 20, "sdp")
    with pytest.raises(ValueError):
        relay.send_answer(ih(1), SPEC_PEER, "", "sdp")
    with pytest.raises(ValueError):
        relay.send_answer(ih(1), SPEC_PEER, "o" * 20, "")
    # Not connected (never started): refused, counted, not queued.
    assert relay.send_answer(ih(1), SPEC_PEER, "o" * 20, "sdp") is False
    assert relay.counters["answer_unsent"] == 1


# ---------------------------------------------------------------------- with the real tracker


async def test_offer_and_answer_through_the_real_tracker(
    shared_tracker: Tracker, make_relay: RelayFactory
) -> None:
    room, other_room = ih(10), ih(11)
    a, b, a_got, b_got, a_offers, b_offers = swarm_pair(shared_tracker.url, make_relay, room)
    b.set_announce(other_room, b_offers)  # a second swarm on the same socket, A not in it
    await a.start()
    await a.wait_connected()
    await until(lambda: a.counters.get("reply", 0) >= 1)  # A is in the swarm
    await b.start()

    # B's first announce forwards one of B's offers to A (the only other member); A answers.
    (h, peer, offer_id, sdp), *_ = await a_got.wait_for(1)
    assert (h, peer) == (room, b.peer_id)
    assert (offer_id, sdp) in b_offers.issued
    answers_at_b: Signals = b.on_answer  # type: ignore[assignment]
    assert (await answers_at_b.wait_for(1))[0] == (room, a.peer_id, offer_id, f"answer-to-{sdp}")

    # And the other way round: A re-announces, so its offers reach B.
    a.announce_now(room)
    (h, peer, offer_id, sdp), *_ = await b_got.wait_for(1)
    assert (h, peer, (offer_id, sdp) in a_offers.issued) == (room, a.peer_id, True)
    answers_at_a: Signals = a.on_answer  # type: ignore[assignment]
    await answers_at_a.wait_for(1)
    assert answers_at_a.items[0] == (room, b.peer_id, offer_id, f"answer-to-{sdp}")

    assert len({x[0] for x in a_got.items + b_got.items}) == 1  # nothing from other_room
    assert a.state == b.state == "connected"
    assert not [k for k in a.counters | b.counters if k.startswith("dropped:") and k != "dropped:duplicate"]
    # Field order on the wire, as the real tracker received it.
    ours = [json.loads(f) for f in shared_tracker.frames() if a.peer_id in f]
    assert list(ours[0]) == ["action", "info_hash", "peer_id", "numwant", "offers"]
    answer = next(f for f in ours if "answer" in f)
    assert list(answer) == ["action", "info_hash", "peer_id", "answer", "offer_id", "to_peer_id"]


async def test_real_tracker_interval_is_clamped_and_honoured(
    tracker_factory: TrackerFactory, make_relay: RelayFactory
) -> None:
    tracker = tracker_factory(interval_ms=5000)  # clients are told "interval": 1
    default = make_relay(tracker.url)
    default.set_announce(ih(20), None)
    times: list[float] = []

    def provider() -> list[TorrentOffer]:
        times.append(time.monotonic())
        return []

    # A policy whose floor lets the tracker's 1 s through, without warm-up, to see the cadence.
    quick_policy = dataclasses.replace(TORRENT_025, min_interval=0.5, warmup=())
    quick = make_relay(tracker.url, policy=quick_policy)
    quick.set_announce(ih(21), provider)
    assert default.interval(ih(20)) == 10.0  # the default until the tracker names one
    await default.start()
    await quick.start()
    await until(lambda: default.counters.get("interval", 0) >= 1)
    assert default.interval(ih(20)) == 10.0  # 1 s, clamped up to the 10 s floor
    await until(lambda: len(times) >= 4, timeout=6)
    assert quick.interval(ih(21)) == 1.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # The first gap is the 10 s default cut short by the reply naming 1 s; then 1 s each.
    assert all(0.9 <= g <= 1.3 for g in gaps), gaps
    # The default relay: first announce, then the 0.233/0.533/1.333 warm-up (capped by 10 s).
    assert default.counters["announce"] == 4


async def test_remove_leaves_the_swarm(shared_tracker: Tracker, make_relay: RelayFactory) -> None:
    room = ih(30)
    a, b, a_got, _, _, _ = swarm_pair(shared_tracker.url, make_relay, room)
    await a.start()
    await b.start()
    await a_got.wait_for(1)  # both in the swarm
    await until(lambda: b.counters.get("reply", 0) >= 4)  # B's warm-up is over
    a.remove(room)
    await until(lambda: a.counters.get("stopped") == 1)
    await until(lambda: a.counters.get("late", 0) >= 1)  # the tracker's reply to our stopped
    await asyncio.sleep(0.2)
    late, offers_at_a = a.counters["late"], len(a_got.items)
    b.announce_now(room)
    before = b.counters["reply"]
    await until(lambda: b.counters["reply"] > before)
    await asyncio.sleep(0.2)
    # Without the stopped announce the tracker would still forward B's offers to A.
    assert a.counters["late"] == late and len(a_got.items) == offers_at_a
    assert a.rooms == () and b.rooms == (room,)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_real_tracker_restart_reannounces_and_offers_flow_again(
    tracker_factory: TrackerFactory, make_relay: RelayFactory, how: str
) -> None:
    tracker = tracker_factory()
    room = ih(40)
    a, b, a_got, b_got, _, _ = swarm_pair(tracker.url, make_relay, room)
    a.set_announce(ih(41), None)  # a second room on A's socket
    states: list[RelayState] = []
    a.on_state = states.append
    await a.start()
    await a.wait_connected()
    await until(lambda: a.counters.get("reply", 0) >= 2)
    await b.start()
    await a_got.wait_for(1)
    answers_at_b: Signals = b.on_answer  # type: ignore[assignment]
    await answers_at_b.wait_for(1)

    getattr(tracker, how)()  # kill: a crash (no close frame); stop: close 1001, then exit
    await asyncio.gather(wait_state(a, "reconnecting"), wait_state(b, "reconnecting"))
    a_replies, b_replies = a.counters["reply"], b.counters["reply"]
    tracker.start()  # same port, empty swarms
    await asyncio.wait_for(asyncio.gather(a.wait_connected(), b.wait_connected()), 10)
    # Both of A's rooms re-announced at once on the new socket, and the new tracker replied.
    await until(lambda: a.counters["reply"] >= a_replies + 2 and b.counters["reply"] >= b_replies + 1)

    # Offers flow again: A re-announces into the swarm B rejoined; B answers; A gets the answer.
    answers_at_a: Signals = a.on_answer  # type: ignore[assignment]
    offers_at_b, answers_before = len(b_got.items), len(answers_at_a.items)
    a.announce_now(room)
    await b_got.wait_for(offers_at_b + 1, timeout=5)
    # B may get two offers here (A's reconnect announce can find B already back in the swarm),
    # and their answers may cross: every offer B got is answered back to A, in whatever order.
    offered = {item[2] for item in b_got.items[offers_at_b:]}
    await until(lambda: offered <= {item[2] for item in answers_at_a.items[answers_before:]})
    assert states == ["connecting", "connected", "reconnecting", "connected"]


async def test_no_threads(shared_tracker: Tracker, make_relay: RelayFactory) -> None:
    before = threading.active_count()
    a, b, a_got, _, _, _ = swarm_pair(shared_tracker.url, make_relay, ih(50))
    await a.start()
    await a.wait_connected()
    await until(lambda: a.counters.get("reply", 0) >= 1)
    await b.start()
    await a_got.wait_for(1)
    await a.close()
    await b.close()
    assert threading.active_count() == before, threading.enumerate()


# ---------------------------------------------------------------------- with a scripted tracker


async def test_frames_on_the_socket(fake_tracker: FakeFactory, make_relay: RelayFactory) -> None:
    server = await fake_tracker()
    relay = make_relay(server.url, peer_id=SPEC_PEER)
    room_offers = [TorrentOffer("OfferIdOfferIdOffer1", "s1"), TorrentOffer("OfferIdOfferIdOffer2", "s2")]
    relay.set_announce(SPEC_IH, lambda: room_offers)
    relay.set_announce(ih(1), None, passive=True)
    relay.set_announce(ih(2), None)
    await relay.start()
    await server.wait(lambda: len(server.frames) >= 3)
    conn = server.connections[0]
    assert sorted(conn.raw[:3]) == sorted(
        [
            announce_message(SPEC_IH, SPEC_PEER, room_offers),
            passive_announce_message(ih(1), SPEC_PEER),
            announce_message(ih(2), SPEC_PEER, []),
        ]
    )
    assert (
        conn.raw[:3].count(
            '{"action":"announce","info_hash":"2j432q6wtm54z4742363","peer_id":"AbCdEfGhIjKlMnOpQrSt",'
            '"numwant":3,"offers":[{"offer_id":"OfferIdOfferIdOffer1","offer":{"type":"offer","sdp":"s1"}},'
            '{"offer_id":"OfferIdOfferIdOffer2","offer":{"type":"offer","sdp":"s2"}}]}'
        )
        == 1
    )
    assert relay.send_answer(SPEC_IH, "ZzZzZzZzZzZzZzZzZzZz", "TheirOfferIdTheirOff", "sealed-answer")
    await server.wait(lambda: any("answer" in f for f in conn.frames))
    assert (
        answer_message(SPEC_IH, SPEC_PEER, "ZzZzZzZzZzZzZzZzZzZz", "TheirOfferIdTheirOff", "sealed-answer")
        in conn.raw
    )
    relay.remove(ih(1))
    await server.wait(lambda: any("event" in f for f in conn.frames))
    assert stopped_message(ih(1), SPEC_PEER) in conn.raw
    assert len(server.connections) == 1  # every room on one socket
    assert relay.counters["answer_sent"] == 1 and relay.counters["stopped"] == 1


async def test_warmup_cadence(fake_tracker: FakeFactory, make_relay: RelayFactory) -> None:
    server = await fake_tracker()  # replies "interval": 120
    relay = make_relay(server.url)
    relay.set_announce(SPEC_IH, None)
    await relay.start()
    await server.wait(lambda: len(server.frames) >= 4, timeout=4)
    times = server.connections[0].times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, expected in zip(gaps, (0.233, 0.533, 1.333), strict=True):
        assert expected - 0.02 <= gap <= expected + 0.15, gaps
    await asyncio.sleep(0.5)
    assert len(server.frames) == 4 and relay.interval(SPEC_IH) == 120.0  # then 120 s


async def test_interval_values(fake_tracker: FakeFactory, make_relay: RelayFactory) -> None:
    named: dict[str, Any] = {
        ih(1): 1,
        ih(2): 30,
        ih(3): 500,
        ih(4): 45.5,
        ih(5): 0,  # JS: falsy, ignored
        ih(6): "30",
        ih(7): -1,
        ih(8): True,
        ih(9): {"s": 30},
        ih(10): None,
    }
    server = await fake_tracker(on_frame=bt_reply(lambda h: named[h]))
    relay = make_relay(server.url)
    for h in named:
        relay.set_announce(h, None)
    await relay.start()
    await until(lambda: relay.counters.get("reply", 0) >= len(named))
    assert {h: relay.interval(h) for h in named} == {
        ih(1): 10.0,
        ih(2): 30.0,
        ih(3): 120.0,
        ih(4): 45.5,
        ih(5): 10.0,
        ih(6): 10.0,
        ih(7): 10.0,
        ih(8): 10.0,
        ih(9): 10.0,
        ih(10): 10.0,
    }
    assert relay.counters["bad_interval"] >= 5 and relay.state == "connected"


async def test_malformed_input_is_dropped_and_counted(
    fake_tracker: FakeFactory, make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = await fake_tracker()
    mine = offers(3)
    relay, conn = await connected_with_room(server, make_relay, mine, max_sdp_chars=1000)
    got_offers, got_answers = Signals(), Signals()
    relay.on_offer, relay.on_answer = got_offers, got_answers
    peer = pid()
    good = offer_frame(peer, "GoodOfferIdGoodOffer")

    def with_(**changes: Any) -> dict[str, Any]:
        frame = dict(good)
        for key, value in changes.items():
            if value is ...:
                del frame[key]
            else:
                frame[key] = value
        return frame

    junk: list[tuple[Any, str | tuple[str, ...]]] = [
        ("not json", "dropped:not_json"),
        ("1e400", "dropped:not_json"),  # infinity
        ("[1, 2]", "dropped:not_object"),
        ('"a string"', "dropped:not_object"),
        ({"failure reason": "invalid info_hash"}, "failure"),
        ({"failure reason": "nope", "info_hash": SPEC_IH, "offer": good["offer"]}, "failure"),
        (with_(action="scrape"), "dropped:bad_action"),
        (with_(info_hash=...), "dropped:unknown_room"),
        (with_(info_hash=ih(99)), "dropped:unknown_room"),
        (with_(info_hash=["not", "a", "string"]), "dropped:unknown_room"),
        (with_(peer_id=5), "dropped:bad_field"),
        (with_(peer_id=""), "dropped:bad_field"),
        (with_(peer_id=...), "dropped:bad_field"),
        (with_(offer_id=None), "dropped:bad_field"),
        (with_(offer_id="x" * 65), "dropped:bad_field"),
        (with_(offer="a string"), "dropped:bad_field"),
        (with_(offer=None), "dropped:bad_field"),
        (with_(offer={"type": "offer"}), "dropped:bad_field"),
        (with_(offer={"type": "offer", "sdp": ""}), "dropped:bad_field"),
        (with_(offer={"type": "offer", "sdp": 7}), "dropped:bad_field"),
        (with_(offer={"type": "answer", "sdp": "s"}), "dropped:bad_field"),
        (with_(answer={"type": "answer", "sdp": "s"}), "dropped:bad_field"),  # both
        (with_(offer={"type": "offer", "sdp": "x" * 1001}), "dropped:oversize"),
        (with_(peer_id=relay.peer_id), "dropped:own"),
        (answer_frame(peer, "NeverAnnouncedByUs00"), "dropped:unknown_offer"),
        (good, "offers_received"),
        (good, "dropped:duplicate"),
        (with_(offer={"sdp": "no type is fine"}, offer_id="OtherOfferIdOtherOff"), "offers_received"),
        (
            {"warning message": "slow down", **with_(offer_id="ThirdOfferIdThirdOff")},
            ("warning", "offers_received"),
        ),
        ({"info_hash": SPEC_IH, "interval": "soon"}, ("bad_interval", "reply")),
        (answer_frame(peer, mine[1].offer_id, "their answer"), "answers_received"),
    ]
    expected: dict[str, int] = {}
    before = relay.counters
    for message, names in junk:
        await conn.send(message)
        for name in (names,) if isinstance(names, str) else names:
            expected[name] = expected.get(name, 0) + 1
    await conn.ws.send_bytes(b"\x00binary")
    expected["dropped:not_json"] += 1
    await until(lambda: relay.counters.get("answers_received") == 1)
    counters = relay.counters
    for name, count in expected.items():
        assert counters.get(name, 0) - before.get(name, 0) == count, (name, counters)
    assert [x[2] for x in got_offers.items] == [
        "GoodOfferIdGoodOffer",
        "OtherOfferIdOtherOff",
        "ThirdOfferIdThirdOff",
    ]
    assert got_answers.items == [(SPEC_IH, peer, mine[1].offer_id, "their answer")]
    assert counters["offers_received"] == 3  # the warning did not stop the offer next to it
    assert relay.state == "connected" and len(server.connections) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_oversized_frame_drops_the_connection(
    fake_tracker: FakeFactory, make_relay: RelayFactory
) -> None:
    server = await fake_tracker()
    relay, conn = await connected_with_room(server, make_relay, [])
    await conn.send(json.dumps(offer_frame(pid(), gen_id(20), "x" * (1024 * 1024 + 10))))
    await wait_state(relay, "reconnecting")
    await asyncio.wait_for(relay.wait_connected(), 5)
    await server.wait(lambda: len(server.connections) == 2 and bool(server.connections[1].frames))


async def test_dedupe(fake_tracker: FakeFactory, make_relay: RelayFactory) -> None:
    server = await fake_tracker()
    policy = dataclasses.replace(TORRENT_025, dedupe_window=0.3)
    relay, conn = await connected_with_room(server, make_relay, [], policy=policy)
    got = Signals()
    relay.on_offer = got
    p, q = pid(), pid()
    await conn.send(offer_frame(p, "X" * 20))
    await conn.send(offer_frame(p, "X" * 20, "same id, other sdp"))  # key has no sdp: duplicate
    await conn.send(offer_frame(q, "X" * 20))  # another peer: a different signal
    await got.wait_for(2)
    await asyncio.sleep(0.35)
    await conn.send(offer_frame(p, "X" * 20))  # the window has passed: handled again (JS too)
    await got.wait_for(3)
    assert [x[1] for x in got.items] == [p, q, p] and relay.counters["dropped:duplicate"] == 1

    # 0.22: by offer_id alone, for as long as we remember it.
    server22 = await fake_tracker()
    old, conn22 = await connected_with_room(server22, make_relay, [], policy=TORRENT_022)
    got22 = Signals()
    old.on_offer = got22
    await conn22.send(offer_frame(p, "Y" * 20))
    await conn22.send(offer_frame(q, "Y" * 20))
    await got22.wait_for(1)
    await asyncio.sleep(0.35)
    await conn22.send(offer_frame(p, "Y" * 20))
    await until(lambda: old.counters.get("dropped:duplicate") == 2)
    assert len(got22.items) == 1


async def test_flood_is_delivered_bounded_and_the_loop_stays_responsive(
    fake_tracker: FakeFactory, make_relay: RelayFactory
) -> None:
    server = await fake_tracker()
    relay, conn = await connected_with_room(server, make_relay, [])
    got = Signals()
    relay.on_offer = got
    count = DEDUPE_CAPACITY + 1000
    frames = [json.dumps(offer_frame(pid(), gen_id(20), "s" * 200)) for _ in range(count)]
    with Ticker() as ticker:
        for frame in frames:
            await conn.ws.send_str(frame)
        await got.wait_for(count, timeout=30)
    assert ticker.max_gap < 0.5, ticker.max_gap
    assert len(relay._handled) <= DEDUPE_CAPACITY  # the dedupe map stays bounded
    assert relay.state == "connected"


async def test_announce_now_is_rate_limited(fake_tracker: FakeFactory, make_relay: RelayFactory) -> None:
    server = await fake_tracker()  # "interval": 120, so only forced announces follow
    relay, conn = await connected_with_room(
        server, make_relay, [], policy=dataclasses.replace(TORRENT_025, warmup=())
    )
    for _ in range(10):
        relay.announce_now(SPEC_IH)
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.2)
    assert len(conn.announces()) == 2  # the first, then one forced announce
    assert conn.times[1] - conn.times[0] >= 0.95
    relay.announce_now("unknown-room-is-a-no-op")


async def test_passive_room(fake_tracker: FakeFactory, make_relay: RelayFactory) -> None:
    server = await fake_tracker()
    relay = make_relay(server.url)
    calls: list[int] = []

    def provider() -> list[TorrentOffer]:
        calls.append(1)
        return offers(1)

    relay.set_announce(SPEC_IH, provider, passive=True)
    await relay.start()
    await server.wait(lambda: len(server.frames) == 1)
    await asyncio.sleep(0.5)  # no warm-up for passive rooms
    assert server.frames == [json.loads(passive_announce_message(SPEC_IH, relay.peer_id))] and not calls
    relay.set_announce(SPEC_IH, provider)  # wakes up: announces with offers at once
    await server.wait(lambda: len(server.frames) == 2, timeout=1.5)
    assert len(server.frames[1]["offers"]) == 1 and calls == [1]
    assert relay.counters["announce_passive"] == 1 and relay.counters["announce"] == 1


async def test_offers_providers(
    fake_tracker: FakeFactory, make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = await fake_tracker()
    relay = make_relay(server.url, offers_timeout=0.2)
    failures: list[int] = []

    async def async_two() -> list[TorrentOffer]:
        await asyncio.sleep(0.01)
        return offers(2)

    def raises() -> list[TorrentOffer]:
        failures.append(1)
        raise RuntimeError("no peer connection available")

    async def too_slow() -> list[TorrentOffer]:
        await asyncio.sleep(10)
        return []

    def mixed() -> list[Any]:
        return [("OkOfferIdOkOfferIdOk", "sdp"), ("", "x"), ("a" * 20, ""), 5, ("b" * 20, "s", "extra")]

    relay.set_announce(ih(1), async_two)
    relay.set_announce(ih(2), raises)
    relay.set_announce(ih(3), too_slow)
    relay.set_announce(ih(4), mixed)
    relay.set_announce(ih(5), lambda: offers(5))
    relay.set_announce(ih(6), lambda: None)
    with caplog.at_level(logging.WARNING, logger="signaling.relays.torrent"):
        await relay.start()
        await until(lambda: relay.counters.get("offers_failed", 0) >= 4)  # raises + too_slow, twice
    conn = server.connections[0]
    counts = {
        h: [len(f["offers"]) for f in conn.announces(h)] for h in (ih(1), ih(2), ih(3), ih(4), ih(5), ih(6))
    }
    assert counts[ih(1)][0] == 2 and counts[ih(4)][0] == 1 and counts[ih(5)][0] == 3 and counts[ih(6)][0] == 0
    assert counts[ih(2)] == [] and counts[ih(3)] == []  # failed announces are skipped...
    assert len(failures) >= 2  # ...and the cadence goes on
    assert relay.counters["offers_invalid"] >= 4 and relay.counters["offers_truncated"] >= 1
    assert relay.state == "connected"


async def test_silent_tcp_listener_times_out_without_blocking(make_relay: RelayFactory) -> None:
    with socket.socket() as sock:  # the kernel completes the handshake, nobody ever answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        relay = make_relay(f"ws://127.0.0.1:{sock.getsockname()[1]}/", connect_timeout=0.5)
        relay.set_announce(SPEC_IH, None)
        with Ticker() as ticker:
            await relay.start()
            await asyncio.sleep(1.5)
        assert relay.state == "connecting" and relay.connect_attempts >= 2
        assert ticker.ticks >= 40 and ticker.max_gap < 0.5, (ticker.ticks, ticker.max_gap)


async def test_tracker_that_accepts_and_never_answers(
    fake_tracker: FakeFactory, make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # The upgrade succeeds, then nothing: announces are never replied to, pings never ponged.
    server = await fake_tracker(read=False)
    relay = make_relay(server.url, heartbeat=None, reply_timeout=0.5)
    relay.set_announce(SPEC_IH, None)
    with caplog.at_level(logging.WARNING, logger="signaling.relays.torrent"), Ticker() as ticker:
        await relay.start()
        await wait_state(relay, "connected")
        await wait_state(relay, "reconnecting", timeout=2)
        await asyncio.wait_for(relay.wait_connected(), 3)
        await wait_state(relay, "reconnecting", timeout=2)
    assert relay.counters["reply_timeout"] >= 2 and len(server.connections) >= 2
    assert any("not answering" in r.getMessage() for r in caplog.records)
    assert ticker.max_gap < 0.5

    # With no room there is no announce to wait for: the heartbeat finds the dead tracker.
    await heartbeat_finds_dead_server(make_relay, server.url)


async def test_tracker_that_refuses_every_announce(
    fake_tracker: FakeFactory, make_relay: RelayFactory
) -> None:
    async def refuse(conn: FakeConn, frame: dict[str, Any]) -> None:
        # bittorrent-tracker's shape when its filter disallows a torrent
        await conn.send(
            {"action": "announce", "failure reason": "torrent not allowed", "info_hash": frame["info_hash"]}
        )

    server = await fake_tracker(on_frame=refuse)
    relay = make_relay(server.url, reply_timeout=0.3)
    relay.set_announce(SPEC_IH, None)
    await relay.start()
    await asyncio.sleep(1.0)  # the warm-up announces are all refused
    assert relay.counters["failure"] >= 3 and "reply_timeout" not in relay.counters
    assert relay.state == "connected" and len(server.connections) == 1  # refusals are answers


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_tracker_closes_mid_session(
    fake_tracker: FakeFactory, make_relay: RelayFactory, how: str
) -> None:
    server = await fake_tracker()
    relay = make_relay(server.url)
    rooms = [ih(1), ih(2), ih(3)]
    for h in rooms:
        relay.set_announce(h, None)
    got = Signals()
    relay.on_offer = got
    await relay.start()
    await server.wait(lambda: len(server.frames) >= 3)
    first = server.connections[0]
    if how == "close":
        await first.ws.close()
    else:
        first.abort()
    await wait_state(relay, "reconnecting")
    await asyncio.wait_for(relay.wait_connected(), 5)
    await server.wait(lambda: len(server.connections) == 2 and len(server.connections[1].frames) >= 3)
    second = server.connections[1]
    # Every room at once, right after the socket opened (not at its next timer).
    assert sorted(f["info_hash"] for f in second.frames[:3]) == sorted(rooms)
    assert second.times[2] - second.at < 0.2
    await second.send(offer_frame(pid(), gen_id(20), info_hash=ih(2)))
    assert (await got.wait_for(1))[0][0] == ih(2)


async def test_send_answer_while_reconnecting_is_refused(
    fake_tracker: FakeFactory, make_relay: RelayFactory
) -> None:
    server = await fake_tracker()
    relay, conn = await connected_with_room(server, make_relay, [], backoff=Backoff(initial=1.0, cap=1.0))
    assert relay.send_answer(SPEC_IH, SPEC_PEER, "o" * 20, "sdp")
    conn.abort()
    await wait_state(relay, "reconnecting")
    assert not relay.send_answer(SPEC_IH, SPEC_PEER, "o" * 20, "sdp")
    assert not relay.send_answer(ih(77), SPEC_PEER, "o" * 20, "sdp")  # not a room of ours
    assert relay.counters["answer_sent"] == 1 and relay.counters["answer_unsent"] == 2


@pytest.mark.filterwarnings("error")
async def test_close_is_clean(fake_tracker: FakeFactory, make_relay: RelayFactory) -> None:
    server = await fake_tracker()
    relay = make_relay(server.url)
    states: list[RelayState] = []
    relay.on_state = states.append
    relay.set_announce(SPEC_IH, None)
    await relay.start()
    await server.wait(lambda: bool(server.frames))
    await asyncio.gather(relay.close(), relay.close())
    assert states == ["connecting", "connected", "closed"]
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("torrent")]
    await server.wait(lambda: server.connections[0].ws.closed)
    with pytest.raises(ConnectionError):
        await relay.wait_connected()
    gc.collect()

    # Rooms survive close(): a later start() announces them on a new connection.
    await relay.start()
    await server.wait(lambda: len(server.connections) == 2 and bool(server.connections[1].frames))
    assert server.connections[1].frames[0]["info_hash"] == SPEC_IH


async def test_close_while_retrying_and_before_start(make_relay: RelayFactory) -> None:
    def queue(relay: TorrentRelay) -> None:
        relay.set_announce(SPEC_IH, lambda: offers(3))

    relay = await close_before_start_and_while_retrying(make_relay, "ws://127.0.0.1:1/", queue, limit=0.2)
    assert relay.counters.get("announce", 0) == 0


# ---------------------------------------------------------------------- a real Trystero torrent peer


def js_peers_available(wire: str) -> bool:
    package = INTEROP_DIR / "node_modules" / ("@trystero-p2p/torrent" if wire == "0.25" else "trystero022")
    return package.is_dir() and (INTEROP_DIR / "node_modules" / "bittorrent-tracker").is_dir()


@pytest.mark.interop
@pytest.mark.parametrize("wire", ["0.25", "0.22"])
async def test_real_trystero_torrent_peer(tmp_path: Path, make_relay: RelayFactory, wire: str) -> None:
    """Relay level only: a real Trystero peer's offers reach us (and decrypt to SDP offers), our
    aiortc offer reaches it and its answer comes back by offer_id, the data channel opens, and
    both sides' frames are byte-identical to what our builders write."""
    if not js_peers_available(wire):
        pytest.fail("tests/interop/node_modules missing: run `npm ci` in tests/interop (make test does)")
    from signaling.peer import Peer
    from tests.interop.jspeer import JsPeer

    tracker = service_or_fail(Tracker, tmp_path / "tracker", log_frames=True)
    tracker.start()
    try:
        app_id, room = f"p2pdiff-test-{uuid.uuid4().hex[:10]}", "torrent-room"
        info_hash = torrent_info_hash(root_topic(app_id, room))
        key = derive_key(None, app_id, room)
        policy = TORRENT_025 if wire == "0.25" else TORRENT_022
        # A low-sorting id: a 0.25 JS peer answers only offers from smaller ids (spec §4).
        relay = make_relay(tracker.url, peer_id=pid("0000"), policy=policy)
        got_offers, got_answers = Signals(), Signals()
        relay.on_offer, relay.on_answer = got_offers, got_answers
        peer = Peer(initiator=True, host_addresses=["127.0.0.1"])
        try:
            ours = TorrentOffer(gen_id(20), encrypt(key, await peer.create_offer()))
            relay.set_announce(info_hash, lambda: [ours])
            await relay.start()
            await until(lambda: relay.counters.get("reply", 0) >= 1, timeout=10)  # in the swarm

            async with JsPeer.start(kind="node", wire=wire) as js:
                await js.join(room, app_id=app_id, relay_urls=[tracker.url], strategy="torrent")
                # Its first announce forwards one of its offers to us, the only other member.
                (h, from_peer, _, sealed), *_ = await got_offers.wait_for(1, timeout=20)
                assert (h, from_peer) == (info_hash, js.self_id)
                sdp = decrypt(key, sealed)
                assert sdp.startswith("v=0") and "a=fingerprint:" in sdp and "webrtc-datachannel" in sdp
                # Now it is in the swarm: announce again so our offer reaches it; it answers.
                relay.announce_now(info_hash)
                (h, from_peer, offer_id, sealed_answer), *_ = await got_answers.wait_for(1, timeout=20)
                assert (h, from_peer, offer_id) == (info_hash, js.self_id, ours.offer_id)
                await peer.accept_answer(decrypt(key, sealed_answer))
                await asyncio.wait_for(peer.wait_open(), 15)
        finally:
            await peer.close()
        assert not [k for k in relay.counters if k.startswith("dropped:") and k != "dropped:duplicate"]

        # Byte-level: rebuild JS's own frames with our builders (JSON.stringify == orjson here).
        js_frames = [f for f in tracker.frames() if f'"peer_id":"{js.self_id}"' in f]
        js_announce = next(f for f in js_frames if '"offers":[{' in f)
        parsed = orjson.loads(js_announce)
        rebuilt = announce_message(
            info_hash,
            js.self_id,
            [(o["offer_id"], o["offer"]["sdp"]) for o in parsed["offers"]],
            policy.numwant,
        )
        assert js_announce == rebuilt
        assert len(parsed["offers"]) == policy.max_offers and all(
            len(o["offer_id"]) == 20 for o in parsed["offers"]
        )
        js_answer = next(f for f in js_frames if '"answer":' in f)
        assert js_answer == answer_message(info_hash, js.self_id, relay.peer_id, ours.offer_id, sealed_answer)
        assert announce_message(info_hash, relay.peer_id, [ours], policy.numwant) in tracker.frames()
    finally:
        tracker.cleanup()
