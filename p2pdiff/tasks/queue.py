"""The task queue: rooms, tasks and the one state machine every caller (REST, peers) goes through.

Plain synchronous methods, no HTTP and no network. Each mutation hands its changed rows to the store
(any ``store.TaskStore``: the app chooses the backend); callers ``await queue.flush()`` to make them
durable before they answer anyone (a failed commit puts memory back as it was at the last one, see
journal.py).
On a store several nodes share (store.py, "Shared stores"), changes are made inside the node's write
turn: ``async with queue.writing()`` for callers that can wait, ``write_soon`` for synchronous ones
(a peer's message); ``await queue.sync()`` before a read that must see other nodes' changes.
Each state change is also handed to an injected ``publish`` callback (the event bus), so live views
see exactly the changes this module makes and nothing else has to know the rules; the methods that
change tasks take the caller's ``origin`` (``events.Origin``: the server, or a peer's message) and
publish it with the event.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from p2pdiff.errors import Conflict, InvalidTransition, NotFound, Unavailable
from p2pdiff.tasks import events, validate
from p2pdiff.tasks.journal import Journal
from p2pdiff.tasks.model import (
    CANCELLED,
    COMPLETE,
    FAILED,
    FINISHED,
    PENDING,
    PROCESSING,
    STATUSES,
    Room,
    Task,
)
from p2pdiff.tasks.store import STORE_BUSY, STORE_CONFLICT, Remote, Stored, StoreFault, TaskStore
from p2pdiff.tasks.validate import NewTask, TaskUpdate

# The whole state machine: (action, from) -> to. Nothing else may change a task's status.
TRANSITIONS: dict[tuple[str, str], str] = {
    ("claim", PENDING): PROCESSING,
    ("progress", PROCESSING): PROCESSING,
    ("complete", PROCESSING): COMPLETE,
    ("fail", PROCESSING): FAILED,
    ("requeue", PROCESSING): PENDING,
    ("requeue", FAILED): PENDING,
    ("cancel", PENDING): CANCELLED,
    ("cancel", PROCESSING): CANCELLED,
    ("expire", PROCESSING): PENDING,
}

log = logging.getLogger(__name__)

# Synchronous changes waiting for this node's write turn on a shared store (write_soon); past it
# they are dropped and counted, like a store fault (peers' messages are rate limited long before).
MAX_DEFERRED_CHANGES = 10_000

# Where each action means to take a task, for error messages that name both states.
ACTION_TARGET = {
    "claim": PROCESSING,
    "progress": PROCESSING,
    "complete": COMPLETE,
    "fail": FAILED,
    "requeue": PENDING,
    "cancel": CANCELLED,
    "expire": PENDING,
}

# The event each action publishes (requeue and lease expiry both announce a requeue, with a reason).
ACTION_EVENT = {
    "claim": events.TASK_CLAIMED,
    "progress": events.TASK_PROGRESS,
    "complete": events.TASK_COMPLETE,
    "fail": events.TASK_FAILED,
    "requeue": events.TASK_REQUEUED,
    "cancel": events.TASK_CANCELLED,
    "expire": events.TASK_REQUEUED,
}


def same_task(existing: Task, new: NewTask) -> bool:
    """Whether ``new`` describes ``existing``: the same prompt, and options that agree wherever both
    sides have some. An empty options object means "not given": the browser app's ``queue``
    message carries none, its POST of the same task carries them all."""
    return existing.prompt == new.prompt and (
        existing.options == new.options or not existing.options or not new.options
    )


def _author(task: Task) -> Any:
    return task.extra.get("createdBy")


def now_ms(clock: Callable[[], float]) -> int:
    return int(clock() * 1000)


def _unavailable(fault: StoreFault) -> Unavailable:
    """The REST answer to a store fault: 503 with a documented code and Retry-After."""
    if fault.code == STORE_BUSY:
        message = "the task store is busy (another program holds its write lock); nothing was changed"
    elif fault.code == STORE_CONFLICT:
        message = "another node changed the same tasks meanwhile; nothing was changed"
    else:
        message = "the task store cannot save changes (disk full or failing); nothing was changed"
    return Unavailable(f"{message}, try again", code=fault.code, retry_after=fault.retry_after)


@dataclass(slots=True)
class AddResult:
    task: Task
    position: int | None
    created: bool


def _percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, math.ceil(pct / 100 * len(ordered)) - 1)
    return ordered[rank]


def _timing(values: list[float]) -> dict[str, Any]:
    mean = sum(values) / len(values) if values else None
    p95 = _percentile(values, 95)
    return {
        "count": len(values),
        "mean": None if mean is None else round(mean, 3),
        "p95": None if p95 is None else round(p95, 3),
    }


class WriteTurn:
    """What ``QueueManager.writing()`` returns: waits for the store's write turn unless it accepts
    changes already (always, on a store only this process writes: nothing to wait for)."""

    __slots__ = ("store",)

    def __init__(self, store: TaskStore) -> None:
        self.store = store

    async def __aenter__(self) -> None:
        if self.store.accepts_changes:
            return
        try:
            await self.store.begin()
        except StoreFault as fault:
            raise _unavailable(fault) from None

    async def __aexit__(self, *exc: object) -> None:
        return None


class QueueManager:
    def __init__(
        self,
        store: TaskStore,
        *,
        lease_seconds: float,
        clock: Callable[[], float] = time.time,
        publish: events.Publish | None = None,
        default_room: str = "default",
    ) -> None:
        self.store = store
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.publish = publish
        # Where POST /api/queue puts a task that names no room ([server] default_room).
        self.default_room = default_room
        self.rooms: dict[str, Room] = {}
        self._seq = 0
        self.requeues = 0
        # Memory runs ahead of the disk until the next commit; a failed commit puts it back.
        self._journal = Journal()
        self._committed_requeues = 0
        self.rollbacks = 0
        # A reload after a rollback that could not put memory back; flush() callers wait for it.
        self._reloading: asyncio.Task[None] | None = None
        # write_soon's changes waiting for the write turn, oldest first, and the task running them.
        self._deferred: deque[Callable[[], None]] = deque()
        self._deferring: asyncio.Task[None] | None = None
        self.deferred_dropped = 0
        store.on_commit = self._committed
        store.on_rollback = self._rolled_back
        store.on_remote = self._apply_remote

    # -- loading and persistence -------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild memory from the store, in the stored queue order."""
        self._install(await self.store.load())

    def _install(self, stored: Stored) -> None:
        self.rooms.clear()
        for room in stored.rooms:
            self.rooms[room.id] = room
        for task in stored.tasks:
            room = self._room(task.room_id)
            room.tasks[task.id] = task
            room.counts[task.status] += 1
            self._seq = max(self._seq, task.seq)
        # A lifetime counter: pruning old tasks must not make it go down.
        self.requeues = self._committed_requeues = stored.counters.get("requeues", 0)
        self._journal.clear()

    async def flush(self) -> None:
        """Make every mutation so far durable (one group commit for all concurrent callers)."""
        try:
            await self.store.commit()
        except StoreFault as fault:
            # Memory is back at the last commit already (_rolled_back), or being reloaded: the
            # caller changed nothing.
            if self._reloading is not None:
                await asyncio.shield(self._reloading)
            raise _unavailable(fault) from None

    def writing(self) -> WriteTurn:
        """``async with queue.writing():`` changes made inside (synchronous calls, no await) are
        this node's to make: on a shared store it holds the write turn and memory is caught up.
        ``flush()`` after it as before."""
        return WriteTurn(self.store)

    def write_soon(self, change: Callable[[], None]) -> None:
        """Run ``change`` (synchronous queue calls, e.g. a peer's message) now if the store accepts
        changes and no earlier one waits; else in this node's next write turn, in order."""
        if not self._deferred and self.store.accepts_changes:
            change()
            return
        if len(self._deferred) >= MAX_DEFERRED_CHANGES:
            self.deferred_dropped += 1
            log.warning("queue: %d changes wait for the store already; dropping one", len(self._deferred))
            return
        self._deferred.append(change)
        if self._deferring is None or self._deferring.done():
            self._deferring = asyncio.get_running_loop().create_task(self._run_deferred())

    async def _run_deferred(self) -> None:
        while self._deferred:
            try:
                await self.store.begin()
            except Exception:  # the store is failing: its own log says why; try again shortly
                await asyncio.sleep(0.5)
                continue
            while self._deferred and self.store.accepts_changes:
                change = self._deferred.popleft()
                try:
                    change()
                except Exception:  # the caller's own error handling let it through: say so, go on
                    log.exception("queue: a deferred change failed")

    async def sync(self) -> None:
        """What other nodes committed before this call is in memory when it returns (a read
        barrier on a shared store; nothing to do on one only this process writes)."""
        await self.store.sync()

    def _apply_remote(self, remote: Remote) -> None:
        """Rows other nodes committed: memory takes them as they are (none of them is changed
        here and not yet committed; the store makes sure). Objects keep their identity."""
        if remote.full is not None:
            self._install(remote.full)
            self._emit(events.QUEUE_RELOADED, None, {"reason": "caught_up", "rooms": sorted(self.rooms)})
            return
        touched: dict[str, Room] = {}
        unordered: dict[str, Room] = {}
        for key, stored_task in remote.tasks.items():
            room_id, task_id = key
            room = self.rooms.get(room_id)
            task = room.tasks.get(task_id) if room is not None else None
            if task is not None:
                assert room is not None
                room.counts[task.status] -= 1
                touched[room_id] = room
                if stored_task is None:
                    del room.tasks[task_id]
                    continue
            if stored_task is None:
                continue
            if room is None:
                room = self.rooms[room_id] = Room(id=room_id)
            touched[room_id] = room
            if task is None:
                newest = next(reversed(room.tasks.values()), None)
                if newest is not None and newest.seq > stored_task.seq:
                    unordered[room_id] = room  # it belongs before tasks memory has: sort once
                room.tasks[task_id] = stored_task
            else:
                for name in Task.__slots__:
                    setattr(task, name, getattr(stored_task, name))
            room.counts[stored_task.status] += 1
            self._seq = max(self._seq, stored_task.seq)
        for room_id, stored_room in remote.rooms.items():
            room = self.rooms.get(room_id)
            if stored_room is None:
                if room is not None and not room.tasks:
                    del self.rooms[room_id]
                continue
            if room is None:
                room = self.rooms[room_id] = Room(id=room_id)
            room.generated, room.last_activity = stored_room.generated, stored_room.last_activity
            room.helper_joined = stored_room.helper_joined
            room.helper_wire, room.helper_dispatch = stored_room.helper_wire, stored_room.helper_dispatch
            touched[room_id] = room
        for room in unordered.values():  # insertion order is queue order (seq)
            room.tasks = dict(sorted(room.tasks.items(), key=lambda item: item[1].seq))
        for room in touched.values():
            room.version += 1
        if "requeues" in remote.counters:
            self.requeues = self._committed_requeues = remote.counters["requeues"]

    def check_writable(self) -> None:
        """Refuse a change up front (Unavailable) while the store backs off after a failed commit:
        cheaper than making it, failing to commit it and putting it back."""
        try:
            self.store.check_writable()
        except StoreFault as fault:
            raise _unavailable(fault) from None

    def _committed(self) -> None:
        self._journal.clear()
        self._committed_requeues = self.requeues

    def _rolled_back(self, fault: StoreFault) -> None:
        """The store could not commit: memory goes back to what is on disk (the journal, O(changes))."""
        self.requeues = self._committed_requeues
        self.rollbacks += 1
        try:
            rooms = self._journal.rollback(self.rooms)
        except Exception:  # a change the journal missed: memory half put back is worse than a reload
            log.exception("store fault: putting memory back failed; reloading the queue from the store")
            # The store reads asynchronously; the task starts before any waiter of this commit resumes.
            self._reloading = asyncio.get_running_loop().create_task(self._reload(fault))
            return
        log.info("store fault (%s): put %d rooms back as committed", fault.code, len(rooms))
        self._emit(events.QUEUE_RELOADED, None, {"reason": fault.code, "rooms": rooms})

    async def _reload(self, fault: StoreFault) -> None:
        try:
            await self.load()
        except Exception:  # nobody awaits this with a use for the error: say it here
            log.exception("store fault: reloading the queue failed; memory may differ from the store")
            return
        finally:
            self._reloading = None
        self._emit(events.QUEUE_RELOADED, None, {"reason": fault.code, "rooms": sorted(self.rooms)})

    def _changing(self, room: Room, task: Task | None = None) -> None:
        """Note ``room`` (and ``task``) as they are before a change, for ``_rolled_back``."""
        self._journal.room(room)
        if task is not None:
            self._journal.task(task)

    def _emit(
        self, type: str, room_id: str | None, data: dict[str, Any], origin: events.Origin = events.SERVER
    ) -> None:
        if self.publish is not None:
            self.publish(type, room_id, data, origin=origin)

    def _emit_task(
        self,
        action: str,
        task: Task,
        position: int | None = None,
        reason: str | None = None,
        origin: events.Origin = events.SERVER,
    ) -> None:
        data: dict[str, Any] = {"task": task.to_json(position)}
        if action in ("requeue", "expire"):
            data["reason"] = reason or ("lease_expired" if action == "expire" else "requeue")
        self._emit(ACTION_EVENT[action], task.room_id, data, origin)

    def _room(self, room_id: str) -> Room:
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = Room(id=room_id)
            self._journal.created_room(room)
        return room

    def _touch(self, room: Room, now: int) -> None:
        room.last_activity = now
        room.version += 1
        self.store.save_room(room)

    def _set_status(self, room: Room, task: Task, action: str, now: int) -> None:
        target = TRANSITIONS.get((action, task.status))
        if target is None:
            raise InvalidTransition(action, task.status, ACTION_TARGET[action])
        self._changing(room, task)
        if target != task.status:
            room.counts[task.status] -= 1
            room.counts[target] += 1
        if target == PENDING:
            task.claimed_by = None
            task.claimed_at = None
            task.progress = 0.0
            task.requeues += 1
            self.requeues += 1
            self.store.save_counter("requeues", self.requeues)
        elif target == PROCESSING and task.status == PENDING:
            task.claimed_at = now
            task.progress = 0.0
            task.error = None
        elif target in FINISHED:
            task.finished_at = now
            if target == COMPLETE:
                task.progress = 1.0
                room.generated += 1
        task.status = target
        task.updated_at = now

    # -- reads ----------------------------------------------------------------------------------

    def get_room(self, room_id: str) -> Room | None:
        return self.rooms.get(room_id)

    def get_task(self, room_id: str, task_id: str) -> Task:
        room = self.rooms.get(room_id)
        task = room.tasks.get(task_id) if room else None
        if task is None:
            raise NotFound(f"task '{task_id}' not found in room '{room_id}'", code="task_not_found")
        return task

    def position(self, task: Task) -> int | None:
        return self.rooms[task.room_id].position(task)

    def list_tasks(
        self, room_id: str, statuses: Iterable[str] | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        room = self.rooms.get(room_id)
        if room is None:
            return []
        wanted = None if statuses is None else frozenset(statuses)
        out: list[dict[str, Any]] = []
        pos = 0
        for task in room.tasks.values():
            if task.status == PENDING:
                pos += 1
            if wanted is not None and task.status not in wanted:
                continue
            out.append(task.to_json(pos if task.status == PENDING else None))
            if limit is not None and len(out) >= limit:
                break
        return out

    def stats(self) -> dict[str, Any]:
        by_status: Counter[str] = Counter()
        waits: list[float] = []
        runs: list[float] = []
        for room in self.rooms.values():
            by_status.update(room.counts)
            for task in room.tasks.values():
                if task.claimed_at is not None:
                    waits.append((task.claimed_at - task.queued_at) / 1000)
                    if task.status == COMPLETE and task.finished_at is not None:
                        runs.append((task.finished_at - task.claimed_at) / 1000)
        return {
            "byStatus": {s: by_status[s] for s in STATUSES},
            "totalQueued": by_status[PENDING],
            "requeues": self.requeues,
            "waitSeconds": _timing(waits),
            "runSeconds": _timing(runs),
        }

    def pending_tasks(self, room_id: str) -> Iterator[Task]:
        """A room's pending tasks in queue order (what the helper's dispatcher hands out)."""
        room = self.rooms.get(room_id)
        if room is None or not room.counts[PENDING]:
            return iter(())
        return (task for task in room.tasks.values() if task.status == PENDING)

    def has_processing(self) -> bool:
        """Whether any task is being worked on (and so could see its lease expire)."""
        return any(room.counts[PROCESSING] for room in self.rooms.values())

    def helper_rooms(self) -> list[str]:
        return [room.id for room in self.rooms.values() if room.helper_joined]

    # -- writes -----------------------------------------------------------------------------------

    def add(self, room_id: str, new: NewTask, *, origin: events.Origin = events.SERVER) -> AddResult:
        """Add a task, or return the existing one if the same id was already submitted."""
        validate.check_new_task(new)  # before anything changes: a refused task is never half-stored
        room = self._room(room_id)
        if new.id is not None and new.id in room.tasks:
            existing = room.tasks[new.id]
            if not same_task(existing, new):
                raise Conflict(
                    f"task '{new.id}' already exists in room '{room_id}' with a different prompt or options",
                    code="task_exists",
                )
            self._fill(room, existing, new, origin)
            return AddResult(existing, room.position(existing), created=False)
        now = now_ms(self.clock)
        self._seq += 1
        tid = new.id or f"task_{now}_{uuid.uuid4().hex[:12]}"
        task = Task(
            room_id=room_id,
            id=tid,
            seq=self._seq,
            prompt=new.prompt,
            options=new.options,
            extra=new.extra,
            status=PENDING,
            created_at=new.created_at if new.created_at is not None else now,
            queued_at=now,
            updated_at=now,
        )
        self._changing(room)
        self._journal.created_task(task)
        room.tasks[tid] = task
        room.counts[PENDING] += 1
        self._touch(room, now)
        self.store.save_task(task)
        self._emit(events.TASK_CREATED, room_id, {"task": task.to_json(room.counts[PENDING])}, origin)
        return AddResult(task, room.counts[PENDING], created=True)

    def add_unplaced(self, new: NewTask, helper_rooms: Iterable[str]) -> AddResult:
        """A task posted without a room (``POST /api/queue``). The browser app posts every task it
        has just announced to its room this way: when one of ``helper_rooms`` (the rooms the
        helper is in: a few, where the queue may hold tens of thousands) already holds a task
        with this id, prompt and author (``createdBy``), that task is the one meant, and the body
        fills what the room's ``queue`` message lacked (one id, one task). Anything else goes to
        the default room."""
        default = self.rooms.get(self.default_room)
        if new.id is not None and (default is None or new.id not in default.tasks):
            for room_id in helper_rooms:
                room = self.rooms.get(room_id)
                existing = room.tasks.get(new.id) if room is not None else None
                if existing is None or not same_task(existing, new):
                    continue
                if _author(existing) == new.extra.get("createdBy"):
                    assert room is not None
                    self._fill(room, existing, new)
                    return AddResult(existing, room.position(existing), created=False)
        return self.add(self.default_room, new)

    def _fill(self, room: Room, task: Task, new: NewTask, origin: events.Origin = events.SERVER) -> None:
        """Complete ``task`` with what another submission of it carries and it lacks (options,
        extra fields such as ``negativePrompt``); what it has already is never overwritten."""
        validate.check_new_task(new)
        options = new.options if not task.options and new.options else task.options
        extra = {k: v for k, v in new.extra.items() if k not in task.extra}
        if options is task.options and not extra:
            return
        self._changing(room, task)
        task.options = options
        task.extra = {**task.extra, **extra}
        now = now_ms(self.clock)
        task.updated_at = now
        self._touch(room, now)
        self.store.save_task(task)
        self._emit(events.TASK_UPDATED, room.id, {"task": task.to_json(room.position(task))}, origin)

    def _move(self, task: Task, to_room: str, origin: events.Origin) -> Task:
        """Move ``task`` (any state) to the end of ``to_room``'s queue, as one store transaction."""
        source = self.rooms[task.room_id]
        self._changing(source, task)
        del source.tasks[task.id]
        source.counts[task.status] -= 1
        self.store.delete_tasks(source.id, [task.id])
        now = now_ms(self.clock)
        self._touch(source, now)
        room = self._room(to_room)
        self._changing(room)
        self._seq += 1
        task.room_id, task.seq, task.updated_at = to_room, self._seq, now
        room.tasks[task.id] = task
        room.counts[task.status] += 1
        self._touch(room, now)
        self.store.save_task(task)
        data = {"task": task.to_json(room.position(task)), "fromRoom": source.id}
        self._emit(events.TASK_MOVED, to_room, data, origin)
        return task

    def update(
        self,
        room_id: str,
        task_id: str,
        update: TaskUpdate,
        *,
        reason: str | None = None,
        origin: events.Origin = events.SERVER,
    ) -> Task:
        """Apply one worker action. ``reason`` names why a requeue happened in its event (default
        ``requeue``; the helper says ``worker_left`` when a peer holding the task leaves)."""
        room = self.rooms.get(room_id)
        task = self.get_task(room_id, task_id)
        assert room is not None
        if (
            update.action != "claim"
            and task.status == PROCESSING
            and update.worker is not None
            and update.worker != task.claimed_by
        ):
            raise Conflict(
                f"task '{task_id}' is claimed by '{task.claimed_by}', not '{update.worker}'",
                code="worker_mismatch",
            )
        validate.check_update(update)
        now = now_ms(self.clock)
        self._set_status(room, task, update.action, now)
        if update.action == "claim":
            task.claimed_by = update.worker
        if update.progress is not None and task.status == PROCESSING:
            task.progress = update.progress
        if update.result is not None and task.status == COMPLETE:
            task.result = update.result
        if update.error is not None and task.status == FAILED:
            task.error = update.error
        self._touch(room, now)
        self.store.save_task(task)
        position = room.position(task) if task.status == PENDING else None
        self._emit_task(update.action, task, position, reason, origin)
        return task

    # -- writes on behalf of peers (the helper; see p2pdiff/rooms/agent.py) ------------------------
    # The same transitions as REST, through update()/cancel(): peers get no rule of their own.

    def upsert_from_peer(
        self,
        room_id: str,
        new: NewTask,
        status: str = PENDING,
        worker: str | None = None,
        *,
        sender: str | None = None,
        origin: events.Origin = events.SERVER,
    ) -> AddResult:
        """A task peer ``sender`` announced (the app's ``queue`` action). A new task is added and
        carried forward to the state the peer reports (claim, then complete/fail; or cancel). A
        task we know already is left alone: its state moves by progress and results, never
        backwards because an older snapshot says so. The same id with another prompt or options
        is a Conflict, as over REST. The sender's own task waiting in the default room (its POST
        came first) moves here."""
        room = self.rooms.get(room_id)
        existing = room.tasks.get(new.id) if room is not None and new.id is not None else None
        if existing is not None:
            if not same_task(existing, new):
                raise Conflict(
                    f"task '{new.id}' already exists in room '{room_id}' with a different prompt or options",
                    code="task_exists",
                )
            assert room is not None
            self._fill(room, existing, new, origin)
            return AddResult(existing, self.position(existing), created=False)
        default = self.rooms.get(self.default_room) if room_id != self.default_room else None
        parked = default.tasks.get(new.id) if default is not None and new.id is not None else None
        if parked is not None and same_task(parked, new) and sender is not None and _author(parked) == sender:
            # The app's POST without a room reached us before its `queue` message: the task
            # belongs here. It keeps the state it has (a REST worker may hold it already).
            task = self._move(parked, room_id, origin)
            self._fill(self.rooms[room_id], task, new, origin)
            return AddResult(task, self.position(task), created=True)
        added = self.add(room_id, new, origin=origin)
        task = added.task
        if status in (PROCESSING, COMPLETE, FAILED):
            self.update(room_id, task.id, TaskUpdate("claim", worker, None, None, None), origin=origin)
            if status == COMPLETE:
                self.update(room_id, task.id, TaskUpdate("complete", None, None, None, None), origin=origin)
            elif status == FAILED:
                failed = TaskUpdate("fail", None, None, None, "failed on a peer")
                self.update(room_id, task.id, failed, origin=origin)
        elif status == CANCELLED:
            self.cancel(room_id, task.id, origin=origin)
        return AddResult(task, self.position(task), created=True)

    def _adopt(self, task: Task, worker: str) -> None:
        # A processing task with no known worker (a peer announced it as processing without
        # naming one) belongs to the first worker that reports on it. Not a state change.
        if task.status == PROCESSING and task.claimed_by is None:
            room = self.rooms[task.room_id]
            self._changing(room, task)
            task.claimed_by = worker
            room.version += 1

    def worker_progress(
        self,
        room_id: str,
        task_id: str,
        worker: str,
        progress: float,
        *,
        origin: events.Origin = events.SERVER,
    ) -> Task:
        """Progress from a worker peer: a pending task is claimed by it first (a browser handed it
        out); another worker's task is a Conflict (worker_mismatch), a finished one invalid."""
        task = self.get_task(room_id, task_id)
        if task.status == PENDING:
            self.update(room_id, task_id, TaskUpdate("claim", worker, None, None, None), origin=origin)
        self._adopt(task, worker)
        return self.update(
            room_id, task_id, TaskUpdate("progress", worker, progress, None, None), origin=origin
        )

    def worker_complete(
        self, room_id: str, task_id: str, worker: str, result: Any, *, origin: events.Origin = events.SERVER
    ) -> Task:
        """A worker's result: only a processing task it holds completes (pending: invalid)."""
        self._adopt(self.get_task(room_id, task_id), worker)
        return self.update(
            room_id, task_id, TaskUpdate("complete", worker, None, result, None), origin=origin
        )

    def attach_result(
        self,
        room_id: str,
        task_id: str,
        worker: str,
        fields: dict[str, Any],
        *,
        origin: events.Origin = events.SERVER,
    ) -> Task:
        """Add ``fields`` (the stored image) to the result of a complete task, for the worker that
        completed it (image bytes may come after the ``result`` message). Not a state change;
        published as ``task.result``."""
        room = self.rooms.get(room_id)
        task = self.get_task(room_id, task_id)
        assert room is not None
        if task.status != COMPLETE:
            raise InvalidTransition("attach a result to", task.status, COMPLETE)
        if task.claimed_by != worker:
            raise Conflict(
                f"task '{task_id}' was completed by '{task.claimed_by}', not '{worker}'",
                code="worker_mismatch",
            )
        validate.check_fields(fields, validate.MAX_STORED_DEPTH)
        result = dict(task.result) if isinstance(task.result, dict) else {"data": task.result}
        result.update(fields)
        self._changing(room, task)
        task.result = result
        now = now_ms(self.clock)
        task.updated_at = now
        self._touch(room, now)
        self.store.save_task(task)
        self._emit(events.TASK_RESULT, room_id, {"task": task.to_json()}, origin)
        return task

    def cancel(self, room_id: str, task_id: str, *, origin: events.Origin = events.SERVER) -> Task:
        room = self.rooms.get(room_id)
        task = self.get_task(room_id, task_id)
        assert room is not None
        now = now_ms(self.clock)
        self._set_status(room, task, "cancel", now)
        self._touch(room, now)
        self.store.save_task(task)
        self._emit_task("cancel", task, origin=origin)
        return task

    def expire_leases(self) -> list[Task]:
        """Processing tasks silent for lease_seconds go back to pending at their old position."""
        now = now_ms(self.clock)
        cutoff = now - int(self.lease_seconds * 1000)
        expired: list[Task] = []
        for room in self.rooms.values():
            if not room.counts[PROCESSING]:
                continue
            stale = [t for t in room.tasks.values() if t.status == PROCESSING and t.updated_at <= cutoff]
            for task in stale:
                self._set_status(room, task, "expire", now)
                self.store.save_task(task)
            if stale:
                self._touch(room, now)
                expired.extend(stale)
                for task in stale:
                    self._emit_task("expire", task, room.position(task))
        return expired

    def sweep(self, retention_hours: float) -> int:
        """Drop finished tasks of rooms idle for retention_hours; pending work is never dropped."""
        now = now_ms(self.clock)
        cutoff = now - int(retention_hours * 3600 * 1000)
        removed = 0
        for room in list(self.rooms.values()):
            if room.last_activity > cutoff:
                continue
            gone = [t for t in room.tasks.values() if t.status in FINISHED]
            for task in gone:
                self._changing(room, task)
                del room.tasks[task.id]
                room.counts[task.status] -= 1
            if gone:
                self.store.delete_tasks(room.id, [t.id for t in gone])
                room.version += 1
                removed += len(gone)
                self._emit(events.TASKS_PRUNED, room.id, {"count": len(gone)})
            if not room.tasks and not room.helper_joined:
                self._changing(room)
                del self.rooms[room.id]
                self.store.delete_room(room.id)
        return removed

    def set_helper_joined(self, room_id: str, joined: bool) -> None:
        room = self._room(room_id)
        if room.helper_joined == joined:
            return
        self._changing(room)
        room.helper_joined = joined
        if not joined:
            # Choices made when joining last until the helper leaves the room.
            room.helper_wire = room.helper_dispatch = None
        self._touch(room, now_ms(self.clock))
        self._emit(events.HELPER_JOINED if joined else events.HELPER_LEFT, room_id, {"roomId": room_id})

    def set_helper_options(
        self, room_id: str, *, wire: str | None = None, dispatch: bool | None = None
    ) -> None:
        """Remember what the helper was asked to do in the room (None: unchanged), for rejoining
        the same way after a restart."""
        room = self._room(room_id)
        wire = room.helper_wire if wire is None else wire
        dispatch = room.helper_dispatch if dispatch is None else dispatch
        if (room.helper_wire, room.helper_dispatch) != (wire, dispatch):
            self._changing(room)
            room.helper_wire, room.helper_dispatch = wire, dispatch
            self._touch(room, now_ms(self.clock))
