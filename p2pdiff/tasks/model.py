"""The queue's data: tasks, rooms and the statuses a task can have.

Plain data with no behaviour beyond rendering and counting, shared by the queue (which alone changes
it, queue.py), its undo journal (journal.py) and the stores that persist it (store.py), so none of
them imports another to know what a task is.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

PENDING, PROCESSING, COMPLETE, FAILED, CANCELLED = "pending", "processing", "complete", "failed", "cancelled"
STATUSES = (PENDING, PROCESSING, COMPLETE, FAILED, CANCELLED)
FINISHED = frozenset({COMPLETE, FAILED, CANCELLED})


@dataclass(slots=True)
class Task:
    room_id: str
    id: str
    seq: int
    prompt: str
    options: dict[str, Any]
    extra: dict[str, Any]
    status: str
    created_at: int
    queued_at: int
    updated_at: int
    claimed_by: str | None = None
    claimed_at: int | None = None
    finished_at: int | None = None
    progress: float = 0.0
    result: Any = None
    error: str | None = None
    requeues: int = 0

    def to_json(self, position: int | None = None) -> dict[str, Any]:
        data = dict(self.extra)
        data.update(
            id=self.id,
            roomId=self.room_id,
            prompt=self.prompt,
            options=self.options,
            status=self.status,
            createdAt=self.created_at,
            queuedAt=self.queued_at,
            updatedAt=self.updated_at,
            claimedBy=self.claimed_by,
            claimedAt=self.claimed_at,
            finishedAt=self.finished_at,
            progress=self.progress,
            result=self.result,
            error=self.error,
            requeues=self.requeues,
        )
        if position is not None:
            data["position"] = position
        return data


@dataclass(slots=True)
class Room:
    id: str
    generated: int = 0
    last_activity: int = 0
    helper_joined: bool = False
    # The Trystero wire the helper was asked to use here, and whether it hands out the room's
    # tasks (None: the [p2p] defaults).
    helper_wire: str | None = None
    helper_dispatch: bool | None = None
    # Insertion order is queue order: tasks are created in seq order and never re-inserted.
    tasks: dict[str, Task] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    # Moves on every change of the room or its tasks (rollbacks too, see journal.py): a rendering
    # of this room object made at one version is current while the version stands (rest/api.py
    # caches listings by it).
    version: int = 0

    def position(self, task: Task) -> int | None:
        if task.status != PENDING:
            return None
        pos = 0
        for other in self.tasks.values():
            if other.status == PENDING:
                pos += 1
                if other is task:
                    return pos
        return None

    def stats(self) -> dict[str, Any]:
        return {
            "queueLength": self.counts[PENDING],
            "generated": self.generated,
            "lastActivity": self.last_activity,
            "tasks": self.counts[PENDING] + self.counts[PROCESSING] + sum(self.counts[s] for s in FINISHED),
            "byStatus": {s: self.counts[s] for s in STATUSES},
            "helperJoined": self.helper_joined,
        }
