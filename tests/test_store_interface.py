"""The queue on a store that is not SQLite (tests/memory_store.py): what the TaskStore interface
promises is all the queue needs, so another backend is a new module, not an edit of the queue."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from p2pdiff.errors import Unavailable
from p2pdiff.tasks.journal import Journal
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.validate import NewTask, TaskUpdate
from tests.memory_store import MemoryStore, unavailable


def new(tid: str) -> NewTask:
    return NewTask(id=tid, prompt="p", options={}, extra={}, created_at=None)


async def restarted(store: MemoryStore) -> QueueManager:
    queue = QueueManager(store.connection(), lease_seconds=10)
    await queue.load()
    return queue


def image(queue: QueueManager) -> dict[str, Any]:
    return {
        "rooms": {room_id: queue.list_tasks(room_id) for room_id in sorted(queue.rooms)},
        "helperRooms": queue.helper_rooms(),
        "requeues": queue.stats()["requeues"],
    }


async def test_the_queue_keeps_its_state_in_any_task_store() -> None:
    store = MemoryStore()
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    await queue.load()

    async def add(tid: str) -> None:
        queue.add("r", new(tid))
        await queue.flush()

    await asyncio.gather(*(add(f"t{i}") for i in range(3)))
    assert store.commits == 1  # one group commit for the callers of one loop turn
    queue.update("r", "t0", TaskUpdate("claim", "w", None, None, None))
    queue.update("r", "t0", TaskUpdate("requeue", "w", None, None, None))
    queue.update("r", "t1", TaskUpdate("claim", "w", None, None, None))
    queue.update("r", "t1", TaskUpdate("complete", "w", None, {"data": "x"}, None))
    queue.set_helper_joined("lobby", True)
    queue.set_helper_options("lobby", wire="0.22", dispatch=False)
    await queue.flush()
    again = await restarted(store)
    assert image(again) == image(queue) and again.stats()["requeues"] == 1
    lobby = again.get_room("lobby")
    assert lobby is not None and (lobby.helper_wire, lobby.helper_dispatch) == ("0.22", False)
    await store.close()


async def test_a_failed_commit_of_any_store_puts_memory_back_and_answers_503() -> None:
    store = MemoryStore()
    events: list[tuple[str, Any]] = []
    queue = QueueManager(store, lease_seconds=10, publish=lambda t, r, d, origin: events.append((t, d)))
    await queue.load()
    queue.add("r", new("kept"))
    await queue.flush()
    committed = image(queue)
    store.fail_next = unavailable()
    queue.add("r", new("lost"))
    queue.update("r", "kept", TaskUpdate("claim", "w", None, None, None))
    queue.add("other", new("lost too"))
    with pytest.raises(Unavailable) as info:
        await queue.flush()
    assert (info.value.code, info.value.retry_after) == ("store_unavailable", 1.0)
    assert image(queue) == committed == image(await restarted(store)) and queue.rollbacks == 1
    assert events[-1] == ("queue.reloaded", {"reason": "store_unavailable", "rooms": ["other", "r"]})


async def test_a_store_that_refuses_changes_refuses_them_before_they_are_made() -> None:
    store = MemoryStore()
    queue = QueueManager(store, lease_seconds=10)
    store.refusing = unavailable()
    with pytest.raises(Unavailable) as info:
        queue.check_writable()
    assert (info.value.code, info.value.retry_after) == ("store_unavailable", 1.0)
    assert store.stats()["failing"] == "store_unavailable" and store.refused == 1


async def test_a_reload_that_waits_for_the_store_ends_before_the_callers_hear(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the journal cannot put memory back, the queue reloads from the store; a network
    store's load gives the loop away, and flush() answers only once memory is reloaded."""
    store = MemoryStore(load_suspends=True)
    events: list[tuple[str, Any]] = []
    queue = QueueManager(store, lease_seconds=10, publish=lambda t, r, d, origin: events.append((t, d)))
    await queue.load()
    queue.add("r", new("kept"))
    await queue.flush()

    def broken(self: Journal, rooms: Any) -> list[str]:
        raise KeyError("a change the journal missed")

    monkeypatch.setattr(Journal, "rollback", broken)
    store.fail_next = unavailable()
    queue.add("r", new("lost"))
    queue.add("new-room", new("lost too"))
    with pytest.raises(Unavailable):
        await queue.flush()
    assert [t["id"] for t in queue.list_tasks("r")] == ["kept"] and queue.get_room("new-room") is None
    assert queue.rollbacks == 1
    assert events[-1] == ("queue.reloaded", {"reason": "store_unavailable", "rooms": ["r"]})
