"""The 0.22 wire at the session/strategy seam (signaling.negotiation022, signaling.foreign_wire).

Pure checks (traits, cadence, default relays, who offers, glare, stranger screening), then two
Python sessions through a real mosquitto on 127.0.0.1: 0.22 rooms meeting, a 0.22 and a 0.25 room
in one session, and peers of the other wire injected into a room with a raw MQTT client.
Interop with real Trystero 0.22 peers is in tests/interop/test_room_wire022.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from signaling import RoomConfig, Session, Timeouts, crypto, negotiation022, strategies
from signaling import session as session_module
from signaling.config import Limits
from signaling.foreign_wire import ForeignWireWatch
from signaling.pacing import AnnouncePacer
from signaling.relays import Backoff, MqttRelay, Relay
from signaling.signaller import Signal
from signaling.strategies.mqtt import DEFAULT_BROKERS, PROFILE_022
from signaling.wire import v022, v025
from signaling.wire.interface import WireTraits
from tests.services import Mosquitto
from tests.support import SessionFactory, config_factory, eventually

APP = "p2p-webgpu-diffusion-v1"


# --------------------------------------------------------------------------- traits and keys


def test_traits() -> None:
    assert v025.WIRE.traits == WireTraits("0.25", True, True, True, False)
    assert v022.WIRE.traits == WireTraits("0.22", False, False, False, True)


def test_context_keys() -> None:
    new = RoomConfig(app_id="a", relay_urls=["ws://127.0.0.1:1"])
    old = RoomConfig(app_id="a", relay_urls=["ws://127.0.0.1:1"], wire="0.22")
    key = negotiation022.context_key
    assert key(new.app_id, "r1", v025.WIRE) == key(new.app_id, "r2", v025.WIRE) == "a"
    assert key(old.app_id, "r1", v022.WIRE) == ("a", "0.22", "r1")


def test_unknown_wire_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported wire"):
        RoomConfig(app_id="a", wire="0.23")


# --------------------------------------------------------------------------- per-wire defaults


def test_default_mqtt_brokers_per_wire() -> None:
    assert RoomConfig(app_id=APP).effective_relay_urls == DEFAULT_BROKERS["0.25"]
    old = RoomConfig(app_id=APP, wire="0.22").effective_relay_urls
    assert (
        old
        == PROFILE_022.default_urls
        == (
            "wss://test.mosquitto.org:8081/mqtt",
            "wss://broker.emqx.io:8084/mqtt",
            "wss://broker.hivemq.com:8884/mqtt",
        )
    )
    # explicit URLs win over both
    assert RoomConfig(app_id=APP, wire="0.22", relay_urls=["ws://x"]).effective_relay_urls == ("ws://x",)


def test_default_nostr_relays_per_wire_do_not_overlap() -> None:
    """Spec §9.4: for this app the two five-relay picks are disjoint, so each wire's rooms must
    join their own set (a helper serving both joins both)."""
    old = RoomConfig(app_id=APP, strategy="nostr", wire="0.22").effective_relay_urls
    new = RoomConfig(app_id=APP, strategy="nostr", wire="0.25").effective_relay_urls
    assert old == (
        "wss://ftp.halifax.rwth-aachen.de/nostr",
        "wss://relay.binaryrobot.com",
        "wss://nostr.cool110.xyz",
        "wss://relay.nostromo.social",
        "wss://nos.lol",
    )
    assert set(new) == {
        "wss://strfry.shock.network",
        "wss://relay02.lnfi.network",
        "wss://relay.mostr.pub",
        "wss://nostr-01.yakihonne.com",
        "wss://schnorr.me",
    }
    assert len(old) == len(new) == 5 and not set(old) & set(new)


# --------------------------------------------------------------------------- cadence


def test_cadence_follows_the_wire() -> None:
    default = Timeouts()
    old = negotiation022.cadence_timeouts(default, v022.WIRE)
    assert (old.announce_warmup, old.announce_interval) == ((), 5.333)
    assert negotiation022.announce_delays(old, 3) == [5.333, 5.333, 5.333]
    assert negotiation022.cadence_timeouts(default, v025.WIRE) is default
    assert negotiation022.announce_delays(default, 5) == [0.233, 0.533, 1.333, 60.0, 60.0]
    # a cadence the caller chose is kept
    custom = Timeouts(announce_interval=2.0)
    assert negotiation022.cadence_timeouts(custom, v022.WIRE).announce_interval == 2.0
    assert negotiation022.cadence_timeouts(custom, v022.WIRE).announce_warmup == ()


def pacer_schedule(timeouts: Timeouts, until: float) -> list[float]:
    """When the signaller's pacer (no peers, no backoff) announces, on a simulated clock."""
    now = [0.0]
    pacer = AnnouncePacer(
        warmup=timeouts.announce_warmup,
        interval=timeouts.announce_interval,
        stable_interval=timeouts.announce_interval_stable,
        clock=lambda: now[0],
    )
    sent = []
    while now[0] <= until:
        wait = pacer.due_in()
        if wait <= 0:
            sent.append(round(now[0], 3))
            pacer.sent()
        else:
            now[0] += wait
    return sent


def test_pacer_schedule_per_wire() -> None:
    old = negotiation022.cadence_timeouts(Timeouts(), v022.WIRE)
    assert pacer_schedule(old, 20) == [0.0, 5.333, 10.666, 15.999]
    assert pacer_schedule(Timeouts(), 130) == [0.0, 0.233, 0.766, 2.099, 62.099, 122.099]


class MemoryRelay(Relay):
    """A relay without a server: subscriptions are acknowledged at once, publishes recorded."""

    made: list[MemoryRelay] = []

    def __init__(self, url: str) -> None:
        super().__init__(url, backoff=Backoff(initial=0.01, cap=0.02))
        self.published: list[tuple[float, str, str]] = []
        self._gone = asyncio.Event()
        MemoryRelay.made.append(self)

    async def _open(self) -> None:
        self._gone.clear()

    def _request_subscribe(self, topics: list[str]) -> asyncio.Future[None]:
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack

    def _request_unsubscribe(self, topic: str) -> None:
        pass

    def _send(self, topic: str, text: str) -> bool:
        self.published.append((time.monotonic(), topic, text))
        return True

    async def _wait_disconnected(self) -> None:
        await self._gone.wait()

    def _abort_connection(self) -> None:
        self._gone.set()

    async def _disconnect(self) -> None:
        self._gone.set()


@pytest.fixture
def memory_relays() -> Iterator[list[MemoryRelay]]:
    memory = strategies.Strategy(
        name="memory",
        signallers=strategies.topic_signallers(MemoryRelay),
        default_relays=lambda _app_id, _wire: (),
    )
    strategies.register(memory)
    MemoryRelay.made = []
    try:
        yield MemoryRelay.made
    finally:
        strategies.unregister(memory.name)


async def test_signaller_announces_on_its_wires_schedule(memory_relays: list[MemoryRelay]) -> None:
    """The real announce loop of a 0.22 and a 0.25 room, side by side in one session."""
    session = Session()
    try:
        config = {"app_id": f"cadence-{uuid.uuid4().hex[:8]}", "strategy": "memory", "relay_urls": ["mem://"]}
        t0 = time.monotonic()
        old = session.join(RoomConfig(wire="0.22", **config), "old")
        new = session.join(RoomConfig(wire="0.25", **config), "new")
        assert old.signaller._timeouts.announce_interval == v022.PROFILE.announce_interval
        await asyncio.sleep(6.0)
        (relay,) = memory_relays  # one relay per URL, shared by both rooms
        announce = orjson.dumps({"peerId": session.self_id}).decode()

        def times(room: Any) -> list[float]:
            return [
                t - t0
                for t, topic, text in relay.published
                if topic == room.signaller.root_topic and text == announce
            ]

        old_times, new_times = times(old), times(new)
        assert len(old_times) == 2, old_times  # at once, then after 5.333 s: no warm-up
        assert old_times[0] < 0.5 and abs(old_times[1] - old_times[0] - 5.333) < 0.3
        assert len(new_times) == 4, new_times  # at once, +0.233, +0.533, +1.333, then 60 s
        gaps = [b - a for a, b in itertools.pairwise(new_times)]
        assert all(abs(g - w) < 0.2 for g, w in zip(gaps, (0.233, 0.533, 1.333), strict=True)), gaps
        assert old.stats["announces_out"] == 2 and new.stats["announces_out"] == 4
    finally:
        await session.close()


# --------------------------------------------------------------------------- who offers (0.22)


class FakePeer:
    """What the negotiator uses of signaling.peer.Peer, without a network."""

    def __init__(self, initiator: bool) -> None:
        self.initiator = initiator
        self.on_open: Any = None
        self.on_close: Any = None
        self.close_reason: str | None = None
        self.closed = False
        self.remote_offer: str | None = None

    async def create_offer(self) -> str:
        return "v=0\r\na=ice-options:trickle\r\na=offer\r\n"

    async def accept_offer(self, sdp: str) -> str:
        self.remote_offer = sdp
        return "v=0\r\na=answer\r\n"

    async def accept_answer(self, sdp: str) -> None:
        pass

    async def close(self, reason: str = "") -> None:
        self.closed = True
        self.close_reason = reason


class FakeLinks:
    def __init__(self) -> None:
        self.peers: list[FakePeer] = []

    def is_connected(self, peer_id: str) -> bool:
        return False

    def on_signal_from_connected(self, peer_id: str, room: Any) -> None:
        pass

    def can_accept(self) -> bool:
        return True

    def make_peer(self, initiator: bool, peer_id: str) -> FakePeer:
        self.peers.append(FakePeer(initiator))
        return self.peers[-1]

    def on_peer_open(self, peer_id: str, peer: Any, room: Any) -> None:
        pass


class FakeRoom:
    """A RoomSignaller as the negotiator sees it: key, counters, and what it signals."""

    def __init__(self, password: str = "") -> None:
        self.room_id = "r"
        self.key = crypto.derive_key(password, "app", "r")
        self.counters: Counter[str] = Counter()
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def signal(self, url: str, peer_id: str, payload: dict[str, Any]) -> None:
        self.sent.append((url, peer_id, payload))


def negotiator(self_id: str) -> tuple[negotiation022.Negotiator022, FakeLinks, FakeRoom]:
    links = FakeLinks()
    neg = negotiation022.Negotiator022(self_id=self_id, links=links, limits=Limits(), timeouts=Timeouts())
    return neg, links, FakeRoom()


def relay_signal(text: str, self_id: str) -> v022.RelaySignal:
    parsed = v022.parse_relay_payload(text, self_id)
    assert isinstance(parsed, v022.RelaySignal)
    return parsed


async def test_smaller_id_asks_for_an_offer() -> None:
    neg, links, room = negotiator("00" + "a" * 18)
    ann = relay_signal(v022.make_announce_payload("js" + "b" * 18), neg.self_id)
    neg.handle_022(room, "u1", ann, on_root=True)
    assert room.sent == [("u1", ann.peer_id, {"peerId": neg.self_id})]
    neg.handle_022(room, "u1", ann, on_root=True)  # within JS's pending-offer TTL: not again
    neg.handle_022(room, "u1", ann, on_root=False)  # someone asking us: never asked back
    assert len(room.sent) == 1 and links.peers == [] and neg.pending == {}
    await neg.close()


async def test_larger_id_offers_once_in_the_022_shape() -> None:
    neg, links, room = negotiator("zz" + "a" * 18)
    peer_id = "js" + "b" * 18
    ann = relay_signal(v022.make_announce_payload(peer_id), neg.self_id)
    neg.handle_022(room, "u1", ann, on_root=True)
    await eventually(lambda: bool(room.sent), "the offer")
    neg.handle_022(room, "u2", ann, on_root=True)  # heard again, on another relay: no second offer
    await asyncio.sleep(0.05)
    ((url, to, payload),) = room.sent
    assert (url, to, set(payload)) == ("u1", peer_id, {"peerId", "offer"})
    assert payload["offer"]["type"] == "offer"
    assert crypto.decrypt(room.key, payload["offer"]["sdp"]) == "v=0\r\na=offer\r\n"  # trickle line gone
    assert "offerId" not in payload and links.peers[0].initiator

    # glare: their offer while ours is pending; the larger id (ours) wins
    theirs = relay_signal(v022.make_offer_payload(peer_id, crypto.encrypt(room.key, "v=0")), neg.self_id)
    neg.handle_022(room, "u1", theirs, on_root=False)
    assert room.counters["glare_ignored"] == 1 and neg.pending[peer_id].role == "offerer"

    # their answer (object-shaped, no offer id) applies to our offer
    answer = relay_signal(v022.make_answer_payload(peer_id, crypto.encrypt(room.key, "v=0")), neg.self_id)
    neg.handle_022(room, "u1", answer, on_root=False)
    assert neg.pending[peer_id].answered
    await neg.close()


async def test_smaller_id_answers_one_offer_via_its_relay() -> None:
    neg, links, room = negotiator("00" + "a" * 18)
    peer_id = "zz" + "b" * 18
    offer = relay_signal(v022.make_offer_payload(peer_id, crypto.encrypt(room.key, "v=0")), neg.self_id)
    neg.handle_022(room, "u2", offer, on_root=False)
    await eventually(lambda: bool(room.sent), "the answer")
    ((url, to, payload),) = room.sent
    assert (url, to) == ("u2", peer_id)  # via the relay the offer came from
    assert payload["answer"]["type"] == "answer" and "offerId" not in payload
    assert crypto.decrypt(room.key, payload["answer"]["sdp"]) == "v=0\r\na=answer\r\n"
    neg.handle_022(room, "u1", offer, on_root=False)  # one offer per peer at a time
    await asyncio.sleep(0.05)
    assert len(room.sent) == 1 and len(links.peers) == 1
    await neg.close()


def sealed_offer(room: FakeRoom, peer_id: str, sdp: str, self_id: str) -> v022.RelaySignal:
    return relay_signal(v022.make_offer_payload(peer_id, crypto.encrypt(room.key, sdp)), self_id)


async def test_newer_offer_on_the_relay_replaces_the_one_being_answered() -> None:
    """Issue 11: JS 0.22 that handles two announcements from us at once sends two offers and
    applies any answer to the one it made last; the older negotiation is closed unanswered."""
    neg, links, room = negotiator("00" + "a" * 18)
    peer_id = "zz" + "b" * 18
    neg.handle_022(room, "u1", sealed_offer(room, peer_id, "v=0 first", neg.self_id), on_root=False)
    neg.handle_022(room, "u1", sealed_offer(room, peer_id, "v=0 second", neg.self_id), on_root=False)
    await eventually(lambda: bool(room.sent), "the answer")
    first, second = links.peers
    assert first.closed and first.close_reason == "superseded by a newer offer"
    assert second.remote_offer == "v=0 second" and not second.closed
    ((url, to, payload),) = room.sent  # one answer, to the newer offer, via its relay
    assert (url, to, payload["answer"]["type"]) == ("u1", peer_id, "answer")
    assert room.counters["offers_superseded"] == 1 and neg.pending[peer_id].peer is second
    await neg.close()


async def test_newer_offer_replaces_an_answer_that_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer to an offer is held back (NEWER_OFFER_WAIT) after aiortc made it: a newer
    offer arriving meanwhile still wins, and the held answer is never sent."""
    neg, links, room = negotiator("00" + "a" * 18)
    peer_id = "zz" + "b" * 18
    monkeypatch.setattr(negotiation022, "NEWER_OFFER_WAIT", 3600.0)
    neg.handle_022(room, "u1", sealed_offer(room, peer_id, "v=0 first", neg.self_id), on_root=False)
    await eventually(lambda: links.peers[0].remote_offer is not None, "the first answer made")
    assert room.sent == []  # made, not sent: a newer offer may still come
    monkeypatch.setattr(negotiation022, "NEWER_OFFER_WAIT", 0.0)
    neg.handle_022(room, "u1", sealed_offer(room, peer_id, "v=0 second", neg.self_id), on_root=False)
    await eventually(lambda: bool(room.sent), "the answer to the newer offer")
    first, second = links.peers
    assert first.closed and second.remote_offer == "v=0 second"
    assert len(room.sent) == 1 and room.counters["offers_superseded"] == 1
    await neg.close()


async def test_offer_after_our_answer_or_via_another_relay_is_ignored() -> None:
    """Once our answer is sent, JS has taken it (for its first offer, whose connection is coming
    up, or for its newest if they crossed, which then takes no other): the negotiation stays. An
    offer via another relay is JS's pending offer *there*; ours can connect as well."""
    neg, links, room = negotiator("00" + "a" * 18)
    peer_id = "zz" + "b" * 18
    neg.handle_022(room, "u1", sealed_offer(room, peer_id, "v=0 first", neg.self_id), on_root=False)
    neg.handle_022(room, "u2", sealed_offer(room, peer_id, "v=0 other relay", neg.self_id), on_root=False)
    await eventually(lambda: bool(room.sent), "the answer")
    neg.handle_022(room, "u1", sealed_offer(room, peer_id, "v=0 late", neg.self_id), on_root=False)
    (only,) = links.peers
    assert only.remote_offer == "v=0 first" and not only.closed
    assert [url for url, _, _ in room.sent] == ["u1"] and "offers_superseded" not in room.counters
    await neg.close()


async def test_tracker_offers_newest_per_tracker_answered_by_id() -> None:
    """Torrent (tracker-forwarded offers, with ids): JS answers only its latest announce's offer
    ids on each tracker, so a newer offer from the same tracker replaces ours; the answer names
    its offer id. An offer via another tracker leaves ours alone."""
    neg, links, room = negotiator("00" + "a" * 18)
    peer_id = "zz" + "b" * 18

    def forwarded(tracker: str, offer_id: str, sdp: str) -> None:
        neg.handle(room, tracker, Signal(peer_id, offer_id, offer=crypto.encrypt(room.key, sdp)))

    forwarded("t1", "o" * 20, "v=0 older announce")
    forwarded("t1", "n" * 20, "v=0 newer announce")
    forwarded("t2", "x" * 20, "v=0 other tracker")
    await eventually(lambda: bool(room.sent), "the answer")
    ((url, to, payload),) = room.sent
    assert (url, to, payload["offerId"]) == ("t1", peer_id, "n" * 20)
    first, second = links.peers
    assert first.closed and second.remote_offer == "v=0 newer announce"
    assert room.counters["offers_superseded"] == 1
    await neg.close()


async def test_wrong_password_is_a_decrypt_failure(caplog: pytest.LogCaptureFixture) -> None:
    neg, links, room = negotiator("00" + "a" * 18)
    peer_id = "zz" + "b" * 18
    other_key = crypto.derive_key("wrong", "app", "r")
    offer = relay_signal(v022.make_offer_payload(peer_id, crypto.encrypt(other_key, "v=0")), neg.self_id)
    for _ in range(3):
        neg.handle_022(room, "u1", offer, on_root=False)
    assert room.counters["dropped.decrypt_failed"] == 3 and links.peers == [] and room.sent == []
    assert sum("wrong room password" in r.getMessage() for r in caplog.records) == 1
    await neg.close()


# --------------------------------------------------------------------------- stranger screening


def watch(wire: str, dropped: list[str] | None = None) -> tuple[ForeignWireWatch, Counter[str]]:
    counters: Counter[str] = Counter()
    on = dropped.append if dropped is not None else None
    return ForeignWireWatch(
        wire=wire, room_id="lobby", counters=counters, on_stranger=on, capacity=4
    ), counters


def test_screen_025_signals_in_a_022_room(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="signaling.foreign_wire")
    found: list[str] = []
    w, counters = watch("0.22", found)
    offer = orjson.dumps({"peerId": "P25", "offerId": "o" * 12, "offer": "1,2$abc"}).decode()
    candidate = orjson.dumps({"peerId": "C25", "offerId": "o" * 12, "candidate": "1,2$abc"}).decode()
    announce = orjson.dumps({"peerId": "P25"}).decode()
    assert w.screen(offer, None, suspicious=True)
    assert w.screen(candidate, "C25", suspicious=True)  # 0.22 reads it as an announcement
    assert w.screen(announce, "P25", suspicious=False)  # a known stranger: everything dropped
    assert w.screen(offer, None, suspicious=True)
    assert not w.screen(announce.replace("P25", "other"), "other", suspicious=True)  # no version
    assert found == ["P25", "C25"] and counters == Counter(
        {"dropped.foreign_wire": 4, "foreign_wire_peers": 2}
    )
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "room lobby (Trystero wire 0.22): peer P25 seems to speak Trystero wire 0.25 (string-shaped offer "
        "with offerId); it cannot join this room: both sides must use the same wire",
        "room lobby (Trystero wire 0.22): peer C25 seems to speak Trystero wire 0.25 ('candidate' field); "
        "it cannot join this room: both sides must use the same wire",
    ]


def test_screen_022_signals_in_a_025_room(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="signaling.foreign_wire")
    w, counters = watch("0.25")
    offer = v022.make_offer_payload("P22", "1,2$abc")
    assert w.screen(offer, None, suspicious=True) and "P22" in w
    assert "seems to speak Trystero wire 0.22 (object-shaped offer)" in caplog.text
    # our own wire's shapes, non-JSON and nonsense are not strangers
    assert not w.screen(
        orjson.dumps({"peerId": "Q", "offer": "x", "offerId": "y"}).decode(), None, suspicious=True
    )
    assert not w.screen("not json", None, suspicious=True)
    assert not w.screen("[1,2]", None, suspicious=True)
    assert not w.screen(
        orjson.dumps({"offer": {"type": "offer", "sdp": "x"}}).decode(), None, suspicious=True
    )
    assert counters["foreign_wire_peers"] == 1


def test_screen_is_bounded_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="signaling.foreign_wire")
    w, counters = watch("0.25")
    for i in range(10):
        w.screen(v022.make_offer_payload(f"P{i}", "s"), None, suspicious=True)
    assert len(w) == 4  # capacity: the oldest strangers are forgotten
    w.screen(v022.make_offer_payload("P0", "s"), None, suspicious=True)  # found again, not re-logged
    assert counters["foreign_wire_peers"] == 11 and len(caplog.records) == 10


# --------------------------------------------------------------------------- two Python sessions


@pytest.fixture
def config(mosquitto: Mosquitto) -> Callable[..., RoomConfig]:
    return config_factory(f"wire022-{uuid.uuid4().hex[:10]}", [mosquitto.ws_url], wire="0.22")


async def test_two_022_sessions_meet_talk_and_leave(
    sessions: SessionFactory, config: Callable[..., RoomConfig]
) -> None:
    a, b = sessions("00"), sessions("zz")
    room_a, room_b = a.join(config(), "lobby"), b.join(config(), "lobby")
    await eventually(lambda: b.self_id in room_a.peers and a.self_id in room_b.peers, "the pair to join")
    link_a = a.links(room_a.app_id, "lobby")[b.self_id]
    assert not link_a.peer.initiator and b.links(room_b.app_id, "lobby")[a.self_id].peer.initiator
    assert a.links(room_a.app_id) == {}  # 0.22 rooms do not live in the app's shared context

    got: list[tuple[Any, str, Any]] = []
    room_b.make_action("chat").on_receive(lambda p, pid, m: got.append((p, pid, m)))
    chat = room_a.make_action("chat")
    await chat.send({"x": 1})
    await chat.send("text")
    await chat.send(b"\x01" * 40_000, metadata={"n": 1})
    with pytest.raises(ValueError, match="only with binary"):
        await chat.send({"x": 2}, metadata={"n": 2})
    with pytest.raises(ValueError):
        room_a.make_action("thirteen-char")  # 0.22 action names are at most 12 bytes
    await eventually(lambda: len(got) == 3, "three messages")
    assert got == [
        ({"x": 1}, a.self_id, None),
        ("text", a.self_id, None),
        (b"\x01" * 40_000, a.self_id, {"n": 1}),
    ]
    assert 0 < await room_a.ping(b.self_id) < 2000 and 0 < await room_b.ping(a.self_id) < 2000

    await room_a.leave()
    await eventually(lambda: room_b.peers == {}, "b to see a leave", 5)
    await eventually(lambda: link_a.closed, "a's connection to close", 5)
    assert a.apps == {} and b.links(room_b.app_id, "lobby") == {}
    assert room_b.stats["dropped"] == {} and room_b.stats["pending_peers"] == 0


async def test_a_room_per_wire_in_one_session(
    sessions: SessionFactory, config: Callable[..., RoomConfig]
) -> None:
    """Each wire's room meets only its own wire's peers; both at once, on one selfId."""
    helper, old_peer, new_peer = sessions(""), sessions(""), sessions("")
    old = helper.join(config(wire="0.22"), "old")
    new = helper.join(config(wire="0.25"), "new")
    old_peer.join(config(wire="0.22"), "old")
    new_peer.join(config(wire="0.25"), "new")
    await eventually(lambda: set(old.peers) == {old_peer.self_id}, "the 0.22 join")
    await eventually(lambda: set(new.peers) == {new_peer.self_id}, "the 0.25 join")
    with pytest.raises(ValueError, match="already joined"):
        helper.join(config(wire="0.25"), "old")
    with pytest.raises(ValueError, match="already joined"):
        helper.join(config(wire="0.22"), "new")
    assert helper.join(config(wire="0.22"), "old") is old
    assert len(helper.apps) == 2


@pytest.mark.parametrize(("wire", "foreign"), [("0.22", "0.25"), ("0.25", "0.22")])
async def test_strangers_injected_on_the_relay(
    wire: str,
    foreign: str,
    sessions: SessionFactory,
    config: Callable[..., RoomConfig],
    raw_relay: MqttRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Foreign-shaped signals from a made-up peer: logged once per room, the pair carries on."""
    caplog.set_level(logging.WARNING, logger="signaling.foreign_wire")
    a, b = sessions(""), sessions("")
    room_a, room_b = a.join(config(wire=wire), "mix"), b.join(config(wire=wire), "mix")
    await eventually(lambda: b.self_id in room_a.peers and a.self_id in room_b.peers, "the pair")
    key = room_a.signaller.key
    stranger = "stranger" + crypto.gen_id(12)
    if foreign == "0.25":
        text = orjson.dumps(
            {"peerId": stranger, "offerId": "o" * 12, "offer": crypto.encrypt(key, "v=0")}
        ).decode()
    else:
        text = v022.make_offer_payload(stranger, crypto.encrypt(key, "v=0"))
    for topic in (room_a.signaller.self_topic, room_a.signaller.root_topic) * 3:
        raw_relay.publish(topic, text)
    raw_relay.publish(room_a.signaller.root_topic, orjson.dumps({"peerId": stranger}).decode())
    await eventually(lambda: room_a.stats["dropped"].get("foreign_wire", 0) >= 7, "the stranger's drops")
    # once per room that heard it: a (root and self topic) and b (root topic only)
    await eventually(lambda: room_b.stats.get("foreign_wire_peers", 0) == 1, "b to notice it too")
    lines = [r.getMessage() for r in caplog.records if stranger in r.getMessage()]
    assert len(lines) == 2 and all(f"seems to speak Trystero wire {foreign}" in line for line in lines)
    assert room_a.stats["foreign_wire_peers"] == 1 and stranger not in room_a.peers
    assert room_a.stats["app"]["negotiations"] == 0
    assert 0 < await room_a.ping(b.self_id) < 2000


async def test_frames_after_leave_do_not_bring_the_peer_back(
    sessions: SessionFactory, config: Callable[..., RoomConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """JS 0.22 keeps answering pings for the 99 ms between its @_leave and closing, so a pong can
    arrive after the leave; the peer stays gone until its connection closes."""
    # Keep the left connection open long enough that a busy loop still delivers the late frames
    # on it (0.3 s by default; a stall that long would close it first and hide what is tested).
    monkeypatch.setattr(session_module, "PEER_LEAVE_GRACE", 2.0)
    a, b = sessions("00"), sessions("zz")
    room_a, room_b = a.join(config(), "late"), b.join(config(), "late")
    joins: list[str] = []
    leaves: list[str] = []
    room_a.on_peer_join(joins.append)
    room_a.on_peer_leave(leaves.append)
    chats: list[object] = []
    room_a.make_action("chat").on_receive(lambda payload, peer_id, metadata: chats.append(payload))
    await eventually(lambda: b.self_id in room_a.peers and a.self_id in room_b.peers, "the pair to join")
    link_b = b.links(room_b.app_id, "late")[a.self_id]
    link_a = a.links(room_a.app_id, "late")[b.self_id]
    for action in (v022.ACTION_LEAVE, v022.ACTION_PONG, "chat"):
        for frame in room_b.encoder.encode(action, ""):
            assert link_b.send_nowait(frame)
    # At least the pong and the chat; b may add a keepalive ping of its own (it has not heard from
    # a for 5 s when the join was slow), which is just as late and just as ignored.
    await eventually(lambda: room_a.stats["dropped"].get("after_leave", 0) >= 2, "the late frames")
    assert chats == []
    assert joins == leaves == [b.self_id] and room_a.peers == {}
    assert link_a.finished
    await eventually(lambda: link_a.closed, "the left connection to close", 10)
