"""The helper's part in one room of the browser app: tracking, announcing, and the room's dispatch.

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
- **Dispatch** (when enabled) is its :class:`~p2pdiff.rooms.dispatch.Dispatcher`'s job: which GPU
  peer works on which task and chunk, re-offers, resting silent workers. The agent tells it what
  the room and the queue say, and finds there the chunk a worker's ``progress``, ``result`` or
  ``chunk`` is about.

Anything malformed or out of turn is ignored and counted by ``<action>.<reason>`` (shown in
``/api/stats``); no payload can raise out of here into the room.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson

from p2pdiff.errors import Conflict, InvalidTransition, NotFound, Unavailable
from p2pdiff.rooms import protocol as rp
from p2pdiff.rooms.dispatch import ChunkState, Dispatcher, TaskPlan, task_id_of
from p2pdiff.tasks import events
from p2pdiff.tasks.images import ImageRejected
from p2pdiff.tasks.model import COMPLETE, FINISHED, PENDING, PROCESSING, Task
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.results import ResultStore, StoredImage, task_image
from p2pdiff.tasks.validate import TaskUpdate
from signaling.background import BackgroundTasks
from signaling.bounded import LruDict, LruSet, TokenBucket

log = logging.getLogger(__name__)

Send = Callable[[str, Any, str | None, Any], Awaitable[None]]
Emit = Callable[[str, dict[str, Any]], None]

# Caps on state kept per room; each says what happens when it is reached.
MAX_PEERS = 512  # peer records (signaling admits at most 256 connections per app); new ones ignored
MAX_STAGED = 256  # images that arrived before their result message (LRU; the file stays for gc)
MAX_FINISHED = 256  # tracked tasks finished by progress, kept to attach a later result (LRU)
# Per peer token buckets (like REST's per-client limit): messages of any action, and new tasks a
# peer may add to the durable queue. A browser steps at well under 100 progress messages per
# second; a joining browser may announce a few hundred queued tasks at once, then few.
MESSAGES_PER_SECOND, MESSAGE_BURST = 100.0, 500
NEW_TASKS_PER_SECOND, NEW_TASK_BURST = 10.0, 500
# A `queue` message the helper sends stays under this many bytes of task JSON (the newest tasks
# are always in it; older active ones fill the rest).
MAX_QUEUE_MESSAGE_BYTES = 1024 * 1024


@dataclass(slots=True)
class PeerState:
    id: str
    messages: TokenBucket = field(default_factory=lambda: TokenBucket(MESSAGES_PER_SECOND, MESSAGE_BURST))
    new_tasks: TokenBucket = field(default_factory=lambda: TokenBucket(NEW_TASKS_PER_SECOND, NEW_TASK_BURST))
    capabilities: rp.Capabilities | None = None

    @property
    def has_gpu(self) -> bool:
        return self.capabilities is not None and self.capabilities.has_gpu


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
        self.peers: dict[str, PeerState] = {}
        # Images for tracked (not dispatched) tasks, waiting for the result message; by task id.
        self.staged: LruDict[str, StoredImage] = LruDict(MAX_STAGED)
        # Tracked tasks completed by their worker's progress: a result that comes afterwards still
        # attaches (dispatched ones are the dispatcher's).
        self.finished: LruSet[str] = LruSet(MAX_FINISHED)
        self.received: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.closed = False
        self._announce: dict[str, None] = {}  # task ids created over REST, not yet broadcast
        self._announcer: asyncio.Future[None] | None = None
        self._flush_task: asyncio.Future[None] | None = None
        self._tasks = BackgroundTasks(log)
        # The background commit is apart: close() lets it finish (peer-made changes reach the disk).
        self._commits = BackgroundTasks(log)
        self.dispatcher = Dispatcher(
            room_id,
            queue,
            self_id=self_id,
            send=self._send,
            spawn=self._spawn,
            flush_soon=self._flush_soon,
            active_peers=active_peers,
            enabled=dispatch,
        )

    # -- plumbing --------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Future[None]:
        return self._tasks.spawn(coro, "room %s: %s", self.room_id, name, name=f"{name} {self.room_id}")

    def _flush_soon(self) -> None:
        """Commit peer-made changes in the background: nobody waits for an answer, and changes
        from many messages share one commit."""
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = self._commits.spawn(
                self._flush(), "room %s: flush", self.room_id, name=f"flush {self.room_id}"
            )

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
        self.dispatcher.close()
        self._tasks.cancel()
        await asyncio.gather(self._tasks.wait(), self._commits.wait())

    def _drop(self, action: str, reason: str, peer_id: str, detail: str = "") -> None:
        self.dropped[f"{action}.{reason}"] += 1
        log.debug("room %s: ignored %s from %s: %s %s", self.room_id, action, peer_id, reason, detail)

    # -- peers -----------------------------------------------------------------------------------

    def _peer(self, peer_id: str) -> PeerState | None:
        state = self.peers.get(peer_id)
        # Only for active peers: a message replayed after its peer left must not leave a record
        # behind that no leave event would ever remove.
        if state is None and len(self.peers) < MAX_PEERS and peer_id in self.active_peers():
            state = self.peers[peer_id] = PeerState(peer_id)
            self.dispatcher.add_worker(peer_id)
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
        self.peers.pop(peer_id, None)
        self.queue.write_soon(functools.partial(self.dispatcher.peer_left, peer_id))

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

        def handle() -> None:
            if self.closed:
                return
            try:
                handler(self, payload, peer_id, metadata)
            except rp.ProtocolError as exc:
                self._drop(action, exc.reason, peer_id, exc.detail)
            except Exception:
                log.exception("room %s: handling %s from %s failed", self.room_id, action, peer_id)
                self._drop(action, rp.INTERNAL_ERROR, peer_id)

        # Now, or (several nodes) in this node's next write turn: the rows it decides on are current.
        self.queue.write_soon(handle)

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

    def _on_capabilities(self, payload: Any, peer_id: str, metadata: Any) -> None:
        caps = rp.parse_capabilities(payload)
        state = self._peer(peer_id)
        if state is None:
            raise rp.ProtocolError(rp.NOT_A_PEER, f"not an active peer, or more than {MAX_PEERS}")
        state.capabilities = caps
        self.dispatcher.heard_from(peer_id)
        if self.emit is not None:
            self.emit(events.PEER_CAPABILITIES, {"peer": {"id": peer_id, "capabilities": caps.to_json()}})
        self.dispatcher.set_gpu(peer_id, caps.has_gpu)

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
                    functools.partial(
                        self.queue.upsert_from_peer,
                        self.room_id,
                        item.new,
                        item.status,
                        item.worker,
                        sender=peer_id,
                        origin=origin,
                    ),
                )
            except rp.ProtocolError as exc:
                self._drop(rp.QUEUE, exc.reason, peer_id, exc.detail)
                continue
            created = created or added.created
            if added.created and not added.task.options:
                self.dispatcher.awaits_options(added.task.id)
            room = self.queue.get_room(self.room_id)
        if created:
            self._flush_soon()
            self.dispatcher.kick()

    def _on_task(self, payload: Any, peer_id: str, metadata: Any) -> None:
        # The helper announces hasGPU: false, so a well-behaved app never sends it work.
        raise rp.ProtocolError(rp.NOT_A_WORKER)

    def _not_yours(self, task: Task | None, task_id: str, peer_id: str) -> str:
        """Why a worker's message about a task it does not hold is ignored."""
        if self.dispatcher.taken_from(task_id, peer_id):
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
        self.dispatcher.heard_from(peer_id)
        plan = self.dispatcher.plans.get(msg.task_id)
        # The published app's worker reports progress up to 1.0 and never sends a result: 1.0
        # is "done" (a result or image that comes later still attaches; see _on_result).
        done = msg.progress >= 1.0
        if plan is not None:
            chunk = plan.chunk_of(peer_id, msg.chunk_id)
            if chunk is None:
                raise rp.ProtocolError(self._not_yours(self._task_or_none(msg.task_id), msg.task_id, peer_id))
            if chunk.done:
                raise rp.ProtocolError(rp.DUPLICATE)
            chunk.progress = msg.progress
            if done:
                fields = self._result_fields(plan.task_id, chunk.plan.id, peer_id, chunk.image)
                self.dispatcher.chunk_done(plan, chunk, fields, origin)
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
                image = self.staged.pop(msg.task_id)
                fields = self._result_fields(msg.task_id, msg.chunk_id, peer_id, image)
                self.queue.worker_complete(self.room_id, msg.task_id, peer_id, fields, origin=origin)
                self.finished.add(msg.task_id)
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
            self.dispatcher.drop(plan)
            claimer = plan.claimer
        self.queue.update(
            self.room_id, task.id, TaskUpdate("fail", claimer, None, None, error), origin=origin
        )
        self._flush_soon()
        self.dispatcher.kick()

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
        self.dispatcher.heard_from(peer_id)
        task = self._task_or_none(msg.task_id)
        if task is None:
            raise rp.ProtocolError(rp.UNKNOWN_TASK)
        plan = self.dispatcher.plans.get(msg.task_id)
        if plan is None and (msg.task_id in self.dispatcher.finished or msg.task_id in self.finished):
            self._late_result(task, self.dispatcher.finished.get(msg.task_id), msg, peer_id, origin)
            return
        chunk: ChunkState | None = None
        if plan is not None:
            chunk = plan.chunk_of(peer_id, msg.chunk_id, reported=True)
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
            image = image or self.staged.pop(msg.task_id)
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
            self.dispatcher.chunk_done(plan, chunk, fields, origin)

    def _late_result(
        self, task: Task, plan: TaskPlan | None, msg: rp.Result, peer_id: str, origin: events.Origin
    ) -> None:
        """A ``result`` after progress 1.0 finished the sender's work: its data and image join the
        task's result (``plan`` None: a task the helper did not dispatch)."""
        chunk: ChunkState | None = None
        if plan is None:
            if task.status != COMPLETE or task.claimed_by != peer_id:
                raise rp.ProtocolError(self._not_yours(task, task.id, peer_id))
            chunk_id: str | None = msg.chunk_id
        else:
            chunk = plan.chunk_of(peer_id, msg.chunk_id, reported=True)
            if chunk is None:
                raise rp.ProtocolError(self._not_yours(task, task.id, peer_id))
            if chunk.reported:
                raise rp.ProtocolError(rp.DUPLICATE)
            chunk_id = msg.chunk_id or chunk.plan.id
        if msg.status == "failed":
            raise rp.ProtocolError(rp.LATE)  # its progress said done; the task stays complete
        image = self._image_from_data(msg.data)
        if plan is None:
            self.finished.discard(task.id)  # one result per task: a second is a duplicate
            fields = self._result_fields(task.id, chunk_id, peer_id, image, msg)
            self._queue_call(
                rp.RESULT,
                peer_id,
                lambda: self.queue.attach_result(self.room_id, task.id, peer_id, fields, origin=origin),
            )
        else:
            assert chunk is not None
            chunk.reported = True
            chunk.image = image or chunk.image
            chunk.result = self._result_fields(task.id, chunk_id, peer_id, chunk.image, msg)
            self.dispatcher.attach_result(plan, origin)
        self._flush_soon()

    def _on_chunk(self, payload: Any, peer_id: str, metadata: Any) -> None:
        data, meta = rp.parse_chunk(payload, metadata)
        origin = events.Origin.peer_message(self.room_id, peer_id)
        self.dispatcher.heard_from(peer_id)
        task = self._task_or_none(meta.task_id)
        if task is None:
            raise rp.ProtocolError(rp.UNKNOWN_TASK)
        plan = self.dispatcher.plans.get(meta.task_id) or self.dispatcher.finished.get(meta.task_id)
        chunk = plan.chunk_of(peer_id, meta.chunk_id, reported=True) if plan is not None else None
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
                self.dispatcher.attach_result(plan, origin)
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
            self.staged[task.id] = image

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
        task_id = task_id_of(event)
        if event.type == events.TASK_CREATED and task_id is not None:
            if event.origin.kind != "peer":  # a peer's own task: its room heard of it from the peer
                self._announce_task(task_id)
        elif event.type in (events.TASK_REQUEUED, events.TASK_FAILED, events.TASK_CANCELLED) and task_id:
            self.staged.pop(task_id)
        elif event.type == events.QUEUE_RELOADED:
            # Memory went back to the last commit: what was handed out since may be undone.
            self.staged.clear()
            self.finished.clear()
        self.dispatcher.on_event(event)

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

    def set_dispatch(self, enabled: bool) -> None:
        self.dispatcher.set_enabled(enabled)

    # -- views -----------------------------------------------------------------------------------

    def referenced_results(self) -> set[str]:
        """Files that are stored but not yet referenced by a task (kept by results gc)."""
        return {image.path for image in self.staged.values()} | self.dispatcher.referenced_results()

    def stats(self) -> dict[str, Any]:
        return {
            "gpuPeers": self.gpu_peers(),
            "dispatch": self.dispatcher.enabled,
            "protocol": {
                "received": dict(self.received),
                "dropped": dict(self.dropped),
                "droppedTotal": sum(self.dropped.values()),
                **{k: self.dispatcher.counts[k] for k in ("dispatched", "reoffered", "completed")},
                "announced": self.counts["announced"],
                "resultsStored": self.counts["resultsStored"],
                "resultBytes": self.counts["resultBytes"],
                "sendFailures": self.counts["sendFailures"],
                "assignments": self.dispatcher.assignments(),
            },
        }
