"""NostrRelay: spec vectors, real local relays (PyPI nostr-relay and p2pdiff's own) and scripted
fake relays.

Happy paths, the reconnect and the rate limit run against each real relay of
tests.conftest.NOSTR_RELAYS (ids ``[pypi-relay]``, ``[p2pdiff-relay]``); invalid events need a
relay that forwards them, which only PyPI's does when told not to verify. What a real relay will
not do on demand (stay silent, close mid-subscription, answer CLOSED / OK false, send garbage or the same
event twice) is scripted with a small aiohttp WebSocket server in this file.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from signaling.bounded import LruSet
from signaling.crypto import ID_CHARSET, nostr_event_id, nostr_kind, root_topic, self_topic
from signaling.relays import RelayState
from signaling.relays.nostr import (
    InvalidEvent,
    NostrKeys,
    NostrRelay,
    _Escalation,
    event_message,
    event_topic,
    make_event,
    req_message,
    verify_signature,
)
from tests.conftest import NOSTR_RELAYS, NostrRelayService, event_rate_limit
from tests.services import NostrRelay as NostrRelayServer
from tests.services import running
from tests.support import service_or_fail, service_pool

from . import relay_helpers
from .relay_helpers import (
    FakeServer,
    Inbox,
    Ticker,
    close_before_start_and_while_retrying,
    heartbeat_finds_dead_server,
    relays_closed_after,
    sender_and_receiver,
    servers_stopped_after,
    until,
    wait_state,
)
from .wire_helpers import run_node

# §10 vectors (appId harness-app, roomId r1, peer AbCdEfGhIjKlMnOpQrSt).
ROOT = "575i5ptb234329582o5d374u6f1s95l92g63"
SELF = "4b5c5cg353n6y2d4g6f2g672t3h6l496f1c6b49"
SPEC_EVENT = {
    "kind": 22507,
    "tags": [["x", ROOT]],
    "created_at": 1700000000,
    "content": '{"peerId":"AbCdEfGhIjKlMnOpQrSt"}',
    "pubkey": "79265425389962a3d30b62ecbce6c4a047416081aeda71e058da2776f63661a8",
    "id": "2098357496247e5811d03278010807516f2c9d7833e0da45cef558486043097b",
    "sig": "2b307c3f67feda8cfc37e1337178404d35ed6d86771680e56e8fa6daaeffc075"
    "310a760f962dee5c6c18be073098467e1e3e698b93bc5296e577c6a458635843",
}


# ---------------------------------------------------------------------- an independent BIP-340 verifier
# Written from the reference code in BIP-340 (pure Python integers), so our signatures are
# checked by something that shares no code with libsecp256k1.

_P = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEFFFFFC2F
_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_G = (
    0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
    0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8,
)
_Point = tuple[int, int] | None


def _tagged_hash(tag: str, msg: bytes) -> bytes:
    tag_hash = hashlib.sha256(tag.encode()).digest()
    return hashlib.sha256(tag_hash + tag_hash + msg).digest()


def _point_add(p1: _Point, p2: _Point) -> _Point:
    if p1 is None:
        return p2
    if p2 is None:
        return p1
    if p1[0] == p2[0] and p1[1] != p2[1]:
        return None
    if p1 == p2:
        lam = (3 * p1[0] * p1[0] * pow(2 * p1[1], _P - 2, _P)) % _P
    else:
        lam = ((p2[1] - p1[1]) * pow(p2[0] - p1[0], _P - 2, _P)) % _P
    x3 = (lam * lam - p1[0] - p2[0]) % _P
    return (x3, (lam * (p1[0] - x3) - p1[1]) % _P)


def _point_mul(point: _Point, k: int) -> _Point:
    result: _Point = None
    for i in range(256):
        if (k >> i) & 1:
            result = _point_add(result, point)
        point = _point_add(point, point)
    return result


def _lift_x(x: int) -> _Point:
    if x >= _P:
        return None
    y_sq = (pow(x, 3, _P) + 7) % _P
    y = pow(y_sq, (_P + 1) // 4, _P)
    if pow(y, 2, _P) != y_sq:
        return None
    return (x, y if y & 1 == 0 else _P - y)


def bip340_verify(msg: bytes, pubkey: bytes, sig: bytes) -> bool:
    point = _lift_x(int.from_bytes(pubkey, "big"))
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    if point is None or r >= _P or s >= _N:
        return False
    e = int.from_bytes(_tagged_hash("BIP0340/challenge", sig[:32] + pubkey + msg), "big") % _N
    big_r = _point_add(_point_mul(_G, s), _point_mul(point, _N - e))
    return big_r is not None and big_r[1] % 2 == 0 and big_r[0] == r


def independently_valid(event: dict[str, Any]) -> bool:
    serial = json.dumps(
        [0, event["pubkey"], event["created_at"], event["kind"], event["tags"], event["content"]],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    if hashlib.sha256(serial).hexdigest() != event["id"]:
        return False
    return bip340_verify(
        bytes.fromhex(event["id"]), bytes.fromhex(event["pubkey"]), bytes.fromhex(event["sig"])
    )


# ---------------------------------------------------------------------- helpers


def topic(n: int) -> str:
    return root_topic("p2pdiff-test", f"room-{n}")


RelayFactory = Callable[..., NostrRelay]


@pytest.fixture
async def make_relay() -> AsyncIterator[RelayFactory]:
    async with relays_closed_after(NostrRelay) as make:
        yield make


ServerFactory = Callable[..., NostrRelayService]


@pytest.fixture
def server_factory(tmp_path: Path, nostr_relay_name: str) -> Iterator[ServerFactory]:
    """``server_factory(**kwargs)``: a started relay of the test's kind, for tests that restart or
    configure it (the others share the module's ``nostr_relay``)."""
    with service_pool(NOSTR_RELAYS[nostr_relay_name], tmp_path, nostr_relay_name) as make:
        yield make


@pytest.fixture
def lax_server(tmp_path: Path) -> Iterator[NostrRelayServer]:
    """A PyPI relay that forwards whatever it gets, as a careless public relay might (it verifies
    neither ids nor signatures; ours always does)."""
    with running(service_or_fail(NostrRelayServer, tmp_path / "nostr-lax", verify=False)) as server:
        yield server


async def raw_publish(url: str, *events: dict[str, Any]) -> list[list[Any]]:
    """Publish events as they are (valid or not) with a plain WebSocket; returns the OKs."""
    answers = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        for event in events:
            await ws.send_str(json.dumps(["EVENT", event]))
            async with asyncio.timeout(10):
                answers.append(json.loads(await ws.receive_str()))
    return answers


# ---------------------------------------------------------------------- a scripted relay

Hook = Callable[["FakeConn", list[Any]], Awaitable[None]]


class FakeConn(relay_helpers.FakeConn):
    def of(self, kind: str) -> list[list[Any]]:
        return [f for f in self.frames if f and f[0] == kind]


async def answer_eose(conn: FakeConn, frame: list[Any]) -> None:
    await conn.send(["EOSE", frame[1]])


async def answer_ok(conn: FakeConn, frame: list[Any]) -> None:
    await conn.send(["OK", frame[1]["id"], True, ""])


class FakeRelay(FakeServer[FakeConn]):
    """A NIP-01 server on 127.0.0.1 whose answers are scripted per test; records every frame."""

    conn_class = FakeConn

    def __init__(
        self,
        *,
        read: bool = True,
        on_req: Hook | None = answer_eose,
        on_event: Hook | None = answer_ok,
        on_close: Hook | None = None,
    ) -> None:
        super().__init__(read=read)
        self.on_req = on_req
        self.on_event = on_event
        self.on_close = on_close

    def of(self, kind: str) -> list[list[Any]]:
        return [f for f in self.frames if f and f[0] == kind]

    async def on_frame(self, conn: FakeConn, frame: list[Any]) -> None:
        hook = {"REQ": self.on_req, "EVENT": self.on_event, "CLOSE": self.on_close}.get(frame[0])
        if hook is not None:
            await hook(conn, frame)


@pytest.fixture
async def fake_relay() -> AsyncIterator[Callable[..., Awaitable[FakeRelay]]]:
    async with servers_stopped_after(FakeRelay) as make:
        yield make


def signed(keys: NostrKeys, topic_: str, content: str, **changes: Any) -> dict[str, Any]:
    event = make_event(keys, topic_, content, int(time.time()))
    event.update(changes)
    return event


# ---------------------------------------------------------------------- vectors (no network)


def test_spec_event_vector() -> None:
    assert root_topic("harness-app", "r1") == ROOT
    assert self_topic("harness-app", "r1", "AbCdEfGhIjKlMnOpQrSt") == SELF
    assert nostr_kind(ROOT) == 22507 and nostr_kind(SELF) == 22877
    ev = SPEC_EVENT
    assert nostr_event_id(ev["pubkey"], ev["created_at"], ev["kind"], ev["tags"], ev["content"]) == ev["id"]
    assert event_topic(dict(ev)) == ROOT
    assert verify_signature(dict(ev))
    assert independently_valid(ev)  # the JS signature, checked by the pure-Python BIP-340 code
    tampered = dict(ev, sig=ev["sig"][:-2] + ("00" if ev["sig"][-2:] != "00" else "01"))
    assert not verify_signature(tampered) and not independently_valid(tampered)


def test_our_events_match_trystero_and_verify_independently() -> None:
    keys = NostrKeys()
    content = '{"peerId":"Zz","offer":"1,2$é🚀\\n"}'  # non-ASCII and an escape
    event = make_event(keys, SELF, content, 1700000123)
    assert list(event) == ["kind", "tags", "created_at", "content", "pubkey", "id", "sig"]
    assert event["kind"] == 22877 and event["tags"] == [["x", SELF]] and event["pubkey"] == keys.pubkey
    assert independently_valid(event)
    assert event_topic(event) == SELF and verify_signature(event)
    # Compact JSON with raw UTF-8, exactly JSON.stringify's output.
    expected = json.dumps(["EVENT", event], separators=(",", ":"), ensure_ascii=False)
    assert event_message(event) == expected
    assert '"content":"{\\"peerId\\":\\"Zz\\",\\"offer\\":\\"1,2$é🚀\\\\n\\"}"' in expected
    # Fresh aux randomness: two signatures of the same id differ, both valid.
    again = make_event(keys, SELF, content, 1700000123)
    assert again["id"] == event["id"] and again["sig"] != event["sig"] and verify_signature(again)
    assert len(keys.pubkey) == 64 and "NostrKeys" in repr(keys) and keys.pubkey not in repr(keys)


def test_our_events_verify_with_noble_in_node() -> None:
    events = [
        make_event(NostrKeys(), t, c, 1700000000 + i)
        for i, (t, c) in enumerate(
            [(ROOT, '{"peerId":"x"}'), (SELF, "héllo \u2028 ✓ 🚀"), (topic(1), '\x00\x1f"\\')]
        )
    ]
    script = """
        import { schnorr } from "@noble/secp256k1";
        import { createHash } from "node:crypto";
        import { readFileSync } from "node:fs";
        const hex = (s) => Uint8Array.from(Buffer.from(s, "hex"));
        for (const ev of JSON.parse(readFileSync(0, "utf8"))) {
          const serial = JSON.stringify([0, ev.pubkey, ev.created_at, ev.kind, ev.tags, ev.content]);
          const id = createHash("sha256").update(serial).digest("hex");
          const ok = id === ev.id && await schnorr.verifyAsync(hex(ev.sig), hex(ev.id), hex(ev.pubkey));
          console.log(ok ? "ok" : "bad");
        }
    """
    assert run_node(script, json.dumps(events, ensure_ascii=False)).split() == ["ok"] * 3


def test_req_message_shape() -> None:
    topics = [ROOT, SELF, "ab", "ba"]  # "ab" and "ba" share a kind: kinds are unique, in first-seen order
    text = req_message("S" * 64, topics, 1699999940)
    kinds = [22507, 22877, nostr_kind("ab")]
    assert text == json.dumps(
        ["REQ", "S" * 64, {"kinds": kinds, "since": 1699999940, "#x": topics}], separators=(",", ":")
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"kind": "22507"}, "malformed"),
        ({"kind": True}, "malformed"),
        ({"created_at": -1}, "malformed"),
        ({"content": None}, "malformed"),
        ({"tags": [["x", 5]]}, "malformed"),
        ({"pubkey": "AB" * 32}, "malformed"),  # NIP-01 hex is lower-case
        ({"sig": "00"}, "malformed"),
        ({"tags": [["e", ROOT]]}, "no_topic"),
        ({"tags": [["x", SELF]]}, "wrong_kind"),  # kind 22507 belongs to ROOT
        ({"content": "changed"}, "bad_id"),
        ({"created_at": 1700000001}, "bad_id"),
    ],
)
def test_event_topic_rejects(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        event_topic({**SPEC_EVENT, **change})
    assert info.value.reason == reason
    with pytest.raises(InvalidEvent):
        event_topic(["not", "an", "object"])


def test_first_x_tag_is_the_topic() -> None:
    keys = NostrKeys()
    event = make_event(keys, ROOT, "c", 1)
    tags = [["p", "z"], ["x", ROOT], ["x", SELF]]
    event.update(tags=tags, id=nostr_event_id(keys.pubkey, 1, event["kind"], tags, "c"))
    event["sig"] = keys.sign(event["id"])
    assert event_topic(event) == ROOT and verify_signature(event)
    event["pubkey"] = "f" * 64  # not an x coordinate on the curve
    assert not verify_signature(event)


def test_escalation_doubles_caps_and_resets() -> None:
    now = [1000.0]
    esc = _Escalation(60, 900, clock=lambda: now[0])
    assert esc.remaining() == 0 and esc.enter() == 60 and esc.remaining() == 60
    now[0] += 30
    assert esc.enter() is None and esc.remaining() == 30  # in flight: no escalation
    pauses = []
    for _ in range(6):
        now[0] += 1000 if not pauses else esc.remaining() + 1
        pauses.append(esc.enter())
    assert pauses[0] == 60  # more than `cap` quiet seconds after the first window: start over
    assert pauses[1:] == [120, 240, 480, 900, 900]
    esc.reset()
    assert esc.remaining() == 0 and esc.enter() == 60


async def test_rejects_bad_urls_and_topics() -> None:
    for url in ("http://relay", "nostr://relay", "wss://", "ws://h:99999"):
        with pytest.raises(ValueError):
            NostrRelay(url)
    relay = NostrRelay("ws://127.0.0.1:1", max_topics=2)
    for bad in ("", "x" * 257):
        with pytest.raises(ValueError):
            relay.publish(bad, "x")
    relay.subscribe("a")
    relay.subscribe("b")
    relay.subscribe("a")  # already there: fine
    with pytest.raises(ValueError):
        relay.subscribe("c")
    assert relay.topics == ("a", "b") and relay.queued == 0


# ---------------------------------------------------------------------- with a real relay


async def test_round_trip(nostr_relay: NostrRelayService, make_relay: RelayFactory) -> None:
    a, b = make_relay(nostr_relay.url), make_relay(nostr_relay.url)
    inbox_a, inbox_b = Inbox(), Inbox()
    a.on_message, b.on_message = inbox_a, inbox_b
    acks = [a.subscribe(SELF), b.subscribe(ROOT), b.subscribe(topic(1))]
    await a.start()
    await b.start()
    await asyncio.gather(a.wait_connected(), b.wait_connected(), *acks)

    a.publish(ROOT, '{"peerId":"AbCdEfGhIjKlMnOpQrSt"}')
    a.publish(topic(1), "héllo ✓ — 🚀")
    b.publish(SELF, '{"peerId":"Zz","offer":"' + "o" * 20_000 + '"}')  # an SDP-sized event
    assert sorted(await inbox_b.wait_for(2)) == sorted(['{"peerId":"AbCdEfGhIjKlMnOpQrSt"}', "héllo ✓ — 🚀"])
    assert dict(inbox_b.items)[topic(1)] == "héllo ✓ — 🚀"
    assert (await inbox_a.wait_for(1))[0].endswith('o"}')
    await until(lambda: a.counters.get("accepted") == 2 and b.counters.get("accepted") == 1)
    assert b.counters["delivered"] == 2 and not any(k.startswith("dropped") for k in b.counters)
    assert a.pubkey == b.pubkey  # one key pair per process, as Trystero has one per realm


async def test_many_topics_and_kinds_in_one_req(
    nostr_relay: NostrRelayService, make_relay: RelayFactory
) -> None:
    sender, receiver = make_relay(nostr_relay.url), make_relay(nostr_relay.url)
    inbox = Inbox()
    receiver.on_message = inbox
    topics = [topic(100 + i) for i in range(6)]
    assert len({nostr_kind(t) for t in topics}) > 1
    acks = [receiver.subscribe(t) for t in topics]
    await sender.start()
    await receiver.start()
    await asyncio.gather(sender.wait_connected(), receiver.wait_connected(), *acks)
    assert len(receiver.sub_ids) == 1 and receiver.counters["req"] == 1  # one batched REQ

    for t in topics:
        sender.publish(t, f"to {t}")
    sender.publish(topic(999), "nobody listens here")
    await inbox.wait_for(len(topics))
    assert sorted(inbox.items) == sorted((t, f"to {t}") for t in topics)

    # Changing the topic set re-sends the REQ under the same id; the dropped topic goes quiet.
    receiver.unsubscribe(topics[0])
    await asyncio.wait_for(receiver.subscribe(topic(200)), 5)
    assert len(receiver.sub_ids) == 1 and receiver.counters["req"] >= 2
    sender.publish(topics[0], "after unsubscribe")
    sender.publish(topic(200), "new topic")
    await inbox.wait_for(len(topics) + 1)
    await asyncio.sleep(0.2)
    assert inbox.items[-1] == (topic(200), "new topic") and len(inbox.items) == len(topics) + 1


async def test_invalid_events_are_dropped_and_counted(
    lax_server: NostrRelayServer, make_relay: RelayFactory
) -> None:
    relay = make_relay(lax_server.url)
    inbox = Inbox()
    relay.on_message = inbox
    acks = [relay.subscribe(ROOT), relay.subscribe(SELF)]
    await relay.start()
    await asyncio.gather(relay.wait_connected(), *acks)

    mallory = NostrKeys()
    other = signed(mallory, ROOT, "something else")
    bad_sig = signed(mallory, ROOT, "forged", sig=other["sig"])  # right shape, wrong signature
    bad_id = signed(mallory, ROOT, "original")
    bad_id["content"] = "swapped after signing"
    # Signed correctly but with the kind of the other topic: passes the relay's kinds/#x filter.
    wrong_kind = {
        "kind": nostr_kind(SELF),
        "tags": [["x", ROOT]],
        "created_at": int(time.time()),
        "content": "wrong kind",
        "pubkey": mallory.pubkey,
    }
    wrong_kind["id"] = nostr_event_id(
        mallory.pubkey, wrong_kind["created_at"], wrong_kind["kind"], wrong_kind["tags"], "wrong kind"
    )
    wrong_kind["sig"] = mallory.sign(wrong_kind["id"])
    good = signed(mallory, SELF, "genuine")
    answers = await raw_publish(lax_server.url, bad_sig, bad_id, wrong_kind, good)
    assert all(answer[2] is True for answer in answers), answers  # the relay took them all

    assert await inbox.wait_for(1) == ["genuine"]
    await until(lambda: relay.counters.get("received", 0) >= 4)
    counters = relay.counters
    assert counters["dropped:bad_sig"] == 1 and counters["dropped:bad_id"] == 1
    assert counters["dropped:wrong_kind"] == 1 and counters["delivered"] == 1
    assert bad_sig["id"] not in relay.seen  # a forged copy must not block the genuine event later
    assert relay.state == "connected"


@pytest.mark.slow
async def test_relay_restart_reconnects_and_resubscribes(
    server_factory: ServerFactory, make_relay: RelayFactory
) -> None:
    server = server_factory()
    a, b = make_relay(server.url), make_relay(server.url)
    states: list[RelayState] = []
    b.on_state = states.append
    inbox_a, inbox_b = Inbox(), Inbox()
    a.on_message, b.on_message = inbox_a, inbox_b
    a.subscribe(SELF)
    b.subscribe(ROOT)
    b.subscribe(topic(1))
    await a.start()
    await b.start()
    await asyncio.gather(a.wait_connected(), b.wait_connected())
    a.publish(ROOT, "before")
    await inbox_b.wait_for(1)
    sub_ids = b.sub_ids

    server.kill()
    await asyncio.gather(wait_state(a, "reconnecting"), wait_state(b, "reconnecting"))
    a.publish(topic(1), "while down")  # queued; signed when it finally goes out
    await asyncio.sleep(0.3)
    assert a.queued == 1

    server.start()  # same port, empty relay
    await asyncio.wait_for(asyncio.gather(a.wait_connected(), b.wait_connected()), 10)
    assert await inbox_b.wait_for(2) == ["before", "while down"]
    a.publish(ROOT, "after")
    b.publish(SELF, "reply")
    assert (await inbox_b.wait_for(3))[-1] == "after"
    assert await inbox_a.wait_for(1) == ["reply"]
    assert b.sub_ids == sub_ids  # the same subscription id, re-sent
    assert states == ["connecting", "connected", "reconnecting", "connected"]


async def test_real_relay_rate_limit_pauses_announces(
    server_factory: ServerFactory, nostr_relay_name: str, make_relay: RelayFactory
) -> None:
    server = server_factory(**event_rate_limit(nostr_relay_name, 2, seconds=60))
    relay = make_relay(server.url, rate_limit_backoff=(30.0, 120.0))
    relay.subscribe(ROOT)  # publishing to a subscribed topic = announcing
    await relay.start()
    await relay.wait_connected()
    for i in range(3):
        relay.publish(ROOT, f"announce {i}")
    await until(lambda: relay.counters.get("rejected:rate-limited") == 1, timeout=10)
    assert 25 < relay.announce_backoff <= 30
    relay.publish(ROOT, "announce 3")  # paused: not sent
    relay.publish(SELF, "a signal")  # signals still go out (and this relay refuses it too)
    await until(lambda: relay.counters.get("rejected:rate-limited") == 2, timeout=10)
    assert relay.counters["announce_suppressed"] == 1 and relay.counters["published"] == 4
    assert 25 < relay.announce_backoff <= 30  # a rejection inside the pause does not stretch it
    assert relay.state == "connected"


async def test_flood_is_delivered_and_the_loop_stays_responsive(
    nostr_relay: NostrRelayService, make_relay: RelayFactory
) -> None:
    receiver = make_relay(nostr_relay.url)
    inbox = Inbox()
    receiver.on_message = inbox
    receiver.subscribe(topic(300))
    await receiver.start()
    await receiver.wait_connected()
    keys = NostrKeys()
    events = [signed(keys, topic(300), f"m{i}") for i in range(300)]
    with Ticker() as ticker:  # 300 events, each parsed, hashed and signature-checked
        async with aiohttp.ClientSession() as session, session.ws_connect(nostr_relay.url) as ws:
            for event in events:
                await ws.send_str(json.dumps(["EVENT", event]))
            await inbox.wait_for(300, limit=30)
    assert sorted(inbox.texts) == sorted(f"m{i}" for i in range(300))
    assert ticker.max_gap < 0.5, ticker.max_gap


# ---------------------------------------------------------------------- with a scripted relay


async def test_wire_frames_match_trystero(
    fake_relay: Callable[..., Awaitable[FakeRelay]], make_relay: RelayFactory
) -> None:
    server = await fake_relay()
    now = 1_700_000_000.0
    relay = make_relay(server.url, clock=lambda: now)
    topics = [topic(i) for i in range(260)]  # > 250: two REQs
    for t in topics:
        relay.subscribe(t)
    await relay.start()
    await relay.wait_connected()
    conn = server.connections[0]
    reqs = conn.of("REQ")
    assert len(reqs) == 2 and len(relay.sub_ids) == 2
    for sub_id in relay.sub_ids:
        assert len(sub_id) == 64 and set(sub_id) <= set(ID_CHARSET)
    assert [r[1] for r in reqs] == list(relay.sub_ids)
    assert reqs[0][2]["#x"] == topics[:250] and reqs[1][2]["#x"] == topics[250:]
    assert reqs[0][2]["since"] == 1_700_000_000 - 60
    assert reqs[0][2]["kinds"] == list(dict.fromkeys(nostr_kind(t) for t in topics[:250]))
    assert conn.raw[0] == req_message(relay.sub_ids[0], topics[:250], 1_700_000_000 - 60)

    relay.publish(topic(0), '{"peerId":"é"}')
    await server.wait(lambda: bool(conn.of("EVENT")))
    raw = next(r for r in conn.raw if r.startswith('["EVENT"'))
    event = conn.of("EVENT")[0][1]
    assert raw == json.dumps(["EVENT", event], separators=(",", ":"), ensure_ascii=False)
    assert list(event) == ["kind", "tags", "created_at", "content", "pubkey", "id", "sig"]
    assert event["created_at"] == 1_700_000_000 and independently_valid(event)

    # Dropping below 250 topics closes the second subscription; dropping all closes the first.
    for t in topics[200:]:
        relay.unsubscribe(t)
    await server.wait(lambda: len(conn.of("CLOSE")) == 1 and len(conn.of("REQ")) == 3)
    assert conn.of("CLOSE")[0][1] == reqs[1][1] and conn.of("REQ")[2][2]["#x"] == topics[:200]
    for t in topics[:200]:
        relay.unsubscribe(t)
    await server.wait(lambda: len(conn.of("CLOSE")) == 2)
    assert conn.of("CLOSE")[1][1] == reqs[0][1] and relay.sub_ids == ()
    assert len(conn.of("REQ")) == 3  # one coalesced REQ per burst, none for the empty set


async def test_scripted_bad_input_is_counted_and_survived(
    fake_relay: Callable[..., Awaitable[FakeRelay]],
    make_relay: RelayFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await fake_relay()
    shared = LruSet[str](16)
    a, b = make_relay(server.url, seen=shared), make_relay(server.url, seen=shared)
    inbox_a, inbox_b = Inbox(), Inbox()
    a.on_message, b.on_message = inbox_a, inbox_b
    for relay in (a, b):
        relay.subscribe(ROOT)
        await relay.start()
        await relay.wait_connected()
    conn_a, conn_b = server.connections
    sid = a.sub_ids[0]
    keys = NostrKeys()
    good = signed(keys, ROOT, "once")
    for junk in (
        "not json",
        "{}",
        "[]",
        '["EVENT"]',
        ["EVENT", "x" * 64, good],  # not our subscription id
        ["EVENT", sid, "not an event"],
        ["EVENT", sid, signed(keys, SELF, "not subscribed here")],
        ["EVENT", sid, dict(good, tags=[])],
        ["OK"],
        ["OK", ["unhashable"], True, ""],
        ["EOSE", {"unhashable": 1}],
        ["NOTICE", "hello from the relay"],
        ["AUTH", "challenge"],
        ["WHATEVER"],
        ["CLOSED", "x" * 64, "not ours"],
        ["EOSE", "x" * 64],
        ["EVENT", sid, good],
        ["EVENT", sid, good],  # the same event again
    ):
        await conn_a.send(junk)
    await conn_a.ws.send_bytes(b"\x00binary")
    await inbox_a.wait_for(1)
    await conn_b.send(["EVENT", b.sub_ids[0], good])  # and once more via the other relay
    await until(lambda: b.counters.get("dropped:duplicate") == 1)
    await asyncio.sleep(0.05)
    assert inbox_a.texts == ["once"] and inbox_b.texts == []  # the shared LRU let one copy through
    c = a.counters
    assert c["dropped:malformed"] == 7  # not JSON, {}, [], 2 bad OKs, a string event, binary
    assert c["dropped:unknown_sub"] == 2 and c["dropped:unsubscribed"] == 1 and c["dropped:no_topic"] == 1
    assert c["dropped:duplicate"] == 1 and c["notice"] == 1 and c["auth_challenge"] == 1
    assert c["unknown_message"] == 1 and c["delivered"] == 1
    assert a.state == "connected" and b.state == "connected"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no handler blew up


async def test_silent_tcp_listener_times_out_without_blocking(make_relay: RelayFactory) -> None:
    with socket.socket() as sock:  # the kernel completes the handshake, nobody ever answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        relay = make_relay(f"ws://127.0.0.1:{sock.getsockname()[1]}/", connect_timeout=0.8)
        with Ticker() as ticker:
            await relay.start()
            await asyncio.sleep(1.8)
        assert relay.state == "connecting" and relay.connect_attempts >= 2
        # A blocking connect would stall the loop for the whole 0.8 s timeout of each attempt.
        assert ticker.ticks >= 40 and ticker.max_gap < 0.5, (ticker.ticks, ticker.max_gap)


async def test_relay_that_never_answers(
    fake_relay: Callable[..., Awaitable[FakeRelay]],
    make_relay: RelayFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The WebSocket upgrade succeeds, then nothing: no EOSE (so never "connected") and no pong.
    server = await fake_relay(read=False)
    relay = make_relay(server.url, connect_timeout=0.8)
    relay.subscribe(ROOT)
    with caplog.at_level(logging.INFO, logger="signaling.relays"), Ticker() as ticker:
        await relay.start()
        await asyncio.sleep(1.8)
    assert relay.state == "connecting" and len(server.connections) >= 2
    assert any("TimeoutError" in r.getMessage() for r in caplog.records)
    assert ticker.max_gap < 0.5

    # Without topics there is nothing to acknowledge: the heartbeat finds the dead relay.
    await heartbeat_finds_dead_server(make_relay, server.url)


async def test_relay_that_stops_answering_eose_is_dropped(
    fake_relay: Callable[..., Awaitable[FakeRelay]], make_relay: RelayFactory
) -> None:
    answered: list[int] = []

    async def eose_once_per_connection(conn: FakeConn, frame: list[Any]) -> None:
        if conn.index not in answered:
            answered.append(conn.index)
            await conn.send(["EOSE", frame[1]])

    server = await fake_relay(on_req=eose_once_per_connection)
    relay = make_relay(server.url, connect_timeout=0.5)
    relay.subscribe(ROOT)
    await relay.start()
    await relay.wait_connected()
    late = relay.subscribe(SELF)  # this REQ is never answered
    done, _ = await asyncio.wait([late], timeout=0.2)
    assert not done
    await wait_state(relay, "reconnecting", timeout=3)
    assert relay.counters["eose_timeout"] == 1
    await asyncio.wait_for(relay.wait_connected(), 3)  # next connection: EOSE again
    await asyncio.wait_for(late, 1)  # the waiter is resolved by the resubscription
    assert server.connections[-1].of("REQ")[0][2]["#x"] == [ROOT, SELF]


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_relay_closes_mid_subscription(
    fake_relay: Callable[..., Awaitable[FakeRelay]], make_relay: RelayFactory, how: str
) -> None:
    server = await fake_relay()
    relay = make_relay(server.url)
    inbox = Inbox()
    relay.on_message = inbox
    relay.subscribe(ROOT)
    await relay.start()
    await relay.wait_connected()
    first = server.connections[0]
    if how == "close":
        await first.ws.close()
    else:
        first.abort()
    await wait_state(relay, "reconnecting")
    await asyncio.wait_for(relay.wait_connected(), 5)
    second = server.connections[-1]
    assert second is not first and second.of("REQ")[0][1] == first.of("REQ")[0][1]
    await second.send(["EVENT", relay.sub_ids[0], signed(NostrKeys(), ROOT, "still here")])
    assert await inbox.wait_for(1) == ["still here"]


async def test_closed_subscription_reconnects_after_a_growing_penalty(
    fake_relay: Callable[..., Awaitable[FakeRelay]], make_relay: RelayFactory
) -> None:
    async def refuse(conn: FakeConn, frame: list[Any]) -> None:
        await conn.send(["EOSE", frame[1]])
        await conn.send(["CLOSED", frame[1], "error: shutting down idle subscriptions"])

    server = await fake_relay(on_req=refuse)
    relay = make_relay(server.url, penalty_backoff=(0.4, 1.0))
    relay.subscribe(ROOT)
    await relay.start()
    await server.wait(lambda: len(server.connections) >= 3, timeout=5)
    await until(lambda: relay.counters.get("penalty") == 3)
    assert relay.counters["closed"] == 3 and 0 < relay.penalty_remaining <= 1.0
    # Pauses of 0.4 s, then 0.8 s (then the 1.0 s cap). JS would have dropped the relay for good.
    first, second, third = (conn.at for conn in server.connections[:3])
    assert second - first >= 0.38 and third - second >= 0.78, (second - first, third - second)


async def test_rate_limited_pauses_announces_not_signals(
    fake_relay: Callable[..., Awaitable[FakeRelay]], make_relay: RelayFactory
) -> None:
    accept = False

    async def maybe_accept(conn: FakeConn, frame: list[Any]) -> None:
        if accept:
            await conn.send(["OK", frame[1]["id"], True, ""])
        else:
            await conn.send(["OK", frame[1]["id"], False, "rate-limited: slow down"])

    server = await fake_relay(on_event=maybe_accept)
    relay = make_relay(server.url, rate_limit_backoff=(0.5, 2.0))
    relay.subscribe(ROOT)
    await relay.start()
    await relay.wait_connected()

    def sent(topic_: str) -> int:
        return sum(1 for f in server.of("EVENT") if f[1]["tags"][0][1] == topic_)

    relay.publish(ROOT, "announce 1")
    await until(lambda: relay.announce_backoff > 0)
    assert relay.announce_backoff <= 0.5
    relay.publish(ROOT, "announce 2")  # suppressed
    relay.publish(SELF, "signal")  # not an announce: sent
    await server.wait(lambda: sent(SELF) == 1)
    assert sent(ROOT) == 1 and relay.counters["announce_suppressed"] == 1

    await asyncio.sleep(relay.announce_backoff + 0.05)  # over: the next announce goes out, refused again
    relay.publish(ROOT, "announce 3")
    await until(lambda: relay.counters.get("rejected:rate-limited") == 3)
    assert sent(ROOT) == 2 and 0.5 < relay.announce_backoff <= 1.0  # doubled

    accept = True
    relay.publish(SELF, "accepted signal")
    await until(lambda: relay.counters.get("accepted") == 1)
    assert relay.announce_backoff > 0  # only an accepted announce ends the episode (as in JS)
    await asyncio.sleep(relay.announce_backoff + 0.05)
    relay.publish(ROOT, "announce 4")
    await until(lambda: relay.counters.get("accepted") == 2)
    accept = False
    relay.publish(ROOT, "announce 5")  # refused again: a new episode, from 0.5 s rather than 2 s
    await until(lambda: relay.counters.get("rejected:rate-limited") == 4)
    assert 0 < relay.announce_backoff <= 0.5
    assert sent(ROOT) == 4 and relay.counters["announce_suppressed"] == 1
    assert relay.state == "connected" and len(server.connections) == 1


@pytest.mark.parametrize(
    ("reason", "penalized"),
    [
        ("blocked: not on the allow list", True),
        ("auth-required: sign in", True),
        ("invalid: event too large", False),
        ("error: database busy", False),
        ("nope", False),
    ],
)
async def test_ok_false_policy_vs_event_rejections(
    fake_relay: Callable[..., Awaitable[FakeRelay]], make_relay: RelayFactory, reason: str, penalized: bool
) -> None:
    async def refuse(conn: FakeConn, frame: list[Any]) -> None:
        await conn.send(["OK", frame[1]["id"], False, reason])

    server = await fake_relay(on_event=refuse)
    relay = make_relay(server.url, penalty_backoff=(5.0, 10.0))
    await relay.start()
    await relay.wait_connected()
    relay.publish(SELF, "signal")
    prefix = reason.partition(":")[0] if ":" in reason else "other"
    await until(lambda: relay.counters.get(f"rejected:{prefix}") == 1)
    if penalized:
        await wait_state(relay, "reconnecting")
        assert 4 < relay.penalty_remaining <= 5
        await asyncio.sleep(0.3)
        assert len(server.connections) == 1  # no reconnect during the penalty
    else:
        await asyncio.sleep(0.1)
        assert relay.state == "connected" and relay.penalty_remaining == 0


async def test_publish_before_start_is_signed_when_sent(
    fake_relay: Callable[..., Awaitable[FakeRelay]], make_relay: RelayFactory
) -> None:
    server = await fake_relay()
    clock = [1_700_000_000.0]
    relay = make_relay(server.url, clock=lambda: clock[0])
    relay.publish(SELF, "early")
    assert relay.queued == 1
    clock[0] += 100
    await relay.start()
    await server.wait(lambda: bool(server.of("EVENT")))
    event = server.of("EVENT")[0][1]
    assert event["content"] == "early" and event["created_at"] == 1_700_000_100
    assert relay.queued == 0


@pytest.mark.filterwarnings("error")
async def test_close_is_clean(
    fake_relay: Callable[..., Awaitable[FakeRelay]], make_relay: RelayFactory
) -> None:
    server = await fake_relay()
    relay = make_relay(server.url)
    states: list[RelayState] = []
    relay.on_state = states.append
    relay.subscribe(ROOT)
    await relay.start()
    await relay.wait_connected()
    relay.publish(SELF, "last words")
    await asyncio.gather(relay.close(), relay.close())
    assert states == ["connecting", "connected", "closed"]
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith(("nostr", "relay"))]
    await server.wait(lambda: server.connections[0].ws.closed)
    assert [f[1]["content"] for f in server.of("EVENT")] == ["last words"]
    with pytest.raises(ConnectionError):
        await relay.wait_connected()
    gc.collect()

    # A later start() resumes the subscriptions on a new connection.
    await relay.start()
    await relay.wait_connected()
    assert len(server.connections) == 2 and server.connections[1].of("REQ")[0][2]["#x"] == [ROOT]


async def test_close_while_retrying_and_before_start(make_relay: RelayFactory) -> None:
    def queue(relay: NostrRelay) -> None:
        relay.publish(SELF, "never sent")

    relay = await close_before_start_and_while_retrying(make_relay, "ws://127.0.0.1:1/", queue, limit=0.2)
    assert relay.queued == 0


async def test_no_threads(nostr_relay: NostrRelayService, make_relay: RelayFactory) -> None:
    before = threading.active_count()
    a, b, inbox = await sender_and_receiver(make_relay, nostr_relay.url, nostr_relay.url, topic(400))
    a.publish(topic(400), "ping")
    await inbox.wait_for(1)
    await a.close()
    await b.close()
    assert threading.active_count() == before, threading.enumerate()
