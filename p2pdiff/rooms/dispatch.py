"""Dispatch in one room: which GPU peer works on which task, and what happens when it stops.

A :class:`Dispatcher` belongs to a :class:`~p2pdiff.rooms.agent.RoomAgent`, which tells it what the
room says (peers coming, going and speaking, their capabilities, finished chunks) and what the
queue's events say. When enabled it hands pending tasks to idle GPU peers as ``task`` messages,
one task at a time per peer, least recently served first; a task may be split into chunks
(:func:`~p2pdiff.rooms.protocol.plan_chunks`), each handed to its own peer. The published app never
sends ``result``: a worker's ``progress`` of 1.0 finishes its chunk (a ``result`` or image that
comes later still attaches to the task). A peer that leaves has its task re-offered at once; one
that goes silent loses it when the queue's lease expires (the ``task.requeued`` event with reason
``lease_expired``) and rests: it is tried again after a backoff that doubles with each lost task,
or at once when it speaks.

Whatever it changes goes through the same QueueManager methods (and state machine) REST uses.
Peers leaving give their tasks back whether or not dispatch is on: a browser may have handed them
out itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

from p2pdiff.errors import Conflict, NotFound, Unavailable
from p2pdiff.rooms import protocol as rp
from p2pdiff.tasks import events
from p2pdiff.tasks.model import PROCESSING, Task
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.results import StoredImage
from p2pdiff.tasks.validate import TaskUpdate
from signaling.bounded import LruDict, LruSet

log = logging.getLogger(__name__)

SendTo = Callable[[str, Any, str], Awaitable[bool]]
Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Future[None]]

# Caps on state kept per room; each says what happens when it is reached.
MAX_PLANS = 1024  # tasks being dispatched at once; past it nothing new is handed out until one ends
MAX_HISTORY = 4096  # (task, worker) pairs a task was taken from, to tell late from foreign (LRU)
MAX_FINISHED = 256  # dispatched tasks finished by progress, kept to attach a later result (LRU)
STORE_RETRY_SECONDS = 1.0  # dispatch pauses this long after the store failed to commit a claim
# A worker that lost a task to the lease rests this long before it is offered work again,
# doubling with each task it loses in a row (up to the cap); anything it sends ends the rest.
REST_FIRST_SECONDS, REST_MAX_SECONDS = 15.0, 600.0
# The published app announces a task with a `queue` message that has no options and POSTs the
# full task ~10 ms later: a task announced without options is not dispatched before that POST
# filled it in, or this long after the announcement (a page without the backend never POSTs).
FILL_GRACE_SECONDS = 1.0
MAX_UNFILLED = 1024  # announced tasks waiting for their options (LRU; the oldest just go out)


@dataclass(slots=True)
class Worker:
    """A peer of the room as dispatch sees it (only those with a GPU get work)."""

    id: str
    order: int  # join order: the tie-break between peers never served
    has_gpu: bool = False
    last_served: int = 0  # dispatch sequence number of its last hand-out; least recent goes first
    assignment: tuple[str, str] | None = None  # (task id, chunk id) it is working on
    silences: int = 0  # tasks lost to the lease in a row (reset when it speaks)
    resting_until: float = 0.0  # loop time before which it gets no new work


@dataclass(slots=True)
class ChunkState:
    plan: rp.ChunkPlan
    worker: str | None = None
    progress: float = 0.0
    done: bool = False  # by its result message or progress 1.0
    reported: bool = False  # its result message came (the published app never sends one)
    result: dict[str, Any] | None = None
    image: StoredImage | None = None


@dataclass(slots=True)
class TaskPlan:
    """A task the helper dispatched: its chunks and who has them."""

    task_id: str
    claimer: str  # the worker the queue knows: the peer (one chunk) or the helper (several)
    chunks: dict[str, ChunkState] = field(default_factory=dict)

    def progress(self) -> float:
        return sum(1.0 if c.done else c.progress for c in self.chunks.values()) / len(self.chunks)

    def result(self, room_id: str) -> dict[str, Any] | None:
        """The task's result once every chunk is done: the chunk's own for one chunk; for several,
        all of them, with the image of the last chunk that has one (the final steps)."""
        chunks = list(self.chunks.values())
        if len(chunks) == 1:
            return chunks[0].result
        result: dict[str, Any] = {"chunks": [c.result for c in chunks], "status": "complete"}
        final = next((c.image for c in reversed(chunks) if c.image is not None), None)
        if final is not None:
            result["image"] = final.to_json(room_id, self.task_id)
        return result

    def chunk_of(self, peer_id: str, chunk_id: str | None, *, reported: bool = False) -> ChunkState | None:
        """The chunk ``peer_id`` holds: the one named, or (no id, or an id the helper did not make,
        e.g. an app numbering chunks its own way) the one it has that is not done (``reported``:
        whose result message has not come, though progress 1.0 may)."""
        chunk = self.chunks.get(chunk_id) if chunk_id is not None else None
        if chunk is not None:
            return chunk if chunk.worker == peer_id else None
        for chunk in self.chunks.values():
            if chunk.worker == peer_id and not (chunk.reported if reported else chunk.done):
                return chunk
        return None


def task_id_of(event: events.Event) -> str | None:
    """The id of the task a queue event is about (None for other events)."""
    task = event.data.get("task") if isinstance(event.data, dict) else None
    task_id = task.get("id") if isinstance(task, dict) else None
    return task_id if isinstance(task_id, str) else None


class Dispatcher:
    def __init__(
        self,
        room_id: str,
        queue: QueueManager,
        *,
        self_id: str,
        send: SendTo,
        spawn: Spawn,
        flush_soon: Callable[[], None],
        active_peers: Callable[[], Collection[str]],
        enabled: bool = False,
    ) -> None:
        self.room_id = room_id
        self.queue = queue
        self.self_id = self_id
        self.send = send
        self.spawn = spawn
        self.flush_soon = flush_soon
        self.active_peers = active_peers
        self.enabled = enabled
        # One per peer record of the agent (it caps them), in join order.
        self.workers: dict[str, Worker] = {}
        self.plans: dict[str, TaskPlan] = {}
        # Who a task was taken from: their later messages about it are late, not foreign.
        self.history: LruSet[tuple[str, str]] = LruSet(MAX_HISTORY)
        # Dispatched tasks completed by their workers' progress, by task id: a result or image
        # that arrives afterwards still finds its chunk.
        self.finished: LruDict[str, TaskPlan] = LruDict(MAX_FINISHED)
        # Tasks peers announced without options, by id: when the grace for their POST ends.
        self._unfilled: LruDict[str, float] = LruDict(MAX_UNFILLED)
        self._fill_timer: asyncio.TimerHandle | None = None
        self._rest_timers: dict[str, asyncio.TimerHandle] = {}
        self.counts: Counter[str] = Counter()
        self.closed = False
        self._joins = 0
        self._served = 0
        self._pump_task: asyncio.Future[None] | None = None
        self._pump_again = False

    def close(self) -> None:
        """Stop handing out work (the agent cancels the pump with its other tasks)."""
        self.closed = True
        for timer in [*self._rest_timers.values(), self._fill_timer]:
            if timer is not None:
                timer.cancel()
        self._rest_timers.clear()

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        self.kick()

    # -- what the room says ------------------------------------------------------------------------

    def add_worker(self, peer_id: str) -> None:
        self._joins += 1
        self.workers[peer_id] = Worker(peer_id, self._joins)

    def set_gpu(self, peer_id: str, has_gpu: bool) -> None:
        """``peer_id`` announced its capabilities: with a GPU it may get work."""
        worker = self.workers.get(peer_id)
        if worker is not None:
            worker.has_gpu = has_gpu
        if has_gpu:
            self.kick()

    def heard_from(self, peer_id: str) -> None:
        worker = self.workers.get(peer_id)
        if worker is not None and worker.silences:
            self._wake(worker)  # it is alive after all: it may have work again

    def awaits_options(self, task_id: str) -> None:
        """A peer announced ``task_id`` without options: its POST may still fill them in."""
        self._unfilled[task_id] = asyncio.get_running_loop().time() + FILL_GRACE_SECONDS

    def peer_left(self, peer_id: str) -> None:
        worker = self.workers.pop(peer_id, None)
        timer = self._rest_timers.pop(peer_id, None)
        if timer is not None:
            timer.cancel()
        if worker is not None and worker.assignment is not None:
            task_id, chunk_id = worker.assignment
            plan = self.plans.get(task_id)
            if plan is not None and chunk_id in plan.chunks:
                self._reoffer(plan, plan.chunks[chunk_id], "worker_left")
        # Tasks it held without the helper's hand-out (a browser coordinated) go back too.
        room = self.queue.get_room(self.room_id)
        if room is not None and room.counts[PROCESSING]:
            held = [t.id for t in room.tasks.values() if t.status == PROCESSING and t.claimed_by == peer_id]
            for task_id in held:
                self._remember(task_id, peer_id)
                update = TaskUpdate("requeue", peer_id, None, None, None)
                self.queue.update(self.room_id, task_id, update, reason="worker_left")
                self.counts["reoffered"] += 1
        self.flush_soon()
        self.kick()

    def taken_from(self, task_id: str, peer_id: str) -> bool:
        """Whether ``peer_id`` had ``task_id`` until it was taken away (left, silent, cancelled)."""
        return (task_id, peer_id) in self.history

    # -- what workers report ---------------------------------------------------------------------

    def chunk_done(
        self, plan: TaskPlan, chunk: ChunkState, result: dict[str, Any], origin: events.Origin
    ) -> None:
        """``chunk``'s worker is done with it (its result, or progress 1.0): the worker is free,
        and the task completes with its last chunk."""
        chunk.done = True
        chunk.result = result
        if chunk.worker is not None:
            self._free(chunk.worker)
        if not all(c.done for c in plan.chunks.values()):
            update = TaskUpdate("progress", plan.claimer, plan.progress(), None, None)
            self.queue.update(self.room_id, plan.task_id, update, origin=origin)
        else:
            self.plans.pop(plan.task_id, None)
            if not all(c.reported for c in plan.chunks.values()):
                self.finished[plan.task_id] = plan
            update = TaskUpdate("complete", plan.claimer, None, plan.result(self.room_id), None)
            self.queue.update(self.room_id, plan.task_id, update, origin=origin)
            self.counts["completed"] += 1
        self.flush_soon()
        self.kick()

    def attach_result(self, plan: TaskPlan, origin: events.Origin) -> None:
        """A finished chunk gained its data or image: the complete task's result follows."""
        if plan.task_id not in self.finished:
            return  # other chunks still run: the result is built when the last one is done
        result = plan.result(self.room_id)
        if all(c.reported for c in plan.chunks.values()):
            self.finished.pop(plan.task_id)
        if result is not None:
            self.queue.attach_result(self.room_id, plan.task_id, plan.claimer, result, origin=origin)

    def drop(self, plan: TaskPlan) -> None:
        """``plan``'s task fails (its caller tells the queue): its workers are free."""
        self.plans.pop(plan.task_id, None)
        self._release(plan)

    # -- queue events --------------------------------------------------------------------------------

    def on_event(self, event: events.Event) -> None:
        task_id = task_id_of(event)
        if event.type == events.TASK_CREATED and task_id is not None:
            self.kick()
        elif event.type == events.TASK_MOVED and event.room == self.room_id:
            self.kick()  # a peer's `queue` named a task the app had posted without a room
        elif event.type == events.TASK_UPDATED and task_id in self._unfilled:
            self.kick()  # the app's POST filled in the options: it may go out now
        elif event.type == events.TASK_REQUEUED and task_id is not None:
            plan = self.plans.pop(task_id, None)
            if plan is not None:
                # Lease expired (nobody sent progress for lease_seconds) or a REST requeue: the
                # holders lose it; silent ones rest (see _rest).
                self._release(plan, silent=event.data.get("reason") == "lease_expired")
                self.counts["reoffered"] += 1
            self.kick()
        elif event.type in (events.TASK_COMPLETE, events.TASK_FAILED, events.TASK_CANCELLED) and task_id:
            plan = self.plans.pop(task_id, None)
            if plan is not None:  # finished from outside (REST, or a peer's queue snapshot)
                self._release(plan)
                self.kick()
        elif event.type == events.QUEUE_RELOADED:
            # Memory went back to the last commit: what was handed out since may be undone.
            for plan in list(self.plans.values()):
                self._release(plan)
            self.plans.clear()
            self.finished.clear()
            self.kick()

    # -- handing out ---------------------------------------------------------------------------------

    def kick(self) -> None:
        """Look for work to hand out, soon (one pump per room; requests while it runs coalesce)."""
        if not self.enabled or self.closed:
            return
        self._pump_again = True
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = self.spawn(self._pump(), "dispatch")

    def _idle_gpu_workers(self) -> list[Worker]:
        active = self.active_peers()
        now = asyncio.get_running_loop().time()
        return [
            w
            for w in self.workers.values()
            if w.has_gpu and w.assignment is None and w.resting_until <= now and w.id in active
        ]

    def _awaits_options(self, task: Task) -> bool:
        """Whether ``task`` was announced without options and the app's POST of it may still come
        (FILL_GRACE_SECONDS); a timer looks again when the grace ends."""
        deadline = self._unfilled.get(task.id)
        if deadline is None:
            return False
        now = asyncio.get_running_loop().time()
        if task.options or now >= deadline:
            self._unfilled.pop(task.id)
            return False
        if self._fill_timer is None:
            self._fill_timer = asyncio.get_running_loop().call_later(deadline - now, self._fill_grace_over)
        return True

    def _fill_grace_over(self) -> None:
        self._fill_timer = None
        self.kick()

    def _open_chunks(self) -> Iterator[tuple[TaskPlan, ChunkState]]:
        for plan in self.plans.values():
            for chunk in plan.chunks.values():
                if chunk.worker is None and not chunk.done:
                    yield plan, chunk

    def _next_offer(self) -> tuple[Worker, TaskPlan, ChunkState] | None:
        idle = self._idle_gpu_workers()
        if not idle:
            return None
        worker = min(idle, key=lambda w: (w.last_served, w.order))  # least recently served
        offer = next(self._open_chunks(), None)  # re-offers first: they were handed out earlier
        if offer is None:
            if len(self.plans) >= MAX_PLANS:
                return None
            task = next(self.queue.pending_tasks(self.room_id), None)
            if task is None or self._awaits_options(task):
                return None  # the queue order holds: nothing overtakes a task waiting for its POST
            chunks = rp.plan_chunks(task)
            # One chunk: the queue shows the peer as the worker. Several: the helper holds the
            # task and reports the chunks' combined progress.
            claimer = worker.id if len(chunks) == 1 else self.self_id
            self.queue.update(self.room_id, task.id, TaskUpdate("claim", claimer, None, None, None))
            plan = self.plans[task.id] = TaskPlan(task.id, claimer, {c.id: ChunkState(c) for c in chunks})
            offer = (plan, next(iter(plan.chunks.values())))
        plan, chunk = offer
        chunk.worker = worker.id
        chunk.progress = 0.0
        worker.assignment = (plan.task_id, chunk.plan.id)
        self._served += 1
        worker.last_served = self._served
        return worker, plan, chunk

    async def _pump(self) -> None:
        while self._pump_again and self.enabled and not self.closed:
            self._pump_again = False
            while self.enabled and not self.closed:
                try:
                    async with self.queue.writing():  # several nodes: the claim is decided on current rows
                        offer = self._next_offer()
                    if offer is None:
                        break
                    worker, plan, chunk = offer
                    await self.queue.flush()  # the claim is on disk before anyone works on it
                except Unavailable:
                    # Reloaded (on_event dropped the plans). Wait before claiming again, so a
                    # failing disk is not hammered in a loop.
                    await asyncio.sleep(STORE_RETRY_SECONDS)
                    break
                if self.plans.get(plan.task_id) is not plan or chunk.worker != worker.id:
                    continue  # cancelled, or the peer left, while the claim was committing
                task = self.queue.get_task(self.room_id, plan.task_id)
                self.counts["dispatched"] += 1
                log.info(
                    "room %s: task %s (%s) handed to %s", self.room_id, task.id, chunk.plan.id, worker.id
                )
                sent = await self.send(rp.TASK, rp.task_message(task, chunk.plan, self.self_id), worker.id)
                if not sent:
                    self.queue.write_soon(functools.partial(self._reoffer_unsent, plan, chunk, worker.id))

    # -- taking work back ----------------------------------------------------------------------------

    def _remember(self, task_id: str, worker: str | None) -> None:
        if worker is not None:
            self.history.add((task_id, worker))

    def _free(self, peer_id: str) -> None:
        worker = self.workers.get(peer_id)
        if worker is not None:
            worker.assignment = None

    def _release(self, plan: TaskPlan, *, silent: bool = False) -> None:
        """Free every peer working on ``plan`` (it was dropped); their later messages are late.
        ``silent``: they lost it to the lease, and rest before they get more."""
        for chunk in plan.chunks.values():
            if chunk.worker is None:
                continue
            self._remember(plan.task_id, chunk.worker)
            worker = self.workers.get(chunk.worker)
            if worker is not None and worker.assignment == (plan.task_id, chunk.plan.id):
                worker.assignment = None
                if silent and not chunk.done:
                    self._rest(worker)

    def _reoffer_unsent(self, plan: TaskPlan, chunk: ChunkState, worker_id: str) -> None:
        if self.plans.get(plan.task_id) is plan and chunk.worker == worker_id:
            self._reoffer(plan, chunk, "send_failed")

    def _reoffer(self, plan: TaskPlan, chunk: ChunkState, reason: str) -> None:
        """Take ``chunk`` from its worker and offer it to another peer."""
        worker = chunk.worker
        self._remember(plan.task_id, worker)
        if worker is not None:
            self._free(worker)
        self.counts["reoffered"] += 1
        log.info("room %s: %s of task %s re-offered (%s)", self.room_id, chunk.plan.id, plan.task_id, reason)
        if len(plan.chunks) == 1:
            # Back to pending at its old place, through the state machine; the pump claims it
            # again for the next idle peer.
            self.plans.pop(plan.task_id, None)
            with_reason = TaskUpdate("requeue", plan.claimer, None, None, None)
            try:
                self.queue.update(self.room_id, plan.task_id, with_reason, reason=reason)
            except (Conflict, NotFound) as exc:
                log.info("room %s: re-offering task %s: %s", self.room_id, plan.task_id, exc)
        else:
            chunk.worker = None
            chunk.progress = 0.0
        self.flush_soon()
        self.kick()

    # -- resting silent workers ----------------------------------------------------------------------

    def _wake(self, worker: Worker) -> None:
        worker.silences = 0
        worker.resting_until = 0.0
        timer = self._rest_timers.pop(worker.id, None)
        if timer is not None:
            timer.cancel()
        self.kick()

    def _rest(self, worker: Worker) -> None:
        """``worker`` lost a task to the lease: no new work for a while, then it is tried again
        (it may have been busy, or its messages lost), the wait doubling while it stays silent."""
        worker.silences += 1
        # (the exponent is capped: a peer may stay silent in the room for days)
        wait = min(REST_FIRST_SECONDS * 2 ** min(worker.silences - 1, 20), REST_MAX_SECONDS)
        loop = asyncio.get_running_loop()
        worker.resting_until = loop.time() + wait
        old = self._rest_timers.pop(worker.id, None)
        if old is not None:
            old.cancel()
        self._rest_timers[worker.id] = loop.call_later(wait, self._end_rest, worker.id)
        log.info("room %s: %s lost a task to the lease; next offer in %.0f s", self.room_id, worker.id, wait)

    def _end_rest(self, peer_id: str) -> None:
        self._rest_timers.pop(peer_id, None)
        self.kick()

    # -- views ---------------------------------------------------------------------------------------

    def referenced_results(self) -> set[str]:
        """Images of chunks dispatched or finished whose task has not got them yet."""
        plans = [*self.plans.values(), *self.finished.values()]
        return {c.image.path for plan in plans for c in plan.chunks.values() if c.image is not None}

    def assignments(self) -> list[dict[str, str]]:
        return [
            {"peer": w.id, "taskId": w.assignment[0], "chunkId": w.assignment[1]}
            for w in self.workers.values()
            if w.assignment is not None
        ]
