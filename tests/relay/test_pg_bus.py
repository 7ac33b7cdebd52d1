"""PgRelayBus on a real PostgreSQL: what one node publishes, every other node hears once, in order,
long texts included; a node never hears itself; a dropped listener or connection recovers; and
publishing never waits for the database."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from p2pdiff.relay import pg_bus
from p2pdiff.relay.pg_bus import PgRelayBus
from p2pdiff.tasks.pg_store import PgStore
from tests.app_room import until


class Node:
    """One node's store and relay bus, recording what it hears."""

    def __init__(self, url: str, name: str) -> None:
        self.store = PgStore(url, display=url, node=name)
        self.bus = PgRelayBus(self.store)
        self.heard: list[tuple[str, str]] = []
        self.bus.on_remote = lambda channel, text: self.heard.append((channel, text))

    async def start(self) -> Node:
        await self.store.open()
        await self.bus.start()
        return self

    async def stop(self) -> None:
        await self.bus.close()
        await self.store.close()


NodeFactory = Callable[[int], Awaitable[list[Node]]]


@pytest.fixture
async def nodes(pg_url: str) -> AsyncIterator[NodeFactory]:
    started: list[Node] = []

    async def make(count: int) -> list[Node]:
        for _ in range(count):
            started.append(await Node(pg_url, f"node-{len(started) + 1}").start())
        return started[-count:]

    yield make
    for node in started:
        await node.stop()


async def test_every_other_node_hears_each_text_once_in_order(nodes: NodeFactory) -> None:
    a, b, c = await nodes(3)
    long_text = '{"content":"' + "é" * 5000 + '"}'  # 10 kB of UTF-8: too long for a notification
    texts = [("nostr", f'{{"n":{i}}}') for i in range(300)]
    texts[100] = ("ws-relay", long_text)
    texts[200] = ("nostr", long_text + " ")
    for channel, text in texts:
        a.bus.publish(channel, text)
    await until(lambda: len(b.heard) == len(texts) and len(c.heard) == len(texts))
    assert b.heard == texts and c.heard == texts
    assert a.heard == []  # its own texts come back from PostgreSQL too, and are skipped
    assert a.bus.counters["sent"] == 300 and a.bus.counters["stored"] == 2
    b.bus.publish("nostr", "from b")
    await until(lambda: len(a.heard) == 1 and len(c.heard) == 301)
    assert a.heard == [("nostr", "from b")] and c.heard[-1] == ("nostr", "from b")
    assert not b.bus.counters["missing"] and not b.bus.counters["malformed"]


async def test_stored_texts_are_pruned(nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = await nodes(2)
    a.bus.publish("nostr", "x" * 9000)
    await until(lambda: len(b.heard) == 1)
    assert await a.store.pool.fetchval("SELECT count(*) FROM relay_texts") == 1
    monkeypatch.setattr(pg_bus, "STORED_KEEP_SECONDS", 0.0)
    await a.bus._prune()
    assert await a.store.pool.fetchval("SELECT count(*) FROM relay_texts") == 0
    # A notification whose text is gone (a node far behind) is counted, not delivered.
    key_payload = '["node-1",99,"nostr","0123"]\n'
    await a.store.pool.execute("SELECT pg_notify($1, $2)", pg_bus.CHANNEL, key_payload)
    await until(lambda: b.bus.counters["missing"] == 1)
    await a.store.pool.execute("SELECT pg_notify($1, 'garbage')", pg_bus.CHANNEL)
    await until(lambda: b.bus.counters["malformed"] == 1)
    assert b.heard == [("nostr", "x" * 9000)]


async def test_publish_never_waits_and_its_backlog_is_bounded(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_bus, "MAX_BACKLOG_BYTES", 10_000)
    bus = PgRelayBus(PgStore(pg_url, display=pg_url, node="n"))  # never started: nothing sends
    started = time.perf_counter()
    for i in range(1000):
        bus.publish("nostr", f"{i:0100d}")
    assert time.perf_counter() - started < 0.5
    assert bus.backlog <= 10_000 and bus.counters["dropped_backlog"] == 1000 - 10_000 // 100
    bus.publish("nostr", "\ud800")  # no UTF-8 form
    bus.publish("nostr", "a\x00b")
    assert bus.counters["dropped_unsendable"] == 2


async def test_a_lost_listener_and_lost_connections_recover(nodes: NodeFactory, pg_url: str) -> None:
    a, b = await nodes(2)
    a.bus.publish("nostr", "before")
    await until(lambda: b.heard == [("nostr", "before")])
    admin = await asyncpg.connect(pg_url)
    try:  # every connection of both nodes: b's listener, both pools
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()

    async def heard_again() -> None:
        n = 0
        while not any(text.startswith("after") for _, text in b.heard):
            n += 1
            a.bus.publish("nostr", f"after {n}")
            await asyncio.sleep(0.2)

    await asyncio.wait_for(heard_again(), 10)  # the store's watch listens again within 2 s


async def test_cross_node_latency(nodes: NodeFactory) -> None:
    """From publish on one node to delivery on another: p50 and p99 over a steady stream."""
    a, b = await nodes(2)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    b.bus.on_remote = lambda channel, text: latencies.append(time.perf_counter() - sent[text])
    for i in range(1000):
        text = f'["EVENT",{{"n":{i}}}]'
        sent[text] = time.perf_counter()
        a.bus.publish("nostr", text)
        if i % 10 == 9:
            await asyncio.sleep(0.005)  # ~2000 events/s in bursts of 10
    await until(lambda: len(latencies) == 1000)
    quantiles = statistics.quantiles(latencies, n=100)
    p50, p99 = statistics.median(latencies), quantiles[98]
    print(f"cross-node delivery: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms over {len(latencies)}")
    assert p99 < 1.0
