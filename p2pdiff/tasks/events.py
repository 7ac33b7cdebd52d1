"""In-process event bus: the queue and the helper publish, SSE clients (and anyone else) subscribe.

Everything is synchronous and runs on the one event loop: ``publish`` appends to a bounded backlog
and offers the event to every subscriber's bounded buffer, without awaiting. A subscriber whose
buffer is full is a consumer that cannot keep up; it is dropped (its ``on_overflow`` callback runs,
e.g. to close its connection) instead of letting its buffer grow.

Event ids are increasing integers. A process starts numbering at the current time in microseconds,
so a client resuming with an id from an earlier process of this server is always told to refetch
instead of silently missing what happened in between. On a store several nodes share, events are
numbered by the database instead (pg_store.py) and arrive through ``deliver``: every node then
carries the same ids, in one order, and a client may resume on any node.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

log = logging.getLogger(__name__)

# Defaults; the app passes the [server] sse_* config values.
DEFAULT_BACKLOG = 1000
DEFAULT_CLIENT_BUFFER = 256
DEFAULT_MAX_SUBSCRIBERS = 256
DEFAULT_MAX_PER_OWNER = 8

# The event types, for readers of the code and of the API (also listed in the README).
TASK_CREATED = "task.created"
TASK_CLAIMED = "task.claimed"
TASK_PROGRESS = "task.progress"
TASK_COMPLETE = "task.complete"
TASK_FAILED = "task.failed"
TASK_CANCELLED = "task.cancelled"
TASK_REQUEUED = "task.requeued"  # data.reason: "requeue" (a worker asked), "lease_expired", "worker_left"
TASK_UPDATED = "task.updated"  # a later submission of the same task filled fields it lacked
TASK_MOVED = "task.moved"  # data.fromRoom: it was in the default room until its room named it
TASK_RESULT = "task.result"  # a complete task's result gained its image (bytes after the result message)
TASKS_PRUNED = "tasks.pruned"  # retention removed finished tasks of an idle room
QUEUE_RELOADED = "queue.reloaded"  # a commit failed and its changes were undone in memory: refetch
HELPER_JOINED = "helper.joined"
HELPER_LEFT = "helper.left"
PEER_JOINED = "peer.joined"
PEER_LEFT = "peer.left"
PEER_RTT = "peer.rtt"
PEER_CAPABILITIES = "peer.capabilities"  # data.peer carries the capabilities the peer announced
RELAY_STATE = "relay.state"
RESET = "reset"  # SSE only: the stream cannot be resumed from the client's id; refetch everything
HELLO = "hello"  # SSE only: first event of a fresh stream, its id is where the client stands


@dataclass(frozen=True, slots=True)
class Origin:
    """What made an event happen, for listeners in this process (never sent to clients).

    ``kind`` "server": the server itself (a REST request, the helper's own hand-outs, the lease and
    retention sweeps); "peer": a message from peer ``peer`` in room ``room``. The room agent does
    not announce back to a room the tasks its own peers announced.
    """

    kind: Literal["server", "peer"]
    room: str | None = None
    peer: str | None = None

    @classmethod
    def peer_message(cls, room: str, peer: str) -> Origin:
        return cls("peer", room, peer)


SERVER = Origin("server")


class Publish(Protocol):
    def __call__(
        self, type: str, room: str | None, data: dict[str, Any], *, origin: Origin = SERVER
    ) -> Event | None: ...


def encode_sse(event_id: int, payload: bytes) -> bytes:
    """One SSE message. ``payload`` is single-line JSON (orjson never emits raw newlines)."""
    return b"id: %d\ndata: %s\n\n" % (event_id, payload)


@dataclass(slots=True)
class Event:
    id: int
    type: str
    room: str | None
    data: dict[str, Any]
    ts: int  # milliseconds since the epoch, like the task times
    origin: Origin = SERVER  # not part of to_json(): what clients see stays as it was
    # Serialized once at publish and shared by every subscriber: N clients cost N references.
    frame: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.frame = encode_sse(self.id, orjson.dumps(self.to_json()))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "room": self.room, "ts": self.ts, "data": self.data}

    def concerns(self, room: str | None) -> bool:
        """Whether a stream of ``room``'s events (None: all) carries this one. A task that moved
        away is news for the room it left as well."""
        if room is None or self.room is None or self.room == room:
            return True
        return self.type == TASK_MOVED and self.data.get("fromRoom") == room


class Subscriber:
    """One consumer's bounded buffer. ``room`` None means every room."""

    def __init__(
        self,
        bus: EventBus,
        room: str | None,
        limit: int,
        on_overflow: Callable[[], None] | None = None,
        owner: str | None = None,
    ) -> None:
        self.bus = bus
        self.room = room
        self.limit = limit
        self.on_overflow = on_overflow
        self.owner = owner
        # Bounded by ``limit``: offer() drops the subscriber rather than exceed it.
        self._buffer: deque[Event] = deque()
        self._wakeup: asyncio.Future[None] | None = None  # while a reader waits
        self.closed = False
        self.overflowed = False
        self.peak = 0  # the largest the buffer ever got (tests and stats)

    def wants(self, event: Event) -> bool:
        return event.concerns(self.room)

    def __len__(self) -> int:
        return len(self._buffer)

    def offer(self, event: Event) -> None:
        if self.closed or not self.wants(event):
            return
        if len(self._buffer) >= self.limit:
            self.overflowed = True
            self.bus.unsubscribe(self)
            self.bus.slow_disconnects += 1
            log.warning(
                "event stream consumer too slow (%d events buffered%s): disconnecting it",
                len(self._buffer),
                f", room {self.room}" if self.room else "",
            )
            self._buffer.clear()  # it is going away; don't hold the events for it
            if self.on_overflow is not None:
                try:
                    self.on_overflow()
                except Exception:
                    log.exception("on_overflow callback failed")
            return
        self._buffer.append(event)
        if len(self._buffer) > self.peak:
            self.peak = len(self._buffer)
            self.bus.max_buffered = max(self.bus.max_buffered, self.peak)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def drain(self) -> list[Event]:
        """Everything buffered, oldest first (empty when nothing is)."""
        events = list(self._buffer)
        self._buffer.clear()
        return events

    def take(self, max_bytes: int) -> list[Event]:
        """The oldest buffered events, about ``max_bytes`` of frames (at least one if any).

        What is not taken stays buffered and counts against the limit: a consumer that writes in
        pieces is measured by what it has not yet written, not by what it has taken out.
        """
        out: list[Event] = []
        size = 0
        while self._buffer and (not out or size + len(self._buffer[0].frame) <= max_bytes):
            event = self._buffer.popleft()
            out.append(event)
            size += len(event.frame)
        return out

    async def wait(self) -> None:
        """Until something is buffered or the subscriber is closed."""
        if self._buffer or self.closed:
            return
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None


class TooManySubscribers(Exception):
    pass


class OwnerLimitReached(TooManySubscribers):
    """This owner (a client address) holds its share of the subscriptions already."""


class EventBus:
    def __init__(
        self,
        *,
        backlog: int = DEFAULT_BACKLOG,
        max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS,
        max_per_owner: int = DEFAULT_MAX_PER_OWNER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.max_subscribers = max_subscribers
        # A share per owner, so one client cannot take every subscription and lock others out.
        self.max_per_owner = max_per_owner
        # The resume window: the newest ``backlog`` events; older ones fall off the left.
        self._backlog: deque[Event] = deque(maxlen=backlog)
        self._next_id = time.time_ns() // 1000
        # Every id up to here is unknown or fell out of the backlog: resuming from before it resets.
        self._floor = self._next_id - 1
        # Bounded by max_subscribers (subscribe refuses past it).
        self._subscribers: set[Subscriber] = set()
        # Subscriptions per owner; an owner leaves the map with its last one, so it is bounded too.
        self._owners: dict[str, int] = {}
        self._listeners: list[Callable[[Event], None]] = []
        self.closed = False
        self.published = 0
        self.slow_disconnects = 0
        self.max_buffered = 0  # the most events any one subscriber ever had waiting

    @property
    def last_id(self) -> int:
        """The id of the newest event (one below the first id while there is none)."""
        return self._next_id - 1

    def publish(
        self, type: str, room: str | None, data: dict[str, Any], *, origin: Origin = SERVER
    ) -> Event | None:
        """Record an event and hand it to every subscriber. Never raises, never awaits."""
        if self.closed:
            return None
        event = Event(self._next_id, type, room, data, int(self.clock() * 1000), origin)
        self._dispatch(event)
        return event

    def start_after(self, last_id: int) -> None:
        """Number from the database's ids (a shared store): ``last_id`` is the newest event before
        this process, not in its backlog. Only before the first event."""
        assert not self._backlog
        self._next_id = last_id + 1
        self._floor = last_id

    @property
    def backlog_size(self) -> int:
        return self._backlog.maxlen or 0

    def preload(self, past: list[Event]) -> None:
        """Events from before this process (a shared store's newest) into the resume window only:
        subscribers and listeners have nothing to do with the past."""
        for event in past:
            if event.id >= self._next_id:
                self._next_id = event.id + 1
                self._backlog.append(event)

    def deliver(self, event: Event) -> None:
        """An event numbered elsewhere (a shared store's feed), ids increasing with gaps allowed."""
        if self.closed:
            return
        if event.id < self._next_id:
            log.warning("event %d arrived after %d: dropped", event.id, self._next_id - 1)
            return
        self._dispatch(event)

    def _dispatch(self, event: Event) -> None:
        self._next_id = event.id + 1
        self.published += 1
        if len(self._backlog) == self._backlog.maxlen:
            self._floor = self._backlog[0].id  # about to fall off the left
        self._backlog.append(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener %r failed", listener)
        # A copy: offer() may unsubscribe a slow subscriber while we iterate.
        for subscriber in list(self._subscribers):
            subscriber.offer(event)

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """A synchronous callback for every event (metrics, the helper); must be quick."""
        self._listeners.append(listener)

    def subscribe(
        self,
        room: str | None = None,
        *,
        limit: int = DEFAULT_CLIENT_BUFFER,
        on_overflow: Callable[[], None] | None = None,
        owner: str | None = None,
    ) -> Subscriber:
        """A new subscription; ``owner`` (who asks, e.g. a client address) gets ``max_per_owner``."""
        if self.closed:
            raise TooManySubscribers("the event bus is closed")
        held = self._owners.get(owner, 0) if owner is not None else 0
        if held >= self.max_per_owner:
            raise OwnerLimitReached(f"at most {self.max_per_owner} event streams per client")
        if len(self._subscribers) >= self.max_subscribers:
            raise TooManySubscribers(f"at most {self.max_subscribers} event streams at once")
        subscriber = Subscriber(self, room, limit, on_overflow, owner)
        self._subscribers.add(subscriber)
        if owner is not None:
            self._owners[owner] = held + 1
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)
            owner = subscriber.owner
            if owner is not None:
                left = self._owners.pop(owner) - 1
                if left:
                    self._owners[owner] = left
        subscriber.close()

    def since(self, last_id: int, room: str | None = None) -> list[Event] | None:
        """Events after ``last_id`` (for ``room`` if given), or None when some fell out of the backlog
        or the id is not one of this process's (then the client must refetch)."""
        if last_id < self._floor or last_id > self.last_id:
            return None
        return [e for e in self._events_after(last_id) if e.concerns(room)]

    def _events_after(self, last_id: int) -> Iterable[Event]:
        start = bisect.bisect_right(self._backlog, last_id, key=lambda event: event.id)
        return itertools.islice(self._backlog, start, None)

    def close(self) -> None:
        """Stop publishing and end every subscription (at shutdown)."""
        self.closed = True
        for subscriber in list(self._subscribers):
            self.unsubscribe(subscriber)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def stats(self) -> dict[str, Any]:
        return {
            "lastId": self.last_id,
            "published": self.published,
            "backlog": len(self._backlog),
            "clients": len(self._subscribers),
            "slowDisconnects": self.slow_disconnects,
            "maxBuffered": self.max_buffered,
        }
