"""The ws-relay endpoint (Trystero's self-hosted relay protocol) on a real p2pdiff app: the frames,
the limits, garbage, slow readers, the cluster bus; its frame parser fuzzed; our client
(signaling.relays.wsrelay.WsRelay) against it."""

from __future__ import annotations

import asyncio
import string
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import ClientWebSocketResponse, WSCloseCode, WSMsgType
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st

from p2pdiff.config import Config, RelayConfig
from p2pdiff.relay import RELAY
from p2pdiff.relay.bus import RelayBus
from p2pdiff.relay.link import LocalClientLink
from p2pdiff.relay.metrics import RelayMetrics
from p2pdiff.relay.ws_relay import (
    GARBAGE_LIMIT,
    MAX_TOPIC_LENGTH,
    WS_RELAY,
    Garbage,
    Publish,
    Subscribe,
    Unsubscribe,
    WsRelayHub,
    WsRelaySession,
    parse_frame,
    relay_frame,
)
from signaling.relays import local as local_relays
from signaling.relays.wsrelay import WsRelay, publish_frame, subscription_frame
from tests.conftest import ClientFactory
from tests.relay.conftest import metric
from tests.signaling.relay_helpers import Inbox

WAIT = 5.0


class WsClient:
    """A raw ws-relay client on the test app: frames as dicts."""

    def __init__(self, ws: ClientWebSocketResponse) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, client: TestClient) -> WsClient:
        return cls(await client.ws_connect("/ws-relay"))

    async def subscribe(self, *topics: str) -> None:
        for topic in topics:
            await self.ws.send_str(subscription_frame("subscribe", topic))

    async def unsubscribe(self, topic: str) -> None:
        await self.ws.send_str(subscription_frame("unsubscribe", topic))

    async def publish(self, topic: str, payload: Any) -> None:
        await self.ws.send_str(orjson.dumps({"type": "publish", "topic": topic, "payload": payload}).decode())

    async def recv_raw(self) -> str:
        message = await self.ws.receive(timeout=WAIT)
        assert message.type is WSMsgType.TEXT, (message.type, message.data)
        return str(message.data)

    async def recv(self) -> Any:
        return orjson.loads(await self.recv_raw())

    async def silent(self, seconds: float = 0.2) -> None:
        try:
            message = await self.ws.receive(timeout=seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected nothing, got {message.type} {message.data!r}")

    async def closed(self) -> int | None:
        """Wait for the relay to close the socket; its close code."""
        while True:
            message = await self.ws.receive(timeout=WAIT)
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                return self.ws.close_code


async def metrics_of(client: TestClient) -> str:
    return await (await client.get("/metrics")).text()


@pytest.fixture
def relay_app(make_client: ClientFactory, relay_config: Config) -> Callable[..., Any]:
    """``await relay_app(**relay_settings)``: the app with its relay on and ``[relay]`` changed."""

    async def make(**settings: Any) -> TestClient:
        for key, value in settings.items():
            setattr(relay_config.relay, key, value)
        return await make_client(relay_config)

    return make


# ---------------------------------------------------------------------- the parser (pure)


def test_parse_frame_reads_the_three_messages() -> None:
    assert parse_frame('{"type":"subscribe","topic":"t"}') == Subscribe("t")
    assert parse_frame('{"topic":"t","type":"unsubscribe","extra":1}') == Unsubscribe("t")
    relayed = '"{\\"peerId\\":\\"é\\"}"'  # a JSON string; é is 2 bytes in UTF-8
    assert parse_frame(publish_frame("t", '{"peerId":"é"}')) == Publish("t", relayed, len(relayed) + 1)
    obj = parse_frame('{"type":"publish","topic":"t","payload":{"peerId": "a", "n": [1, 2.5]}}')
    assert obj == Publish("t", '{"peerId":"a","n":[1,2.5]}', 26)
    assert relay_frame("t", obj.payload) == '{"topic":"t","payload":{"peerId":"a","n":[1,2.5]}}'


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '"subscribe"',
        "{}",
        '{"type":"subscribe"}',
        '{"type":"subscribe","topic":""}',
        '{"type":"subscribe","topic":5}',
        '{"type":"subscribe","topic":"' + "x" * (MAX_TOPIC_LENGTH + 1) + '"}',
        '{"type":"SUBSCRIBE","topic":"t"}',
        '{"type":"join","topic":"t"}',
        '{"type":"publish","topic":"t"}',
        '{"type":"publish","topic":"t","payload":null}',
        '{"type":"publish","topic":"t","payload":5}',
        '{"type":"publish","topic":"t","payload":["a"]}',
        '{"type":"publish","topic":"t","payload":' + '{"a":' * 300 + "1" + "}" * 300 + "}",
        '{"type":"publish","topic":"t","payload":"\\ud800"}',
    ],
)
def test_parse_frame_refuses_garbage(text: str) -> None:
    with pytest.raises(Garbage):
        parse_frame(text)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(st.text(max_size=300))
def test_parse_frame_fuzz_text_only_garbage_or_a_message(text: str) -> None:
    try:
        message = parse_frame(text)
    except Garbage:
        return
    assert isinstance(message, Subscribe | Unsubscribe | Publish)
    assert 0 < len(message.topic) <= MAX_TOPIC_LENGTH


@given(
    st.dictionaries(
        st.sampled_from(["type", "topic", "payload", "x"]),
        st.sampled_from(["subscribe", "unsubscribe", "publish", ""]) | _json,
        max_size=4,
    )
)
def test_parse_frame_fuzz_objects(frame: dict[str, Any]) -> None:
    text = orjson.dumps(frame).decode()
    try:
        message = parse_frame(text)
    except Garbage:
        topic, kind = frame.get("topic"), frame.get("type")
        payload_ok = isinstance(frame.get("payload"), str | dict)
        assert not (
            isinstance(topic, str)
            and 0 < len(topic) <= MAX_TOPIC_LENGTH
            and (kind in ("subscribe", "unsubscribe") or (kind == "publish" and payload_ok))
        )
        return
    assert (
        message.topic == frame["topic"]
        and frame["type"]
        == {
            Subscribe: "subscribe",
            Unsubscribe: "unsubscribe",
            Publish: "publish",
        }[type(message)]
    )
    if isinstance(message, Publish):
        assert orjson.loads(message.payload) == frame["payload"]
        assert message.size == len(message.payload.encode())
        relayed = orjson.loads(relay_frame(message.topic, message.payload))
        assert relayed == {"topic": frame["topic"], "payload": frame["payload"]}


# ---------------------------------------------------------------------- over a WebSocket


async def test_subscribe_publish_receive(relay_client: TestClient) -> None:
    alice, bob = await WsClient.connect(relay_client), await WsClient.connect(relay_client)
    await bob.subscribe("root", "self-b")
    await asyncio.sleep(0.05)  # no acknowledgement in this protocol: let the relay read it
    await alice.publish("root", '{"peerId":"a"}')
    assert await bob.recv_raw() == '{"topic":"root","payload":"{\\"peerId\\":\\"a\\"}"}'
    await alice.publish("self-b", {"peerId": "a", "offer": "sdp"})  # an object stays an object
    assert await bob.recv() == {"topic": "self-b", "payload": {"peerId": "a", "offer": "sdp"}}
    await alice.silent()  # not subscribed: nothing, not even its own

    await alice.subscribe("root")
    await asyncio.sleep(0.05)
    await alice.publish("root", "again")
    assert await alice.recv() == {"topic": "root", "payload": "again"}  # the publisher hears itself
    assert await bob.recv() == {"topic": "root", "payload": "again"}

    await bob.unsubscribe("root")
    await bob.unsubscribe("never-subscribed")
    await asyncio.sleep(0.05)
    await alice.publish("root", "bob is gone")
    assert await alice.recv() == {"topic": "root", "payload": "bob is gone"}
    await bob.silent()
    text = await metrics_of(relay_client)
    assert metric(text, "p2pdiff_relay_events_total", protocol=WS_RELAY, result="accepted") == 4
    assert metric(text, "p2pdiff_relay_deliveries_total", protocol=WS_RELAY) == 5
    assert metric(text, "p2pdiff_relay_connections", protocol=WS_RELAY) == 2


async def test_garbage_is_ignored_and_counted_then_the_socket_closed(relay_client: TestClient) -> None:
    alice, bob = await WsClient.connect(relay_client), await WsClient.connect(relay_client)
    await bob.subscribe("root")
    for junk in ("not json", "[]", '{"type":"subscribe"}', '{"type":"publish","topic":"root","payload":5}'):
        await alice.ws.send_str(junk)
    await alice.ws.send_bytes(b"\x00binary")
    await alice.publish("root", "still served")
    assert await bob.recv() == {"topic": "root", "payload": "still served"}
    text = await metrics_of(relay_client)
    assert metric(text, "p2pdiff_relay_refused_total", protocol=WS_RELAY, reason="garbage") == 5
    for _ in range(GARBAGE_LIMIT - 5):
        await alice.ws.send_str("garbage")
    assert await alice.closed() == WSCloseCode.POLICY_VIOLATION
    text = await metrics_of(relay_client)
    assert metric(text, "p2pdiff_relay_dropped_total", protocol=WS_RELAY, reason="garbage") == 1
    await bob.silent()  # no answer ever goes out for garbage


async def test_topics_per_connection_are_capped(relay_app: Callable[..., Any]) -> None:
    client = await relay_app(max_filter_values=250)
    alice, bob = await WsClient.connect(client), await WsClient.connect(client)
    await bob.subscribe(*[f"t{i}" for i in range(251)])
    await bob.subscribe("t0")  # already there: not another topic
    await asyncio.sleep(0.1)
    await alice.publish("t250", "over the cap")
    await alice.publish("t249", "under it")
    assert await bob.recv() == {"topic": "t249", "payload": "under it"}
    await bob.unsubscribe("t0")  # room for one more
    await bob.subscribe("t250")
    await asyncio.sleep(0.05)
    await alice.publish("t250", "now heard")
    assert await bob.recv() == {"topic": "t250", "payload": "now heard"}
    text = await metrics_of(client)
    assert metric(text, "p2pdiff_relay_refused_total", protocol=WS_RELAY, reason="subscriptions") == 1


async def test_publish_rate_and_payload_size(relay_app: Callable[..., Any]) -> None:
    client = await relay_app(events_per_second=1.0, events_burst=3, max_event_bytes=1000)
    alice, bob = await WsClient.connect(client), await WsClient.connect(client)
    await bob.subscribe("root")
    await asyncio.sleep(0.05)
    await alice.publish("root", "x" * 999)  # 1001 bytes as JSON: over
    for i in range(5):
        await alice.publish("root", f"m{i}")
    assert [(await bob.recv())["payload"] for _ in range(3)] == ["m0", "m1", "m2"]
    await bob.silent()
    text = await metrics_of(client)
    events = {
        r: metric(text, "p2pdiff_relay_events_total", protocol=WS_RELAY, result=r)
        for r in ("accepted", "rate_limited", "too_large")
    }
    assert events == {"accepted": 3, "rate_limited": 2, "too_large": 1}


async def test_connections_per_address_are_capped(relay_app: Callable[..., Any]) -> None:
    client = await relay_app(max_connections_per_address=2, max_connections=10)
    first, second = await WsClient.connect(client), await WsClient.connect(client)
    third = await WsClient.connect(client)
    assert await third.closed() == WSCloseCode.TRY_AGAIN_LATER
    text = await metrics_of(client)
    assert (
        metric(text, "p2pdiff_relay_refused_total", protocol=WS_RELAY, reason="connections_per_address") == 1
    )
    await first.ws.close()
    await asyncio.sleep(0.05)
    fourth = await WsClient.connect(client)
    await fourth.subscribe("t")
    await asyncio.sleep(0.05)
    await second.publish("t", "in")
    assert await fourth.recv() == {"topic": "t", "payload": "in"}


async def test_oversized_message_closes_the_socket(relay_app: Callable[..., Any]) -> None:
    client = await relay_app(max_event_bytes=1000, max_message_bytes=2024, outbox_bytes=4096)
    alice = await WsClient.connect(client)
    await alice.publish("t", "x" * 3000)
    assert await alice.closed() == WSCloseCode.MESSAGE_TOO_BIG


# ---------------------------------------------------------------------- hub, session, bus


class RecordingBus(RelayBus):
    def __init__(self) -> None:
        self.published: list[tuple[str, str]] = []

    def publish(self, channel: str, text: str) -> None:
        self.published.append((channel, text))


def limits(**changes: Any) -> RelayConfig:
    config = Config().relay
    for key, value in changes.items():
        setattr(config, key, value)
    return config


async def test_the_bus_carries_publishes_out_and_remote_ones_in() -> None:
    metrics, bus = RelayMetrics(), RecordingBus()
    hub = WsRelayHub(metrics, bus)
    heard: list[str] = []
    link = LocalClientLink(heard.append, lambda: None, WS_RELAY, 1 << 20, metrics)
    session = WsRelaySession(hub, link, limits(), metrics)
    session.handle(subscription_frame("subscribe", "root"))
    session.handle(publish_frame("root", "mine"))
    frame = '{"topic":"root","payload":"mine"}'
    assert bus.published == [(WS_RELAY, frame)]
    hub.on_remote('{"topic":"root","payload":{"from":"another node"}}')
    hub.on_remote('{"topic":"elsewhere","payload":"nobody here"}')
    hub.on_remote("garbage from a broken node")
    await asyncio.sleep(0)
    assert heard == [frame, '{"topic":"root","payload":{"from":"another node"}}']
    assert bus.published == [(WS_RELAY, frame)]  # remote frames are never published again
    session.end()
    assert len(hub) == 0


async def test_a_slow_reader_is_dropped_not_buffered() -> None:
    metrics = RelayMetrics()
    hub = WsRelayHub(metrics, RecordingBus())
    lost = asyncio.Event()
    slow = LocalClientLink(lambda _: None, lost.set, WS_RELAY, 10_000, metrics)
    slow_session = WsRelaySession(hub, slow, limits(), metrics)
    slow_session.handle(subscription_frame("subscribe", "root"))
    slow.on_closed = slow_session.end
    fast_heard: list[str] = []
    fast = LocalClientLink(fast_heard.append, lambda: None, WS_RELAY, 1 << 20, metrics)
    WsRelaySession(hub, fast, limits(), metrics).handle(subscription_frame("subscribe", "root"))
    publisher = WsRelaySession(hub, fast, limits(events_burst=100), metrics)
    for i in range(20):  # in one turn of the loop: nothing is delivered meanwhile
        publisher.handle(publish_frame("root", f"{i:03d}" + "x" * 996))
    assert slow.closed and slow.backlog == 0
    await asyncio.wait_for(lost.wait(), 1)
    await asyncio.sleep(0)
    assert metrics.dropped[WS_RELAY, "slow_reader"] == 1 and len(fast_heard) == 20
    publisher.handle(publish_frame("root", "after"))
    await asyncio.sleep(0)
    assert fast_heard[-1].endswith('"after"}') and len(hub) == 1


# ---------------------------------------------------------------------- our client on it


@pytest.fixture
async def ws_relays() -> AsyncIterator[Callable[..., WsRelay]]:
    made: list[WsRelay] = []

    def make(url: str) -> WsRelay:
        relay = WsRelay(url)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        await relay.close()


async def test_our_client_on_our_endpoint(
    relay_client: TestClient, ws_relays: Callable[..., WsRelay]
) -> None:
    url = str(relay_client.make_url("/ws-relay")).replace("http://", "ws://", 1)
    a, b = ws_relays(url), ws_relays(url)
    inbox = Inbox()
    b.on_message = inbox
    b.subscribe("self-b")
    b.subscribe("root")
    for relay in (a, b):
        await relay.start()
        await relay.wait_connected()
    await asyncio.sleep(0.05)
    a.publish("root", '{"peerId":"a"}')
    a.publish("self-b", '{"peerId":"a","offer":"' + string.ascii_letters * 40 + '"}')
    await inbox.wait_for(2)
    assert inbox.items[0] == ("root", '{"peerId":"a"}')
    assert b.counters["delivered"] == 2 and not any(k.startswith("dropped") for k in b.counters)


async def test_plain_get_and_the_endpoint_turned_off(relay_app: Callable[..., Any]) -> None:
    client = await relay_app()
    resp = await client.get("/ws-relay")
    assert resp.status == 426 and "ws-relay" in await resp.text()
    off = await relay_app(ws_relay_path="")
    assert (await off.get("/ws-relay")).status == 404
    assert 'protocol="ws-relay"' not in await metrics_of(off)


async def test_in_process_client_without_a_socket(
    relay_client: TestClient, ws_relays: Callable[..., WsRelay]
) -> None:
    """The helper on its own server's ws-relay: a WsRelay whose URL is registered in process
    talks to the endpoint without a socket, and meets socket clients."""
    relay = relay_client.app[RELAY]
    port = relay_client.port
    assert relay.local_urls(port, WS_RELAY) == [
        f"ws://127.0.0.1:{port}/ws-relay",
        f"ws://localhost:{port}/ws-relay",
    ]
    url = f"ws://localhost:{port}/ws-relay"
    endpoint = relay.endpoint(WS_RELAY)
    local_relays.register(url, endpoint)
    try:
        helper = ws_relays(url)
        inbox = Inbox()
        helper.on_message = inbox
        helper.subscribe("root")
        await helper.start()
        await helper.wait_connected()
        text = await metrics_of(relay_client)
        assert metric(text, "p2pdiff_relay_connections", protocol=WS_RELAY) == 1
        browser = await WsClient.connect(relay_client)
        await browser.subscribe("root")
        await asyncio.sleep(0.05)
        await browser.publish("root", '{"peerId":"browser"}')
        assert await inbox.wait_for(1) == ['{"peerId":"browser"}']
        helper.publish("root", '{"peerId":"helper"}')
        assert await browser.recv() == {"topic": "root", "payload": '{"peerId":"browser"}'}
        assert await browser.recv() == {"topic": "root", "payload": '{"peerId":"helper"}'}
        await inbox.wait_for(2)  # the helper hears itself, as on a socket
    finally:
        local_relays.unregister(url, endpoint)
