"""A TaskStore in memory whose commits fail when a test says so: the store interface with nothing of
SQLite behind it, so tests show the queue needs no more than ``p2pdiff.tasks.store`` promises."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from p2pdiff.tasks.model import Room, Task
from p2pdiff.tasks.store import STORE_UNAVAILABLE, LocalStore, Stored, StoreFault, StoreStats


class MemoryStore(LocalStore):
    def __init__(self, *, load_suspends: bool = False) -> None:
        self.on_commit: Callable[[], None] | None = None
        self.on_rollback: Callable[[StoreFault], None] | None = None
        # What a restart would load; staged changes replace entries (None: deleted) on commit.
        self.rooms: dict[str, Room] = {}
        self.tasks: dict[tuple[str, str], Task] = {}
        self.counters: dict[str, int] = {}
        self._staged_rooms: dict[str, Room | None] = {}
        self._staged_tasks: dict[tuple[str, str], Task | None] = {}
        self._staged_counters: dict[str, int] = {}
        self._pending: asyncio.Future[None] | None = None
        # Like a network database: load() gives the loop away before it answers.
        self.load_suspends = load_suspends
        self.fail_next: StoreFault | None = None  # the fault the next commit meets
        self.refusing: StoreFault | None = None  # what check_writable raises
        self.commits = 0
        self.refused = 0
        self.failures: dict[str, int] = {}

    def connection(self) -> MemoryStore:
        """Another connection to the same data, as a restarted process opens one."""
        other = MemoryStore()
        other.rooms, other.tasks, other.counters = self.rooms, self.tasks, self.counters
        return other

    @property
    def location(self) -> str:
        return "memory"

    async def open(self) -> None:
        """Nothing to connect to: memory is there."""

    async def load(self) -> Stored:
        if self.load_suspends:
            await asyncio.sleep(0.01)  # a round trip
        # Copies: the queue changes its objects in place, the store's stay as committed.
        rooms = [replace(room, tasks={}) for room in self.rooms.values()]
        tasks = sorted((copy.copy(task) for task in self.tasks.values()), key=lambda task: task.seq)
        return Stored(rooms, tasks, dict(self.counters))

    def save_task(self, task: Task) -> None:
        self._staged_tasks[(task.room_id, task.id)] = copy.copy(task)

    def save_room(self, room: Room) -> None:
        self._staged_rooms[room.id] = replace(room, tasks={})

    def save_counter(self, name: str, value: int) -> None:
        self._staged_counters[name] = value

    def delete_tasks(self, room_id: str, task_ids: list[str]) -> None:
        for task_id in task_ids:
            self._staged_tasks[(room_id, task_id)] = None

    def delete_room(self, room_id: str) -> None:
        self._staged_rooms[room_id] = None

    @property
    def dirty(self) -> bool:
        return bool(self._staged_rooms or self._staged_tasks or self._staged_counters)

    async def commit(self) -> None:
        if self._pending is None:
            if not self.dirty:
                return
            loop = asyncio.get_running_loop()
            self._pending = loop.create_future()
            loop.call_soon(self._end_commit)  # callers of this loop turn share the commit
        await asyncio.shield(self._pending)

    def _end_commit(self) -> None:
        future, self._pending = self._pending, None
        assert future is not None
        fault, self.fail_next = self.fail_next, None
        if fault is None:
            _apply(self.rooms, self._staged_rooms)
            _apply(self.tasks, self._staged_tasks)
            self.counters.update(self._staged_counters)
            self.commits += 1
        else:
            self.failures[fault.code] = self.failures.get(fault.code, 0) + 1
        self._staged_rooms.clear()
        self._staged_tasks.clear()
        self._staged_counters.clear()
        # The listener first, then the waiters (the interface's promise).
        if fault is None:
            if self.on_commit is not None:
                self.on_commit()
            future.set_result(None)
        else:
            if self.on_rollback is not None:
                self.on_rollback(fault)
            future.set_exception(fault)

    def check_writable(self) -> None:
        if self.refusing is not None:
            self.refused += 1
            raise self.refusing

    def stats(self) -> StoreStats:
        return {
            "commits": self.commits,
            "failures": dict(self.failures),
            "refused": self.refused,
            "busyRetries": 0,
            "failing": None if self.refusing is None else self.refusing.code,
            "retryAfter": 0 if self.refusing is None else self.refusing.retry_after,
        }

    async def close(self) -> None:
        await self.commit()


def _apply(committed: dict[Any, Any], staged: dict[Any, Any]) -> None:
    for key, value in staged.items():
        if value is None:
            committed.pop(key, None)
        else:
            committed[key] = value


def unavailable(message: str = "the disk is full") -> StoreFault:
    return StoreFault(message, STORE_UNAVAILABLE, 1.0)
