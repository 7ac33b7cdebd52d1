"""The relay interface: carry signaling text between named topics, and nothing else.

A relay knows nothing of SDP, peers or rooms. The strategy above it subscribes to topics,
publishes JSON strings and gets ``on_message(topic, text)`` back. The base class owns everything
that does not depend on the transport:

* the connection lifecycle (``start`` / ``close``) and a supervisor task that reconnects with
  exponential backoff and jitter,
* the ``state`` machine and its ``on_state`` callback,
* the subscription set, restored on every (re)connect,
* a bounded send queue for messages published while disconnected (oldest dropped first),
* decoding inbound payloads as UTF-8 and shielding the transport from callback errors.

A subclass implements a handful of small transport hooks (see "Transport hooks" below).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

RelayState = Literal["connecting", "connected", "reconnecting", "closed"]
MessageCallback = Callable[[str, str], None]
StateCallback = Callable[[RelayState], None]

# Signaling bursts are small (an announce, one offer, a few candidates per peer); 256 covers a
# busy room while a broker restarts without holding stale offers forever.
DEFAULT_QUEUE_LIMIT = 256
DEFAULT_CONNECT_TIMEOUT = 10.0
# A connection that lived at least this long was healthy, so the next drop restarts the backoff
# from its first step; a broker that accepts and then drops us at once keeps backing off instead.
STABLE_CONNECTION_S = 10.0


@dataclass(frozen=True)
class Backoff:
    """Exponential reconnect delays with jitter: ``min(cap, initial * factor**n)`` shortened by up
    to ``jitter`` (a fraction), so many clients of one broker do not reconnect in lockstep."""

    initial: float = 1.0
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.factor < 1 or self.cap < self.initial or not 0 <= self.jitter <= 1:
            raise ValueError(f"invalid backoff settings: {self}")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        # The exponent is clamped so a relay retrying for days cannot overflow the float.
        base = min(self.cap, self.initial * self.factor ** min(attempt, 64))
        return base * (1.0 - self.jitter * rand())


class Relay(ABC):
    """One connection to one signaling server (MQTT broker, nostr relay, ...).

    Owner contract: set ``on_message`` / ``on_state``, ``subscribe`` and ``publish`` at any time
    (before or after ``start``), ``await start()`` once, ``await close()`` at the end. All methods
    must be called from the event loop that runs the relay; callbacks run on that loop and must
    not block. ``start()`` returns at once: it never waits for the server, so an absent server
    only means the relay stays ``connecting`` and keeps retrying.

    States: ``closed`` (before ``start`` and after ``close``) -> ``connecting`` (until the first
    session is up) -> ``connected`` (session up *and* subscriptions acknowledged) ->
    ``reconnecting`` (after a loss, until the next session is up) -> ``connected`` ...
    """

    def __init__(
        self,
        url: str,
        *,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        backoff: Backoff | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        if queue_limit < 1:
            raise ValueError("queue_limit must be >= 1")
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be > 0")
        self._url = url
        self.on_message: MessageCallback | None = None
        self.on_state: StateCallback | None = None
        self._state: RelayState = "closed"
        # Insertion-ordered set: Trystero subscribes in a fixed order (self topic, then root).
        self._topics: dict[str, None] = {}
        # Futures handed out by subscribe(), resolved when the server acknowledges the topic.
        self._sub_waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Bounded by _queue_limit; _enqueue evicts the oldest entry and logs it.
        self._queue: deque[tuple[str, str]] = deque()
        self._queue_limit = queue_limit
        self._dropped = 0
        self._dropped_since_drain = 0
        self._backoff = backoff or Backoff()
        self._connect_timeout = connect_timeout
        self._task: asyncio.Task[None] | None = None
        self._close_lock = asyncio.Lock()
        self._state_waiters: list[asyncio.Future[None]] = []
        self._ever_connected = False
        self._attempts = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._url} {self._state}>"

    # ------------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        return self._url

    @property
    def state(self) -> RelayState:
        return self._state

    @property
    def topics(self) -> tuple[str, ...]:
        """Current subscriptions, in the order they were made."""
        return tuple(self._topics)

    @property
    def queued(self) -> int:
        """Messages waiting in the send queue."""
        return len(self._queue)

    @property
    def dropped(self) -> int:
        """Messages evicted from the full send queue since the relay was created."""
        return self._dropped

    @property
    def connect_attempts(self) -> int:
        """Connection attempts made so far (successful or not)."""
        return self._attempts

    async def start(self) -> None:
        """Begin connecting in the background; returns immediately."""
        if self._task is not None:
            raise RuntimeError(f"{self!r} already started")
        self._ever_connected = False
        self._set_state("connecting")
        self._task = asyncio.create_task(self._supervise(), name=f"relay {self._url}")

    async def close(self) -> None:
        """Flush what can be flushed, say goodbye to the server and stop. Idempotent.

        Messages still queued afterwards are dropped; subscriptions are kept, so a later
        ``start()`` resumes them.
        """
        async with self._close_lock:  # a second close() waits for the first, then finds nothing to do
            await self._close()

    async def _close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # asyncio.wait, unlike awaiting the task, does not re-raise its CancelledError here,
            # so a cancellation of close() itself still propagates normally.
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                log.error("%s: supervisor failed", self._url, exc_info=task.exception())
        if self._state == "connected":
            self._flush_queue(force=True)
        try:
            await self._disconnect()
        finally:
            if self._queue:
                log.info("%s: closed with %d unsent message(s) dropped", self._url, len(self._queue))
                self._queue.clear()
            for waiters in self._sub_waiters.values():
                for fut in waiters:
                    fut.cancel()
            self._sub_waiters.clear()
            self._set_state("closed")

    async def wait_connected(self) -> None:
        """Wait until the relay is connected (subscriptions active). Raises ``ConnectionError``
        if the relay is closed (or not started) while waiting."""
        loop = asyncio.get_running_loop()
        while self._state != "connected":
            if self._task is None:
                raise ConnectionError(f"{self._url}: relay is not running")
            fut: asyncio.Future[None] = loop.create_future()
            self._state_waiters.append(fut)
            await fut

    def subscribe(self, topic: str) -> asyncio.Future[None]:
        """Add a topic; it stays subscribed across reconnects until ``unsubscribe``.

        The returned future resolves once the server has acknowledged the subscription, which
        may be after a later (re)connect. Awaiting it is optional; it is cancelled on
        ``unsubscribe`` or ``close``.
        """
        self._validate_topic(topic, is_filter=True)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if topic in self._topics and self._state == "connected" and topic not in self._sub_waiters:
            fut.set_result(None)  # already active on this connection
            return fut
        self._sub_waiters.setdefault(topic, []).append(fut)
        if topic not in self._topics:
            self._topics[topic] = None
            if self._state == "connected":
                self._subscribe_live([topic])
        return fut

    def unsubscribe(self, topic: str) -> None:
        if topic not in self._topics:
            return
        del self._topics[topic]
        for fut in self._sub_waiters.pop(topic, []):
            fut.cancel()
        if self._state == "connected":
            self._request_unsubscribe(topic)

    def publish(self, topic: str, text: str) -> None:
        """Send ``text`` to ``topic``. Never blocks: while disconnected (or while the transport
        is backed up) the message waits in the bounded send queue."""
        self._validate_topic(topic, is_filter=False)
        sendable = self._state == "connected" and not self._queue and self._ready_to_send()
        if not (sendable and self._send(topic, text)):
            self._enqueue(topic, text)

    # ------------------------------------------------------------------ for subclasses

    def _deliver(self, topic: str, payload: bytes) -> None:
        """Hand one inbound message to the owner. Never raises into the transport."""
        if not self._matches(topic):
            log.debug("%s: ignored a message on unsubscribed topic %s", self._url, topic)
            return
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            log.warning("%s: ignored a non-UTF-8 message on %s (%d bytes)", self._url, topic, len(payload))
            log.debug("%s: %s", self._url, exc)
            return
        callback = self.on_message
        if callback is None:
            return
        try:
            callback(topic, text)
        except Exception:
            log.exception("%s: on_message callback failed", self._url)

    def _flush_queue(self, *, force: bool = False) -> None:
        """Send queued messages while connected; ``force`` ignores transport back-pressure."""
        while self._queue and self._state == "connected" and (force or self._ready_to_send()):
            topic, text = self._queue[0]
            if not self._send(topic, text):
                break
            self._queue.popleft()
        if not self._queue and self._dropped_since_drain:
            log.warning(
                "%s: send queue drained; %d message(s) had been dropped while it was full",
                self._url,
                self._dropped_since_drain,
            )
            self._dropped_since_drain = 0

    def _matches(self, topic: str) -> bool:
        """Whether an inbound topic belongs to a current subscription (exact match here)."""
        return topic in self._topics

    def _validate_topic(self, topic: str, *, is_filter: bool) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` for a topic the transport cannot carry."""

    def _ready_to_send(self) -> bool:
        """False while the transport has enough unsent data buffered (back-pressure)."""
        return True

    # ------------------------------------------------------------------ transport hooks

    @abstractmethod
    async def _open(self) -> None:
        """Open the transport and the protocol session; return when it is usable, raise if not.
        Runs under the connect timeout and may be cancelled; ``_abort_connection`` cleans up."""

    @abstractmethod
    def _request_subscribe(self, topics: list[str]) -> asyncio.Future[None]:
        """Ask the server for ``topics``; the future resolves on its acknowledgement and fails
        (or is cancelled) if the connection goes away first."""

    @abstractmethod
    def _request_unsubscribe(self, topic: str) -> None:
        """Drop ``topic`` on the server (fire and forget)."""

    @abstractmethod
    def _send(self, topic: str, text: str) -> bool:
        """Hand one message to the transport; False if it cannot take it (connection gone)."""

    @abstractmethod
    async def _wait_disconnected(self) -> None:
        """Return once the open connection is gone."""

    @abstractmethod
    def _abort_connection(self) -> None:
        """Drop the connection (or a half-open attempt) at once, without a goodbye. Idempotent."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Graceful goodbye if connected, then release everything. Idempotent, never raises."""

    # ------------------------------------------------------------------ internals

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            self._set_state("reconnecting" if self._ever_connected else "connecting")
            self._attempts += 1
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._open()
                    await self._restore_subscriptions()
            except (OSError, TimeoutError, ConnectionError) as exc:
                self._abort_connection()
                log.info("%s: connect attempt failed: %s", self._url, _describe(exc))
            except Exception:
                self._abort_connection()
                log.exception("%s: unexpected error while connecting", self._url)
            except BaseException:  # cancelled by close(): leave nothing half-open behind
                self._abort_connection()
                raise
            else:
                up_since = loop.time()
                self._ever_connected = True
                self._set_state("connected")
                self._flush_queue()
                await self._wait_disconnected()
                self._abort_connection()
                log.warning("%s: connection lost", self._url)
                if loop.time() - up_since >= STABLE_CONNECTION_S:
                    failures = 0
                self._set_state("reconnecting")
            delay = self._backoff.delay(failures)
            failures += 1
            log.debug("%s: next connect attempt in %.2f s", self._url, delay)
            await asyncio.sleep(delay)

    async def _restore_subscriptions(self) -> None:
        sent: set[str] = set()
        # Loop because the owner may subscribe more topics while the acknowledgement is pending.
        while pending := [t for t in self._topics if t not in sent]:
            sent.update(pending)
            await self._request_subscribe(pending)
        for topic in sent - self._topics.keys():  # unsubscribed meanwhile
            self._request_unsubscribe(topic)
        self._resolve_sub_waiters(self._topics)

    def _subscribe_live(self, topics: list[str]) -> None:
        ack = self._request_subscribe(topics)
        ack.add_done_callback(functools.partial(self._on_live_ack, tuple(topics)))

    def _on_live_ack(self, topics: tuple[str, ...], ack: asyncio.Future[None]) -> None:
        # A failed ack means the connection dropped; the reconnect resubscribes and resolves.
        if ack.cancelled() or ack.exception() is not None:
            return
        self._resolve_sub_waiters(t for t in topics if t in self._topics)

    def _resolve_sub_waiters(self, topics: Iterable[str]) -> None:
        for topic in list(topics):
            for fut in self._sub_waiters.pop(topic, []):
                if not fut.done():
                    fut.set_result(None)

    def _enqueue(self, topic: str, text: str) -> None:
        if len(self._queue) >= self._queue_limit:
            old_topic, _ = self._queue.popleft()
            self._dropped += 1
            self._dropped_since_drain += 1
            # One warning per overflow episode (a summary follows when the queue drains), so a
            # long outage does not flood the log; every drop is still logged at DEBUG.
            level = logging.WARNING if self._dropped_since_drain == 1 else logging.DEBUG
            log.log(
                level,
                "%s: send queue full (%d), dropped the oldest message (topic %s)",
                self._url,
                self._queue_limit,
                old_topic,
            )
        self._queue.append((topic, text))

    def _set_state(self, state: RelayState) -> None:
        if state == self._state:
            return
        log.info("%s: %s -> %s", self._url, self._state, state)
        self._state = state
        waiters, self._state_waiters = self._state_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        callback = self.on_state
        if callback is not None:
            try:
                callback(state)
            except Exception:
                log.exception("%s: on_state callback failed", self._url)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
