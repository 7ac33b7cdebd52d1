"""The queue's undo journal: how the rooms and tasks changed since the last commit looked before.

The queue changes memory first and commits afterwards (group commit, see store.py). When a commit
fails, memory must go back to what is on disk. Reloading the whole store costs O(store) per failure;
this costs O(changes): before its first change since the last commit, each room and task is copied
(shallow: the queue replaces a task's dict fields, never edits them in place), and ``rollback`` puts
the copies back, returns tasks to the rooms and places they had, and forgets tasks and rooms created
since. Room objects and task objects keep their identity, so references held elsewhere stay valid.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import Any

from p2pdiff.tasks.model import Room, Task

# Room fields a rollback does not copy back: membership and counts are rebuilt from the tasks, and
# the version moves on (it only ever goes up, so nothing rendered before the rollback is current).
_ROOM_DERIVED = frozenset({"tasks", "counts", "version"})


class Journal:
    def __init__(self) -> None:
        # id(object) -> (the object, its state before the first change; None: created since).
        self._tasks: dict[int, tuple[Task, Task | None]] = {}
        self._rooms: dict[int, tuple[Room, dict[str, Any] | None]] = {}

    def __len__(self) -> int:
        return len(self._tasks) + len(self._rooms)

    def task(self, task: Task) -> None:
        """``task`` is about to change."""
        if id(task) not in self._tasks:
            self._tasks[id(task)] = (task, copy.copy(task))

    def room(self, room: Room) -> None:
        """``room``'s own fields (not its tasks) are about to change."""
        if id(room) not in self._rooms:
            state = {f.name: getattr(room, f.name) for f in fields(room) if f.name not in _ROOM_DERIVED}
            self._rooms[id(room)] = (room, state)

    def created_task(self, task: Task) -> None:
        self._tasks.setdefault(id(task), (task, None))

    def created_room(self, room: Room) -> None:
        self._rooms.setdefault(id(room), (room, None))

    def clear(self) -> None:
        """Everything so far is committed."""
        self._tasks.clear()
        self._rooms.clear()

    def rollback(self, rooms: dict[str, Room]) -> list[str]:
        """Put ``rooms`` (the queue's, changed in place) back as they were at the last commit;
        returns the ids of the rooms that changed (those created since, now gone, too)."""
        touched: dict[int, Room] = {}
        for room, state in self._rooms.values():
            touched[id(room)] = room
            if state is None:
                if rooms.get(room.id) is room:
                    del rooms[room.id]
                continue
            for name, value in state.items():
                setattr(room, name, value)
            rooms[room.id] = room  # back in place if it was dropped since (retention)
        unordered: dict[int, Room] = {}
        for task, before in self._tasks.values():
            holder = rooms.get(task.room_id)
            if holder is not None and holder.tasks.get(task.id) is task:
                holder.counts[task.status] -= 1
                touched[id(holder)] = holder
            else:
                holder = None
            if before is None:  # created since: forgotten
                if holder is not None:
                    del holder.tasks[task.id]
                continue
            moved = task.room_id != before.room_id or task.seq != before.seq
            for f in fields(task):
                setattr(task, f.name, getattr(before, f.name))
            # The room it was in at the last commit is in place again (rooms are noted before they
            # lose a task, and put back above).
            home = rooms[task.room_id]
            touched[id(home)] = home
            home.counts[task.status] += 1
            if holder is home and not moved:
                continue  # changed where it stands
            if holder is not None:
                del holder.tasks[task.id]
            home.tasks[task.id] = task
            unordered[id(home)] = home
        for room in unordered.values():
            # Insertion order is queue order (seq): put returned tasks back where they stood.
            room.tasks = dict(sorted(room.tasks.items(), key=lambda item: item[1].seq))
        for room in touched.values():
            room.version += 1
        self.clear()
        return sorted({room.id for room in touched.values()})
