"""The relay on a real p2pdiff app: NIP-01 as Trystero uses it, over a WebSocket."""

from __future__ import annotations

import time

from aiohttp.test_utils import TestClient

from p2pdiff.app import create_app
from p2pdiff.appkeys import CONFIG
from p2pdiff.config import Config
from p2pdiff.rest import openapi
from signaling.crypto import nostr_kind
from signaling.relays.nostr import NostrKeys
from tests.relay.conftest import metric
from tests.relay.nostr_client import NostrClient, signed, topic_filter

TOPIC = "roomtopic1"
OTHER = "roomtopic2"


async def test_subscribe_publish_receive(relay_client: TestClient) -> None:
    alice, bob = await NostrClient.connect(relay_client), await NostrClient.connect(relay_client)
    assert await bob.req("sub-b", topic_filter(TOPIC)) == ["EOSE", "sub-b"]
    event = signed(NostrKeys(), TOPIC, "hello")
    assert await alice.publish(event) == ["OK", event["id"], True, ""]
    frame = await bob.recv()
    assert frame == ["EVENT", "sub-b", event]
    await alice.silent()  # not subscribed: nothing


async def test_publisher_hears_its_own_event_after_the_ok(relay_client: TestClient) -> None:
    alice = await NostrClient.connect(relay_client)
    await alice.req("s", topic_filter(TOPIC))
    event = signed(NostrKeys(), TOPIC)
    await alice.publish(event)
    assert await alice.recv() == ["EVENT", "s", event]


async def test_filters_select_by_topic_kind_since_until_author_id(relay_client: TestClient) -> None:
    keys, other_keys = NostrKeys(), NostrKeys()
    now = int(time.time())
    listener, sender = await NostrClient.connect(relay_client), await NostrClient.connect(relay_client)
    await listener.req("x", topic_filter(TOPIC))
    await listener.req("future", {"#x": [TOPIC], "since": now + 100})
    await listener.req("past", {"#x": [TOPIC], "until": now - 100})
    await listener.req("author", {"authors": [other_keys.pubkey]})
    await listener.req("kind", {"kinds": [nostr_kind(OTHER)]})
    event = signed(keys, TOPIC, created_at=now)
    await sender.publish(event)
    assert await listener.recv() == ["EVENT", "x", event]
    await listener.silent()
    by_other = signed(other_keys, OTHER, created_at=now)
    await sender.publish(by_other)
    received = {tuple(await listener.recv())[:2] for _ in range(2)}
    assert received == {("EVENT", "author"), ("EVENT", "kind")}
    await listener.req("ids", {"ids": [event["id"]]})
    await listener.silent()  # nothing stored: an id filter only matches a later copy


async def test_close_ends_a_subscription_without_an_answer(relay_client: TestClient) -> None:
    alice = await NostrClient.connect(relay_client)
    await alice.req("s", topic_filter(TOPIC))
    await alice.send("CLOSE", "s")
    await alice.silent()  # no CLOSED: Trystero 0.25 would give the relay up
    await alice.publish(signed(NostrKeys(), TOPIC))
    await alice.silent()


async def test_req_with_a_used_id_replaces_the_subscription(relay_client: TestClient) -> None:
    alice = await NostrClient.connect(relay_client)
    await alice.req("s", topic_filter(TOPIC))
    await alice.req("s", topic_filter(OTHER))
    await alice.publish(signed(NostrKeys(), TOPIC))
    await alice.silent()
    event = signed(NostrKeys(), OTHER)
    await alice.publish(event)
    assert await alice.recv() == ["EVENT", "s", event]


async def test_metrics_count_events_and_deliveries(relay_client: TestClient) -> None:
    alice = await NostrClient.connect(relay_client)
    await alice.req("s", topic_filter(TOPIC))
    await alice.publish(signed(NostrKeys(), TOPIC))
    await alice.recv()
    text = await (await relay_client.get("/metrics")).text()
    assert metric(text, "p2pdiff_relay_connections", protocol="nostr") == 1
    assert metric(text, "p2pdiff_relay_events_total", protocol="nostr", result="accepted") == 1
    assert metric(text, "p2pdiff_relay_deliveries_total", protocol="nostr") == 1


async def test_plain_http_gets_the_relay_information_or_426(relay_client: TestClient) -> None:
    info = await relay_client.get("/nostr", headers={"Accept": "application/nostr+json"})
    assert info.status == 200 and info.content_type == "application/nostr+json"
    document = await info.json(content_type=None)
    assert 1 in document["supported_nips"]
    assert document["limitation"]["max_subscriptions"] == relay_client.app[CONFIG].relay.max_subscriptions
    assert (await relay_client.get("/nostr")).status == 426


def test_the_relay_endpoints_stay_out_of_the_api_document(relay_config: Config) -> None:
    app = create_app(relay_config)
    paths = {route.resource.canonical for route in app.router.routes() if route.resource}
    assert {"/nostr", "/ws-relay"} <= paths
    assert not {path for _, path in openapi.registered_operations(app)} & {"/nostr", "/ws-relay"}


async def test_limit_is_accepted_and_bounds_nothing_live(relay_client: TestClient) -> None:
    alice = await NostrClient.connect(relay_client)
    assert await alice.req("s", topic_filter(TOPIC) | {"limit": 0}) == ["EOSE", "s"]
    event = signed(NostrKeys(), TOPIC)
    await alice.publish(event)
    assert await alice.recv() == ["EVENT", "s", event]
