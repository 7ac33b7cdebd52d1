"""The task store's interface: what the queue needs from a database, and the errors a store reports.

The queue (queue.py) keeps every room and task in memory and depends on this interface only; the
app factory chooses the backend (today ``sqlite_store.SqliteStore``). A backend is a new module
that implements ``TaskStore``; the queue and its state machine stay as they are.

The contract, which the queue's rollback relies on:

- ``load()`` returns everything stored, tasks in queue order (``seq``); damage it finds raises
  ``StoreCorrupt`` naming what is damaged and the fix.
- ``save_*`` and ``delete_*`` only stage a change (the newest per task, room and counter wins) and
  never block; ``commit()`` makes all staged changes durable in one transaction. Callers that
  commit while a commit is pending share it (group commit). A cancelled caller must not cancel
  the commit others wait on.
- Exactly one listener runs when a commit ends, before any of its waiters resumes: ``on_commit()``
  when it is durable, ``on_rollback(fault)`` when nothing of it is (the queue then puts memory
  back as it was at the last commit), after which every waiter gets that ``StoreFault``.
- ``check_writable()`` raises the ``StoreFault`` a change would meet now (a store that backs off
  after failures), so a change can be refused before it is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

from p2pdiff.tasks.model import Room, Task

# The REST error codes of a failed commit (README "Error codes").
STORE_BUSY = "store_busy"  # another program holds the database's write lock
STORE_UNAVAILABLE = "store_unavailable"  # the database refused the write (disk full, read-only, I/O error)


class StoreError(Exception):
    """The database could not be opened, migrated, read or written."""


class StoreFault(StoreError):
    """A commit failed and nothing of it is durable, or the store is backing off after one."""

    def __init__(self, message: str, code: str, retry_after: float) -> None:
        super().__init__(message)
        self.code = code  # STORE_BUSY or STORE_UNAVAILABLE
        self.retry_after = retry_after  # seconds until a change is worth trying again


@dataclass(frozen=True, slots=True)
class Damage:
    """One problem found in the database or its rows."""

    where: str  # "table tasks, row room_id=... id=... (rowid 7)", or the file
    problem: str
    table: str | None = None
    rowid: int | None = None

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


class StoreCorrupt(StoreError):
    """The database or a row in it is damaged: one line with the problem and the fix."""

    def __init__(self, damage: Damage, fix: str) -> None:
        super().__init__(f"{damage}; {fix}")
        self.damage = damage


@dataclass(slots=True)
class Stored:
    """Everything a store holds, as ``TaskStore.load`` returns it."""

    rooms: list[Room]  # without their tasks
    tasks: list[Task]  # in queue order (seq)
    counters: dict[str, int] = field(default_factory=dict)


class StoreStats(TypedDict):
    """What ``GET /api/stats`` and ``/metrics`` report of the store."""

    commits: int
    failures: dict[str, int]  # failed commit attempts by code (STORE_BUSY, STORE_UNAVAILABLE)
    refused: int  # changes refused at once while the store backed off
    busyRetries: int  # attempts repeated because another program held the write lock
    failing: str | None  # the last commit's fault code until one works again
    retryAfter: float  # seconds left of the back-off


class TaskStore(Protocol):
    """A durable home for the queue's rooms, tasks and counters, with group commit."""

    # Set by the queue; see the module docstring for when each runs.
    on_commit: Callable[[], None] | None
    on_rollback: Callable[[StoreFault], None] | None

    @property
    def location(self) -> str:
        """Where the data is (a file, a database without its credentials), for logs."""
        ...

    async def open(self) -> None:
        """Connect and bring the schema up to date (StoreError, StoreCorrupt)."""
        ...

    async def load(self) -> Stored:
        """Everything stored, checked: the first damaged row raises StoreCorrupt."""
        ...

    def save_task(self, task: Task) -> None: ...

    def save_room(self, room: Room) -> None: ...

    def save_counter(self, name: str, value: int) -> None: ...

    def delete_tasks(self, room_id: str, task_ids: list[str]) -> None: ...

    def delete_room(self, room_id: str) -> None: ...

    async def commit(self) -> None:
        """Make every staged change durable; StoreFault when nothing of it is."""
        ...

    def check_writable(self) -> None:
        """Raise the StoreFault a change would meet now (counted as refused), else nothing."""
        ...

    def stats(self) -> StoreStats: ...

    async def close(self) -> None:
        """Commit what is staged (the last commit, at shutdown) and disconnect."""
        ...
