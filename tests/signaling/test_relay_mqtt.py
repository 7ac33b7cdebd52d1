"""MqttRelay against a real mosquitto on 127.0.0.1 (no mocks on the happy paths)."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from signaling.relays import Backoff, MqttRelay, RelayState, parse_broker_url
from signaling.relays.mqtt import _decode_frame, _encode_frame, _WebSocketStream
from tests.services import Mosquitto, make_tls_files
from tests.support import eventually

from .conftest import MosquittoFactory
from .relay_helpers import (
    Inbox,
    Ticker,
    close_before_start_and_while_retrying,
    relays_closed_after,
    sender_and_receiver,
    until,
    wait_state,
)

TOPIC = "3x0s2j5a6b1i2d2z2l5d6m2k2o69335n6b4h1t"  # shaped like a Trystero topic hash

RelayFactory = Callable[..., MqttRelay]


@pytest.fixture
async def make_relay() -> AsyncIterator[RelayFactory]:
    async with relays_closed_after(MqttRelay) as make:
        yield make


def url_of(broker: Mosquitto, kind: str) -> str:
    return {"ws": broker.ws_url, "ws-path": broker.ws_url + "/mqtt", "mqtt": broker.tcp_url}[kind]


def raw_publish(port: int, topic: str, payload: bytes) -> None:
    """Publish arbitrary bytes with a plain paho client (blocking, fine for a test helper)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-publisher")
    client.connect("127.0.0.1", port)
    info = client.publish(topic, payload)
    deadline = time.monotonic() + 5
    while not info.is_published() and time.monotonic() < deadline:
        client.loop(0.05)
    client.disconnect()
    client.loop(0.05)
    assert info.is_published()


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port whose kernel completes TCP handshakes but where nothing ever answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


# ---------------------------------------------------------------------- URL parsing (no broker)


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "path", "tls", "websocket"),
    [
        ("ws://127.0.0.1:18083", "ws", "127.0.0.1", 18083, "/", False, True),
        ("ws://127.0.0.1", "ws", "127.0.0.1", 80, "/", False, True),
        ("wss://test.mosquitto.org:8081/mqtt", "wss", "test.mosquitto.org", 8081, "/mqtt", True, True),
        ("wss://broker.hivemq.com/mqtt", "wss", "broker.hivemq.com", 443, "/mqtt", True, True),
        ("ws://h:1/a/b?x=1&y=2", "ws", "h", 1, "/a/b?x=1&y=2", False, True),
        ("mqtt://127.0.0.1:18883", "mqtt", "127.0.0.1", 18883, "", False, False),
        ("mqtt://broker", "mqtt", "broker", 1883, "", False, False),
        ("mqtts://broker", "mqtts", "broker", 8883, "", True, False),
        ("tcp://broker", "mqtt", "broker", 1883, "", False, False),
        ("ssl://broker:1", "mqtts", "broker", 1, "", True, False),
        ("MQTTS://Broker.Example:8884", "mqtts", "broker.example", 8884, "", True, False),
        ("ws://[::1]:9001/mqtt", "ws", "::1", 9001, "/mqtt", False, True),
    ],
)
def test_parse_broker_url(
    url: str, scheme: str, host: str, port: int, path: str, tls: bool, websocket: bool
) -> None:
    address = parse_broker_url(url)
    assert (address.scheme, address.host, address.port, address.path) == (scheme, host, port, path)
    assert (address.tls, address.websocket) == (tls, websocket)
    assert address.username is None and address.password is None


def test_parse_broker_url_credentials() -> None:
    # Trystero's shiftr.io default carries credentials in the URL (and uses path "/").
    address = parse_broker_url("wss://public:public@public.cloud.shiftr.io")
    assert (address.username, address.password, address.port, address.path) == ("public", "public", 443, "/")
    assert parse_broker_url("mqtt://us%40er:p%3Ass@h").username == "us@er"
    assert parse_broker_url("mqtt://us%40er:p%3Ass@h").password == "p:ss"


@pytest.mark.parametrize("url", ["http://h", "nostr://h", "ws://", "mqtt://:1883", "ws://h:99999", "h:1883"])
def test_parse_broker_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        parse_broker_url(url)


def test_relay_rejects_bad_url_and_topics() -> None:
    with pytest.raises(ValueError):
        MqttRelay("https://example.org")
    relay = MqttRelay("mqtt://127.0.0.1:1")
    for topic in ("", "a/+", "a/#", "nul\0"):
        with pytest.raises(ValueError):
            relay.publish(topic, "x")
    assert relay.queued == 0


def test_backoff_grows_caps_and_jitters() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, cap=30.0, jitter=0.5)
    assert [backoff.delay(n, rand=lambda: 0.0) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(3, rand=lambda: 1.0) == 4.0  # at most half of the delay is shaved off
    assert backoff.delay(10_000, rand=lambda: 0.0) == 30.0  # no overflow after days of retrying
    delays = {round(backoff.delay(2), 6) for _ in range(50)}
    assert len(delays) > 1 and all(2.0 <= d <= 4.0 for d in delays)
    with pytest.raises(ValueError):
        Backoff(initial=0)


# ---------------------------------------------------------------------- WebSocket framing (no broker)


def test_websocket_stream_framing() -> None:
    server, client_sock = socket.socketpair()
    with server, client_sock:
        client_sock.setblocking(False)
        stream = _WebSocketStream(client_sock, leftover=b"")
        with pytest.raises(BlockingIOError):
            stream.recv(1)
        # Server frames are unmasked; a ping between two data frames, all in one segment.
        ping = bytes((0x89, 2)) + b"hi"
        long_frame = bytes((0x82, 0x7E)) + (300).to_bytes(2, "big") + b"d" * 300  # 16-bit length
        server.sendall(bytes((0x82, 3)) + b"abc" + ping + long_frame)
        assert stream.recv(2) == b"ab"
        assert stream.pending() == 301  # buffered: the fd will not become readable again
        assert stream.recv(1000) == b"c" + b"d" * 300
        assert stream.pending() == 0
        pong = _decode_frame(bytearray(server.recv(100)))
        assert pong is not None and pong[:2] == (0xA, b"hi")
        # Client frames are masked; a 70000-byte payload takes the 64-bit length form.
        assert stream.send(b"x" * 70000) == 70000
        received = bytearray()
        while (frame := _decode_frame(received)) is None:
            received += server.recv(65536)
        assert frame[0] == 0x2 and frame[1] == b"x" * 70000
        assert received[1] & 0x80  # mask bit set
        # A close frame right behind data: after the data, pending() flags the buffered EOF (the
        # fd may never be readable again), recv() reports it, and we answer the close.
        server.sendall(bytes((0x82, 1)) + b"z" + bytes((0x88, 2)) + (1000).to_bytes(2, "big"))
        assert stream.recv(10) == b"z"
        assert stream.pending() == 1
        assert stream.recv(10) == b""
        reply = _decode_frame(bytearray(server.recv(100)))
        assert reply is not None and reply[0] == 0x8


def test_websocket_frame_cap() -> None:
    header = bytearray((0x82, 0x7F)) + (1 << 40).to_bytes(8, "big")
    with pytest.raises(ConnectionError):
        _decode_frame(header)
    frame = bytearray(_encode_frame(0x2, b"payload"))
    assert _decode_frame(frame) == (0x2, b"payload", len(frame))  # masked frames decode too
    assert _decode_frame(frame[:-1]) is None


# ---------------------------------------------------------------------- with a real broker


@pytest.mark.parametrize("kind", ["ws", "ws-path", "mqtt"])
async def test_round_trip(mosquitto: Mosquitto, make_relay: RelayFactory, kind: str) -> None:
    a, b = make_relay(url_of(mosquitto, kind)), make_relay(url_of(mosquitto, kind))
    inbox_a, inbox_b = Inbox(), Inbox()
    a.on_message, b.on_message = inbox_a, inbox_b
    acks = [a.subscribe("to-a"), b.subscribe("to-b")]
    await a.start()
    await b.start()
    await asyncio.gather(a.wait_connected(), b.wait_connected(), *acks)
    assert all(ack.done() for ack in acks)

    a.publish("to-b", '{"peerId":"AbCdEfGhIjKlMnOpQrSt"}')
    b.publish("to-a", "héllo ✓ — 🚀")
    assert await inbox_b.wait_for(1) == ['{"peerId":"AbCdEfGhIjKlMnOpQrSt"}']
    assert await inbox_a.wait_for(1) == ["héllo ✓ — 🚀"]
    assert inbox_b.items[0][0] == "to-b"
    assert a.client_id.startswith("mqttjs_") and len(a.client_id) == 15


@pytest.mark.parametrize("kind", ["ws", "mqtt"])
async def test_large_message_and_burst_keep_order(
    mosquitto: Mosquitto, make_relay: RelayFactory, kind: str
) -> None:
    # The receiver is on plain MQTT: mosquitto 2.0.11 paces its WebSocket output (~40 kB/s,
    # also with paho's own WebSocket transport), see the next test for the receiving side.
    a, _, inbox = await sender_and_receiver(make_relay, url_of(mosquitto, kind), mosquitto.tcp_url, TOPIC)

    big = "x" * 300_000  # 64-bit WebSocket length, several partial socket writes
    a.publish(TOPIC, big)
    for i in range(500):  # one synchronous burst
        a.publish(TOPIC, f"m{i}")
    texts = await inbox.wait_for(501, limit=10)
    assert texts[0] == big
    assert texts[1:] == [f"m{i}" for i in range(500)]
    assert a.dropped == 0


async def test_websocket_receiver_reassembles_large_messages(
    mosquitto: Mosquitto, make_relay: RelayFactory
) -> None:
    a, _, inbox = await sender_and_receiver(make_relay, mosquitto.tcp_url, mosquitto.ws_url, TOPIC)

    big = "é" * 15_000  # 30 kB of UTF-8: arrives in several pieces
    a.publish(TOPIC, big)
    for i in range(200):
        a.publish(TOPIC, f"m{i}")
    texts = await inbox.wait_for(201, limit=10)
    assert texts == [big] + [f"m{i}" for i in range(200)]


def raw_subscriber(port: int, topic: str) -> tuple[paho.Client, list[paho.MQTTMessage]]:
    """A plain paho subscriber at QoS 1, so the delivered QoS shows what the publisher used."""
    client = paho.Client(CallbackAPIVersion.VERSION2)
    received: list[paho.MQTTMessage] = []
    client.on_message = lambda _c, _u, message: received.append(message)
    client.connect("127.0.0.1", port)
    _, mid = client.subscribe(topic, qos=1)
    acked: list[int] = []
    client.on_subscribe = lambda _c, _u, m, _rc, _p: acked.append(m)
    for _ in range(100):
        if mid in acked:
            break
        client.loop(0.02)
    assert mid in acked
    return client, received


async def test_wire_options_match_trystero(mosquitto: Mosquitto, make_relay: RelayFactory) -> None:
    relay = make_relay(mosquitto.ws_url)
    await relay.start()
    await relay.wait_connected()
    # MQTT 3.1.1 ("p2"), clean session ("c1"), keepalive 60 s, mqtt.js-style client id.
    await until(lambda: f"as {relay.client_id} (p2, c1, k60)" in mosquitto.log_text(), timeout=3.0)

    watcher, received = raw_subscriber(mosquitto.ports["tcp"], TOPIC)
    relay.publish(TOPIC, '{"peerId":"x"}')
    await asyncio.sleep(0.1)  # let the relay write before the blocking paho loop runs
    for _ in range(25):
        if received:
            break
        watcher.loop(0.02)
    assert [(m.payload, m.qos) for m in received] == [(b'{"peerId":"x"}', 0)]  # QoS 0
    watcher.disconnect()

    late, late_received = raw_subscriber(mosquitto.ports["tcp"], TOPIC)
    for _ in range(10):
        late.loop(0.02)
    assert late_received == []  # retain false: nothing stays on the topic for late joiners
    late.disconnect()


async def test_subscribe_and_unsubscribe_while_connected(
    mosquitto: Mosquitto, make_relay: RelayFactory
) -> None:
    a, b = make_relay(mosquitto.ws_url), make_relay(mosquitto.ws_url)
    inbox = Inbox()
    b.on_message = inbox
    await a.start()
    await b.start()
    await asyncio.gather(a.wait_connected(), b.wait_connected())

    await asyncio.wait_for(b.subscribe("late"), 5)  # resolves on SUBACK
    assert b.subscribe("late").done()  # already active: resolved at once
    a.publish("late", "one")
    assert await inbox.wait_for(1) == ["one"]

    b.unsubscribe("late")
    b.subscribe("other")
    await asyncio.wait_for(b.subscribe("other"), 5)
    a.publish("late", "not delivered")
    a.publish("other", "two")
    assert await inbox.wait_for(2) == ["one", "two"]
    assert b.topics == ("other",)


async def test_publish_before_start_is_delivered_after_connect(
    mosquitto: Mosquitto, make_relay: RelayFactory
) -> None:
    a, b = make_relay(mosquitto.ws_url), make_relay(mosquitto.ws_url)
    inbox = Inbox()
    b.on_message = inbox
    b.subscribe(TOPIC)
    await b.start()
    await b.wait_connected()

    for i in range(3):
        a.publish(TOPIC, f"early {i}")
    assert a.queued == 3 and a.state == "closed"
    await a.start()
    assert await inbox.wait_for(3) == ["early 0", "early 1", "early 2"]
    assert a.queued == 0


async def test_send_queue_is_bounded(
    mosquitto: Mosquitto, make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    relay = make_relay(mosquitto.tcp_url, queue_limit=5)
    inbox = Inbox()
    relay.on_message = inbox
    relay.subscribe(TOPIC)  # MQTT delivers our own publishes back to us
    with caplog.at_level(logging.WARNING, logger="signaling.relays.base"):
        for i in range(12):
            relay.publish(TOPIC, f"m{i}")
    assert (relay.queued, relay.dropped) == (5, 7)
    drops = [r for r in caplog.records if "send queue full" in r.getMessage()]
    assert len(drops) == 1  # one warning per overflow episode, not one per message

    with caplog.at_level(logging.WARNING, logger="signaling.relays.base"):
        await relay.start()
        assert await inbox.wait_for(5) == [f"m{i}" for i in range(7, 12)]  # oldest went first
    await asyncio.sleep(0.1)
    assert len(inbox.items) == 5
    assert any("7 message(s) had been dropped" in r.getMessage() for r in caplog.records)


async def test_broker_absent_at_start_keeps_retrying_without_blocking(
    mosquitto_factory: MosquittoFactory, make_relay: RelayFactory
) -> None:
    broker = mosquitto_factory(start=False)  # ports reserved, nothing listening yet
    relay = make_relay(broker.ws_url)
    states: list[RelayState] = []
    relay.on_state = states.append
    inbox = Inbox()
    relay.on_message = inbox
    relay.subscribe(TOPIC)

    with Ticker() as ticker:
        await relay.start()
        relay.publish(TOPIC, "queued while the broker is absent")
        await asyncio.sleep(1.0)
    assert relay.state == "connecting" and states == ["connecting"]
    assert relay.connect_attempts >= 4
    # ~100 ticks are possible; the bounds leave room for a heavily loaded CI machine.
    assert ticker.ticks >= 20 and ticker.max_gap < 0.75, (ticker.ticks, ticker.max_gap)

    broker.start()
    await asyncio.wait_for(relay.wait_connected(), 5)
    assert await inbox.wait_for(1) == ["queued while the broker is absent"]
    assert states == ["connecting", "connected"]


@pytest.mark.parametrize("scheme", ["ws", "mqtts", "mqtt"])
async def test_silent_server_times_out_without_blocking(
    silent_listener: int, make_relay: RelayFactory, caplog: pytest.LogCaptureFixture, scheme: str
) -> None:
    # The TCP connect succeeds, then no WebSocket upgrade / TLS handshake / CONNACK ever comes.
    # paho's own connect() would block the loop in the upgrade and the handshake.
    relay = make_relay(f"{scheme}://127.0.0.1:{silent_listener}", connect_timeout=1.0)
    with caplog.at_level(logging.INFO, logger="signaling.relays.base"), Ticker() as ticker:
        await relay.start()
        await asyncio.sleep(2.3)
    assert relay.state == "connecting"
    assert relay.connect_attempts >= 2
    assert any("TimeoutError" in r.getMessage() for r in caplog.records)
    # A blocking connect would stall the loop for the full 1 s timeout of each attempt.
    assert ticker.ticks >= 40 and ticker.max_gap < 0.75, (ticker.ticks, ticker.max_gap)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ws", "mqtt"])
async def test_reconnects_after_broker_restart(
    mosquitto: Mosquitto, make_relay: RelayFactory, kind: str
) -> None:
    a, b = make_relay(url_of(mosquitto, kind)), make_relay(url_of(mosquitto, kind))
    states_a: list[RelayState] = []
    a.on_state = states_a.append
    inbox_a, inbox_b = Inbox(), Inbox()
    a.on_message, b.on_message = inbox_a, inbox_b
    a.subscribe("self-a")
    b.subscribe("first")
    b.subscribe("second")
    await a.start()
    await b.start()
    await asyncio.gather(a.wait_connected(), b.wait_connected())
    a.publish("first", "before")
    await inbox_b.wait_for(1)

    mosquitto.kill()
    await asyncio.gather(wait_state(a, "reconnecting"), wait_state(b, "reconnecting"))
    a.publish("self-a", "while down")  # queued, delivered back to us after the reconnect
    await asyncio.sleep(0.3)  # a few failed attempts against the dead ports
    assert a.queued == 1

    mosquitto.start()  # same ports
    await asyncio.wait_for(asyncio.gather(a.wait_connected(), b.wait_connected()), 5)
    assert await inbox_a.wait_for(1) == ["while down"]
    a.publish("second", "after")
    a.publish("first", "after too")
    assert await inbox_b.wait_for(3) == ["before", "after", "after too"]  # both topics restored
    assert states_a == ["connecting", "connected", "reconnecting", "connected"]


@pytest.mark.slow
async def test_keepalive_runs_on_the_loop_and_detects_a_hung_broker(
    mosquitto: Mosquitto, make_relay: RelayFactory
) -> None:
    # keepalive 1 s: mosquitto drops a client that stays silent for 1.5 s, so staying connected
    # proves the loop_misc() timer sends PINGREQs; a frozen broker (TCP still open, no PINGRESP)
    # must then be detected by the same timer.
    relay = make_relay(mosquitto.ws_url, keepalive=1)
    await relay.start()
    await relay.wait_connected()
    await asyncio.sleep(2.5)
    assert relay.state == "connected" and relay.connect_attempts == 1

    mosquitto.pause()
    try:
        started = time.monotonic()
        await wait_state(relay, "reconnecting", timeout=8)
        detected_after = time.monotonic() - started
    finally:
        mosquitto.resume()
    assert detected_after < 6  # PINGREQ after 1 s idle, no PINGRESP for 1 s more, 1 s timer
    await asyncio.wait_for(relay.wait_connected(), 5)


async def test_non_utf8_payload_is_ignored(
    mosquitto: Mosquitto, make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    a, b, inbox = await sender_and_receiver(make_relay, mosquitto.ws_url, mosquitto.ws_url, TOPIC)

    with caplog.at_level(logging.WARNING, logger="signaling.relays.base"):
        raw_publish(mosquitto.ports["tcp"], TOPIC, b"\xff\xfe not utf-8 \xc3")
        a.publish(TOPIC, "still fine")
        assert await inbox.wait_for(1) == ["still fine"]
        # The raw client's publish reaches the broker over another connection: it may arrive
        # after "still fine", so wait for its warning rather than assume the order.
        await eventually(
            lambda: any("non-UTF-8" in r.getMessage() for r in caplog.records), "the non-UTF-8 warning", 5
        )
    assert inbox.texts == ["still fine"]
    assert b.state == "connected"


async def test_callback_errors_do_not_break_the_relay(
    mosquitto: Mosquitto, make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    relay = make_relay(mosquitto.tcp_url)
    inbox = Inbox()

    def on_message(topic: str, text: str) -> None:
        inbox(topic, text)
        if text == "boom":
            raise RuntimeError("owner bug")

    relay.on_message = on_message
    relay.on_state = lambda state: 1 / 0  # type: ignore[func-returns-value]
    relay.subscribe(TOPIC)
    await relay.start()
    await relay.wait_connected()
    relay.publish(TOPIC, "boom")
    relay.publish(TOPIC, "after")
    assert await inbox.wait_for(2) == ["boom", "after"]
    assert relay.state == "connected"
    assert any("on_message callback failed" in r.getMessage() for r in caplog.records)


@pytest.mark.filterwarnings("error")
async def test_close_is_clean(mosquitto: Mosquitto, make_relay: RelayFactory) -> None:
    a, b = make_relay(mosquitto.ws_url), make_relay(mosquitto.tcp_url)
    inbox = Inbox()
    b.on_message = inbox
    b.subscribe(TOPIC)
    states: list[RelayState] = []
    a.on_state = states.append
    await a.start()
    await b.start()
    await asyncio.gather(a.wait_connected(), b.wait_connected())

    a.publish(TOPIC, "last words")
    await asyncio.gather(a.close(), a.close())  # flushes what was published, then DISCONNECT
    assert await inbox.wait_for(1) == ["last words"]
    assert states == ["connecting", "connected", "closed"]
    assert a._client is not None and a._client.socket() is None
    await a.close()  # idempotent
    assert states[-1] == "closed" and len(states) == 3
    with pytest.raises(ConnectionError):
        await a.wait_connected()

    await b.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    gc.collect()

    # The broker saw a proper DISCONNECT from both, not a dropped connection.
    await until(lambda: mosquitto.log_text().count(" disconnected.") >= 2, timeout=3.0)
    log_text = mosquitto.log_text()
    assert f"Client {a.client_id} disconnected." in log_text
    assert f"Client {b.client_id} disconnected." in log_text


async def test_close_while_retrying_and_before_start(
    mosquitto_factory: MosquittoFactory, make_relay: RelayFactory
) -> None:
    broker = mosquitto_factory(start=False)

    def queue(relay: MqttRelay) -> None:
        relay.publish(TOPIC, "never sent")

    relay = await close_before_start_and_while_retrying(make_relay, broker.tcp_url, queue, limit=0.1)
    assert relay.queued == 0


async def test_no_threads(mosquitto: Mosquitto, make_relay: RelayFactory) -> None:
    before = threading.active_count()
    relays = [make_relay(mosquitto.ws_url), make_relay(mosquitto.tcp_url)]
    inboxes = [Inbox(), Inbox()]
    for relay, inbox in zip(relays, inboxes, strict=True):
        relay.on_message = inbox
        relay.subscribe(TOPIC)
        await relay.start()
    await asyncio.gather(*(relay.wait_connected() for relay in relays))
    relays[0].publish(TOPIC, "ping")
    for inbox in inboxes:
        await inbox.wait_for(1)
    assert threading.active_count() == before

    mosquitto.kill()
    await asyncio.gather(*(wait_state(relay, "reconnecting") for relay in relays))
    await asyncio.sleep(0.2)
    mosquitto.start()
    await asyncio.gather(*(relay.wait_connected() for relay in relays))
    for relay in relays:
        await relay.close()
    assert threading.active_count() == before, threading.enumerate()


# ---------------------------------------------------------------------- TLS (self-signed CA)


@pytest.fixture
def tls_broker(mosquitto_factory: MosquittoFactory, tmp_path: Path) -> tuple[Mosquitto, ssl.SSLContext]:
    files = make_tls_files(tmp_path / "tls")
    return mosquitto_factory(tls=files), ssl.create_default_context(cafile=str(files.ca_cert))


@pytest.mark.parametrize("scheme", ["mqtts", "wss"])
async def test_tls_round_trip(
    tls_broker: tuple[Mosquitto, ssl.SSLContext], make_relay: RelayFactory, scheme: str
) -> None:
    broker, context = tls_broker
    url = broker.mqtts_url if scheme == "mqtts" else broker.wss_url + "/mqtt"
    a, _, inbox = await sender_and_receiver(make_relay, url, url, TOPIC, ssl_context=context)
    # Several TLS records per read (mosquitto paces its wss output, so keep that one smaller).
    text = "over tls " + "y" * (50_000 if scheme == "mqtts" else 20_000)
    a.publish(TOPIC, text)
    assert await inbox.wait_for(1) == [text]


async def test_tls_rejects_an_untrusted_certificate(
    tls_broker: tuple[Mosquitto, ssl.SSLContext], make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    broker, _ = tls_broker
    relay = make_relay(broker.wss_url)  # system trust store: our test CA is unknown
    with caplog.at_level(logging.INFO, logger="signaling.relays.base"):
        await relay.start()
        await asyncio.sleep(0.3)
    assert relay.state == "connecting"
    assert any("CERTIFICATE_VERIFY_FAILED" in r.getMessage() for r in caplog.records)
