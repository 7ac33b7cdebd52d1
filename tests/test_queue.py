"""QueueManager tested directly: no HTTP, a fake clock, a real store (SQLite in a temp dir, and a
PostgreSQL database: tests/stores.py)."""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from p2pdiff.errors import Conflict, InvalidTransition, NotFound, Unavailable
from p2pdiff.tasks.model import STATUSES
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.sqlite_store import SqliteStore
from p2pdiff.tasks.validate import NewTask, TaskUpdate
from tests.faults import on_disk
from tests.stores import Stores


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def queue(stores: Stores, clock: Clock) -> QueueManager:
    return await stores.queue(clock=clock)


def new(tid: str | None = None, prompt: str = "a cat", **options: object) -> NewTask:
    return NewTask(id=tid, prompt=prompt, options=dict(options), extra={}, created_at=None)


def upd(
    action: str,
    worker: str | None = "w1",
    progress: float | None = None,
    result: object = None,
    error: str | None = None,
) -> TaskUpdate:
    return TaskUpdate(action=action, worker=worker, progress=progress, result=result, error=error)


def test_add_assigns_positions_in_order(queue: QueueManager) -> None:
    positions = [queue.add("r", new(f"t{i}")).position for i in range(5)]
    assert positions == [1, 2, 3, 4, 5]
    tasks = queue.list_tasks("r")
    assert [t["id"] for t in tasks] == ["t0", "t1", "t2", "t3", "t4"]
    assert [t["position"] for t in tasks] == [1, 2, 3, 4, 5]


def test_generated_ids_are_unique(queue: QueueManager) -> None:
    ids = {queue.add("r", new()).task.id for _ in range(200)}
    assert len(ids) == 200


def test_same_id_is_idempotent_and_conflicts_on_change(queue: QueueManager) -> None:
    first = queue.add("r", new("t1", model="m"))
    again = queue.add("r", new("t1", model="m"))
    assert again.created is False and again.task is first.task
    assert len(queue.list_tasks("r")) == 1
    with pytest.raises(Conflict):
        queue.add("r", new("t1", prompt="a dog", model="m"))
    with pytest.raises(Conflict):
        queue.add("r", new("t1", model="other"))
    # The same id in another room is another task.
    assert queue.add("other", new("t1")).created


def test_full_lifecycle_and_positions_shift(queue: QueueManager, clock: Clock) -> None:
    for i in range(3):
        queue.add("r", new(f"t{i}"))
    clock.now += 2
    task = queue.update("r", "t0", upd("claim"))
    assert task.status == "processing" and task.claimed_by == "w1"
    assert queue.position(queue.get_task("r", "t1")) == 1
    queue.update("r", "t0", upd("progress", progress=0.5))
    assert queue.get_task("r", "t0").progress == 0.5
    clock.now += 3
    done = queue.update("r", "t0", upd("complete", result={"url": "x"}))
    assert done.status == "complete" and done.progress == 1.0 and done.result == {"url": "x"}
    stats = queue.stats()
    assert stats["byStatus"]["complete"] == 1 and stats["byStatus"]["pending"] == 2
    assert stats["waitSeconds"]["mean"] == 2.0
    assert stats["runSeconds"]["mean"] == 3.0
    assert queue.get_room("r").generated == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("setup", "action", "message"),
    [
        ([], "complete", "'pending' -> 'complete'"),
        ([], "progress", "'pending' -> 'processing'"),
        (["claim"], "claim", "'processing' -> 'processing'"),
        (["claim", "complete"], "requeue", "'complete' -> 'pending'"),
        (["claim", "complete"], "fail", "'complete' -> 'failed'"),
    ],
)
def test_illegal_transitions_name_both_states(
    queue: QueueManager, setup: list[str], action: str, message: str
) -> None:
    queue.add("r", new("t"))
    for step in setup:
        queue.update("r", "t", upd(step))
    with pytest.raises(InvalidTransition) as info:
        queue.update("r", "t", upd(action, progress=0.1))
    assert message in str(info.value)


def test_cancel_pending_and_processing_only(queue: QueueManager) -> None:
    queue.add("r", new("a"))
    queue.add("r", new("b"))
    queue.update("r", "b", upd("claim"))
    assert queue.cancel("r", "a").status == "cancelled"
    assert queue.cancel("r", "b").status == "cancelled"
    with pytest.raises(InvalidTransition):
        queue.cancel("r", "a")


def test_worker_mismatch_is_a_conflict(queue: QueueManager) -> None:
    queue.add("r", new("t"))
    queue.update("r", "t", upd("claim", worker="w1"))
    with pytest.raises(Conflict, match="claimed by 'w1'"):
        queue.update("r", "t", upd("complete", worker="w2"))


def test_unknown_task(queue: QueueManager) -> None:
    with pytest.raises(NotFound):
        queue.update("r", "nope", upd("claim"))


def test_lease_expiry_requeues_at_old_position(queue: QueueManager, clock: Clock) -> None:
    for i in range(3):
        queue.add("r", new(f"t{i}"))
    queue.update("r", "t0", upd("claim"))
    queue.update("r", "t1", upd("claim"))
    clock.now += 5
    queue.update("r", "t1", upd("progress", progress=0.3))  # t1 keeps its lease alive
    clock.now += 6
    expired = queue.expire_leases()
    assert [t.id for t in expired] == ["t0"]
    t0 = queue.get_task("r", "t0")
    assert t0.status == "pending" and t0.claimed_by is None and t0.requeues == 1
    assert queue.position(t0) == 1  # ahead of t2, as before it was claimed
    assert queue.get_task("r", "t1").status == "processing"
    assert queue.stats()["requeues"] == 1


def test_sweep_prunes_finished_tasks_of_idle_rooms_only(queue: QueueManager, clock: Clock) -> None:
    queue.add("idle", new("done"))
    queue.add("idle", new("waiting"))
    queue.update("idle", "done", upd("claim"))
    queue.update("idle", "done", upd("complete"))
    queue.add("gone", new("x"))
    queue.cancel("gone", "x")
    clock.now += 25 * 3600
    queue.add("busy", new("b"))
    queue.update("busy", "b", upd("claim"))
    queue.update("busy", "b", upd("complete"))
    assert queue.sweep(retention_hours=24) == 2
    assert [t["id"] for t in queue.list_tasks("idle")] == ["waiting"]
    assert queue.get_room("gone") is None
    assert [t["id"] for t in queue.list_tasks("busy")] == ["b"]
    assert queue.get_room("idle").generated == 1  # type: ignore[union-attr]


async def test_state_survives_reload(queue: QueueManager, stores: Stores) -> None:
    for i in range(10):
        queue.add("r", new(f"t{i}", n=i))
    queue.update("r", "t3", upd("claim"))
    queue.update("r", "t3", upd("fail", error="oom"))
    queue.update("r", "t3", upd("requeue"))
    queue.cancel("r", "t5")
    queue.set_helper_joined("r", True)
    await queue.flush()
    before = queue.list_tasks("r")
    await queue.store.close()
    again = await stores.queue()
    assert again.list_tasks("r") == before
    assert again.helper_rooms() == ["r"]
    assert again.stats()["requeues"] == 1


# -- a failed commit puts memory back (p2pdiff/tasks/journal.py) ---------------------------------------

ROOM_IDS = st.sampled_from(["a", "b", "default"])
TASK_IDS = st.sampled_from(["t1", "t2", "t3"])
PEERS = st.sampled_from(["p1", "p2"])
CHANGES = st.one_of(
    st.tuples(
        st.just("add"), ROOM_IDS, TASK_IDS | st.none(), st.sampled_from(["x", "y"]), st.booleans(), PEERS
    ),
    st.tuples(st.just("add_unplaced"), TASK_IDS, st.sampled_from(["x", "y"]), st.booleans(), PEERS),
    st.tuples(
        st.just("update"),
        ROOM_IDS,
        TASK_IDS,
        st.sampled_from(["claim", "progress", "complete", "fail", "requeue"]),
        PEERS,
    ),
    st.tuples(st.just("cancel"), ROOM_IDS, TASK_IDS),
    st.tuples(st.just("from_peer"), ROOM_IDS, TASK_IDS, st.sampled_from(STATUSES), PEERS, st.booleans()),
    st.tuples(st.just("worker_progress"), ROOM_IDS, TASK_IDS, PEERS),
    st.tuples(st.just("worker_complete"), ROOM_IDS, TASK_IDS, PEERS),
    st.tuples(st.just("attach"), ROOM_IDS, TASK_IDS, PEERS),
    st.tuples(st.just("expire")),
    st.tuples(st.just("sweep")),
    st.tuples(st.just("join"), ROOM_IDS, st.booleans()),
    st.tuples(
        st.just("helper_options"), ROOM_IDS, st.sampled_from([None, "0.22"]), st.sampled_from([None, True])
    ),
    st.tuples(st.just("tick"), st.sampled_from([1, 20, 30 * 3600])),
)
# Commits interleaved with the changes, half of them failing.
STEPS = st.one_of(CHANGES, CHANGES, st.tuples(st.just("commit"), st.booleans()))


def change(queue: QueueManager, op: tuple[Any, ...]) -> None:
    kind, *args = op
    if kind == "add":
        room, tid, prompt, with_options, peer = args
        options = {"steps": 4} if with_options else {}
        queue.add(room, NewTask(tid, prompt, options, {"createdBy": peer}, None))
    elif kind == "add_unplaced":
        tid, prompt, with_options, peer = args
        queue.add_unplaced(
            NewTask(tid, prompt, {"steps": 4} if with_options else {}, {"createdBy": peer}, None),
            queue.helper_rooms(),
        )
    elif kind == "update":
        room, tid, action, peer = args
        queue.update(room, tid, upd(action, peer, progress=0.5 if action == "progress" else None))
    elif kind == "cancel":
        queue.cancel(*args)
    elif kind == "from_peer":
        room, tid, status, peer, named = args  # a peer may announce a task as processing by nobody
        new = NewTask(tid, "x", {}, {"createdBy": peer}, None)
        queue.upsert_from_peer(room, new, status, peer if named else None, sender=peer)
    elif kind == "worker_progress":
        queue.worker_progress(*args, 0.5)
    elif kind == "worker_complete":
        queue.worker_complete(*args, {"data": "r"})
    elif kind == "attach":
        queue.attach_result(*args, {"image": {"path": "x"}})
    elif kind == "expire":
        queue.expire_leases()
    elif kind == "sweep":
        queue.sweep(24)
    elif kind == "join":
        queue.set_helper_joined(*args)
    elif kind == "helper_options":
        room, wire, dispatch = args
        queue.set_helper_options(room, wire=wire, dispatch=dispatch)


def image(queue: QueueManager) -> Any:
    """Everything a restart would see of the queue (rooms that hold nothing and were never saved
    are left out: they exist in memory only until something happens in them)."""
    rooms = {}
    for room in queue.rooms.values():
        held = Counter(t.status for t in room.tasks.values())
        assert {s: room.counts[s] for s in STATUSES} == {s: held[s] for s in STATUSES}
        fields = (
            room.generated,
            room.last_activity,
            room.helper_joined,
            room.helper_wire,
            room.helper_dispatch,
        )
        if room.tasks or fields != (0, 0, False, None, None):
            rooms[room.id] = (fields, queue.list_tasks(room.id))
    return rooms, queue.requeues


def deny_writes(action: int, *_: Any) -> int:
    """An authorizer that makes every write fail the way a failing disk does (a refused statement)."""
    return (
        sqlite3.SQLITE_DENY
        if action in (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE)
        else 0
    )


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    setup=st.lists(CHANGES, min_size=3, max_size=30),
    steps=st.lists(STEPS, max_size=30),
    last=st.lists(CHANGES, min_size=1, max_size=3),
)
# Paths random lists seldom take: an empty idle room dropped by retention, a result attached.
@example(setup=[("join", "a", True), ("join", "a", False)], steps=[], last=[("tick", 30 * 3600), ("sweep",)])
@example(
    setup=[("add", "a", "t1", "x", True, "p1"), ("update", "a", "t1", "claim", "p1")],
    steps=[("update", "a", "t1", "complete", "p1")],
    last=[("attach", "a", "t1", "p1")],
)
async def test_after_any_changes_a_failed_commit_leaves_memory_as_on_disk(
    setup: list[tuple[Any, ...]], steps: list[tuple[Any, ...]], last: list[tuple[Any, ...]]
) -> None:
    """Committed state, then any changes and commits (half of them failing), then a few changes
    right after a commit that meet a failing one: after each commit memory is what a restart
    would load."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "q.sqlite3"
        store = SqliteStore(path, synchronous="off", clock=(store_clock := Clock()))
        await store.open()
        queue = QueueManager(store, lease_seconds=10, clock=Clock())
        failed = 0
        for op in [*setup, ("commit", False), *steps, ("commit", False), *last, ("commit", True)]:
            if op[0] == "tick":
                queue.clock.now += op[1]  # type: ignore[attr-defined]
            elif op[0] != "commit":
                with contextlib.suppress(Conflict, InvalidTransition, NotFound):
                    change(queue, op)
                continue
            fail, dirty = op[1], store.dirty
            if fail:
                store.db.set_authorizer(deny_writes)
            try:
                await queue.flush()
            except Unavailable as exc:
                assert fail and dirty and exc.code == "store_unavailable"
                failed += 1
            else:
                assert not (fail and dirty)
            store.db.set_authorizer(None)
            store_clock.now += 10  # past the back-off
            assert image(queue) == image(await on_disk(path))
        event(f"failed commits: {min(failed, 3)}{'+' if failed > 3 else ''}")
        assert queue.rollbacks == failed
        await store.close()
