from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdiff.appkeys import EVENTS
from p2pdiff.config import Config
from p2pdiff.tasks import events
from p2pdiff.tasks.events import EventBus
from tests.conftest import ClientFactory, post_task
from tests.fake_signaling import fake_p2p_helper
from tests.server_process import ServerProcess
from tests.sse_client import SSEStream
from tests.support import eventually


async def open_stream(
    client: TestClient, query: str = "", headers: dict[str, str] | None = None
) -> SSEStream:
    """An open stream; a fresh one (not resuming) has had its ``hello`` read already."""
    resp = await client.get(f"/api/events{query}", headers=headers or {})
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Cache-Control"].startswith("no-cache")
    stream = SSEStream(resp)
    if "Last-Event-ID" not in (headers or {}) and "lastEventId=" not in query:
        hello = await stream.event()
        assert hello["type"] == "hello" and hello["id"] == client.server.app[EVENTS].last_id
    return stream


async def patch(client: TestClient, room: str, task_id: str, body: dict[str, Any], status: int = 200) -> Any:
    resp = await client.patch(f"/api/queue/{room}/{task_id}", json=body)
    data = await resp.json()
    assert resp.status == status, data
    return data


# -- the bus on its own ----------------------------------------------------------------------------


def test_bus_ids_backlog_and_resume_window() -> None:
    bus = EventBus(backlog=3)
    first = bus.last_id + 1
    assert bus.since(bus.last_id) == []  # nothing happened yet: resuming from "now" is fine
    assert bus.since(first - 5) is None  # an id from an earlier process: refetch
    published = [bus.publish("t", "r", {"i": i}) for i in range(5)]
    ids = [e.id for e in published if e is not None]
    assert ids == list(range(first, first + 5))
    assert [e.data["i"] for e in bus.since(ids[1]) or []] == [2, 3, 4]
    assert bus.since(ids[4]) == []
    assert bus.since(ids[0]) is None  # event ids[1] fell out of the 3-event backlog
    assert bus.since(ids[4] + 1) is None  # a future id is not one of ours
    assert b"id: %d\ndata: {" % ids[0] in published[0].frame  # type: ignore[union-attr]


def test_bus_overflow_drops_only_the_slow_subscriber() -> None:
    bus = EventBus()
    kicked: list[str] = []
    slow = bus.subscribe(limit=2, on_overflow=lambda: kicked.append("slow"))
    fast = bus.subscribe(limit=2)
    for i in range(3):
        bus.publish("t", None, {"i": i})
        if i < 2:
            fast.drain()
    assert kicked == ["slow"] and slow.closed and slow.overflowed and len(slow) == 0
    assert not fast.closed and len(fast) == 1
    assert bus.subscribers == 1 and bus.slow_disconnects == 1 and bus.max_buffered == 2


def test_bus_room_filter_and_close() -> None:
    bus = EventBus(max_subscribers=2)
    sub = bus.subscribe("a")
    bus.subscribe()
    with pytest.raises(events.TooManySubscribers):
        bus.subscribe()
    bus.publish("t", "a", {})
    bus.publish("t", "b", {})
    bus.publish("t", None, {})  # not about one room: everyone gets it
    assert [e.room for e in sub.drain()] == ["a", None]
    bus.close()
    assert sub.closed and bus.subscribers == 0 and bus.publish("t", "a", {}) is None


# Subscribe (owner index, or None for no owner) or unsubscribe (a pick among the open ones).
_BUS_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("sub"), st.one_of(st.none(), st.integers(0, 3))),
        st.tuples(st.just("unsub"), st.integers(0, 50)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=_BUS_OPS, per_owner=st.integers(1, 4), total=st.integers(1, 8))
def test_bus_shares_subscriptions_per_owner(
    ops: list[tuple[str, int | None]], per_owner: int, total: int
) -> None:
    """Whatever the order of subscriptions and unsubscriptions: an owner holds at most its share, the
    total stays capped, a refusal names the cap that was hit, and every slot comes back."""
    bus = EventBus(max_subscribers=total, max_per_owner=per_owner)
    held: list[events.Subscriber] = []
    for op, arg in ops:
        if op == "unsub":
            if held:
                sub = held.pop(arg % len(held))
                bus.unsubscribe(sub)
                bus.unsubscribe(sub)  # twice (overflow, then the stream's own cleanup): counted once
            continue
        owner = None if arg is None else f"10.0.0.{arg}"
        mine = sum(1 for s in held if s.owner == owner)
        if owner is not None and mine >= per_owner:
            with pytest.raises(events.OwnerLimitReached):
                bus.subscribe(owner=owner)
        elif len(held) >= total:
            with pytest.raises(events.TooManySubscribers) as refused:
                bus.subscribe(owner=owner)
            assert not isinstance(refused.value, events.OwnerLimitReached)
        else:
            held.append(bus.subscribe(owner=owner))
        assert bus.subscribers == len(held)
    for sub in held:
        bus.unsubscribe(sub)
    assert bus.subscribers == 0
    for i in range(4):  # everyone's share is whole again
        subs = [bus.subscribe(owner=f"10.0.0.{i}") for _ in range(min(per_owner, total))]
        for sub in subs:
            bus.unsubscribe(sub)


# -- the stream ------------------------------------------------------------------------------------


async def test_task_events_arrive_in_order(client: TestClient) -> None:
    stream = await open_stream(client)
    t1 = (await post_task(client, "r", {"id": "t1", "prompt": "a cat"}))["task"]
    await patch(client, "r", "t1", {"action": "claim", "worker": "w1"})
    await patch(client, "r", "t1", {"action": "progress", "worker": "w1", "progress": 0.5})
    await patch(client, "r", "t1", {"action": "complete", "worker": "w1", "result": {"url": "x"}})
    await post_task(client, "r", {"id": "t2", "prompt": "a dog"})
    assert (await client.delete("/api/queue/r/t2")).status == 200
    await post_task(client, "r", {"id": "t3", "prompt": "a fox"})
    await patch(client, "r", "t3", {"action": "claim", "worker": "w2"})
    await patch(client, "r", "t3", {"action": "fail", "worker": "w2", "error": "out of memory"})
    await patch(client, "r", "t3", {"action": "requeue"})

    got = await stream.events(10)
    assert [(e["type"], e["data"]["task"]["id"]) for e in got] == [
        ("task.created", "t1"),
        ("task.claimed", "t1"),
        ("task.progress", "t1"),
        ("task.complete", "t1"),
        ("task.created", "t2"),
        ("task.cancelled", "t2"),
        ("task.created", "t3"),
        ("task.claimed", "t3"),
        ("task.failed", "t3"),
        ("task.requeued", "t3"),
    ]
    ids = [e["id"] for e in got]
    assert ids == list(range(ids[0], ids[0] + 10))  # consecutive: nothing else was published
    assert all(e["room"] == "r" and isinstance(e["ts"], int) for e in got)
    # The payload is the task as the REST API shows it, after the change.
    assert got[0]["data"]["task"] == t1
    assert got[1]["data"]["task"]["claimedBy"] == "w1"
    assert got[2]["data"]["task"]["progress"] == 0.5
    assert got[3]["data"]["task"]["status"] == "complete"
    assert got[3]["data"]["task"]["result"] == {"url": "x"}
    assert got[8]["data"]["task"]["error"] == "out of memory"
    assert got[9]["data"] == {
        "task": got[9]["data"]["task"],
        "reason": "requeue",
    }
    assert got[9]["data"]["task"]["status"] == "pending" and got[9]["data"]["task"]["position"] == 1


async def test_rejected_changes_and_duplicates_publish_nothing(client: TestClient) -> None:
    stream = await open_stream(client)
    await post_task(client, "r", {"id": "t1", "prompt": "a cat"})
    await post_task(client, "r", {"id": "t1", "prompt": "a cat"}, status=200)  # idempotent repeat
    await patch(client, "r", "t1", {"action": "complete", "worker": "w"}, status=409)
    assert (await stream.event())["type"] == "task.created"
    await stream.nothing_for(0.2)


async def test_lease_expiry_publishes_a_requeue(make_client: ClientFactory, config: Config) -> None:
    config.queue.lease_seconds = 0.3
    client = await make_client(config)
    stream = await open_stream(client)
    await post_task(client, "r", {"id": "t1", "prompt": "slow"})
    await patch(client, "r", "t1", {"action": "claim", "worker": "w1"})
    got = await stream.events(3, within=5)
    assert [e["type"] for e in got] == ["task.created", "task.claimed", "task.requeued"]
    assert got[2]["data"]["reason"] == "lease_expired"
    task = got[2]["data"]["task"]
    assert task["status"] == "pending" and task["claimedBy"] is None and task["requeues"] == 1


async def test_room_filter(client: TestClient) -> None:
    only_a = await open_stream(client, "?room=a")
    everything = await open_stream(client)
    await post_task(client, "b", {"id": "tb", "prompt": "x"})
    await post_task(client, "a", {"id": "ta", "prompt": "x"})
    await post_task(client, "b", {"id": "tb2", "prompt": "x"})
    ev = await only_a.event()
    assert (ev["room"], ev["data"]["task"]["id"]) == ("a", "ta")
    assert [e["data"]["task"]["id"] for e in await everything.events(3)] == ["tb", "ta", "tb2"]
    await only_a.nothing_for(0.2)
    resp = await client.get("/api/events?room=bad%20room")
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_room_id"


async def test_resume_with_last_event_id(client: TestClient) -> None:
    stream = await open_stream(client)
    await post_task(client, "r", {"id": "t1", "prompt": "x"})
    seen = await stream.event()
    stream.resp.close()  # the client drops off...
    await post_task(client, "r", {"id": "t2", "prompt": "x"})  # ...and misses these
    await post_task(client, "s", {"id": "t3", "prompt": "x"})
    await post_task(client, "r", {"id": "t4", "prompt": "x"})

    resumed = await open_stream(client, headers={"Last-Event-ID": str(seen["id"])})
    missed = await resumed.events(3)
    assert [e["data"]["task"]["id"] for e in missed] == ["t2", "t3", "t4"]
    assert [e["id"] for e in missed] == [seen["id"] + 1, seen["id"] + 2, seen["id"] + 3]
    # Live events follow the replay without a gap.
    await post_task(client, "r", {"id": "t5", "prompt": "x"})
    assert (await resumed.event())["id"] == seen["id"] + 4

    # With a room filter, the replay is filtered too (the query parameter works like the header).
    filtered = await open_stream(client, f"?room=r&lastEventId={seen['id']}")
    assert [e["data"]["task"]["id"] for e in await filtered.events(3)] == ["t2", "t4", "t5"]

    # An up-to-date client gets nothing replayed.
    current = await open_stream(client, headers={"Last-Event-ID": str(seen["id"] + 4)})
    await current.nothing_for(0.2)

    # An id that cannot be one of ours means "refetch" (tests/test_untrusted_values.py has more).
    garbled = await open_stream(client, headers={"Last-Event-ID": "abc"})
    assert (await garbled.event())["data"] == {"reason": "invalid_id", "lastEventId": None}


async def test_a_fresh_stream_starts_with_hello(client: TestClient, config: Config) -> None:
    """Before any event, the stream tells the client where it stands, so an early reconnect resumes."""
    await post_task(client, "r", {"id": "t1", "prompt": "x"})
    stream = SSEStream(await client.get("/api/events?room=r"))
    retry = await stream.block()
    assert retry.retry is not None and retry.retry > 0
    hello = await stream.block()
    assert hello.id == client.server.app[EVENTS].last_id
    assert hello.data == {
        "id": hello.id,
        "type": "hello",
        "room": "r",
        "ts": hello.data["ts"],
        "data": {
            "heartbeatSeconds": config.server.sse_heartbeat_seconds,
            "backlog": config.server.sse_backlog,
        },
    }
    # Resuming from the hello's id misses nothing.
    await post_task(client, "r", {"id": "t2", "prompt": "x"})
    resumed = await open_stream(client, headers={"Last-Event-ID": str(hello.id)})
    assert (await resumed.event())["data"]["task"]["id"] == "t2"


async def test_resume_after_the_backlog_moved_on_sends_reset(
    make_client: ClientFactory, config: Config
) -> None:
    config.server.sse_backlog = 3
    client = await make_client(config)
    stream = await open_stream(client)
    await post_task(client, "r", {"id": "t0", "prompt": "x"})
    seen = await stream.event()
    stream.resp.close()
    for i in range(1, 6):
        await post_task(client, "r", {"id": f"t{i}", "prompt": "x"})
    resumed = await open_stream(client, headers={"Last-Event-ID": str(seen["id"])})
    reset = await resumed.event()
    assert reset["type"] == "reset"
    assert reset["data"] == {"reason": "events_lost", "lastEventId": seen["id"]}
    assert reset["id"] == seen["id"] + 5  # resume from here after refetching
    await post_task(client, "r", {"id": "t6", "prompt": "x"})
    assert (await resumed.event())["data"]["task"]["id"] == "t6"
    # An id this process never gave out (e.g. from before a restart) also means "refetch".
    stale = await open_stream(client, headers={"Last-Event-ID": "12345"})
    assert (await stale.event())["type"] == "reset"


async def test_heartbeat(make_client: ClientFactory, config: Config) -> None:
    config.server.sse_heartbeat_seconds = 0.1
    client = await make_client(config)
    stream = await open_stream(client, "?room=quiet")
    started = time.monotonic()
    await post_task(client, "other", {"id": "t1", "prompt": "x"})  # filtered out
    beat = await stream.block(within=2)
    assert beat.comments == ["heartbeat"] and beat.data is None
    assert time.monotonic() - started < 1.5
    # The heartbeat moves a filtered client's cursor past events it did not need.
    assert beat.id == client.server.app[EVENTS].last_id
    beat2 = await stream.block(within=2)
    assert beat2.comments == ["heartbeat"]


async def test_one_client_cannot_take_every_stream(make_client: ClientFactory, config: Config) -> None:
    config.server.trusted_proxy_header = "X-Forwarded-For"  # to stand in for several addresses
    config.server.sse_max_clients_per_address = 2
    client = await make_client(config)

    def at(address: str) -> dict[str, str]:
        return {"X-Forwarded-For": f"198.51.100.7, {address}"}  # the last entry is the proxy's

    greedy = [await open_stream(client, headers=at("10.0.0.1")) for _ in range(2)]
    resp = await client.get("/api/events", headers=at("10.0.0.1"))
    body = await resp.json()
    assert resp.status == 429 and body["error"]["code"] == "too_many_streams", body
    assert int(resp.headers["Retry-After"]) > 0
    # Another client (the dashboard) still gets its stream.
    await open_stream(client, headers=at("10.0.0.2"))
    # IPv6 clients are counted by /64, the block one subscriber holds: two of its addresses fill it.
    await open_stream(client, headers=at("2001:db8:0:1::5"))
    await open_stream(client, headers=at("2001:db8:0:1::6"))
    assert (await client.get("/api/events", headers=at("2001:db8:0:1::7"))).status == 429
    # A share comes back when one of its streams closes (the server notices at its next write).
    greedy[0].resp.close()
    await post_task(client, "r", {"prompt": "wake the streams"})
    bus = client.server.app[EVENTS]
    await eventually(lambda: bus.subscribers == 4, "closed stream noticed")
    await open_stream(client, headers=at("10.0.0.1"))


async def test_too_many_streams(make_client: ClientFactory, config: Config) -> None:
    config.server.sse_max_clients = 2
    client = await make_client(config)
    first = await open_stream(client)
    await open_stream(client)
    resp = await client.get("/api/events")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "too_many_streams"
    first.resp.close()
    # The closed stream's slot frees up once the server notices (the next write to it fails).
    await post_task(client, "r", {"prompt": "x"})
    for _ in range(100):
        if client.server.app[EVENTS].subscribers < 2:
            break
        await asyncio.sleep(0.02)
    assert (await client.get("/api/events")).status == 200


async def test_cors_header_on_the_stream(make_client: ClientFactory, config: Config) -> None:
    config.server.cors_origins = ["http://app.example"]
    client = await make_client(config)
    resp = await client.get("/api/events", headers={"Origin": "http://app.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "http://app.example"
    resp.close()
    resp = await client.get("/api/events", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp.close()


async def test_stats_report_the_streams(client: TestClient) -> None:
    await open_stream(client)
    await post_task(client, "r", {"prompt": "x"})
    data = await (await client.get("/api/stats")).json()
    assert data["events"]["clients"] == 1
    assert data["events"]["published"] == 1
    assert data["events"]["slowDisconnects"] == 0


async def test_slow_consumer_is_disconnected_and_memory_stays_bounded(
    make_client: ClientFactory, config: Config
) -> None:
    config.server.sse_client_buffer = 4
    client = await make_client(config)
    bus = client.server.app[EVENTS]
    loop = asyncio.get_running_loop()

    good = await open_stream(client)
    received: list[int] = []

    async def read_good() -> None:
        while True:
            received.append((await good.event(within=30))["id"])

    reader = asyncio.create_task(read_good())

    # A client that sends its request and then never reads, with a tiny receive window.
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.setblocking(False)
    await loop.sock_connect(stuck, ("127.0.0.1", client.server.port or 0))
    await loop.sock_sendall(stuck, b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    for _ in range(200):
        if bus.subscribers == 2:
            break
        await asyncio.sleep(0.01)
    assert bus.subscribers == 2

    blob = "x" * 16_000
    sent = 0
    try:
        for sent in range(1, 5001):  # noqa: B007 - the count is used after the loop
            bus.publish("test.big", "r", {"blob": blob})
            await asyncio.sleep(0.001)  # the good client keeps up; the stuck one cannot
            if bus.slow_disconnects:
                break
        assert bus.slow_disconnects == 1, f"not disconnected after {sent} events"
        assert bus.subscribers == 1
        # Never more than the cap waited for anyone, however long the client was stuck.
        assert bus.max_buffered <= 4
        # The good client saw everything, in order, and is still connected.
        last = bus.publish("test.end", "r", {})
        assert last is not None
        for _ in range(500):
            if received and received[-1] == last.id:
                break
            await asyncio.sleep(0.01)
        assert received == list(range(received[0], last.id + 1))
        assert len(received) == sent + 1
    finally:
        reader.cancel()
        # The server cut the stuck connection: draining its socket ends in EOF or a reset.
        ended = False
        try:
            async with asyncio.timeout(10):
                while await loop.sock_recv(stuck, 1 << 20):
                    pass
                ended = True
        except ConnectionResetError:
            ended = True
        stuck.close()
    assert ended


async def test_many_clients_get_every_event_in_order(make_client: ClientFactory, config: Config) -> None:
    config.server.sse_max_clients_per_address = 40  # every stream comes from 127.0.0.1
    client = await make_client(config)
    streams = [await open_stream(client, "?room=r" if i % 2 else "") for i in range(40)]
    for i in range(25):
        await post_task(client, "r", {"id": f"t{i}", "prompt": "x"})
    results = await asyncio.gather(*(s.events(25) for s in streams))
    for got in results:
        assert [e["data"]["task"]["id"] for e in got] == [f"t{i}" for i in range(25)]
    assert client.server.app[EVENTS].stats()["clients"] == 40


# -- helper events (P2P helper over a stand-in signaling room) -------------------------------------


async def test_helper_publishes_peers_and_relay_states(
    make_client: ClientFactory, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    helper, rooms = fake_p2p_helper(monkeypatch)
    client = await make_client(config, helper=helper)
    stream = await open_stream(client)
    assert (await client.post("/api/join/lobby")).status == 202
    room = rooms["lobby"]
    room.add_peer("peer-1")
    room.relay_states["mqtt://127.0.0.1:1883"] = "connected"
    room.set_rtt("peer-1", 12.34)
    helper.watch_once(helper.room("lobby"))
    helper.watch_once(helper.room("lobby"))  # nothing changed: nothing published
    room.drop_peer("peer-1")
    assert (await client.delete("/api/join/lobby")).status == 200

    got = await stream.events(7)
    assert [(e["type"], e["room"]) for e in got] == [
        ("relay.state", "lobby"),
        ("helper.joined", "lobby"),
        ("peer.joined", "lobby"),
        ("relay.state", "lobby"),
        ("peer.rtt", "lobby"),
        ("peer.left", "lobby"),
        ("helper.left", "lobby"),
    ]
    assert got[0]["data"] == {"url": "mqtt://127.0.0.1:1883", "state": "connecting", "previous": None}
    assert got[2]["data"]["peer"]["id"] == "peer-1" and got[2]["data"]["peer"]["rttMs"] is None
    assert got[3]["data"] == {"url": "mqtt://127.0.0.1:1883", "state": "connected", "previous": "connecting"}
    assert got[4]["data"]["peer"]["rttMs"] == 12.3
    assert got[5]["data"] == {"peer": {"id": "peer-1"}}
    await stream.nothing_for(0.1)


# -- shutdown --------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_shutdown_ends_open_streams_at_once(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            streams = [await session.get(f"{server.url}/api/events") for _ in range(3)]
            for resp in streams:
                assert resp.status == 200
            started = time.monotonic()
            assert server.proc is not None
            server.proc.terminate()
            code = await asyncio.wait_for(server.proc.wait(), 10)
            elapsed = time.monotonic() - started
            # Each stream ends cleanly (EOF), not by timing out.
            for resp in streams:
                async with asyncio.timeout(2):
                    await resp.content.read()
    finally:
        await server.stop()
    assert code == 0, server.log()
    assert elapsed < 3, f"shutdown took {elapsed:.1f}s with open event streams"
