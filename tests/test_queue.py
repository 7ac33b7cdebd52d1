"""QueueManager tested directly: no HTTP, a fake clock, a real SQLite store in a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pdiff.errors import Conflict, InvalidTransition, NotFound
from p2pdiff.queue import QueueManager
from p2pdiff.store import Store
from p2pdiff.validate import NewTask, TaskUpdate


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(tmp_path: Path, clock: Clock) -> QueueManager:
    store = Store(tmp_path / "q.sqlite3")
    store.open()
    q = QueueManager(store, lease_seconds=10, clock=clock)
    q.load()
    return q


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


async def test_state_survives_reload(queue: QueueManager, tmp_path: Path) -> None:
    for i in range(10):
        queue.add("r", new(f"t{i}", n=i))
    queue.update("r", "t3", upd("claim"))
    queue.update("r", "t3", upd("fail", error="oom"))
    queue.update("r", "t3", upd("requeue"))
    queue.cancel("r", "t5")
    queue.set_helper_joined("r", True)
    await queue.flush()
    before = queue.list_tasks("r")
    queue.store.close()
    store = Store(tmp_path / "q.sqlite3")
    store.open()
    again = QueueManager(store, lease_seconds=10)
    again.load()
    assert again.list_tasks("r") == before
    assert again.helper_rooms() == ["r"]
    assert again.stats()["requeues"] == 1
