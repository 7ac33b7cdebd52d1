"""The relay interface: carry signaling text between named topics, and nothing else.

A relay knows nothing of SDP, peers or rooms. The strategy above it subscribes to topics,
publishes JSON strings and gets ``on_message(topic, text)`` back.

Everything that does not depend on one protocol is written once, here:

* :class:`ConnectionLifecycle`, shared by every signaling connection, topic relay or not (the
  WebTorrent :class:`~signaling.relays.torrent.TorrentRelay` builds on it too): ``start`` /
  ``close``, a supervisor task that reconnects with exponential backoff and jitter (restarted
  from its first step after a connection that lived ``STABLE_CONNECTION_S``), the ``state``
  machine with its ``on_state`` callback, and ``wait_connected``.
* :class:`Relay`, a lifecycle that carries topics:

  * the subscription set, restored on every (re)connect,
  * a bounded send queue for messages published while disconnected (oldest dropped first),
  * decoding inbound payloads as UTF-8 and shielding the transport from callback errors.

  A subclass implements a handful of small transport hooks (see "Transport hooks" below).
* :class:`Link`, the connection under the nostr relay, the ws-relay (both through
  :class:`~signaling.relays.link_relay.LinkRelay`) and the tracker client, which keep only their
  protocol: :class:`WebSocketLink`, the aiohttp WebSocket client (one socket at a time, a
  writer task fed from an outbox, a reader task, the heartbeat, closing in the background), or
  :class:`~signaling.relays.local.LocalLink` to a server in this process (no socket at all);
  :func:`~signaling.relays.local.make_link` picks one by URL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import ssl
import urllib.parse
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Literal

import aiohttp

from signaling.background import BackgroundTasks

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
# How long a goodbye (last frames, a close frame, an MQTT DISCONNECT) may take before we hang up.
GOODBYE_TIMEOUT_S = 2.0
_READ_YIELD_EVERY = 64


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


class ConnectionLifecycle(ABC):
    """One supervised connection to one signaling server: ``start`` / ``close``, reconnects, state.

    Owner contract: set ``on_state`` at any time, ``await start()`` once, ``await close()`` at the
    end. All methods must be called from the event loop that runs the connection; callbacks run
    on that loop and must not block. ``start()`` returns at once: it never waits for the server,
    so an absent server only means the state stays ``connecting`` while it keeps retrying.

    States: ``closed`` (before ``start`` and after ``close``) -> ``connecting`` (until the first
    connection is up) -> ``connected`` -> ``reconnecting`` (after a loss, until the next
    connection is up) -> ``connected`` ... What "up" means is decided by ``_connect``.

    A subclass implements the lifecycle hooks below and may set the class attributes.
    """

    #: Where the lifecycle's lines go (state changes, failed attempts, losses): the subclass's
    #: module logger, so they appear where that protocol's other lines do.
    _log: ClassVar[logging.Logger] = log
    #: First word of the supervisor task's name.
    _task_label: ClassVar[str] = "relay"
    #: Connect failures the network is expected to cause: one INFO line, no traceback.
    _connect_errors: ClassVar[tuple[type[Exception], ...]] = (OSError, TimeoutError, ConnectionError)

    def __init__(self, url: str, *, backoff: Backoff, connect_timeout: float) -> None:
        self._url = url
        self._name = redact_url(url)
        self.on_state: StateCallback | None = None
        self._state: RelayState = "closed"
        self._backoff = backoff
        self._connect_timeout = connect_timeout
        self._task: asyncio.Task[None] | None = None
        self._close_lock = asyncio.Lock()
        self._state_waiters: list[asyncio.Future[None]] = []
        self._ever_connected = False
        self._attempts = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name} {self._state}>"

    @property
    def url(self) -> str:
        """The URL as configured, credentials included: for connecting and as a key, never for
        display (use ``name``)."""
        return self._url

    @property
    def name(self) -> str:
        """The URL with its password masked: what log lines, task names and errors show."""
        return self._name

    @property
    def state(self) -> RelayState:
        return self._state

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
        self._task = asyncio.create_task(self._supervise(), name=f"{self._task_label} {self._name}")

    async def close(self) -> None:
        """Stop reconnecting, end the connection (``_shutdown`` says goodbye first) and go
        ``closed``. Idempotent."""
        async with self._close_lock:  # a second close() waits for the first, then finds nothing to do
            task, self._task = self._task, None
            tasks = [t for t in (task, *self._detach_tasks()) if t is not None]
            for t in tasks:
                t.cancel()
            if tasks:
                # asyncio.wait, unlike awaiting the tasks, does not re-raise their CancelledError
                # here, so a cancellation of close() itself still propagates normally.
                await asyncio.wait(tasks)
            if task is not None and not task.cancelled() and task.exception() is not None:
                self._log.error("%s: supervisor failed", self._name, exc_info=task.exception())
            try:
                await self._shutdown()
            finally:
                self._set_state("closed")

    async def wait_connected(self) -> None:
        """Wait until the state is ``connected``. Raises ``ConnectionError`` if the connection is
        closed (or not started) while waiting."""
        loop = asyncio.get_running_loop()
        while self._state != "connected":
            if self._task is None:
                raise ConnectionError(f"{self._name}: relay is not running")
            fut: asyncio.Future[None] = loop.create_future()
            self._state_waiters.append(fut)
            await fut

    # ------------------------------------------------------------------ lifecycle hooks

    @abstractmethod
    async def _connect(self) -> None:
        """Make one connection usable; return when it is up, raise if it cannot be. Runs under
        the connect timeout and may be cancelled; ``_abort_connection`` cleans up."""

    @abstractmethod
    def _on_connected(self) -> None:
        """The state just became ``connected``: start using the connection."""

    @abstractmethod
    async def _wait_disconnected(self) -> None:
        """Return once the open connection is gone."""

    @abstractmethod
    def _abort_connection(self) -> None:
        """Drop the connection (or a half-open attempt) at once, without a goodbye. Idempotent."""

    @abstractmethod
    async def _shutdown(self) -> None:
        """``close()``, after the supervisor stopped: goodbye if connected, then release
        everything. Idempotent; the state becomes ``closed`` even if it raises."""

    def _detach_tasks(self) -> Iterable[asyncio.Task[None]]:
        """Tasks besides the supervisor that ``close()`` cancels and awaits with it."""
        return ()

    # ------------------------------------------------------------------ internals

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            self._set_state("reconnecting" if self._ever_connected else "connecting")
            self._attempts += 1
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._connect()
            except self._connect_errors as exc:
                self._abort_connection()
                self._log.info("%s: connect attempt failed: %s", self._name, describe(exc))
            except Exception:
                self._abort_connection()
                self._log.exception("%s: unexpected error while connecting", self._name)
            except BaseException:  # cancelled by close(): leave nothing half-open behind
                self._abort_connection()
                raise
            else:
                up_since = loop.time()
                self._ever_connected = True
                self._set_state("connected")
                self._on_connected()
                await self._wait_disconnected()
                self._abort_connection()
                self._log.warning("%s: connection lost", self._name)
                if loop.time() - up_since >= STABLE_CONNECTION_S:
                    failures = 0
                self._set_state("reconnecting")
            delay = self._backoff.delay(failures)
            failures += 1
            self._log.debug("%s: next connect attempt in %.2f s", self._name, delay)
            await asyncio.sleep(delay)

    def _set_state(self, state: RelayState) -> None:
        if state == self._state:
            return
        self._log.info("%s: %s -> %s", self._name, self._state, state)
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
                self._log.exception("%s: on_state callback failed", self._name)


class Relay(ConnectionLifecycle):
    """One connection to one signaling server (MQTT broker, nostr relay, ...).

    Owner contract (see :class:`ConnectionLifecycle`): set ``on_message`` / ``on_state``,
    ``subscribe`` and ``publish`` at any time (before or after ``start``). ``connected`` means
    the session is up *and* its subscriptions are acknowledged. ``close()`` flushes what can be
    flushed and says goodbye to the server; messages still queued afterwards are dropped, while
    subscriptions are kept, so a later ``start()`` resumes them.
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
        super().__init__(url, backoff=backoff or Backoff(), connect_timeout=connect_timeout)
        self.on_message: MessageCallback | None = None
        # Insertion-ordered set: Trystero subscribes in a fixed order (self topic, then root).
        self._topics: dict[str, None] = {}
        # Futures handed out by subscribe(), resolved when the server acknowledges the topic.
        self._sub_waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Bounded by _queue_limit; _enqueue evicts the oldest entry and logs it.
        self._queue: deque[tuple[str, str]] = deque()
        self._queue_limit = queue_limit
        self._dropped = 0
        self._dropped_since_drain = 0

    # ------------------------------------------------------------------ public API

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

    def _deliver(self, topic: str, payload: bytes | bytearray) -> None:
        """Hand one inbound message to the owner. Never raises into the transport."""
        if not self._matches(topic):
            log.debug("%s: ignored a message on unsubscribed topic %s", self._name, topic)
            return
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            log.warning("%s: ignored a non-UTF-8 message on %s (%d bytes)", self._name, topic, len(payload))
            log.debug("%s: %s", self._name, exc)
            return
        callback = self.on_message
        if callback is None:
            return
        try:
            callback(topic, text)
        except Exception:
            log.exception("%s: on_message callback failed", self._name)

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
                self._name,
                self._dropped_since_drain,
            )
            self._dropped_since_drain = 0

    def _matches(self, topic: str) -> bool:
        """Whether an inbound topic belongs to a current subscription (exact match here)."""
        return topic in self._topics

    def _validate_topic(self, topic: str, *, is_filter: bool) -> None:
        """Raise ``ValueError`` for a topic the transport cannot carry (optional hook)."""

    def _ready_to_send(self) -> bool:
        """False while the transport has enough unsent data buffered (back-pressure)."""
        return True

    # ------------------------------------------------------------------ transport hooks
    # Besides these: _wait_disconnected and _abort_connection (see ConnectionLifecycle).

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
    async def _disconnect(self) -> None:
        """Graceful goodbye if connected, then release everything. Idempotent, never raises."""

    # ------------------------------------------------------------------ lifecycle hooks

    async def _connect(self) -> None:
        await self._open()
        await self._restore_subscriptions()

    def _on_connected(self) -> None:
        self._flush_queue()

    async def _shutdown(self) -> None:
        if self._state == "connected":
            self._flush_queue(force=True)
        try:
            await self._disconnect()
        finally:
            if self._queue:
                log.info("%s: closed with %d unsent message(s) dropped", self._name, len(self._queue))
                self._queue.clear()
            for waiters in self._sub_waiters.values():
                for fut in waiters:
                    fut.cancel()
            self._sub_waiters.clear()

    # ------------------------------------------------------------------ internals

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
                self._name,
                self._queue_limit,
                old_topic,
            )
        self._queue.append((topic, text))


class Link(ABC):
    """One connection at a time of a lifecycle whose protocol speaks JSON text frames (the nostr
    relay, the tracker client), to a server behind a socket (:class:`WebSocketLink`) or in this
    process (:class:`~signaling.relays.local.LocalLink`). The owner's lifecycle hooks drive it:
    ``open`` in ``_connect``, ``wait_closed`` in ``_wait_disconnected``, ``drop`` in its teardown,
    ``drain`` + ``drop`` + ``release`` in ``_shutdown``; it is typed against this class only.

    ``send`` never blocks: frames wait in an outbox that the link writes out in the background;
    ``backlog`` lets the owner bound it. Inbound text frames go to the owner's ``on_text``, never
    from inside one of its own calls. When the server closes, or the connection fails, the owner's
    ``on_lost`` is called: it forgets what belonged to the connection and calls ``drop``. The
    outbox's bookkeeping and the warnings are the same for every kind of link and live here.
    """

    def __init__(self, url: str, *, logger: logging.Logger) -> None:
        self._url = url
        self._name = redact_url(url)
        self._log = logger
        self._closed = asyncio.Event()
        self._closed.set()  # no connection yet
        self._outbox: deque[str] = deque()
        self._outbox_chars = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Keys already logged at WARNING on this connection; owners use fixed keys, so it stays small.
        self._warned: set[str] = set()

    @property
    @abstractmethod
    def connected(self) -> bool:
        """Whether a connection is open (from ``open`` until ``drop``)."""

    @property
    def backlog(self) -> int:
        """Characters handed to ``send`` and not yet written to the server."""
        return self._outbox_chars

    @abstractmethod
    async def open(self) -> None:
        """Connect; raises ``OSError`` (or ``TimeoutError``) when the server cannot be reached."""

    def send(self, frame: str) -> None:
        """Queue one text frame for the writer (while connected; ``drop`` discards it)."""
        self._outbox.append(frame)
        self._outbox_chars += len(frame)
        self._idle.clear()
        self._wake_writer()

    async def wait_closed(self) -> None:
        """Return once no connection is open."""
        await self._closed.wait()

    async def drain(self) -> bool:
        """Wait until the writer has sent everything queued; False if that took longer than
        ``GOODBYE_TIMEOUT_S``."""
        if not self.connected or self._idle.is_set():
            return True
        try:
            async with asyncio.timeout(GOODBYE_TIMEOUT_S):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    @abstractmethod
    def drop(self) -> bool:
        """Forget the connection at once: discard unsent frames and close it (in the background
        if that takes time). Returns whether a connection was open. Idempotent."""

    @abstractmethod
    async def release(self) -> None:
        """After ``drop``: wait for what closes in the background, free what the link holds."""

    def warn_once(self, key: str, message: str, *args: object) -> None:
        # First occurrence per connection at WARNING, the rest at DEBUG: a hostile or broken
        # server must not flood the log.
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        self._log.log(level, message, *args)

    @abstractmethod
    def _wake_writer(self) -> None:
        """The outbox got a frame: have the writer take it."""

    def _take(self) -> str:
        """The outbox's oldest frame, for the writer."""
        frame = self._outbox.popleft()
        self._outbox_chars -= len(frame)
        return frame

    def _connection_opened(self) -> None:
        self._closed.clear()
        self._forget_outbox()
        self._warned.clear()

    def _connection_dropped(self) -> None:
        self._forget_outbox()
        self._closed.set()

    def _forget_outbox(self) -> None:
        self._outbox.clear()
        self._outbox_chars = 0
        self._idle.set()


class WebSocketLink(Link):
    """The aiohttp WebSocket :class:`Link`: a writer task fed from the outbox, a reader task, the
    heartbeat, and closing in the background.

    The reader hands text frames to ``on_text`` and binary ones to ``on_binary``, yielding to the
    loop every ``_READ_YIELD_EVERY`` frames so a flooding server cannot starve it; frames over
    ``max_msg_size`` drop the connection. aiohttp's heartbeat (ping every ``heartbeat`` s, pong
    due in half of it) catches a hung server or a dead path. Lines go to ``logger``, naming the
    server as ``peer`` ("relay", "tracker").
    """

    def __init__(
        self,
        url: str,
        *,
        label: str,
        peer: str,
        logger: logging.Logger,
        heartbeat: float | None,
        max_msg_size: int,
        ssl_context: ssl.SSLContext | None,
        on_text: Callable[[str], None],
        on_binary: Callable[[], None],
        on_lost: Callable[[], None],
        on_drained: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(url, logger=logger)
        self._label = label  # first word of the task names
        self._peer = peer
        self._heartbeat = heartbeat
        self._max_msg_size = max_msg_size
        self._ssl_context = ssl_context
        self._on_text = on_text
        self._on_binary = on_binary
        self._on_lost = on_lost
        # Called whenever the outbox runs empty; frames it sends are written before going idle.
        self._on_drained = on_drained
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closers = BackgroundTasks(logger)
        self._wakeup = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._ws is not None

    async def open(self) -> None:
        """Connect and start the reader and writer; raises what ``ws_connect`` raises."""
        if self._session is None or self._session.closed:
            # Session-wide timeouts off: the owner's connect timeout bounds the handshake, the
            # heartbeat (and the owner's own watchdogs) bound the rest.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        ws = await self._session.ws_connect(
            self._url,
            heartbeat=self._heartbeat,
            max_msg_size=self._max_msg_size,
            ssl=self._ssl_context if self._ssl_context is not None else True,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=GOODBYE_TIMEOUT_S),
        )
        self._ws = ws
        self._connection_opened()
        self._reader = asyncio.create_task(self._read_loop(ws), name=f"{self._label} read {self._name}")
        self._writer = asyncio.create_task(self._write_loop(ws), name=f"{self._label} write {self._name}")

    def _wake_writer(self) -> None:
        self._wakeup.set()

    def drop(self) -> bool:
        """Stop the reader and writer, discard unsent frames and close the socket in the
        background (the close frame is our goodbye)."""
        ws, self._ws = self._ws, None
        current = asyncio.current_task()
        for task in (self._reader, self._writer):
            if task is not None and task is not current and not task.done():
                task.cancel()
        self._reader = self._writer = None
        self._connection_dropped()
        if ws is not None and not ws.closed:
            self._closers.spawn(
                self._close_quietly(ws),
                "%s: closing the connection",
                self._name,
                name=f"{self._label} close {self._name}",
            )
        return ws is not None

    async def release(self) -> None:
        """Wait for the sockets closing in the background, close the session."""
        await self._closers.wait()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _write_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            while True:
                while self._outbox:
                    await ws.send_str(self._take())
                if self._on_drained is not None:
                    self._on_drained()
                    if self._outbox:
                        continue
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._log.info("%s: send failed: %s", self._name, describe(exc))
            if self._ws is ws:
                self._on_lost()

    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        handled = 0
        try:
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self._on_text(msg.data)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    self._on_binary()
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    self._log.info("%s: connection error: %s", self._name, describe(msg.data))
                    return
                else:  # CLOSE / CLOSING / CLOSED
                    self._log.info(
                        "%s: connection closed by the %s (code %s)", self._name, self._peer, ws.close_code
                    )
                    return
                handled += 1
                if handled % _READ_YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a flooding server must not starve the loop
        except asyncio.CancelledError:
            raise
        except Exception:
            self._log.exception("%s: reader failed; dropping the connection", self._name)
        finally:
            if self._ws is ws:
                self._on_lost()

    async def _close_quietly(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            await ws.close()  # bounded by ws_close; aborts the transport on any error
        except Exception as exc:
            self._log.debug("%s: error while dropping the connection: %s", self._name, describe(exc))


# scheme://user:password@ -> scheme://user:***@; the password runs to the last "@", so one that
# breaks the URL (a stray "/" or "@") is still hidden. p2pdiff.config.mask_url is the same rule
# (this package imports nothing of p2pdiff; p2pdiff's tests check that the two agree).
_URL_PASSWORD_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:(?://)?[^:@/?#]*:)(.*)@(?=[^@]*$)", re.DOTALL)


def redact_url(url: str) -> str:
    """``url`` with the password in its user info replaced by ``***``, for logs and errors."""
    return _URL_PASSWORD_RE.sub(r"\1***@", url)


def check_websocket_url(url: str, what: str) -> None:
    """Raise ``ValueError`` unless ``url`` is a usable ``ws://`` / ``wss://`` URL of a ``what``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("ws", "wss"):
        raise ValueError(f"{what} URL must be ws:// or wss://, got {redact_url(url)!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {what} URL {redact_url(url)!r}")
    try:
        _ = parts.port  # raises ValueError when out of range
    except ValueError:
        # Its own message quotes the URL's text after the last ":", a password if one broke the URL.
        raise ValueError(f"bad port in {what} URL {redact_url(url)!r}") from None


def describe(exc: BaseException | None) -> str:
    """An exception as one short log phrase: its type, and its text if it has one."""
    if exc is None:
        return "no details"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
