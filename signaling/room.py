"""The public room API, shaped like Trystero's ``joinRoom()`` result.

::

    room = signaling.join_room(RoomConfig(app_id="my-app", relay_urls=[...]), "lobby")
    chat = room.make_action("chat")
    chat.on_receive(lambda payload, peer_id, metadata: print(peer_id, payload))
    room.on_peer_join(lambda peer_id: print("joined", peer_id))
    await chat.send({"hello": "world"})             # to every active peer
    await chat.send(b"\\x00\\x01", target=peer_id, metadata={"name": "blob"})
    async for payload, peer_id, metadata in chat:   # alternative to on_receive
        ...
    rtt_ms = await room.ping(peer_id)
    await room.leave()

Payloads: ``str`` travels as text, ``bytes``/``bytearray``/``memoryview`` as binary (received as
``bytes``), anything else JSON-serialisable as JSON. ``metadata`` is any JSON value (``None``
means none). Callbacks may be plain functions or coroutine functions; their exceptions are logged.
Messages for an action nobody listens to yet are kept (bounded) and replayed to the first
listener, as Trystero does.

Only peers that passed admission (``@_hsready``, and the password check if the room has a
password; on ``wire="0.22"``, which has no admission, an open channel) are *active*: they appear
in ``peers``, fire ``on_peer_join`` and are the default targets. The connection, presence and
admission machinery lives in :mod:`signaling.session`. On 0.22, action names are at most 12
bytes and ``metadata`` is only allowed with binary payloads (ValueError otherwise, as JS throws).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from signaling.background import BackgroundTasks, every
from signaling.bounded import LruDict
from signaling.framing import NO_METADATA

if TYPE_CHECKING:
    from signaling.config import RoomConfig
    from signaling.relays import RelayState
    from signaling.signaller import RoomSignaller
    from signaling.wire.interface import Wire

log = logging.getLogger(__name__)

__all__ = ["Action", "PeerInfo", "PeerNotFound", "Room", "RoomHost", "RoomLink", "RoomPeer"]

PeerCallback = Callable[[str], Any]
ReceiveCallback = Callable[[Any, str, Any], Any]


#: Always present in ``Room.stats`` (other counters appear once non-zero).
_STANDARD_COUNTERS = (
    "bytes_in",
    "bytes_out",
    "actions_in",
    "actions_out",
    "signals_in",
    "signals_out",
    "announces_out",
)


class PeerNotFound(LookupError):
    """No active peer with that id in this room."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """An active peer. Times are Unix seconds; ``rtt_ms`` is the last ping (None before one)."""

    id: str
    joined_at: float
    last_seen: float
    rtt_ms: float | None


class RoomLink(Protocol):
    """What a room needs of the connection to one of its peers (the session's ``PeerLink``)."""

    @property
    def last_seen(self) -> float: ...

    def send_nowait(self, frame: bytes) -> bool: ...

    async def send_frames(self, frames: list[bytes]) -> bool: ...


class RoomPeer(Protocol):
    """What a room needs of one of its peers, pending or active (the session's ``Binding``, which
    runs admission and owns the rest)."""

    #: The last ping's round trip, written by :meth:`Room.ping`.
    rtt_ms: float | None

    @property
    def active(self) -> bool: ...

    @property
    def joined_at(self) -> float: ...

    @property
    def link(self) -> RoomLink: ...

    @property
    def pong_waiters(self) -> deque[asyncio.Future[None]]: ...


class RoomHost(Protocol):
    """What a room needs of the app context that owns it (the session's ``AppContext``), so this
    module depends on no session type: the session imports the room, never the reverse."""

    @property
    def wire(self) -> Wire: ...

    def stats(self) -> dict[str, Any]:
        """App-wide counters (connections are shared by the app's rooms) for :attr:`Room.stats`."""
        ...

    async def leave_room(self, room: Room) -> None:
        """Trystero's leave for ``room``: ``@_leave`` to its peers, then tear down."""
        ...


def _call(callback: Callable[..., Any], *args: Any, tasks: BackgroundTasks) -> None:
    """Run a user callback; coroutines become tasks. Never raises."""
    try:
        result = callback(*args)
    except Exception:
        log.exception("callback %r failed", callback)
        return
    if inspect.isawaitable(result):
        tasks.spawn(result, "callback %r", callback)


Item = tuple[Any, str, Any]  # (payload, peer_id, metadata)


class _Queue:
    """Received messages waiting for a consumer: at most ``maxlen`` of them, and together with
    the room's other queues at most ``Limits.max_queued_bytes`` (oldest dropped, counted)."""

    def __init__(self, room: Room, maxlen: int) -> None:
        self.room = room
        self.maxlen = maxlen
        self.items: deque[tuple[Item, int]] = deque()
        self.changed = asyncio.Event()  # for async iteration
        self.closed = False

    def __len__(self) -> int:
        return len(self.items)

    def push(self, item: Item, size: int) -> None:
        room = self.room
        if len(self.items) >= self.maxlen:
            self._drop_oldest()
        self.items.append((item, size))
        room.queued_bytes += size
        while room.queued_bytes > room.config.limits.max_queued_bytes and self.items:
            self._drop_oldest()
        self.changed.set()

    def pop(self) -> Item:
        item, size = self.items.popleft()
        self.room.queued_bytes -= size
        return item

    def clear(self) -> int:
        dropped = len(self.items)
        while self.items:
            self.pop()
        return dropped

    def _drop_oldest(self) -> None:
        self.pop()
        self.room.counters["dropped.queue_overflow"] += 1

    async def get(self) -> Item:
        while not self.items:
            if self.closed:
                raise StopAsyncIteration
            self.changed.clear()
            await self.changed.wait()
        return self.pop()


class Action:
    """A named message type in a room (Trystero's ``room.makeAction(name)``)."""

    def __init__(self, room: Room, name: str, backlog: _Queue | None = None) -> None:
        self.room = room
        self.name = name
        self._handler: ReceiveCallback | None = None
        self._inbox: _Queue | None = None
        # Messages that arrived before anyone listened (replayed to the first listener).
        self._backlog = backlog if backlog is not None else _Queue(room, room.config.limits.action_queue)

    def __repr__(self) -> str:
        return f"<Action {self.name!r} in {self.room.room_id}>"

    async def send(
        self, payload: Any, target: str | Iterable[str] | None = None, metadata: Any = None
    ) -> None:
        """Send to ``target`` (a peer id, several, or every active peer). Waits for channel
        back-pressure and returns once every chunk is handed to the channel(s). Targets that are
        not active peers are skipped (Trystero does the same)."""
        await self.room._send(self.name, payload, target, metadata)

    def on_receive(self, callback: ReceiveCallback | None) -> ReceiveCallback | None:
        """Set the handler ``callback(payload, peer_id, metadata)`` (replaces the previous one);
        queued messages are replayed to it. Usable as a decorator."""
        self._handler = callback
        if callback is not None:
            while self._backlog and self._handler is callback:
                _call(callback, *self._backlog.pop(), tasks=self.room._tasks)
        return callback

    def __aiter__(self) -> AsyncIterator[Item]:
        """``async for payload, peer_id, metadata in action`` (ends when the room is left).
        Several iterators share one queue."""
        if self._inbox is None:
            self._inbox = _Queue(self.room, self.room.config.limits.action_queue)
            self._inbox.closed = self.room.left
            while self._backlog:
                item, size = self._backlog.items[0]
                self._backlog.pop()
                self._inbox.push(item, size)
        return self._iterate(self._inbox)

    async def _iterate(self, inbox: _Queue) -> AsyncIterator[Item]:
        while True:
            try:
                yield await inbox.get()
            except StopAsyncIteration:
                return

    def _deliver(self, item: Item, size: int) -> None:
        if self._handler is None and self._inbox is None:
            self._backlog.push(item, size)
            return
        if self._handler is not None:
            _call(self._handler, *item, tasks=self.room._tasks)
        if self._inbox is not None:
            self._inbox.push(item, size)

    def _close(self) -> None:
        self._backlog.clear()
        if self._inbox is not None:
            self._inbox.closed = True
            self._inbox.changed.set()


class Room:
    """A joined room. Create it with :func:`signaling.join_room`."""

    def __init__(
        self,
        app: RoomHost,
        config: RoomConfig,
        room_id: str,
        signaller: RoomSignaller,
        counters: Counter[str],
    ) -> None:
        self._app = app
        self.config = config
        self.app_id = config.app_id
        self.room_id = room_id
        self.self_id: str = signaller.self_id
        self.signaller = signaller
        self.token = signaller.token
        self.counters = counters
        self.encoder = app.wire.new_encoder(self.token)
        #: By peer id, pending and active; kept by the session.
        self.bindings: dict[str, RoomPeer] = {}
        self._wire = app.wire
        self._actions: dict[str, Action] = {}
        # Messages for action names nobody made yet; LRU by name, each queue bounded.
        self._unclaimed: LruDict[str, _Queue] = LruDict(
            config.limits.unclaimed_actions, self._unclaimed_evicted
        )
        #: Bytes held by all receive queues of this room (Limits.max_queued_bytes).
        self.queued_bytes = 0
        self._join_callbacks: list[PeerCallback] = []
        self._leave_callbacks: list[PeerCallback] = []
        self._tasks = BackgroundTasks(log)
        self.left = False
        self._rtt_task = asyncio.get_running_loop().create_task(
            every(config.timeouts.rtt_interval, self._refresh_rtts, "room %s: rtt refresh", room_id),
            name=f"rtt {room_id}",
        )

    def __repr__(self) -> str:
        return f"<Room {self.app_id}/{self.room_id} peers={len(self.peers)}{' left' if self.left else ''}>"

    # ------------------------------------------------------------------ public API

    def make_action(self, name: str) -> Action:
        """The action called ``name`` (at most 32 bytes of UTF-8; names starting with ``@_`` are
        Trystero's own). Calling it again with the same name returns the same action."""
        action = self._actions.get(name)
        if action is not None:
            return action
        if name.startswith(self._wire.internal_prefix):
            raise ValueError(f"action names starting with {self._wire.internal_prefix!r} are reserved")
        self._wire.layout.name_field(name)  # ValueError if empty or too long
        action = self._actions[name] = Action(self, name, self._unclaimed.pop(name))
        return action

    def on_peer_join(self, callback: PeerCallback) -> PeerCallback:
        """Call ``callback(peer_id)`` when a peer becomes active (also at once for current ones)."""
        self._join_callbacks.append(callback)
        for peer_id, binding in list(self.bindings.items()):
            if binding.active:
                _call(callback, peer_id, tasks=self._tasks)
        return callback

    def on_peer_leave(self, callback: PeerCallback) -> PeerCallback:
        """Call ``callback(peer_id)`` when an active peer leaves or disconnects."""
        self._leave_callbacks.append(callback)
        return callback

    @property
    def peers(self) -> dict[str, PeerInfo]:
        """Active peers by id."""
        return {
            peer_id: PeerInfo(peer_id, b.joined_at, b.link.last_seen, b.rtt_ms)
            for peer_id, b in self.bindings.items()
            if b.active
        }

    async def ping(self, peer_id: str) -> float:
        """Round trip to an active peer in milliseconds (Trystero's ``@_ping``/``@_pong``).

        Raises :class:`PeerNotFound`, ``TimeoutError`` after ``timeouts.ping`` seconds, or
        ``ConnectionError`` if the peer leaves meanwhile.
        """
        binding = self.bindings.get(peer_id)
        if binding is None or not binding.active:
            raise PeerNotFound(f"no active peer {peer_id!r} in room {self.room_id!r}")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        binding.pong_waiters.append(waiter)
        start = time.perf_counter()
        for frame in self.encoder.encode(self._wire.action_ping, ""):
            binding.link.send_nowait(frame)
        try:
            async with asyncio.timeout(self.config.timeouts.ping):
                await waiter
        finally:
            if waiter in binding.pong_waiters:
                binding.pong_waiters.remove(waiter)
        rtt = (time.perf_counter() - start) * 1000
        binding.rtt_ms = rtt
        return rtt

    @property
    def relay_states(self) -> dict[str, RelayState]:
        """State of each relay of this room by URL: connecting, connected, reconnecting, closed."""
        return self.signaller.relay_states

    @property
    def stats(self) -> dict[str, Any]:
        """Counters for operations: traffic, and dropped messages by reason."""
        c = self.counters
        dropped = {k.removeprefix("dropped."): v for k, v in c.items() if k.startswith("dropped.")}
        totals = {k: v for k, v in c.items() if not k.startswith("dropped.")}
        return {
            "peers": sum(1 for b in self.bindings.values() if b.active),
            "pending_peers": sum(1 for b in self.bindings.values() if not b.active),
            **{name: c[name] for name in _STANDARD_COUNTERS},
            **totals,
            "dropped": dropped,
            "app": self._app.stats(),
        }

    async def leave(self) -> None:
        """Send ``@_leave`` to the room's peers, then (99 ms later) tear down: presence 0 to
        every connection, unsubscribe the topics, release relays and connections no room uses."""
        if self.left:
            return
        self.left = True
        self._rtt_task.cancel()
        try:
            await self._app.leave_room(self)
        finally:
            for action in self._actions.values():
                action._close()
            for queue in self._unclaimed.values():
                queue.clear()
            self._unclaimed.clear()

    # ------------------------------------------------------------------ for the session

    def deliver(self, name: str, payload: Any, peer_id: str, metadata: Any, size: int) -> None:
        """A complete message of ``size`` wire bytes from an active peer."""
        item = (payload, peer_id, metadata)
        action = self._actions.get(name)
        if action is not None:
            action._deliver(item, size)
            return
        queue = self._unclaimed.setdefault(name, lambda: _Queue(self, self.config.limits.action_queue))
        queue.push(item, size)

    def _unclaimed_evicted(self, _name: str, queue: _Queue) -> None:
        self.counters["dropped.queue_overflow"] += queue.clear()

    def peer_joined(self, peer_id: str) -> None:
        log.info("peer %s joined room %s", peer_id, self.room_id)
        for callback in list(self._join_callbacks):
            _call(callback, peer_id, tasks=self._tasks)
        self.refresh_rtt(peer_id)

    def peer_left(self, peer_id: str, reason: str) -> None:
        log.info("peer %s left room %s: %s", peer_id, self.room_id, reason)
        for callback in list(self._leave_callbacks):
            _call(callback, peer_id, tasks=self._tasks)

    # ------------------------------------------------------------------ internals

    async def _send(self, name: str, payload: Any, target: str | Iterable[str] | None, metadata: Any) -> None:
        if self.left:
            raise RuntimeError(f"room {self.room_id!r} was left")
        frames = self.encoder.encode(name, payload, NO_METADATA if metadata is None else metadata)
        links = self._targets(target)
        if not links:
            return
        if len(links) == 1:
            delivered = int(await links[0].send_frames(frames))
        else:
            delivered = sum(await asyncio.gather(*(link.send_frames(frames) for link in links)))
        # A target whose channel closed mid-send is skipped silently, as Trystero does.
        self.counters["bytes_out"] += sum(map(len, frames)) * delivered
        self.counters["actions_out"] += delivered

    def _targets(self, target: str | Iterable[str] | None) -> list[RoomLink]:
        if target is None:
            return [b.link for b in self.bindings.values() if b.active]
        ids = [target] if isinstance(target, str) else list(target)
        links = []
        for peer_id in dict.fromkeys(ids):
            binding = self.bindings.get(peer_id)
            if binding is None or not binding.active:
                log.debug("room %s: no active peer %s, not sending to it", self.room_id, peer_id)
                continue
            links.append(binding.link)
        return links

    def refresh_rtt(self, peer_id: str) -> None:
        """Ping ``peer_id`` in the background (updates ``rtt_ms``; failures are ignored)."""
        self._tasks.spawn(self._refresh_rtt(peer_id), "room %s: ping %s", self.room_id, peer_id)

    async def _refresh_rtt(self, peer_id: str) -> None:
        with contextlib.suppress(PeerNotFound, TimeoutError, ConnectionError):
            await self.ping(peer_id)

    async def _refresh_rtts(self) -> None:
        active = [peer_id for peer_id, b in self.bindings.items() if b.active]
        if active:
            await asyncio.gather(*(self._refresh_rtt(peer_id) for peer_id in active))
