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

Shared stores. A store several p2pdiff processes use at once (``pg_store.PgStore``, one database
behind several nodes) also keeps memory in step with the others:
- a change may only be made while ``accepts_changes`` is true; ``await begin()`` waits for that (the
  node holds the cluster's write turn and memory is caught up), so no two nodes decide on the same
  rows at once;
- ``await sync()`` is a read barrier: what other nodes committed before it was called is in memory
  when it returns;
- ``on_remote(Remote)`` hands the queue the rows other nodes changed (never while memory holds a
  change of this node's that is not committed);
- ``claim_job(name, every)`` says whether this node runs a periodic job now (once per period in the
  cluster, not once per node).
A store only this process writes (``LocalStore``: SQLite, the tests' memory store) always accepts
changes and has nothing to catch up with.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

from p2pdiff.tasks.model import Room, Task

# The REST error codes of a failed commit (README "Error codes").
STORE_BUSY = "store_busy"  # another program holds the database's write lock
STORE_UNAVAILABLE = "store_unavailable"  # the database refused the write (disk full, read-only, I/O error)
# Changes made outside a write turn met another node's changes (shared stores only): try again.
STORE_CONFLICT = "store_conflict"

BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 5.0

log = logging.getLogger(__name__)


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


@dataclass(slots=True)
class Remote:
    """Rows other nodes committed since memory last caught up (None: deleted); ``full`` instead
    when this node fell too far behind for single rows and must reload everything."""

    rooms: dict[str, Room | None] = field(default_factory=dict)
    tasks: dict[tuple[str, str], Task | None] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    full: Stored | None = None

    def __bool__(self) -> bool:
        return bool(self.rooms or self.tasks or self.counters or self.full)


class CommitBackoff:
    """A store's answer to failing commits: after one fails, changes are refused at once (a
    StoreFault with ``retry_after``) for a back-off of 1 s, doubling to 5 s while commits keep
    failing, instead of trying again for every request; the first commit after it tries again.
    So a failing database costs one attempt per back-off, not one per request."""

    def __init__(self, where: str, clock: Callable[[], float]) -> None:
        self.where = where
        self.clock = clock
        self._fault: StoreFault | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self.failures: Counter[str] = Counter()  # failed commit attempts by code
        self.refused = 0  # changes refused at once during a back-off
        self.busy_retries = 0  # attempts repeated because another program held the write lock

    def fault(self) -> StoreFault | None:
        """The fault to answer with while backing off, else None."""
        if self._fault is None:
            return None
        wait = self._retry_at - self.clock()
        if wait <= 0:
            return None
        return StoreFault(str(self._fault), self._fault.code, wait)

    def wait(self) -> float:
        fault = self.fault()
        return 0.0 if fault is None else fault.retry_after

    def check(self) -> None:
        """Raise the back-off's fault (and count the refusal) while backing off."""
        fault = self.fault()
        if fault is not None:
            self.refused += 1
            raise fault

    def refuse(self) -> StoreFault | None:
        """The back-off's fault for a commit that is not even tried (counted), else None."""
        fault = self.fault()
        if fault is not None:
            self.refused += 1
        return fault

    def fail(self, message: str, code: str) -> StoreFault:
        """A commit attempt failed: the fault for it; starts or lengthens the back-off."""
        self.failures[code] += 1
        self._backoff = min(BACKOFF_MAX_SECONDS, self._backoff * 2 or BACKOFF_FIRST_SECONDS)
        self._retry_at = self.clock() + self._backoff
        fault = StoreFault(message, code, self._backoff)
        if self._fault is None:
            log.error("%s; changes are refused (503 %s) until a commit works again", fault, code)
        else:
            log.warning("%s; still failing, next try in %.0f s", fault, self._backoff)
        self._fault = fault
        return fault

    def succeeded(self) -> None:
        """A commit worked: the back-off is over."""
        if self._fault is not None:
            log.warning("store %s: commits work again", self.where)
            self.clear()

    def clear(self) -> None:
        self._fault = None
        self._backoff = 0.0

    def stats(self, commits: int) -> StoreStats:
        backoff = self.fault()
        return {
            "commits": commits,
            "failures": {code: self.failures[code] for code in (STORE_BUSY, STORE_UNAVAILABLE)},
            "refused": self.refused,
            "busyRetries": self.busy_retries,
            # The last commit's fault until one works again; retryAfter: seconds left of the back-off.
            "failing": None if self._fault is None else self._fault.code,
            "retryAfter": 0 if backoff is None else round(backoff.retry_after, 3),
        }


class TaskStore(Protocol):
    """A durable home for the queue's rooms, tasks and counters, with group commit."""

    # Set by the queue; see the module docstring for when each runs.
    on_commit: Callable[[], None] | None
    on_rollback: Callable[[StoreFault], None] | None
    on_remote: Callable[[Remote], None] | None

    @property
    def accepts_changes(self) -> bool:
        """Whether a change made now is allowed (a shared store: inside this node's write turn)."""
        ...

    async def begin(self) -> None:
        """Wait until ``accepts_changes``: on a shared store, hold the write turn, caught up."""
        ...

    async def sync(self) -> None:
        """Bring memory up to what other nodes committed before this call (on_remote)."""
        ...

    async def claim_job(self, name: str, every_seconds: float) -> bool:
        """Whether this process runs the periodic job ``name`` now (one node per period)."""
        ...

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


class LocalStore:
    """The shared-store part of TaskStore for a store only this process writes: changes are always
    allowed, there is nothing to catch up with, and every periodic job is this process's."""

    on_remote: Callable[[Remote], None] | None = None

    @property
    def accepts_changes(self) -> bool:
        return True

    async def begin(self) -> None:
        """Nothing to wait for: nobody else writes."""

    async def sync(self) -> None:
        """Nothing to catch up with: nobody else writes."""

    async def claim_job(self, name: str, every_seconds: float) -> bool:
        return True
