"""Two p2pdiff nodes on one PostgreSQL: a client of one node's relay hears what a client of the
other node's relay published (PgRelayBus), on either endpoint, long texts included, each once; and
the numbers."""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import orjson
from aiohttp.test_utils import TestClient

from p2pdiff.config import Config
from signaling.relays.nostr import NostrKeys
from tests.conftest import ClientFactory
from tests.relay.conftest import metric
from tests.relay.nostr_client import NostrClient, signed, topic_filter

TOPIC = "clustertopic1"


async def nodes(pg_url: str, make_client: ClientFactory, config: Config, tmp_path: Path) -> list[TestClient]:
    started = []
    for i in range(2):
        cfg = copy.deepcopy(config)
        cfg.relay.enabled = True
        cfg.store.url = pg_url
        cfg.store.results_dir = str(tmp_path / "results")
        cfg.cluster.node_id = f"node-{i + 1}"
        started.append(await make_client(cfg))
    return started


async def test_an_event_published_on_one_node_reaches_subscribers_on_the_other(
    pg_url: str, make_client: ClientFactory, config: Config, tmp_path: Path
) -> None:
    a, b = await nodes(pg_url, make_client, config, tmp_path)
    publisher, listener = await NostrClient.connect(a), await NostrClient.connect(b)
    assert await listener.req("s", topic_filter(TOPIC)) == ["EOSE", "s"]
    keys = NostrKeys()
    small = signed(keys, TOPIC, "hello from node 1")
    large = signed(keys, TOPIC, "x" * 20_000)  # over a notification's 8000 bytes: through relay_texts
    for event in (small, large):
        assert (await publisher.publish(event))[2] is True
    assert await listener.recv() == ["EVENT", "s", small]
    assert await listener.recv() == ["EVENT", "s", large]
    await listener.silent(0.3)  # each once

    # The other way, and a subscriber on the publishing node hears it once too.
    await publisher.req("p", topic_filter(TOPIC))
    back = signed(keys, TOPIC, "and back")
    await listener.publish(back)
    assert await publisher.recv() == ["EVENT", "p", back]
    await publisher.silent(0.3)

    page_a = await (await a.get("/metrics")).text()
    assert metric(page_a, "p2pdiff_relay_bus_texts_total", result="sent") == 2
    assert metric(page_a, "p2pdiff_relay_bus_texts_total", result="stored") == 1
    assert metric(page_a, "p2pdiff_relay_bus_texts_total", result="delivered") == 1
    assert metric(page_a, "p2pdiff_relay_bus_backlog_bytes") == 0


async def test_cross_node_latency_through_the_relays(
    pg_url: str, make_client: ClientFactory, config: Config, tmp_path: Path
) -> None:
    """From a client's EVENT on node 1 to the EVENT at a subscriber of node 2 (p50, p99)."""
    a, b = await nodes(pg_url, make_client, config, tmp_path)
    publisher, listener = await NostrClient.connect(a), await NostrClient.connect(b)
    await listener.req("s", topic_filter(TOPIC))
    keys = NostrKeys()
    latencies = []
    for i in range(200):
        event = signed(keys, TOPIC, f"event {i}")
        sent = time.perf_counter()
        await publisher.send("EVENT", event)
        assert await listener.recv() == ["EVENT", "s", event]
        latencies.append(time.perf_counter() - sent)
        assert (await publisher.recv())[0] == "OK"
    p50, p99 = statistics.median(latencies), statistics.quantiles(latencies, n=100)[98]
    print(f"\ncross-node through the relays: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms (200 events)")
    assert p99 < 1.0


async def test_a_ws_relay_publish_on_one_node_reaches_subscribers_on_the_other(
    pg_url: str, make_client: ClientFactory, config: Config, tmp_path: Path
) -> None:
    a, b = await nodes(pg_url, make_client, config, tmp_path)
    publisher, listener = await a.ws_connect("/ws-relay"), await b.ws_connect("/ws-relay")
    await listener.send_str(orjson.dumps({"type": "subscribe", "topic": TOPIC}).decode())
    # ws-relay acknowledges nothing: the subscription is in once the listener hears its own probe.
    probe = orjson.dumps({"type": "publish", "topic": TOPIC, "payload": "probe"}).decode()
    await listener.send_str(probe)
    assert orjson.loads((await listener.receive(timeout=5)).data)["payload"] == "probe"
    for payload in ("hello from node 1", "y" * 20_000):
        await publisher.send_str(
            orjson.dumps({"type": "publish", "topic": TOPIC, "payload": payload}).decode()
        )
        frame = orjson.loads((await listener.receive(timeout=5)).data)
        assert frame == {"topic": TOPIC, "payload": payload}
    await publisher.close()
    await listener.close()
