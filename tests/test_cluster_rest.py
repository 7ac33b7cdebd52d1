"""Several p2pdiff nodes (apps) on one PostgreSQL database answer REST and stream events as one
server: what is posted on one is at once visible, claimable and cancellable on another, two
workers never hold one task, and an event stream resumes on any node."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from p2pdiff.config import Config
from tests.conftest import ClientFactory
from tests.sse_client import SSEStream


@pytest.fixture
async def start(pg_url: str, make_client: ClientFactory, config: Config, tmp_path: Path) -> Starter:
    """Nodes on one fresh database (set up before the clients, so it is dropped after them)."""

    async def nodes(n: int = 2, lease_seconds: float | None = None) -> list[TestClient]:
        started = []
        for i in range(n):
            cfg = copy.deepcopy(config)
            if lease_seconds is not None:
                cfg.queue.lease_seconds = lease_seconds
            cfg.store.url = pg_url
            cfg.store.results_dir = str(tmp_path / "results")
            cfg.cluster.node_id = f"node-{i + 1}"
            started.append(await make_client(cfg))
        return started

    return nodes


Starter = Callable[..., Awaitable[list[TestClient]]]


async def test_a_task_posted_on_one_node_is_visible_claimable_and_cancellable_on_another(
    start: Starter,
) -> None:
    a, b = await start()
    resp = await a.post("/api/queue/r", json={"id": "t1", "prompt": "a cat"})
    assert resp.status == 201
    listing = await (await b.get("/api/queue/r")).json()
    assert [t["id"] for t in listing["queue"]] == ["t1"]
    resp = await b.patch("/api/queue/r/t1", json={"action": "claim", "worker": "w"})
    assert resp.status == 200, await resp.text()
    task = (await (await a.get("/api/queue/r/t1")).json())["task"]
    assert (task["status"], task["claimedBy"]) == ("processing", "w")
    resp = await a.patch("/api/queue/r/t1", json={"action": "complete", "worker": "other"})
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "worker_mismatch"
    assert (await a.delete("/api/queue/r/t1")).status == 200
    task = (await (await b.get("/api/queue/r/t1")).json())["task"]
    assert task["status"] == "cancelled"
    stats = await (await b.get("/api/stats")).json()
    assert stats["tasksByStatus"]["cancelled"] == 1


async def test_concurrent_claims_over_two_nodes_give_each_task_one_worker(start: Starter) -> None:
    a, b = await start()
    ids = [f"t{i}" for i in range(20)]
    for tid in ids:
        assert (await a.post("/api/queue/r", json={"id": tid, "prompt": "p"})).status == 201

    async def grab(client: TestClient, worker: str, tid: str) -> tuple[str, str, int]:
        resp = await client.patch(f"/api/queue/r/{tid}", json={"action": "claim", "worker": worker})
        body = await resp.json()
        if resp.status == 409:
            assert body["error"]["code"] == "invalid_transition"
        return tid, worker, resp.status

    answers = await asyncio.gather(
        *(grab(node, name, tid) for tid in ids for node, name in ((a, "wa"), (b, "wb"), (a, "xa"), (b, "xb")))
    )
    winners: dict[str, list[str]] = {}
    for tid, worker, status in answers:
        assert status in (200, 409)
        if status == 200:
            winners.setdefault(tid, []).append(worker)
    assert sorted(winners) == sorted(ids) and all(len(w) == 1 for w in winners.values())
    for tid in ids:
        for node in (a, b):
            task = (await (await node.get(f"/api/queue/r/{tid}")).json())["task"]
            assert task["claimedBy"] == winners[tid][0]


async def test_the_same_post_on_two_nodes_at_once_creates_one_task(start: Starter) -> None:
    a, b = await start()
    body = {"id": "same", "prompt": "a cat"}
    answers = await asyncio.gather(*(node.post("/api/queue/r", json=body) for node in (a, b, a, b, a, b)))
    assert sorted(resp.status for resp in answers) == [200] * 5 + [201]
    listing = await (await b.get("/api/queue/r")).json()
    assert [t["id"] for t in listing["queue"]] == ["same"]


async def test_every_node_streams_every_nodes_events_and_resumes_on_any(start: Starter) -> None:
    a, b = await start()
    on_a = SSEStream(await a.get("/api/events"))
    on_b = SSEStream(await b.get("/api/events"))
    hello_a, hello_b = await on_a.event(), await on_b.event()
    assert hello_a["type"] == hello_b["type"] == "hello"
    for i, node in enumerate((a, b, a, b)):
        assert (await node.post("/api/queue/r", json={"id": f"t{i}", "prompt": "p"})).status == 201
    seen_a = [e for e in await on_a.events(4)]
    seen_b = [e for e in await on_b.events(4)]
    assert [(e["id"], e["data"]["task"]["id"]) for e in seen_a] == [
        (e["id"], e["data"]["task"]["id"]) for e in seen_b
    ]
    assert [e["data"]["task"]["id"] for e in seen_a] == ["t0", "t1", "t2", "t3"]
    # A client that saw two events on a resumes on b with the id a gave it.
    resumed = SSEStream(await b.get("/api/events", headers={"Last-Event-ID": str(seen_a[1]["id"])}))
    assert [e["data"]["task"]["id"] for e in await resumed.events(2)] == ["t2", "t3"]
    for stream in (on_a, on_b, resumed):
        stream.resp.close()


async def test_a_node_restarted_resumes_streams_and_keeps_every_task(start: Starter) -> None:
    (a,) = await start(1)
    for i in range(3):
        assert (await a.post("/api/queue/r", json={"id": f"t{i}", "prompt": "p"})).status == 201
    stream = SSEStream(await a.get("/api/events"))
    await stream.event()
    assert (await a.post("/api/queue/r", json={"id": "t3", "prompt": "p"})).status == 201
    # Events reach a node's bus from the database just after the commit: the stream may still
    # get those of the tasks posted before it opened.
    first = await stream.event()
    while first["data"]["task"]["id"] != "t3":
        first = await stream.event()
    stream.resp.close()
    await a.close()
    (again,) = await start(1)
    listing = await (await again.get("/api/queue/r")).json()
    assert [t["id"] for t in listing["queue"]] == ["t0", "t1", "t2", "t3"]
    assert (await again.post("/api/queue/r", json={"id": "t4", "prompt": "p"})).status == 201
    resumed = SSEStream(await again.get("/api/events", headers={"Last-Event-ID": str(first["id"])}))
    event = await resumed.event()
    assert event["type"] == "task.created" and event["data"]["task"]["id"] == "t4"
    resumed.resp.close()


async def test_a_lease_expires_once_across_nodes(start: Starter) -> None:
    nodes = await start(3, lease_seconds=0.4)
    a, b = nodes[0], nodes[1]
    stream = SSEStream(await b.get("/api/events"))
    await stream.event()  # hello
    assert (await a.post("/api/queue/r", json={"id": "t", "prompt": "p"})).status == 201
    assert (await a.patch("/api/queue/r/t", json={"action": "claim", "worker": "w"})).status == 200
    seen = await stream.until("task.requeued", within=10)
    assert [e["type"] for e in seen] == ["task.created", "task.claimed", "task.requeued"]
    assert seen[-1]["data"]["reason"] == "lease_expired"
    await stream.nothing_for(1.0)  # the other nodes found it pending: no second expiry
    task = (await (await b.get("/api/queue/r/t")).json())["task"]
    assert (task["status"], task["requeues"]) == ("pending", 1)
    stream.resp.close()


async def test_stats_show_where_each_node_stands(start: Starter) -> None:
    a, b = await start()
    assert (await a.post("/api/queue/r", json={"id": "t", "prompt": "p"})).status == 201
    await b.get("/api/queue/r")  # b catches up
    stores = [(await (await node.get("/api/stats")).json())["store"] for node in (a, b)]
    assert stores[0]["appliedChange"] == stores[1]["appliedChange"] >= 1
    assert stores[1]["rowsCaughtUp"] >= 1 and stores[0]["conflicts"] == stores[0]["eventsDropped"] == 0
