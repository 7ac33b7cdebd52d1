"""The relay as a public service: every limit answered the NIP-01 way, refusals counted, and the
process serving on afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace
from typing import Any

from aiohttp import WSCloseCode, WSMessage, WSMsgType
from aiohttp.test_utils import TestClient

from p2pdiff.config import Config
from p2pdiff.relay import RELAY
from p2pdiff.relay.limits import READ_YIELD_EVERY
from p2pdiff.relay.link import LocalClientLink
from p2pdiff.relay.nip01 import parse_event
from p2pdiff.relay.nostr_endpoint import UNINDEXED_SUBSCRIPTIONS
from signaling.relays.nostr import NostrKeys, make_event
from tests.conftest import ClientFactory
from tests.relay.conftest import metric
from tests.relay.nostr_client import NostrClient, eventually, signed, topic_filter

TOPIC = "limitstopic"


async def relay_with(make_client: ClientFactory, config: Config, **limits: Any) -> TestClient:
    for key, value in limits.items():
        setattr(config.relay, key, value)
    return await make_client(config)


async def metrics_text(client: TestClient) -> str:
    return await (await client.get("/metrics")).text()


async def still_serves(client: TestClient) -> None:
    """A fresh client can subscribe, publish and hear its event."""
    probe = await NostrClient.connect(client)
    await probe.req("probe", topic_filter("probe-topic"))
    event = signed(NostrKeys(), "probe-topic")
    assert (await probe.publish(event))[2] is True
    assert await probe.recv() == ["EVENT", "probe", event]
    await probe.close()


async def test_connections_per_address(make_client: ClientFactory, relay_config: Config) -> None:
    client = await relay_with(make_client, relay_config, max_connections_per_address=2)
    first, second = await NostrClient.connect(client), await NostrClient.connect(client)
    third = await NostrClient.connect(client)
    notice = await third.recv()
    assert notice[0] == "NOTICE" and notice[1].startswith("rate-limited:")
    closing = await third.ws.receive()
    assert closing.type is WSMsgType.CLOSE and closing.data == WSCloseCode.TRY_AGAIN_LATER
    assert (
        metric(
            await metrics_text(client),
            "p2pdiff_relay_refused_total",
            protocol="nostr",
            reason="connections_per_address",
        )
        == 1
    )
    await first.close()
    await eventually(lambda: client.app[RELAY].book.total == 1)
    await still_serves(client)  # the freed place is taken again
    await second.close()


async def test_connections_per_address_honour_the_trusted_proxy_header(
    make_client: ClientFactory, relay_config: Config
) -> None:
    relay_config.server.trusted_proxy_header = "X-Forwarded-For"
    client = await relay_with(make_client, relay_config, max_connections_per_address=1)
    a = await NostrClient.connect(client, headers={"X-Forwarded-For": "203.0.113.1"})
    b = await NostrClient.connect(client, headers={"X-Forwarded-For": "203.0.113.2"})
    assert await a.req("s", topic_filter(TOPIC)) == ["EOSE", "s"]
    assert await b.req("s", topic_filter(TOPIC)) == ["EOSE", "s"]
    again = await NostrClient.connect(client, headers={"X-Forwarded-For": "10.0.0.9, 203.0.113.1"})
    assert (await again.recv())[1].startswith("rate-limited:")


async def test_connections_in_all(make_client: ClientFactory, relay_config: Config) -> None:
    client = await relay_with(make_client, relay_config, max_connections=2, max_connections_per_address=2)
    await NostrClient.connect(client)
    await NostrClient.connect(client)
    full = await NostrClient.connect(client)
    assert (await full.recv())[1] == "rate-limited: the relay is full; try again later"
    inbox: list[str] = []
    local = client.app[RELAY].connect_local(inbox.append, lambda: None)  # the helper is exempt
    local.receive('["REQ","h",{"#x":["t"]}]')
    await eventually(lambda: inbox == ['["EOSE","h"]'])


async def test_subscriptions_filters_and_values(make_client: ClientFactory, relay_config: Config) -> None:
    client = await relay_with(
        make_client, relay_config, max_subscriptions=2, max_filters=2, max_filter_values=250
    )
    alice = await NostrClient.connect(client)
    assert await alice.req("a", topic_filter(TOPIC)) == ["EOSE", "a"]
    assert await alice.req("b", topic_filter(TOPIC)) == ["EOSE", "b"]
    closed = await alice.req("c", topic_filter(TOPIC))
    assert closed == ["CLOSED", "c", "error: at most 2 subscriptions per connection"]
    assert await alice.req("b", topic_filter("another")) == ["EOSE", "b"]  # replacing is no new one
    await alice.send("CLOSE", "a")
    topics = [f"topic{i}" for i in range(250)]
    assert await alice.req("c", topic_filter(*topics)) == ["EOSE", "c"]  # Trystero 0.25's batch
    await alice.send("CLOSE", "c")
    too_many_values = await alice.req("d", {"#x": [*topics, "one more"]})
    assert too_many_values == ["CLOSED", "d", "error: at most 250 values in #x"]
    too_many_filters = await alice.req("d", {"#x": ["1"]}, {"#x": ["2"]}, {"#x": ["3"]})
    assert too_many_filters == ["CLOSED", "d", "error: at most 2 filters per REQ"]
    for bad, text in [
        ({"#x": "not a list"}, "invalid: #x must be a list"),
        ({"kinds": ["1"]}, "invalid: kinds must hold int values"),
        ({"search": "x"}, "invalid: unsupported filter field 'search'"),
        ({"since": -1}, "invalid: since must be a non-negative integer"),
        ({"authors": ["abc"]}, "invalid: authors must be 64 lower-case hex characters each"),
        ("not an object", "invalid: a filter is a JSON object"),
    ]:
        assert await alice.req("e", bad) == ["CLOSED", "e", text]
    no_filter = await alice.req("e")
    assert no_filter == ["CLOSED", "e", "invalid: a REQ needs at least one filter"]
    text = await metrics_text(client)
    for reason, count in [("subscriptions", 1), ("filter_values", 1), ("filters", 8)]:
        assert metric(text, "p2pdiff_relay_refused_total", protocol="nostr", reason=reason) == count, reason
    await still_serves(client)


async def test_events_per_second(make_client: ClientFactory, relay_config: Config) -> None:
    client = await relay_with(make_client, relay_config, events_per_second=1, events_burst=3)
    alice = await NostrClient.connect(client)
    keys = NostrKeys()
    answers = [await alice.publish(signed(keys, TOPIC, f"n{i}")) for i in range(5)]
    assert [a[2] for a in answers[:3]] == [True, True, True]
    assert answers[3][2] is False and answers[3][3].startswith("rate-limited:")
    await asyncio.sleep(1.05)
    assert (await alice.publish(signed(keys, TOPIC, "later")))[2] is True
    assert (
        metric(
            await metrics_text(client), "p2pdiff_relay_events_total", protocol="nostr", result="rate_limited"
        )
        == 2
    )


async def test_event_and_message_size(make_client: ClientFactory, relay_config: Config) -> None:
    client = await relay_with(
        make_client, relay_config, max_event_bytes=2000, max_message_bytes=4000, outbox_bytes=8000
    )
    alice = await NostrClient.connect(client)
    answer = await alice.publish(signed(NostrKeys(), TOPIC, "x" * 1800))
    assert answer[2:] == [False, "invalid: the event is over 2000 bytes"]
    await alice.send("EVENT", signed(NostrKeys(), TOPIC, "y" * 5000))
    closing = await alice.ws.receive()
    assert closing.type is WSMsgType.CLOSE and closing.data == WSCloseCode.MESSAGE_TOO_BIG
    text = await metrics_text(client)
    assert metric(text, "p2pdiff_relay_events_total", protocol="nostr", result="too_large") == 1
    assert metric(text, "p2pdiff_relay_dropped_total", protocol="nostr", reason="too_large") == 1
    await still_serves(client)


async def test_garbage_frames_are_noticed_and_the_socket_stays(relay_client: TestClient) -> None:
    alice = await NostrClient.connect(relay_client)
    for frame, prefix in [
        ("not json", "error: could not parse"),
        ("{}", "error: a message is a JSON array"),
        ("[]", "error: a message is a JSON array"),
        ('["AUTH","x"]', "error: unknown message type 'AUTH'"),
        ('["EVENT"]', "invalid: an EVENT message"),
        ('["EVENT",{"id":"nothex"}]', "invalid: the event has no id"),
        ('["REQ"]', "invalid: a subscription id"),
        ('["REQ","' + "s" * 65 + '",{}]', "invalid: a subscription id"),
        ('["CLOSE",1]', "invalid: a subscription id"),
    ]:
        await alice.ws.send_str(frame)
        notice = await alice.recv()
        assert notice[0] == "NOTICE" and notice[1].startswith(prefix), (frame, notice)
    await alice.ws.send_bytes(b"\x00\x01")
    assert await alice.recv() == ["NOTICE", "error: this relay takes text frames only"]
    assert await alice.req("s", topic_filter(TOPIC)) == ["EOSE", "s"]
    text = await metrics_text(relay_client)
    assert metric(text, "p2pdiff_relay_refused_total", protocol="nostr", reason="garbage") == 9
    assert metric(text, "p2pdiff_relay_refused_total", protocol="nostr", reason="binary") == 1


async def test_bad_events_are_refused_and_never_relayed(relay_client: TestClient) -> None:
    listener, alice = await NostrClient.connect(relay_client), await NostrClient.connect(relay_client)
    await listener.req("all", {"kinds": list(range(20000, 20100))}, topic_filter(TOPIC))
    keys = NostrKeys()
    forged = signed(keys, TOPIC, "forged")
    forged["sig"] = signed(keys, TOPIC, "other")["sig"]
    assert (await alice.publish(forged))[2:] == [False, "invalid: bad signature"]
    wrong_id = signed(keys, TOPIC, "changed")
    wrong_id["content"] = "changed after signing"
    assert (await alice.publish(wrong_id))[2:] == [False, "invalid: the id is not the hash of the event"]
    stored_kind = make_event(keys, TOPIC, "a note", int(time.time())) | {"kind": 1}
    answer = await alice.publish(stored_kind)
    assert answer[2] is False and answer[3].startswith("blocked: ")
    no_sig = signed(keys, TOPIC) | {"sig": "00"}
    assert (await alice.publish(no_sig))[3].startswith("invalid: sig must be")
    await listener.silent()
    text = await metrics_text(relay_client)
    for result, count in [("bad_signature", 1), ("invalid", 2), ("not_ephemeral", 1), ("accepted", 0)]:
        assert metric(text, "p2pdiff_relay_events_total", protocol="nostr", result=result) == count, result


async def test_replayed_events_are_duplicates_and_reach_nobody(relay_client: TestClient) -> None:
    listener, alice = await NostrClient.connect(relay_client), await NostrClient.connect(relay_client)
    await listener.req("s", topic_filter(TOPIC))
    event = signed(NostrKeys(), TOPIC)
    assert (await alice.publish(event))[2:] == [True, ""]
    assert await listener.recv() == ["EVENT", "s", event]
    replayer = await NostrClient.connect(relay_client)
    assert (await replayer.publish(event))[2:] == [True, "duplicate: already relayed"]
    assert (await alice.publish(event))[2] is True
    await listener.silent()
    text = await metrics_text(relay_client)
    assert metric(text, "p2pdiff_relay_events_total", protocol="nostr", result="duplicate") == 2
    assert metric(text, "p2pdiff_relay_deliveries_total", protocol="nostr") == 1


async def test_idle_sockets_are_closed(make_client: ClientFactory, relay_config: Config) -> None:
    client = await relay_with(make_client, relay_config, idle_seconds=0.4)
    quiet, chatty = await NostrClient.connect(client), await NostrClient.connect(client)
    started = time.monotonic()
    closing = None
    while closing is None:
        await chatty.req("s", topic_filter(TOPIC))  # a frame every 0.1 s keeps it open
        with contextlib.suppress(TimeoutError):
            closing = await quiet.ws.receive(timeout=0.1)
    assert closing.type is WSMsgType.CLOSE and closing.data == WSCloseCode.GOING_AWAY
    assert 0.4 <= time.monotonic() - started < 1.5
    assert not chatty.ws.closed
    assert (
        metric(await metrics_text(client), "p2pdiff_relay_dropped_total", protocol="nostr", reason="idle")
        == 1
    )


async def test_a_reader_that_never_reads_is_dropped_with_bounded_memory(
    make_client: ClientFactory, relay_config: Config
) -> None:
    client = await relay_with(make_client, relay_config)
    relay = client.app[RELAY]
    sleeper = await NostrClient.connect(client)  # subscribes, then never reads again
    await sleeper.req("s", topic_filter(TOPIC))
    (link,) = list(relay._links["nostr"])
    event_text = "z" * 60_000
    published, largest = 0, 0
    while not link.closed:
        assert published < 5000, "never dropped"
        relay.nostr.publish(parse_event(signed(NostrKeys(), TOPIC, event_text), relay.limits))
        largest = max(largest, link.backlog)
        published += 1
        if published % 8 == 0:
            await asyncio.sleep(0)  # the writer runs until the socket's buffers are full
    assert largest <= relay.limits.outbox_bytes
    await eventually(lambda: not relay._links["nostr"])
    assert (
        metric(
            await metrics_text(client), "p2pdiff_relay_dropped_total", protocol="nostr", reason="slow_reader"
        )
        == 1
    )
    await still_serves(client)


async def test_shutdown_closes_sockets_going_away(make_client: ClientFactory, relay_config: Config) -> None:
    client = await make_client(relay_config)
    alice = await NostrClient.connect(client)
    await alice.req("s", topic_filter(TOPIC))
    inbox: list[str] = []
    lost: list[bool] = []
    client.app[RELAY].connect_local(inbox.append, lambda: lost.append(True))
    started = time.monotonic()
    closing = asyncio.ensure_future(alice.ws.receive(timeout=5))
    await client.server.close()  # the app's shutdown, as on SIGTERM
    assert (await closing).type is WSMsgType.CLOSE and (await closing).data == WSCloseCode.GOING_AWAY
    assert time.monotonic() - started < 3
    assert lost == [True]


class FloodingSocket:
    """A socket whose frames are all there already: iterating it never suspends by itself."""

    def __init__(self, frames: int) -> None:
        self.frames = frames

    def __aiter__(self) -> FloodingSocket:
        return self

    async def __anext__(self) -> WSMessage:
        if not self.frames:
            raise StopAsyncIteration
        self.frames -= 1
        return WSMessage(WSMsgType.TEXT, "[]", None)


async def test_a_flood_of_frames_lets_the_loop_run(relay_client: TestClient) -> None:
    relay = relay_client.app[RELAY]
    handled: list[str] = []
    session = SimpleNamespace(handle=handled.append, end=lambda: None)
    link = LocalClientLink(lambda frame: None, lambda: None, "nostr", 1 << 20, relay.metrics)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0)
    ticks = 0
    await relay._read(FloodingSocket(READ_YIELD_EVERY * 10), link, session)  # type: ignore[arg-type]
    task.cancel()
    assert len(handled) == READ_YIELD_EVERY * 10
    assert ticks >= 10  # the other task ran once per READ_YIELD_EVERY frames


async def test_filter_values_of_all_subscriptions_together(
    make_client: ClientFactory, relay_config: Config
) -> None:
    client = await relay_with(make_client, relay_config, max_filter_values=250, max_values_per_connection=600)
    alice = await NostrClient.connect(client)
    topics = [f"topic{i}" for i in range(250)]
    assert await alice.req("a", {"kinds": [20001], "#x": topics}) == ["EOSE", "a"]  # 251 values
    assert await alice.req("b", {"kinds": [20002], "#x": topics}) == ["EOSE", "b"]  # 502 in all
    too_many = ["CLOSED", "c", "error: at most 600 filter values in all subscriptions per connection"]
    assert await alice.req("c", {"#x": topics[:100]}) == too_many
    assert await alice.req("a", {"#x": topics[:10]}) == ["EOSE", "a"]  # replaced: 261 in all
    assert await alice.req("c", {"#x": topics[:100]}) == ["EOSE", "c"]  # 361
    refused = await alice.req("b", {"#x": topics, "#y": topics})  # would be 610: b ends instead
    assert refused == ["CLOSED", "b", too_many[2]]
    assert await alice.req("d", {"#x": topics}, {"#y": topics[:240]}) == ["EOSE", "d"]  # 600 exactly
    event = signed(NostrKeys(), "topic200")
    await alice.publish(event)
    assert await alice.recv() == ["EVENT", "d", event]  # not b: it ended
    await alice.silent()
    reason = "connection_values"
    assert (
        metric(await metrics_text(client), "p2pdiff_relay_refused_total", protocol="nostr", reason=reason)
        == 2
    )


async def test_few_subscriptions_that_every_event_is_checked_against(relay_client: TestClient) -> None:
    alice = await NostrClient.connect(relay_client)
    for i in range(UNINDEXED_SUBSCRIPTIONS):
        assert await alice.req(f"wide{i}", {"kinds": [20000 + i]}) == ["EOSE", f"wide{i}"]
    text = f"error: at most {UNINDEXED_SUBSCRIPTIONS} subscriptions with a filter naming no #x per connection"
    assert await alice.req("one more", {}) == ["CLOSED", "one more", text]
    assert await alice.req("wide0", {"authors": [NostrKeys().pubkey]}) == ["EOSE", "wide0"]  # a replacement
    assert await alice.req("narrow", topic_filter(TOPIC)) == ["EOSE", "narrow"]  # #x: indexed
    assert await alice.req("mixed", topic_filter(TOPIC), {"kinds": [1]}) == ["CLOSED", "mixed", text]
    await alice.send("CLOSE", "wide1")
    assert await alice.req("mixed", topic_filter(TOPIC), {"kinds": [1]}) == ["EOSE", "mixed"]
    reason = "unindexed_subscriptions"
    assert (
        metric(
            await metrics_text(relay_client), "p2pdiff_relay_refused_total", protocol="nostr", reason=reason
        )
        == 2
    )
