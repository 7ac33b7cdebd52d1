"""The PostgreSQL store with several nodes on one database (each node: a PgStore + QueueManager +
EventBus, as create_app wires them), on a real PostgreSQL (tests/services.py): what one node
commits, the others see; two nodes never decide on one row at once; events carry one order."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdiff.errors import Conflict, InvalidTransition, NotFound, Unavailable
from p2pdiff.tasks import events, pg_store
from p2pdiff.tasks.events import EventBus
from p2pdiff.tasks.pg_store import MIGRATIONS, PgStore
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.store import STORE_CONFLICT, StoreError
from p2pdiff.tasks.validate import NewTask, TaskUpdate
from tests.app_room import until
from tests.services import PostgresServer, refuse_task_rows


def new(tid: str, prompt: str = "a cat") -> NewTask:
    return NewTask(id=tid, prompt=prompt, options={}, extra={}, created_at=None)


def claim(worker: str) -> TaskUpdate:
    return TaskUpdate("claim", worker, None, None, None)


class Node:
    """One p2pdiff process's store, queue and bus."""

    def __init__(self, url: str, name: str) -> None:
        self.bus = EventBus()
        self.store = PgStore(url, display=url, node=name, bus=self.bus)
        self.queue = QueueManager(self.store, lease_seconds=10, publish=self.store.publish)
        self.seen: list[tuple[int, str, str | None]] = []
        self.bus.add_listener(lambda e: self.seen.append((e.id, e.type, e.room)))

    async def start(self) -> Node:
        await self.store.open()
        await self.queue.load()
        return self

    async def change(self, what: Any) -> Any:
        """``what()`` in this node's write turn, committed, as a REST handler does it."""
        async with self.queue.writing():
            result = what()
        await self.queue.flush()
        return result

    def image(self) -> dict[str, Any]:
        return {room_id: self.queue.list_tasks(room_id) for room_id in sorted(self.queue.rooms)}


@pytest.fixture
async def nodes(pg_url: str) -> Any:
    started: list[Node] = []

    async def make(count: int) -> list[Node]:
        for _ in range(count):
            started.append(await Node(pg_url, f"n{len(started) + 1}").start())
        return started[-count:]

    yield make
    for node in started:
        await node.store.close()


async def test_a_task_posted_on_one_node_is_at_once_visible_claimable_and_cancellable_on_another(
    nodes: Any,
) -> None:
    a, b = await nodes(2)
    await a.change(lambda: a.queue.add("r", new("t1")))
    await b.queue.sync()  # what a REST read does first
    assert [t["id"] for t in b.queue.list_tasks("r")] == ["t1"]
    await b.change(lambda: b.queue.update("r", "t1", claim("w")))
    await a.queue.sync()
    assert a.queue.get_task("r", "t1").claimed_by == "w"
    await a.change(lambda: a.queue.cancel("r", "t1"))
    await b.queue.sync()
    assert b.queue.get_task("r", "t1").status == "cancelled"
    assert b.queue.get_room("r").counts["cancelled"] == 1  # type: ignore[union-attr]


async def test_concurrent_claims_on_two_nodes_never_give_one_task_two_workers(nodes: Any) -> None:
    a, b = await nodes(2)
    ids = [f"t{i}" for i in range(40)]
    await a.change(lambda: [a.queue.add("r", new(tid)) for tid in ids])

    async def grab(node: Node, worker: str, tid: str) -> str | None:
        try:
            await node.change(lambda: node.queue.update("r", tid, claim(worker)))
        except InvalidTransition:
            return None
        return worker

    order = [(node, tid) for tid in ids for node in random.sample([a, b], 2)]
    winners = await asyncio.gather(*(grab(node, f"w-{node.store.node}", tid) for node, tid in order))
    by_task: dict[str, list[str]] = {}
    for (_, tid), winner in zip(order, winners, strict=True):
        if winner is not None:
            by_task.setdefault(tid, []).append(winner)
    assert all(len(w) == 1 for w in by_task.values()) and sorted(by_task) == sorted(ids)
    await a.queue.sync()
    await b.queue.sync()
    for tid in ids:
        holders = {a.queue.get_task("r", tid).claimed_by, b.queue.get_task("r", tid).claimed_by}
        assert holders == {by_task[tid][0]}
    # The database agrees with both memories.
    again = await Node(a.store._dsn, "n3").start()
    try:
        assert again.image() == a.image() == b.image()
    finally:
        await again.store.close()


async def test_the_same_task_posted_on_two_nodes_at_once_is_created_once(nodes: Any) -> None:
    a, b = await nodes(2)
    results = await asyncio.gather(
        *(node.change(lambda node=node: node.queue.add("r", new("same"))) for node in (a, b, a, b))
    )
    assert sum(r.created for r in results) == 1
    with pytest.raises(Conflict):
        await b.change(lambda: b.queue.add("r", new("same", prompt="a dog")))
    await a.queue.sync()
    assert a.image() == b.image() and len(a.queue.list_tasks("r")) == 1


async def test_worker_mismatch_holds_across_nodes(nodes: Any) -> None:
    a, b = await nodes(2)
    await a.change(lambda: a.queue.add("r", new("t")))
    await a.change(lambda: a.queue.update("r", "t", claim("wa")))
    with pytest.raises(Conflict) as raised:
        await b.change(lambda: b.queue.update("r", "t", TaskUpdate("complete", "wb", None, None, None)))
    assert raised.value.code == "worker_mismatch"


async def test_every_node_delivers_every_event_in_one_order(nodes: Any) -> None:
    a, b, c = await nodes(3)
    writers = [a, b, c] * 5
    await asyncio.gather(
        *(
            node.change(lambda i=i, node=node: node.queue.add(f"r{i % 2}", new(f"t{i}")))
            for i, node in enumerate(writers)
        )
    )
    await until(lambda: all(len(n.seen) == 15 for n in (a, b, c)))
    assert a.seen == b.seen == c.seen
    ids = [event_id for event_id, _, _ in a.seen]
    assert ids == sorted(ids)
    # A stream resumed on another node from an id one node gave: the same events follow.
    middle = ids[6]
    assert [e.id for e in b.bus.since(middle) or []] == [e.id for e in c.bus.since(middle) or []] == ids[7:]


async def test_events_of_other_publishers_reach_every_node(nodes: Any) -> None:
    a, b = await nodes(2)
    origin = events.Origin.peer_message("r", "p1")
    a.store.publish(events.PEER_JOINED, "r", {"peer": {"id": "p1"}}, origin=origin)
    await until(lambda: a.seen and b.seen)
    assert b.seen == a.seen and b.seen[0][1:] == (events.PEER_JOINED, "r")
    event = b.bus.since(b.seen[0][0] - 1)[0]  # type: ignore[index]
    assert event.origin == events.Origin.peer_message("r", "p1") and event.data == {"peer": {"id": "p1"}}


async def test_a_restarted_node_resumes_streams_from_the_database(nodes: Any, pg_url: str) -> None:
    (a,) = await nodes(1)
    for i in range(5):
        await a.change(lambda i=i: a.queue.add("r", new(f"t{i}")))
    await until(lambda: len(a.seen) == 5)
    later = await Node(pg_url, "n2").start()
    try:
        assert later.seen == []  # the past fills the resume window, it is not news to listeners
        assert [e.id for e in later.bus.since(a.seen[1][0]) or []] == [i for i, _, _ in a.seen[2:]]
        assert later.bus.since(a.seen[0][0] - 1) is not None and later.bus.last_id == a.seen[-1][0]
    finally:
        await later.store.close()


async def test_changes_outside_a_turn_on_a_stale_node_are_refused_and_memory_catches_up(nodes: Any) -> None:
    a, b = await nodes(2)
    await a.change(lambda: a.queue.add("r", new("t")))
    # b has not caught up: deciding without the turn, it sees no task "t" and adds its own.
    b.queue.add("r", new("t", prompt="something else"))
    with pytest.raises(Unavailable) as raised:
        await b.queue.flush()
    assert raised.value.code == STORE_CONFLICT and b.store.conflicts == 1
    assert b.queue.get_task("r", "t").prompt == "a cat"  # memory went back, then caught up
    assert b.image() == a.image()


async def test_a_node_that_slept_through_the_pruned_change_log_reloads(nodes: Any) -> None:
    a, b = await nodes(2)
    # b sleeps: it hears of no commit (its watcher and listener stopped, as in a long pause).
    b.store._tasks.cancel()  # the watch (and any catch-up under way)
    await b.store._listener.close()
    await a.change(lambda: a.queue.add("r", new("t1")))
    await a.change(lambda: a.queue.add("r", new("t2")))
    assert b.store.applied == 0
    async with a.store.pool.acquire() as conn:  # as prune_log does, for changes an hour old
        through = await conn.fetchval("SELECT max(id) FROM changes")
        await conn.execute("DELETE FROM changes WHERE id <= $1", through)
        await conn.execute("UPDATE log_pruned SET through = $1", through)
    await b.queue.sync()
    assert [t["id"] for t in b.queue.list_tasks("r")] == ["t1", "t2"]
    assert b.store.applied == through
    await until(lambda: "queue.reloaded" in [t for _, t, _ in b.seen])  # listeners start over


async def test_the_retention_job_runs_once_per_period_across_nodes(nodes: Any) -> None:
    a, b = await nodes(2)
    claims = await asyncio.gather(*(n.store.claim_job("retention", 3600) for n in (a, b, a, b)))
    assert sorted(claims) == [False, False, False, True]
    assert await a.store.claim_job("lease check", 0.0) and await b.store.claim_job("lease check", 0.0)


async def test_schema_migrates_once_when_nodes_start_together(pg_url: str) -> None:
    nodes = [Node(pg_url, f"n{i}") for i in range(4)]
    await asyncio.gather(*(n.start() for n in nodes))
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT array_agg(version) FROM p2pdiff_schema") == [MIGRATIONS[-1][0]]
        await conn.execute("INSERT INTO p2pdiff_schema VALUES (999)")
    finally:
        await conn.close()
    for n in nodes:
        await n.store.close()
    with pytest.raises(StoreError, match="newer than this p2pdiff knows"):
        await Node(pg_url, "late").start()


async def test_a_database_that_goes_away_refuses_changes_then_recovers(tmp_path: Any) -> None:
    with PostgresServer(tmp_path / "pg") as server:
        url = await server.create_database("store")
        node = await Node(url, "n1").start()
        other = await Node(url, "n0").start()
        await node.change(lambda: node.queue.add("r", new("kept")))
        server.stop()
        with pytest.raises(Unavailable) as raised:
            await node.change(lambda: node.queue.add("r", new("lost")))
        assert raised.value.code == "store_unavailable"
        assert [t["id"] for t in node.queue.list_tasks("r")] == ["kept"]
        with pytest.raises(Unavailable):  # the back-off refuses at once
            node.queue.check_writable()
        server.start()
        await until(lambda: node.store.backoff.fault() is None, within=10)
        await node.change(lambda: node.queue.add("r", new("later")))
        # The write turn could not open, so the refused change was never made: nothing to undo,
        # and the other node (its listener back after the restart) sees both tasks arrive.
        await until(lambda: [t for _, t, _ in other.seen] == ["task.created"] * 2, within=10)
        assert [t for _, t, _ in node.seen] == ["task.created"] * 2 and node.queue.rollbacks == 0
        await other.store.close()
        again = await Node(url, "n2").start()
        assert [t["id"] for t in again.queue.list_tasks("r")] == ["kept", "later"]
        await again.store.close()
        await node.store.close()


def act(queue: QueueManager, who: str, action: str, n: int) -> None:
    tid = f"t{n}"
    if action == "add":
        queue.add("r", new(tid))
    elif action == "join":
        queue.set_helper_joined(f"room{n}", n % 2 == 0)
    elif action == "cancel":
        queue.cancel("r", tid)
    else:
        worker = f"w{who}" if action == "claim" else None
        result = {"n": n} if action == "complete" else None
        queue.update("r", tid, TaskUpdate(action, worker, None, result, None))


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        st.sampled_from(["add", "claim", "complete", "requeue", "cancel", "join"]),
        st.integers(0, 5),
    ),
    max_size=25,
)


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(actions=ACTIONS)
async def test_two_nodes_stay_one_queue_whatever_they_do(
    postgres_server: PostgresServer, actions: Any
) -> None:
    url = await postgres_server.create_database()
    a, b = await Node(url, "a").start(), await Node(url, "b").start()
    try:
        for who, action, n in actions:
            node = a if who == "a" else b
            with contextlib.suppress(InvalidTransition, NotFound, Conflict):
                await node.change(functools.partial(act, node.queue, who, action, n))
        await a.queue.sync()
        await b.queue.sync()
        fresh = await Node(url, "c").start()
        try:
            assert a.image() == b.image() == fresh.image()
            assert a.queue.helper_rooms() == b.queue.helper_rooms() == fresh.queue.helper_rooms()
            requeues = {q.stats()["requeues"] for q in (a.queue, b.queue, fresh.queue)}
            assert len(requeues) == 1
        finally:
            await fresh.store.close()
    finally:
        await a.store.close()
        await b.store.close()
        await postgres_server.drop_database(url.rpartition("/")[2])


async def test_a_commit_the_database_refuses_is_undone_on_its_node_only(nodes: Any, pg_url: str) -> None:
    a, b = await nodes(2)
    conn = await asyncpg.connect(pg_url)
    try:  # a database that refuses one row (as a full disk or a constraint would)
        await refuse_task_rows(conn)
    finally:
        await conn.close()
    await a.change(lambda: a.queue.add("r", new("t1")))
    with pytest.raises(Unavailable):
        await a.change(lambda: a.queue.add("r", new("t2", prompt="boom")))
    assert [t["id"] for t in a.queue.list_tasks("r")] == ["t1"] and a.queue.rollbacks == 1
    a.store.backoff.clear()
    await a.change(lambda: a.queue.add("r", new("t3")))
    await until(lambda: [t for _, t, _ in b.seen] == ["task.created"] * 2)
    await until(lambda: "queue.reloaded" in [t for _, t, _ in a.seen])
    assert "queue.reloaded" not in [t for _, t, _ in b.seen]


async def test_a_node_starting_while_others_write_hears_only_what_comes_after_its_start(
    nodes: Any, pg_url: str
) -> None:
    (a,) = await nodes(1)
    for i in range(20):
        await a.change(lambda i=i: a.queue.add("r", new(f"old{i}")))

    async def keep_writing() -> None:
        for i in range(20):
            await a.change(lambda i=i: a.queue.add("r", new(f"new{i}")))

    writing = asyncio.create_task(keep_writing())
    late = Node(pg_url, "late")
    await late.start()
    await writing
    await a.change(lambda: a.queue.add("r", new("after")))  # surely after late's start
    await until(lambda: len(a.seen) == 41)
    await until(lambda: late.seen and late.seen[-1] == a.seen[-1])
    first = late.seen[0][0]
    assert late.seen == [e for e in a.seen if e[0] >= first]  # nothing twice, nothing skipped
    assert all(late.queue.get_task("r", f"old{i}") for i in range(20))  # the past is in memory...
    assert first > a.seen[19][0]  # ...not news to its listeners
    assert late.image() == a.image()
    await late.store.close()


async def test_a_synchronous_change_waits_for_the_write_turn_in_order(nodes: Any) -> None:
    a, b = await nodes(2)
    await b.change(lambda: b.queue.add("r", new("t")))  # a has not caught up yet
    order: list[str] = []

    def claim_on_a() -> None:
        order.append("claim")
        a.queue.update("r", "t", claim("wa"))  # decided on current rows: a's turn caught up first

    a.queue.write_soon(claim_on_a)
    a.queue.write_soon(lambda: order.append("second"))
    assert order == []  # not now: a's memory may be stale outside its turn
    await until(lambda: order == ["claim", "second"])
    await a.queue.flush()
    await b.queue.sync()
    assert b.queue.get_task("r", "t").claimed_by == "wa"


async def test_events_waiting_for_a_database_that_is_away_stay_bounded(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_store, "MAX_PENDING_EVENTS", 5)
    with PostgresServer(tmp_path / "pg") as server:
        url = await server.create_database("store")
        node = await Node(url, "n1").start()
        server.stop()
        for i in range(8):
            node.store.publish(events.PEER_RTT, "r", {"n": i})
        assert node.store.events_dropped == 3
        server.start()
        await until(lambda: len(node.seen) == 5, within=15)  # the five kept, once it is back
        assert [node.bus.since(0)[i].data["n"] for i in range(5)] == [0, 1, 2, 3, 4]  # type: ignore[index]
        await node.store.close()
