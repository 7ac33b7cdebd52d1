"""WsRelay: the frames Trystero's ws-relay client sends, and a scripted relay for what a real one
will not do on demand (send garbage or floods, drop us, go silent).

The scripted relay forwards publishes to the subscribers of their topic, as the protocol says,
and lets a test send any frame it likes on any connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from signaling.relays.wsrelay import MAX_MESSAGE_BYTES, WsRelay, publish_frame, subscription_frame

from . import relay_helpers
from .relay_helpers import (
    FakeServer,
    Inbox,
    Ticker,
    close_before_start_and_while_retrying,
    heartbeat_finds_dead_server,
    relays_closed_after,
    servers_stopped_after,
    until,
    wait_state,
)

RelayFactory = Callable[..., WsRelay]


class FakeConn(relay_helpers.FakeConn):
    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if isinstance(f, dict) and f.get("type") == kind]


class ScriptedWsRelay(FakeServer[FakeConn]):
    """A ws-relay on 127.0.0.1: forwards each publish to its topic's subscribers (``forward``
    off: forwards nothing) and records every frame."""

    conn_class = FakeConn

    def __init__(self, *, read: bool = True, forward: bool = True) -> None:
        super().__init__(read=read)
        self.forward = forward
        self.subscribers: dict[str, set[FakeConn]] = {}

    async def on_frame(self, conn: FakeConn, frame: Any) -> None:
        kind, topic = frame.get("type"), frame.get("topic")
        if kind == "subscribe":
            self.subscribers.setdefault(topic, set()).add(conn)
        elif kind == "unsubscribe":
            self.subscribers.get(topic, set()).discard(conn)
        elif kind == "publish" and self.forward:
            for sub in list(self.subscribers.get(topic, ())):
                if not sub.ws.closed:
                    await sub.send({"topic": topic, "payload": frame["payload"]})


@pytest.fixture
async def make_relay() -> AsyncIterator[RelayFactory]:
    async with relays_closed_after(WsRelay) as make:
        yield make


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[ScriptedWsRelay]]]:
    async with servers_stopped_after(ScriptedWsRelay) as make:
        yield make


# ---------------------------------------------------------------------- frames (no network)


def test_frames_are_what_trystero_sends() -> None:
    # JSON.stringify of the objects @trystero-p2p/ws-relay builds, in their key order.
    assert subscription_frame("subscribe", "t1") == '{"type":"subscribe","topic":"t1"}'
    assert subscription_frame("unsubscribe", "t1") == '{"type":"unsubscribe","topic":"t1"}'
    text = '{"peerId":"é","offer":"x\\"y"}'
    assert publish_frame("t1", text) == json.dumps(
        {"type": "publish", "topic": "t1", "payload": text}, separators=(",", ":"), ensure_ascii=False
    )


async def test_rejects_bad_urls_and_topics(make_relay: RelayFactory) -> None:
    for url in ("http://127.0.0.1:1/", "ws:///nohost", "ws://127.0.0.1:99999/"):
        with pytest.raises(ValueError):
            WsRelay(url)
    with pytest.raises(ValueError):
        WsRelay("ws://127.0.0.1:1/", max_topics=0)
    relay = make_relay("ws://127.0.0.1:1/", max_topics=2)
    for bad in ("", "x" * 257):
        with pytest.raises(ValueError):
            relay.subscribe(bad)
        with pytest.raises(ValueError):
            relay.publish(bad, "{}")
    relay.subscribe("a")
    relay.subscribe("b")
    relay.subscribe("a")  # already there: no new topic
    with pytest.raises(ValueError, match="2 topics"):
        relay.subscribe("c")
    relay.publish("c", "{}")  # publishing needs no subscription


# ---------------------------------------------------------------------- with a scripted relay


async def test_round_trip_and_wire_frames(
    scripted: Callable[..., Awaitable[ScriptedWsRelay]], make_relay: RelayFactory
) -> None:
    server = await scripted()
    a, b = make_relay(server.url), make_relay(server.url)
    inbox_a, inbox_b = Inbox(), Inbox()
    a.on_message, b.on_message = inbox_a, inbox_b
    a.subscribe("root")
    acks = [b.subscribe("root"), b.subscribe("self-b")]
    b.publish("root", "queued before start")  # waits in the queue, sent after the subscriptions
    for relay in (a, b):
        await relay.start()
        await relay.wait_connected()
    await asyncio.wait_for(asyncio.gather(*acks), 1)  # acknowledged once queued on the socket

    # b's own publish comes back to it (and reaches a, which may not have subscribed yet).
    assert await inbox_b.wait_for(1) == ["queued before start"]
    conn_b = server.connections[1]  # a connected first
    assert conn_b.raw[:3] == [
        '{"type":"subscribe","topic":"root"}',
        '{"type":"subscribe","topic":"self-b"}',
        '{"type":"publish","topic":"root","payload":"queued before start"}',
    ]

    a.publish("self-b", '{"peerId":"a","offer":"sdp"}')
    a.publish("root", '{"peerId":"a"}')
    await inbox_b.wait_for(3)
    assert inbox_b.items[1:] == [("self-b", '{"peerId":"a","offer":"sdp"}'), ("root", '{"peerId":"a"}')]
    assert ("root", '{"peerId":"a"}') in inbox_a.items

    b.unsubscribe("self-b")
    await server.wait(lambda: bool(conn_b.of("unsubscribe")))
    assert conn_b.raw[-1] == '{"type":"unsubscribe","topic":"self-b"}'
    a.publish("self-b", "unheard")
    a.publish("root", "heard")
    await inbox_b.wait_for(4)
    assert inbox_b.texts[-1] == "heard"
    assert a.counters["published"] == 4 and b.counters["subscribed"] == 2
    assert b.counters["delivered"] == 4 and not any(k.startswith("dropped") for k in b.counters)


async def test_reconnect_resubscribes_and_flushes(
    scripted: Callable[..., Awaitable[ScriptedWsRelay]], make_relay: RelayFactory
) -> None:
    server = await scripted()
    relay = make_relay(server.url)
    inbox = Inbox()
    relay.on_message = inbox
    for topic in ("t1", "t2", "t3"):
        relay.subscribe(topic)
    await relay.start()
    await relay.wait_connected()
    relay.unsubscribe("t2")
    await server.wait(lambda: bool(server.connections[0].of("unsubscribe")))

    server.connections[0].abort()  # no close frame: the reader notices the lost socket
    await wait_state(relay, "reconnecting")
    relay.publish("t1", "while away")
    assert relay.queued == 1
    await wait_state(relay, "connected")
    second = server.connections[1]
    await server.wait(lambda: len(second.frames) == 3)
    assert second.raw == [
        '{"type":"subscribe","topic":"t1"}',
        '{"type":"subscribe","topic":"t3"}',
        '{"type":"publish","topic":"t1","payload":"while away"}',
    ]
    assert await inbox.wait_for(1) == ["while away"]


async def test_hostile_relay_input_is_counted_and_survived(
    scripted: Callable[..., Awaitable[ScriptedWsRelay]],
    make_relay: RelayFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await scripted(forward=False)
    relay = make_relay(server.url)
    inbox = Inbox()
    relay.on_message = inbox
    relay.subscribe("room")
    await relay.start()
    await relay.wait_connected()
    conn = server.connections[0]
    deep: Any = "x"
    for _ in range(300):  # valid JSON, deeper than orjson writes back
        deep = {"d": deep}
    junk_frames: list[Any] = [
        "not json",
        "[]",
        '"a string"',
        "{}",
        {"payload": "no topic"},
        {"topic": 5, "payload": "x"},
        {"topic": "room"},
        {"topic": "room", "payload": None},
        {"topic": "room", "payload": 5},
        {"topic": "room", "payload": ["a"]},
        {"topic": "room", "payload": deep},
        {"topic": "elsewhere", "payload": "not subscribed"},
        {"topic": "x" * 100_000, "payload": "long topic"},
        '{"topic":"room","payload":"\\ud800"}',  # a lone surrogate: no UTF-8 form
        {"topic": "room", "payload": "text"},
        {"topic": "room", "payload": {"peerId": "é", "n": [1, 2]}},  # an object: its compact JSON
    ]
    # Logged at WARNING once per reason and connection, however much garbage comes.
    with caplog.at_level(logging.DEBUG, logger="signaling.relays.wsrelay"):
        for junk in junk_frames:
            await conn.send(junk)
        await conn.ws.send_bytes(b"\x00binary")
        await inbox.wait_for(2)
        await until(lambda: relay.counters.get("received", 0) == 16)
    assert inbox.items == [("room", "text"), ("room", '{"peerId":"é","n":[1,2]}')]
    c = relay.counters
    assert c["dropped:malformed"] == 13 and c["dropped:unsubscribed"] == 2 and c["delivered"] == 2
    assert relay.state == "connected"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    dropped = [r.levelno for r in caplog.records if "dropped an incoming message" in r.getMessage()]
    assert sorted(dropped) == [logging.DEBUG] * 13 + [logging.WARNING] * 2


async def test_flood_keeps_the_loop_responsive(
    scripted: Callable[..., Awaitable[ScriptedWsRelay]], make_relay: RelayFactory
) -> None:
    server = await scripted(forward=False)
    relay = make_relay(server.url)
    inbox = Inbox()
    relay.on_message = inbox
    relay.subscribe("room")
    await relay.start()
    await relay.wait_connected()
    conn = server.connections[0]
    frames = [json.dumps({"topic": "room" if i % 2 else "other", "payload": f"m{i}"}) for i in range(20_000)]
    with Ticker() as ticker:
        for frame in frames:
            await conn.ws.send_str(frame)
        await inbox.wait_for(10_000, limit=30)
    assert ticker.max_gap < 0.5, ticker.max_gap
    assert relay.counters["dropped:unsubscribed"] == 10_000 and relay.state == "connected"


async def test_oversized_frame_drops_the_connection(
    scripted: Callable[..., Awaitable[ScriptedWsRelay]], make_relay: RelayFactory
) -> None:
    server = await scripted(forward=False)
    relay = make_relay(server.url)
    relay.subscribe("room")
    await relay.start()
    await relay.wait_connected()
    await server.connections[0].send({"topic": "room", "payload": "x" * MAX_MESSAGE_BYTES})
    await wait_state(relay, "reconnecting")
    await wait_state(relay, "connected")
    await server.wait(lambda: len(server.connections) == 2 and bool(server.connections[1].of("subscribe")))


async def test_silent_relay_is_found_dead_by_the_heartbeat(
    scripted: Callable[..., Awaitable[ScriptedWsRelay]], make_relay: RelayFactory
) -> None:
    server = await scripted(read=False)
    await heartbeat_finds_dead_server(make_relay, server.url)


async def test_close_while_retrying_and_before_start(make_relay: RelayFactory) -> None:
    relay = await close_before_start_and_while_retrying(
        make_relay, "ws://127.0.0.1:1/", lambda r: r.publish("t", "never sent"), limit=1.0
    )
    assert relay.queued == 0 and relay.counters.get("published", 0) == 0


async def test_close_flushes_and_says_goodbye(
    scripted: Callable[..., Awaitable[ScriptedWsRelay]], make_relay: RelayFactory
) -> None:
    server = await scripted()
    relay = make_relay(server.url)
    relay.subscribe("t")
    await relay.start()
    await relay.wait_connected()
    for i in range(50):
        relay.publish("t", f"last {i}")
    await relay.close()
    assert relay.state == "closed"
    await server.wait(lambda: len(server.connections[0].of("publish")) == 50)
