"""The helper's part in one room of the browser app: tracking, announcing and (optionally) dispatch.

A :class:`RoomAgent` sits between one joined room and the :class:`~p2pdiff.tasks.queue.QueueManager`.
It never touches the network itself: the helper hands it a ``send(action, payload, target,
metadata)`` coroutine and feeds it what the room delivers (``on_message``, ``on_peer_join``,
``on_peer_leave``) and what the event bus publishes (``on_event``). Payloads are checked and
translated by :mod:`p2pdiff.rooms.protocol`; every state change goes through the same
QueueManager methods (and so the same state machine) REST uses.

What it does:

- **Tracking.** Records each peer's ``capabilities``; folds every ``queue`` (new tasks),
  ``progress`` (claims and progress), ``result`` (completion) and ``chunk`` (image bytes) into the
  queue, so REST shows the tasks the browsers made.
- **Announcing.** Greets each joining peer with the helper's own ``capabilities`` (no GPU, but a
  server that queues) and the room's active tasks; broadcasts a ``queue`` message when a task is
  created over REST.
- **Dispatch** (when enabled): hands pending tasks to idle GPU peers as ``task`` messages, one
  task at a time per peer, least recently served first. The published app never sends
  ``result``: a worker's ``progress`` of 1.0 finishes its chunk (a ``result`` or image that
  comes later still attaches to the task). A peer that leaves has its task re-offered at once;
  one that goes silent loses it when the queue's lease expires (the ``task.requeued`` event
  with reason ``lease_expired``) and rests: it is tried again after a backoff that doubles with
  each lost task, or at once when it speaks.

Anything malformed or out of turn is ignored and counted by ``<action>.<reason>`` (shown in
``/api/stats``); no payload can raise out of here into the room.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from p2pdiff.errors import Conflict, InvalidTransition, NotFound, Unavailable
from p2pdiff.rooms import protocol as rp
from p2pdiff.tasks import events
from p2pdiff.tasks.images import ImageRejected
from p2pdiff.tasks.model import COMPLETE, FINISHED, PENDING, PROCESSING, Task
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.results import ResultStore, StoredImage, task_image
from p2pdiff.tasks.validate import TaskUpdate

log = logging.getLogger(__name__)

Send = Callable[[str, Any, str | None, Any], Awaitable[None]]
Emit = Callable[[str, dict[str, Any]], None]

# Caps on state kept per room; each says what happens when it is reached.
MAX_PEERS = 512  # peer records (signaling admits at most 256 connections per app); new ones ignored
MAX_PLANS = 1024  # tasks being dispatched at once; past it nothing new is handed out until one ends
MAX_STAGED = 256  # images that arrived before their result message (LRU; the file stays for gc)
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
# Per peer token buckets (like REST's per-client limit): messages of any action, and new tasks a
# peer may add to the durable queue. A browser steps at well under 100 progress messages per
# second; a joining browser may announce a few hundred queued tasks at once, then few.
MESSAGES_PER_SECOND, MESSAGE_BURST = 100.0, 500
NEW_TASKS_PER_SECOND, NEW_TASK_BURST = 10.0, 500
# A `queue` message the helper sends stays under this many bytes of task JSON (the newest tasks
# are always in it; older active ones fill the rest).
MAX_QUEUE_MESSAGE_BYTES = 1024 * 1024


def _put_bounded(items: OrderedDict[Any, Any], key: Any, value: Any, cap: int) -> None:
    """Insert or refresh ``key`` as the newest entry; the oldest go beyond ``cap``."""
    items[key] = value
    items.move_to_end(key)
    while len(items) > cap:
        items.popitem(last=False)


@dataclass(slots=True)
class Budget:
    """A token bucket: ``rate`` per second, at most ``burst`` saved up."""

    rate: float
    burst: float
    tokens: float = -1.0  # full on first use
    stamp: float = 0.0

    def take(self) -> bool:
        now = time.monotonic()
        if self.tokens < 0:
            self.tokens = self.burst
        else:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass(slots=True)
class PeerState:
    id: str
    order: int  # join order: the tie-break between peers never served
    messages: Budget = field(default_factory=lambda: Budget(MESSAGES_PER_SECOND, MESSAGE_BURST))
    new_tasks: Budget = field(default_factory=lambda: Budget(NEW_TASKS_PER_SECOND, NEW_TASK_BURST))
    capabilities: rp.Capabilities | None = None
    last_served: int = 0  # dispatch sequence number of its last hand-out; least recent goes first
    assignment: tuple[str, str] | None = None  # (task id, chunk id) it is working on
    silences: int = 0  # tasks lost to the lease in a row (reset when it speaks)
    resting_until: float = 0.0  # loop time before which it gets no new work

    @property
    def has_gpu(self) -> bool:
        return self.capabilities is not None and self.capabilities.has_gpu


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


class RoomAgent:
    def __init__(
        self,
        room_id: str,
        queue: QueueManager,
        results: ResultStore,
        *,
        send: Send,
        self_id: str,
        active_peers: Callable[[], Collection[str]],
        emit: Emit | None = None,
        dispatch: bool = False,
    ) -> None:
        self.room_id = room_id
        self.queue = queue
        self.results = results
        self.send = send
        self.self_id = self_id
        self.active_peers = active_peers
        self.emit = emit
        self.dispatch = dispatch
        self.peers: dict[str, PeerState] = {}
        self.plans: dict[str, TaskPlan] = {}
        # Images for tracked (not dispatched) tasks, waiting for the result message; by task id.
        self.staged: OrderedDict[str, StoredImage] = OrderedDict()
        self.history: OrderedDict[tuple[str, str], None] = OrderedDict()
        # Dispatched tasks completed by their workers' progress, by task id: a result or image
        # that arrives afterwards still finds its chunk.
        self.finished: OrderedDict[str, TaskPlan] = OrderedDict()
        self._rest_timers: dict[str, asyncio.TimerHandle] = {}
        # Tasks peers announced without options, by id: when the grace for their POST ends.
        self._unfilled: OrderedDict[str, float] = OrderedDict()
        self._fill_timer: asyncio.TimerHandle | None = None
        self.received: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.closed = False
        self._joins = 0
        self._served = 0
        self._announce: dict[str, None] = {}  # task ids created over REST, not yet broadcast
        self._announcer: asyncio.Task[None] | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._pump_again = False
        self._flush_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- plumbing --------------------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{name} {self.room_id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("room %s: %s failed", self.room_id, task.get_name(), exc_info=task.exception())

    def _flush_soon(self) -> None:
        """Commit peer-made changes in the background: nobody waits for an answer, and changes
        from many messages share one commit."""
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = self._spawn(self._flush(), "flush")

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let messages already delivered add their writes to this commit
        try:
            await self.queue.flush()
        except Unavailable:
            self.dropped[f"*.{rp.STORE_ERROR}"] += 1  # its changes were undone; on_event resets plans

    async def _send(self, action: str, payload: Any, target: str | None = None, metadata: Any = None) -> bool:
        try:
            await self.send(action, payload, target, metadata)
        except Exception as exc:  # a channel closing mid-send, the room being left
            log.info("room %s: sending %s to %s failed: %s", self.room_id, action, target or "all", exc)
            self.counts["sendFailures"] += 1
            return False
        return True

    async def close(self) -> None:
        self.closed = True
        for timer in [*self._rest_timers.values(), self._fill_timer]:
            if timer is not None:
                timer.cancel()
        self._rest_timers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            if task is not self._flush_task:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _drop(self, action: str, reason: str, peer_id: str, detail: str = "") -> None:
        self.dropped[f"{action}.{reason}"] += 1
        log.debug("room %s: ignored %s from %s: %s %s", self.room_id, action, peer_id, reason, detail)

    def _remember(self, task_id: str, worker: str | None) -> None:
        if worker is not None:
            _put_bounded(self.history, (task_id, worker), None, MAX_HISTORY)

    # -- peers -----------------------------------------------------------------------------------

    def _peer(self, peer_id: str) -> PeerState | None:
        state = self.peers.get(peer_id)
        # Only for active peers: a message replayed after its peer left must not leave a record
        # behind that no leave event would ever remove.
        if state is None and len(self.peers) < MAX_PEERS and peer_id in self.active_peers():
            self._joins += 1
            state = self.peers[peer_id] = PeerState(peer_id, self._joins)
        return state

    def on_peer_join(self, peer_id: str) -> None:
        if self.closed:
            return
        self._peer(peer_id)
        self._spawn(self._greet(peer_id), "greet")

    async def _greet(self, peer_id: str) -> None:
        # The app sends its capabilities to each peer on join; so does the helper, plus what is
        # queued (a browser that joins late has no other way to learn of earlier tasks).
        await self._send(rp.CAPABILITIES, rp.helper_capabilities(), peer_id)
        tasks = self._snapshot(())
        if tasks:
            await self._send(rp.QUEUE, rp.queue_message(tasks, self.self_id), peer_id)

    def on_peer_leave(self, peer_id: str) -> None:
        if self.closed:
            return  # the helper is leaving the room: the peers keep their work
        state = self.peers.pop(peer_id, None)
        timer = self._rest_timers.pop(peer_id, None)
        if timer is not None:
            timer.cancel()
        if state is not None and state.assignment is not None:
            task_id, chunk_id = state.assignment
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
        self._flush_soon()
        self._kick()

    def peer_info(self, peer_id: str) -> dict[str, Any]:
        """Extra fields for the API's view of a peer."""
        state = self.peers.get(peer_id)
        if state is None or state.capabilities is None:
            return {}
        return {"capabilities": state.capabilities.to_json()}

    def gpu_peers(self) -> int:
        active = self.active_peers()
        return sum(1 for s in self.peers.values() if s.has_gpu and s.id in active)

    # -- messages --------------------------------------------------------------------------------

    def on_message(self, action: str, payload: Any, peer_id: str, metadata: Any) -> None:
        """One message from a peer. Never raises: whatever goes wrong is counted."""
        if self.closed:
            return
        self.received[action] += 1
        handler = self._handlers.get(action)
        if handler is None:
            return
        state = self._peer(peer_id)
        if state is None:  # gone already, or past the peer cap
            self._drop(action, rp.NOT_A_PEER, peer_id)
            return
        if not state.messages.take():
            self._drop(action, rp.RATE_LIMITED, peer_id)
            return
        try:
            handler(self, payload, peer_id, metadata)
        except rp.ProtocolError as exc:
            self._drop(action, exc.reason, peer_id, exc.detail)
        except Exception:
            log.exception("room %s: handling %s from %s failed", self.room_id, action, peer_id)
            self._drop(action, rp.INTERNAL_ERROR, peer_id)

    def _queue_call(self, action: str, peer_id: str, call: Callable[[], Any]) -> Any:
        """A QueueManager call for a peer's message; its refusals become counted reasons."""
        try:
            return call()
        except NotFound:
            raise rp.ProtocolError(rp.UNKNOWN_TASK) from None
        except InvalidTransition as exc:
            raise rp.ProtocolError(rp.INVALID_TRANSITION, str(exc)) from None
        except Conflict as exc:
            reason = rp.WORKER_MISMATCH if exc.code == "worker_mismatch" else rp.CONFLICT
            raise rp.ProtocolError(reason, exc.message) from None

    def _heard_from(self, peer_id: str) -> None:
        state = self.peers.get(peer_id)
        if state is not None and state.silences:
            self._wake(state)  # it is alive after all: it may have work again

    def _wake(self, state: PeerState) -> None:
        state.silences = 0
        state.resting_until = 0.0
        timer = self._rest_timers.pop(state.id, None)
        if timer is not None:
            timer.cancel()
        self._kick()

    def _rest(self, state: PeerState) -> None:
        """``state`` lost a task to the lease: no new work for a while, then it is tried again
        (it may have been busy, or its messages lost), the wait doubling while it stays silent."""
        state.silences += 1
        # (the exponent is capped: a peer may stay silent in the room for days)
        wait = min(REST_FIRST_SECONDS * 2 ** min(state.silences - 1, 20), REST_MAX_SECONDS)
        loop = asyncio.get_running_loop()
        state.resting_until = loop.time() + wait
        old = self._rest_timers.pop(state.id, None)
        if old is not None:
            old.cancel()
        self._rest_timers[state.id] = loop.call_later(wait, self._end_rest, state.id)
        log.info("room %s: %s lost a task to the lease; next offer in %.0f s", self.room_id, state.id, wait)

    def _end_rest(self, peer_id: str) -> None:
        self._rest_timers.pop(peer_id, None)
        self._kick()

    def _on_capabilities(self, payload: Any, peer_id: str, metadata: Any) -> None:
        caps = rp.parse_capabilities(payload)
        state = self._peer(peer_id)
        if state is None:
            raise rp.ProtocolError(rp.NOT_A_PEER, f"not an active peer, or more than {MAX_PEERS}")
        state.capabilities = caps
        self._heard_from(peer_id)
        if self.emit is not None:
            self.emit(events.PEER_CAPABILITIES, {"peer": {"id": peer_id, "capabilities": caps.to_json()}})
        if caps.has_gpu:
            self._kick()

    def _on_queue(self, payload: Any, peer_id: str, metadata: Any) -> None:
        message = rp.parse_queue(payload)
        state = self._peer(peer_id)
        assert state is not None  # on_message checked
        origin = events.Origin.peer_message(self.room_id, peer_id)
        for reason in message.rejected:
            self._drop(rp.QUEUE, reason, peer_id)
        created = False
        room = self.queue.get_room(self.room_id)
        for item in message.tasks:
            known = room is not None and item.new.id in room.tasks
            if not known and not state.new_tasks.take():
                self._drop(rp.QUEUE, rp.RATE_LIMITED, peer_id)
                continue
            try:
                added = self._queue_call(
                    rp.QUEUE,
                    peer_id,
                    lambda item=item: self.queue.upsert_from_peer(
                        self.room_id, item.new, item.status, item.worker, sender=peer_id, origin=origin
                    ),
                )
            except rp.ProtocolError as exc:
                self._drop(rp.QUEUE, exc.reason, peer_id, exc.detail)
                continue
            created = created or added.created
            if added.created and not added.task.options:
                deadline = asyncio.get_running_loop().time() + FILL_GRACE_SECONDS
                _put_bounded(self._unfilled, added.task.id, deadline, MAX_UNFILLED)
            room = self.queue.get_room(self.room_id)
        if created:
            self._flush_soon()
            self._kick()

    def _on_task(self, payload: Any, peer_id: str, metadata: Any) -> None:
        # The helper announces hasGPU: false, so a well-behaved app never sends it work.
        raise rp.ProtocolError(rp.NOT_A_WORKER)

    def _find_chunk(
        self, plan: TaskPlan, chunk_id: str | None, peer_id: str, *, reported: bool = False
    ) -> ChunkState | None:
        """The chunk of a dispatched task that ``peer_id`` holds: the one named, or (no id, or an
        id the helper did not make, e.g. an app numbering chunks its own way) the one it has that
        is not done (``reported``: whose result message has not come, though progress 1.0 may)."""
        chunk = plan.chunks.get(chunk_id) if chunk_id is not None else None
        if chunk is not None:
            return chunk if chunk.worker == peer_id else None
        for chunk in plan.chunks.values():
            if chunk.worker == peer_id and not (chunk.reported if reported else chunk.done):
                return chunk
        return None

    def _not_yours(self, task: Task | None, task_id: str, peer_id: str) -> str:
        """Why a worker's message about a task it does not hold is ignored."""
        if (task_id, peer_id) in self.history:
            return rp.LATE  # it had the task; it left, went silent, or the task was cancelled
        if task is not None and task.status in FINISHED:
            return rp.DUPLICATE if task.claimed_by == peer_id else rp.LATE
        if task is None or task.status == PENDING:
            return rp.NOT_HANDED_OUT
        return rp.WORKER_MISMATCH

    def _task_or_none(self, task_id: str) -> Task | None:
        try:
            return self.queue.get_task(self.room_id, task_id)
        except NotFound:
            return None

    def _on_progress(self, payload: Any, peer_id: str, metadata: Any) -> None:
        msg = rp.parse_progress(payload)
        origin = events.Origin.peer_message(self.room_id, peer_id)
        self._heard_from(peer_id)
        plan = self.plans.get(msg.task_id)
        # The published app's worker reports progress up to 1.0 and never sends a result: 1.0
        # is "done" (a result or image that comes later still attaches; see _on_result).
        done = msg.progress >= 1.0
        if plan is not None:
            chunk = self._find_chunk(plan, msg.chunk_id, peer_id)
            if chunk is None:
                raise rp.ProtocolError(self._not_yours(self._task_or_none(msg.task_id), msg.task_id, peer_id))
            if chunk.done:
                raise rp.ProtocolError(rp.DUPLICATE)
            chunk.progress = msg.progress
            if done:
                fields = self._result_fields(plan.task_id, chunk.plan.id, peer_id, chunk.image)
                self._chunk_done(plan, chunk, fields, origin)
                return
            update = TaskUpdate("progress", plan.claimer, plan.progress(), None, None)
            self._queue_call(
                rp.PROGRESS,
                peer_id,
                lambda: self.queue.update(self.room_id, plan.task_id, update, origin=origin),
            )
        else:
            task = self._task_or_none(msg.task_id)
            if task is None:
                raise rp.ProtocolError(rp.UNKNOWN_TASK)
            if task.status == PROCESSING and task.claimed_by not in (None, peer_id):
                raise rp.ProtocolError(self._not_yours(task, msg.task_id, peer_id))
            if task.status in FINISHED:
                raise rp.ProtocolError(rp.LATE)
            # Pending: a browser handed it out; the worker's first progress claims it.
            self._queue_call(
                rp.PROGRESS,
                peer_id,
                lambda: self.queue.worker_progress(
                    self.room_id, msg.task_id, peer_id, msg.progress, origin=origin
                ),
            )
            if done:
                image = self.staged.pop(msg.task_id, None)
                fields = self._result_fields(msg.task_id, msg.chunk_id, peer_id, image)
                self.queue.worker_complete(self.room_id, msg.task_id, peer_id, fields, origin=origin)
                _put_bounded(self.finished, msg.task_id, None, MAX_FINISHED)
        self._flush_soon()

    def _image_from_data(self, data: Any) -> StoredImage | None:
        """A data: URL in result.data, stored; None for any other data."""
        if not rp.is_data_url(data):
            return None
        raw = rp.decode_data_url(data, self.results.max_bytes)
        return self._save(raw)

    def _save(self, raw: bytes) -> StoredImage:
        try:
            image = self.results.save(raw)
        except ImageRejected as exc:
            raise rp.ProtocolError(exc.reason, exc.detail) from None
        except OSError as exc:
            log.error("room %s: cannot store a result image: %s", self.room_id, exc)
            raise rp.ProtocolError(rp.STORE_ERROR, str(exc)) from None
        self.counts["resultsStored"] += 1
        self.counts["resultBytes"] += image.size
        return image

    def _fail(self, task: Task, plan: TaskPlan | None, error: str, origin: events.Origin) -> None:
        """Fail a processing task its sender holds (checked by the caller), through the queue."""
        claimer = task.claimed_by
        if plan is not None:
            self.plans.pop(plan.task_id, None)
            self._release(plan)
            claimer = plan.claimer
        self.queue.update(
            self.room_id, task.id, TaskUpdate("fail", claimer, None, None, error), origin=origin
        )
        self._flush_soon()
        self._kick()

    def _result_fields(
        self,
        task_id: str,
        chunk_id: str | None,
        peer_id: str,
        image: StoredImage | None,
        msg: rp.Result | None = None,
    ) -> dict[str, Any]:
        """A worker's result as the task keeps it: its image, else the ``data`` of its result
        message (none yet when progress 1.0 finished it)."""
        fields: dict[str, Any] = {"chunkId": chunk_id, "workerId": peer_id, "status": "complete"}
        if image is not None:
            fields["image"] = image.to_json(self.room_id, task_id)
        elif msg is not None:
            fields["data"] = rp.small_data(msg.data)
        return fields

    def _on_result(self, payload: Any, peer_id: str, metadata: Any) -> None:
        msg = rp.parse_result(payload)
        origin = events.Origin.peer_message(self.room_id, peer_id)
        self._heard_from(peer_id)
        task = self._task_or_none(msg.task_id)
        if task is None:
            raise rp.ProtocolError(rp.UNKNOWN_TASK)
        plan = self.plans.get(msg.task_id)
        if plan is None and msg.task_id in self.finished:
            self._late_result(task, self.finished[msg.task_id], msg, peer_id, origin)
            return
        chunk: ChunkState | None = None
        if plan is not None:
            chunk = self._find_chunk(plan, msg.chunk_id, peer_id, reported=True)
            if chunk is None or chunk.reported:
                raise rp.ProtocolError(
                    rp.DUPLICATE if chunk is not None else self._not_yours(task, msg.task_id, peer_id)
                )
            if chunk.done:  # finished by progress 1.0, other chunks still running
                self._late_result(task, plan, msg, peer_id, origin)
                return
        elif task.status != PROCESSING or task.claimed_by not in (None, peer_id):
            raise rp.ProtocolError(self._not_yours(task, msg.task_id, peer_id))
        if msg.status == "failed":
            self._fail(task, plan, msg.error or "failed on the worker", origin)
            return
        try:
            image = self._image_from_data(msg.data)
        except rp.ProtocolError as exc:
            if exc.reason == rp.TOO_LARGE:
                self._fail(task, plan, exc.detail, origin)
            raise
        if plan is None:
            image = image or self.staged.pop(msg.task_id, None)
            fields = self._result_fields(msg.task_id, msg.chunk_id, peer_id, image, msg)
            self._queue_call(
                rp.RESULT,
                peer_id,
                lambda: self.queue.worker_complete(self.room_id, msg.task_id, peer_id, fields, origin=origin),
            )
            self._flush_soon()
        else:
            assert chunk is not None
            chunk.image = image or chunk.image
            chunk.reported = True
            fields = self._result_fields(plan.task_id, msg.chunk_id, peer_id, chunk.image, msg)
            self._chunk_done(plan, chunk, fields, origin)

    def _late_result(
        self, task: Task, plan: TaskPlan | None, msg: rp.Result, peer_id: str, origin: events.Origin
    ) -> None:
        """A ``result`` after progress 1.0 finished the sender's work: its data and image join the
        task's result (``plan`` None: a task the helper did not dispatch)."""
        if plan is None:
            if task.status != COMPLETE or task.claimed_by != peer_id:
                raise rp.ProtocolError(self._not_yours(task, task.id, peer_id))
            chunk_id: str | None = msg.chunk_id
        else:
            chunk = self._find_chunk(plan, msg.chunk_id, peer_id, reported=True)
            if chunk is None:
                raise rp.ProtocolError(self._not_yours(task, task.id, peer_id))
            if chunk.reported:
                raise rp.ProtocolError(rp.DUPLICATE)
            chunk_id = msg.chunk_id or chunk.plan.id
        if msg.status == "failed":
            raise rp.ProtocolError(rp.LATE)  # its progress said done; the task stays complete
        image = self._image_from_data(msg.data)
        if plan is None:
            self.finished.pop(task.id, None)  # one result per task: a second is a duplicate
            fields = self._result_fields(task.id, chunk_id, peer_id, image, msg)
            self._queue_call(
                rp.RESULT,
                peer_id,
                lambda: self.queue.attach_result(self.room_id, task.id, peer_id, fields, origin=origin),
            )
        else:
            chunk.reported = True
            chunk.image = image or chunk.image
            chunk.result = self._result_fields(task.id, chunk_id, peer_id, chunk.image, msg)
            self._attach_plan_result(plan, origin)
        self._flush_soon()

    def _attach_plan_result(self, plan: TaskPlan, origin: events.Origin) -> None:
        """A finished chunk gained its data or image: the complete task's result follows."""
        if plan.task_id not in self.finished:
            return  # other chunks still run: the result is built when the last one is done
        result = plan.result(self.room_id)
        if all(c.reported for c in plan.chunks.values()):
            self.finished.pop(plan.task_id, None)
        if result is not None:
            self.queue.attach_result(self.room_id, plan.task_id, plan.claimer, result, origin=origin)

    def _chunk_done(
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
                _put_bounded(self.finished, plan.task_id, plan, MAX_FINISHED)
            update = TaskUpdate("complete", plan.claimer, None, plan.result(self.room_id), None)
            self.queue.update(self.room_id, plan.task_id, update, origin=origin)
            self.counts["completed"] += 1
        self._flush_soon()
        self._kick()

    def _on_chunk(self, payload: Any, peer_id: str, metadata: Any) -> None:
        data, meta = rp.parse_chunk(payload, metadata)
        origin = events.Origin.peer_message(self.room_id, peer_id)
        self._heard_from(peer_id)
        task = self._task_or_none(meta.task_id)
        if task is None:
            raise rp.ProtocolError(rp.UNKNOWN_TASK)
        plan = self.plans.get(meta.task_id) or self.finished.get(meta.task_id)
        chunk = self._find_chunk(plan, meta.chunk_id, peer_id, reported=True) if plan is not None else None
        if plan is not None and chunk is None:
            raise rp.ProtocolError(self._not_yours(task, meta.task_id, peer_id))
        attach = False
        if plan is None:
            if task.status == COMPLETE and task.claimed_by == peer_id:
                if task_image(task.result) is not None:
                    raise rp.ProtocolError(rp.DUPLICATE)
                attach = True  # the bytes came after the result message (or progress 1.0)
            elif task.status != PROCESSING or task.claimed_by not in (None, peer_id):
                raise rp.ProtocolError(self._not_yours(task, meta.task_id, peer_id))
        elif chunk is not None and chunk.image is not None:
            raise rp.ProtocolError(rp.DUPLICATE)
        try:
            self.results.check(data)
        except ImageRejected as exc:
            if exc.reason == rp.TOO_LARGE and task.status == PROCESSING:
                self._fail(task, plan, exc.detail, origin)
            raise rp.ProtocolError(exc.reason, exc.detail) from None
        image = self._save(data)
        if chunk is not None:
            assert plan is not None
            chunk.image = image
            if chunk.result is not None:  # its result (or progress 1.0) came first
                chunk.result["image"] = image.to_json(self.room_id, task.id)
                self._attach_plan_result(plan, origin)
                self._flush_soon()
        elif attach:
            fields = {"image": image.to_json(self.room_id, task.id)}
            self._queue_call(
                rp.CHUNK,
                peer_id,
                lambda: self.queue.attach_result(self.room_id, task.id, peer_id, fields, origin=origin),
            )
            self._flush_soon()
        else:
            _put_bounded(self.staged, task.id, image, MAX_STAGED)

    _handlers: dict[str, Callable[[RoomAgent, Any, str, Any], None]] = {
        rp.CAPABILITIES: _on_capabilities,
        rp.QUEUE: _on_queue,
        rp.TASK: _on_task,
        rp.PROGRESS: _on_progress,
        rp.RESULT: _on_result,
        rp.CHUNK: _on_chunk,
    }

    # -- queue events (from the bus) ---------------------------------------------------------------

    def on_event(self, event: events.Event) -> None:
        if self.closed:
            return
        task_json = event.data.get("task") if isinstance(event.data, dict) else None
        task_id = task_json.get("id") if isinstance(task_json, dict) else None
        if event.type == events.TASK_CREATED and task_id is not None:
            if event.origin.kind != "peer":  # a peer's own task: its room heard of it from the peer
                self._announce_task(task_id)
            self._kick()
        elif event.type == events.TASK_MOVED and event.room == self.room_id:
            self._kick()  # a peer's `queue` named a task the app had posted without a room
        elif event.type == events.TASK_UPDATED and task_id in self._unfilled:
            self._kick()  # the app's POST filled in the options: it may go out now
        elif event.type == events.TASK_REQUEUED and task_id is not None:
            plan = self.plans.pop(task_id, None)
            if plan is not None:
                # Lease expired (nobody sent progress for lease_seconds) or a REST requeue: the
                # holders lose it; silent ones rest (see _rest).
                self._release(plan, silent=event.data.get("reason") == "lease_expired")
                self.counts["reoffered"] += 1
            self.staged.pop(task_id, None)
            self._kick()
        elif event.type in (events.TASK_COMPLETE, events.TASK_FAILED, events.TASK_CANCELLED) and task_id:
            plan = self.plans.pop(task_id, None)
            if plan is not None:  # finished from outside (REST, or a peer's queue snapshot)
                self._release(plan)
                self._kick()
            if event.type != events.TASK_COMPLETE:
                self.staged.pop(task_id, None)
        elif event.type == events.QUEUE_RELOADED:
            # Memory went back to the last commit: what was handed out since may be undone.
            for plan in list(self.plans.values()):
                self._release(plan)
            self.plans.clear()
            self.staged.clear()
            self.finished.clear()
            self._kick()

    # -- announcing ------------------------------------------------------------------------------

    def _snapshot(self, first: Collection[str]) -> list[Task]:
        """Active tasks for a `queue` message, in queue order: ``first`` always, then others, at
        most MAX_TASKS_OUT."""
        room = self.queue.get_room(self.room_id)
        if room is None:
            return []
        chosen: list[Task] = []
        size = 0
        newest = [room.tasks[t] for t in first if t in room.tasks]
        others = (t for t in room.tasks.values() if t.status in (PENDING, PROCESSING) and t.id not in first)
        for task in itertools.chain(newest, others):
            if len(chosen) >= rp.MAX_TASKS_OUT:
                break
            # Tasks are small (a prompt, a few options); the cap is for the worst case.
            size += len(task.prompt) + 2 * len(orjson.dumps(task.options)) + len(orjson.dumps(task.extra))
            if size > MAX_QUEUE_MESSAGE_BYTES and chosen:
                break
            chosen.append(task)
        chosen.sort(key=lambda t: t.seq)
        return chosen

    def _announce_task(self, task_id: str) -> None:
        if len(self._announce) < rp.MAX_TASKS_OUT:
            self._announce[task_id] = None
        if self._announcer is None or self._announcer.done():
            self._announcer = self._spawn(self._announce_loop(), "announce")

    async def _announce_loop(self) -> None:
        while self._announce and not self.closed:
            try:
                # The REST handler commits the task; joining that commit means peers never hear
                # of a task the store then rolled back. Tasks created meanwhile share the message.
                await self.queue.flush()
            except Unavailable:
                self._announce.clear()
                return
            ids = list(self._announce)
            self._announce.clear()
            tasks = self._snapshot(ids)
            if tasks:
                await self._send(rp.QUEUE, rp.queue_message(tasks, self.self_id))
                self.counts["announced"] += 1

    # -- dispatch --------------------------------------------------------------------------------

    def set_dispatch(self, enabled: bool) -> None:
        self.dispatch = enabled
        self._kick()

    def _kick(self) -> None:
        """Look for work to hand out, soon (one pump per room; requests while it runs coalesce)."""
        if not self.dispatch or self.closed:
            return
        self._pump_again = True
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = self._spawn(self._pump(), "dispatch")

    def _idle_gpu_peers(self) -> list[PeerState]:
        active = self.active_peers()
        now = asyncio.get_running_loop().time()
        return [
            s
            for s in self.peers.values()
            if s.has_gpu and s.assignment is None and s.resting_until <= now and s.id in active
        ]

    def _awaits_options(self, task: Task) -> bool:
        """Whether ``task`` was announced without options and the app's POST of it may still come
        (FILL_GRACE_SECONDS); a timer looks again when the grace ends."""
        deadline = self._unfilled.get(task.id)
        if deadline is None:
            return False
        now = asyncio.get_running_loop().time()
        if task.options or now >= deadline:
            del self._unfilled[task.id]
            return False
        if self._fill_timer is None:
            self._fill_timer = asyncio.get_running_loop().call_later(deadline - now, self._fill_grace_over)
        return True

    def _fill_grace_over(self) -> None:
        self._fill_timer = None
        self._kick()

    def _open_chunks(self) -> Iterator[tuple[TaskPlan, ChunkState]]:
        for plan in self.plans.values():
            for chunk in plan.chunks.values():
                if chunk.worker is None and not chunk.done:
                    yield plan, chunk

    def _next_offer(self) -> tuple[PeerState, TaskPlan, ChunkState] | None:
        idle = self._idle_gpu_peers()
        if not idle:
            return None
        peer = min(idle, key=lambda s: (s.last_served, s.order))  # least recently served
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
            claimer = peer.id if len(chunks) == 1 else self.self_id
            self.queue.update(self.room_id, task.id, TaskUpdate("claim", claimer, None, None, None))
            plan = self.plans[task.id] = TaskPlan(task.id, claimer, {c.id: ChunkState(c) for c in chunks})
            offer = (plan, next(iter(plan.chunks.values())))
        plan, chunk = offer
        chunk.worker = peer.id
        chunk.progress = 0.0
        peer.assignment = (plan.task_id, chunk.plan.id)
        self._served += 1
        peer.last_served = self._served
        return peer, plan, chunk

    async def _pump(self) -> None:
        while self._pump_again and self.dispatch and not self.closed:
            self._pump_again = False
            while self.dispatch and not self.closed:
                offer = self._next_offer()
                if offer is None:
                    break
                peer, plan, chunk = offer
                try:
                    await self.queue.flush()  # the claim is on disk before anyone works on it
                except Unavailable:
                    # Reloaded (on_event dropped the plans). Wait before claiming again, so a
                    # failing disk is not hammered in a loop.
                    await asyncio.sleep(STORE_RETRY_SECONDS)
                    break
                if self.plans.get(plan.task_id) is not plan or chunk.worker != peer.id:
                    continue  # cancelled, or the peer left, while the claim was committing
                task = self.queue.get_task(self.room_id, plan.task_id)
                self.counts["dispatched"] += 1
                log.info("room %s: task %s (%s) handed to %s", self.room_id, task.id, chunk.plan.id, peer.id)
                sent = await self._send(rp.TASK, rp.task_message(task, chunk.plan, self.self_id), peer.id)
                if not sent and self.plans.get(plan.task_id) is plan and chunk.worker == peer.id:
                    self._reoffer(plan, chunk, "send_failed")

    def _free(self, peer_id: str) -> None:
        state = self.peers.get(peer_id)
        if state is not None:
            state.assignment = None

    def _release(self, plan: TaskPlan, *, silent: bool = False) -> None:
        """Free every peer working on ``plan`` (it was dropped); their later messages are late.
        ``silent``: they lost it to the lease, and rest before they get more."""
        for chunk in plan.chunks.values():
            if chunk.worker is None:
                continue
            self._remember(plan.task_id, chunk.worker)
            state = self.peers.get(chunk.worker)
            if state is not None and state.assignment == (plan.task_id, chunk.plan.id):
                state.assignment = None
                if silent and not chunk.done:
                    self._rest(state)

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
        self._flush_soon()
        self._kick()

    # -- views -----------------------------------------------------------------------------------

    def referenced_results(self) -> set[str]:
        """Files that are stored but not yet referenced by a task (kept by results gc)."""
        names = {image.path for image in self.staged.values()}
        finished = (plan for plan in self.finished.values() if plan is not None)
        for plan in itertools.chain(self.plans.values(), finished):
            names.update(c.image.path for c in plan.chunks.values() if c.image is not None)
        return names

    def stats(self) -> dict[str, Any]:
        return {
            "gpuPeers": self.gpu_peers(),
            "dispatch": self.dispatch,
            "protocol": {
                "received": dict(self.received),
                "dropped": dict(self.dropped),
                "droppedTotal": sum(self.dropped.values()),
                **{k: self.counts[k] for k in ("dispatched", "reoffered", "completed", "announced")},
                "resultsStored": self.counts["resultsStored"],
                "resultBytes": self.counts["resultBytes"],
                "sendFailures": self.counts["sendFailures"],
                "assignments": [
                    {"peer": s.id, "taskId": s.assignment[0], "chunkId": s.assignment[1]}
                    for s in self.peers.values()
                    if s.assignment is not None
                ],
            },
        }
