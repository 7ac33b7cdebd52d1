"""The helper peer seam: how the app joins and leaves rooms, whatever the transport.

``ApiOnlyHelper`` is used while P2P is unavailable or disabled: it remembers rooms and reports mode
"api-only", so REST clients see the same API either way. ``P2PHelper`` joins each room as a
Trystero-compatible peer through the ``signaling`` library.

A helper publishes what it sees (peers joining and leaving, their RTT, relay states) through the
publisher that ``attach`` gives it; the queue publishes the task and room changes itself.

In P2P mode each room also gets a :class:`~p2pdiff.rooms.agent.RoomAgent` (``connect`` gives the
helper the queue and the result store): the helper registers the browser app's six actions in
the room and routes what arrives, peers coming and going, and the bus's queue events to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from p2pdiff.config import P2PConfig, mask_url
from p2pdiff.errors import BadRequest, Conflict
from p2pdiff.rooms import protocol as rp
from p2pdiff.rooms.agent import RoomAgent
from p2pdiff.tasks import events
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.results import ResultStore
from signaling.background import every
from signaling.wire import WIRE_VERSIONS

if TYPE_CHECKING:  # types only: an api-only server never imports the WebRTC stack
    from signaling.config import RoomConfig
    from signaling.session import Session

log = logging.getLogger(__name__)

LOW_ID_PREFIX = "0"

# How often the P2P helper compares relay states and peer RTTs with what it last published: the
# signaling library has no public change callbacks for these, and a dict comparison per room per
# second costs nothing.
WATCH_INTERVAL = 1.0


#: Trystero wires a room can be joined with ("0.22": the published browser app; see README).
WIRES = WIRE_VERSIONS
DEFAULT_WIRE = WIRES[0]


def check_wire(room: HelperRoom, wire: str | None) -> None:
    """Conflict if a room the helper is in runs another wire than the one asked for: switching
    means new connections for every peer, so it is an explicit leave and join, not a side effect."""
    if wire is not None and wire != room.wire:
        raise Conflict(
            f"the helper is in room '{room.room_id}' with wire {room.wire}; leave it first to use {wire}",
            code="wire_mismatch",
        )


class SeenPeer(Protocol):
    """What the helper reads of a peer of a joined room (``signaling.PeerInfo``)."""

    @property
    def id(self) -> str: ...
    @property
    def joined_at(self) -> float: ...
    @property
    def last_seen(self) -> float: ...
    @property
    def rtt_ms(self) -> float | None: ...


class ActionHandle(Protocol):
    """One of the app's actions in a joined room (``signaling.room.Action``)."""

    async def send(
        self, payload: Any, target: str | Iterable[str] | None = None, metadata: Any = None
    ) -> None: ...
    def on_receive(self, callback: Callable[[Any, str, Any], Any] | None) -> object: ...


class RoomHandle(Protocol):
    """What p2pdiff uses of a room the helper joined (``signaling.Room``, or a test's stand-in)."""

    @property
    def self_id(self) -> str: ...
    @property
    def peers(self) -> Mapping[str, SeenPeer]: ...
    @property
    def relay_states(self) -> Mapping[str, str]: ...
    @property
    def stats(self) -> Mapping[str, Any]: ...
    def make_action(self, name: str) -> ActionHandle: ...
    def on_peer_join(self, callback: Callable[[str], Any]) -> object: ...
    def on_peer_leave(self, callback: Callable[[str], Any]) -> object: ...
    async def leave(self) -> None: ...


@dataclass(slots=True)
class HelperRoom:
    room_id: str
    joined_at: float = field(default_factory=time.time)
    #: The Trystero wire the helper speaks in this room ("0.25" or "0.22").
    wire: str = DEFAULT_WIRE

    def peers(self) -> list[dict[str, Any]]:
        return []

    def to_json(self) -> dict[str, Any]:
        return {
            "roomId": self.room_id,
            "joinedAt": int(self.joined_at * 1000),
            "wire": self.wire,
            "peers": self.peers(),
        }

    def extra_stats(self) -> dict[str, Any]:
        """More per-room numbers for /api/stats (P2P: GPU peers, protocol counters)."""
        return {}

    def relay_states(self) -> Mapping[str, str]:
        """Relay URL -> state, for the metrics (P2P only)."""
        return {}

    def signaling_stats(self) -> Mapping[str, Any] | None:
        """The signaling room's traffic and drop counters, for the metrics; None without one
        (api-only)."""
        return None

    def protocol_counts(self) -> tuple[Mapping[str, int], Mapping[str, int]]:
        """App messages received per action and dropped per ``action.reason`` (P2P only)."""
        return {}, {}


class Helper(ABC):
    """What the REST layer and start-up may ask of the helper peer."""

    mode: str
    _publish: events.Publish | None = None

    def attach(self, publish: events.Publish) -> None:
        """Where to publish peer and relay events (the app's event bus)."""
        self._publish = publish

    def emit(self, type: str, room_id: str, data: dict[str, Any]) -> None:
        if self._publish is not None:
            self._publish(type, room_id, data)

    @abstractmethod
    async def join(self, room_id: str, wire: str | None = None) -> HelperRoom:
        """Join (or stay in) a room; idempotent. ``wire``: the Trystero wire for this room, None
        for the configured default; Conflict if the helper is already in it with another wire."""

    def connect(self, queue: QueueManager, results: ResultStore) -> None:
        """The queue and result store the helper's rooms work with (P2P mode only uses them)."""
        return  # API-only: no room to speak in

    def on_event(self, event: events.Event) -> None:
        """Every event of the app's bus (the helper tells its rooms about queue changes)."""
        return  # API-only: no room to speak in

    def set_dispatch(self, room_id: str, enabled: bool) -> None:
        """Whether the helper hands this room's pending tasks to GPU peers (P2P mode)."""
        return  # API-only: no room to speak in

    def referenced_results(self) -> set[str]:
        """Result files the helper holds for tasks not finished yet (kept by the results gc)."""
        return set()

    @abstractmethod
    async def leave(self, room_id: str) -> bool:
        """Leave a room; False when the helper was not in it."""

    @abstractmethod
    def rooms(self) -> list[HelperRoom]: ...

    def room(self, room_id: str) -> HelperRoom | None:
        return next((r for r in self.rooms() if r.room_id == room_id), None)

    def peer_count(self) -> int:
        return sum(len(room.peers()) for room in self.rooms())

    async def close(self) -> None:
        for room in list(self.rooms()):
            await self.leave(room.room_id)


class ApiOnlyHelper(Helper):
    mode = "api-only"

    def __init__(self, default_wire: str = DEFAULT_WIRE) -> None:
        self._rooms: dict[str, HelperRoom] = {}
        self._default_wire = default_wire

    async def join(self, room_id: str, wire: str | None = None) -> HelperRoom:
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = HelperRoom(room_id, wire=wire or self._default_wire)
        check_wire(room, wire)
        return room

    async def leave(self, room_id: str) -> bool:
        return self._rooms.pop(room_id, None) is not None

    def rooms(self) -> list[HelperRoom]:
        return list(self._rooms.values())


def peer_json(info: SeenPeer) -> dict[str, Any]:
    """A ``signaling.PeerInfo`` as the API shows it."""
    return {
        "id": info.id,
        "joinedAt": int(info.joined_at * 1000),
        "lastSeen": int(info.last_seen * 1000),
        "rttMs": None if info.rtt_ms is None else round(info.rtt_ms, 1),
    }


@dataclass(slots=True, kw_only=True)
class P2PRoom(HelperRoom):
    handle: RoomHandle
    agent: RoomAgent | None = None  # None until the helper is connected to a queue
    # What the watcher last published, to publish changes only.
    seen_relays: dict[str, str] = field(default_factory=dict)
    seen_rtts: dict[str, float | None] = field(default_factory=dict)

    def peer(self, info: SeenPeer) -> dict[str, Any]:
        data = peer_json(info)
        if self.agent is not None:
            data.update(self.agent.peer_info(info.id))
        return data

    def peers(self) -> list[dict[str, Any]]:
        return [self.peer(info) for info in self.handle.peers.values()]

    def extra_stats(self) -> dict[str, Any]:
        return self.agent.stats() if self.agent is not None else {}

    def relay_states(self) -> Mapping[str, str]:
        return self.handle.relay_states

    def signaling_stats(self) -> Mapping[str, Any] | None:
        return self.handle.stats

    def protocol_counts(self) -> tuple[Mapping[str, int], Mapping[str, int]]:
        return (self.agent.received, self.agent.dropped) if self.agent is not None else ({}, {})

    def to_json(self) -> dict[str, Any]:
        data = HelperRoom.to_json(self)
        data["selfId"] = self.handle.self_id
        data["relays"] = {mask_url(url): state for url, state in self.relay_states().items()}
        return data


class P2PHelper(Helper):
    """Joins rooms as a Trystero peer; one signaling session (one peer id) for the whole process."""

    mode = "p2p"

    def __init__(self, config: P2PConfig) -> None:
        from signaling.config import RoomConfig  # the config only: no WebRTC before the first join

        self._room_settings: dict[str, Any] = {
            "app_id": config.app_id,
            "strategy": config.strategy,
            "relay_urls": list(config.relay_urls),
            "password": config.password,
            "ice_servers": list(config.ice_servers),
            "ice_host_addresses": list(config.ice_host_addresses) or None,
        }
        self._room_config = RoomConfig(**self._room_settings, wire=config.wire)
        # One RoomConfig per wire (validated once); the default one above is made at start-up so
        # a bad [p2p] section fails there, not at the first join.
        self._room_configs: dict[str, RoomConfig] = {config.wire: self._room_config}
        self._dispatch = config.dispatch
        self._queue: QueueManager | None = None
        self._results: ResultStore | None = None
        self._rooms: dict[str, P2PRoom] = {}
        self._session: Session | None = None  # created on first join: it needs the running loop
        self._watcher: asyncio.Task[None] | None = None

    async def join(self, room_id: str, wire: str | None = None) -> HelperRoom:
        room = self._rooms.get(room_id)
        if room is not None:
            check_wire(room, wire)
            return room
        # Here, not at the top: an api-only server never imports the WebRTC stack.
        from signaling import RoomConfig, Session, join_room

        if self._session is None:
            # On trackers Trystero answers only offers from smaller ids, and on topic relays the
            # smaller id leads (spec §2.2, §4): an id that sorts low lets browsers connect at
            # our first announce, not their next one (up to 120 s on public trackers). "0" is
            # the lowest character of Trystero's id alphabet; a browser draws it 1 time in 62.
            self._session = Session(id_prefix=LOW_ID_PREFIX)
        wire = wire or self._room_config.wire
        room_config = self._room_configs.get(wire)
        if room_config is None:
            try:
                room_config = RoomConfig(**self._room_settings, wire=wire)
            except ValueError as exc:  # e.g. a strategy that does not support this wire
                raise BadRequest(f"cannot join with wire {wire}: {exc}", code="invalid_wire") from None
            self._room_configs[wire] = room_config
        # One session for both wires: its 0.22 rooms get their own connections (signaling.negotiation022).
        handle = join_room(room_config, room_id, session=self._session)
        room = self._rooms[room_id] = P2PRoom(room_id, wire=wire, handle=handle)
        if self._queue is not None and self._results is not None:
            room.agent = self._make_agent(room)
        handle.on_peer_join(lambda peer_id: self._peer_joined(room, peer_id))
        handle.on_peer_leave(lambda peer_id: self._peer_left(room, peer_id))
        log.info(
            "helper joining room %s as %s over %s (Trystero wire %s)",
            room_id,
            handle.self_id,
            self._room_config.strategy,
            wire,
        )
        self.watch_once(room)
        if self._watcher is None:
            self._watcher = asyncio.create_task(
                every(WATCH_INTERVAL, self._watch_rooms, "watching rooms", logger=log), name="helper-watch"
            )
        return room

    def connect(self, queue: QueueManager, results: ResultStore) -> None:
        self._queue = queue
        self._results = results

    def _make_agent(self, room: P2PRoom) -> RoomAgent:
        assert self._queue is not None and self._results is not None
        handle = room.handle
        # Every action the app uses is registered at once: Trystero 0.22 drops messages for
        # actions nobody registered, and 0.25 would queue them unread.
        actions = {name: handle.make_action(name) for name in rp.ACTIONS}

        async def send(action: str, payload: Any, target: str | None, metadata: Any) -> None:
            await actions[action].send(payload, target=target, metadata=metadata)

        def emit(type: str, data: dict[str, Any]) -> None:
            peer = data.get("peer")
            info = handle.peers.get(peer["id"]) if isinstance(peer, dict) else None
            if info is not None:  # the API's full view of the peer, capabilities included
                data = {**data, "peer": room.peer(info)}
            self.emit(type, room.room_id, data)

        agent = RoomAgent(
            room.room_id,
            self._queue,
            self._results,
            send=send,
            self_id=handle.self_id,
            active_peers=lambda: handle.peers.keys(),
            emit=emit,
            dispatch=self._dispatch,
        )
        for name, action in actions.items():
            action.on_receive(functools.partial(agent.on_message, name))
        return agent

    def on_event(self, event: events.Event) -> None:
        room = self._rooms.get(event.room) if event.room is not None else None
        targets = [room] if room is not None else list(self._rooms.values()) if event.room is None else []
        for target in targets:
            if target.agent is not None:
                target.agent.on_event(event)

    def set_dispatch(self, room_id: str, enabled: bool) -> None:
        room = self._rooms.get(room_id)
        if room is not None and room.agent is not None:
            room.agent.set_dispatch(enabled)

    def referenced_results(self) -> set[str]:
        names: set[str] = set()
        for room in self._rooms.values():
            if room.agent is not None:
                names |= room.agent.referenced_results()
        return names

    def _peer_joined(self, room: P2PRoom, peer_id: str) -> None:
        log.info("room %s: peer %s joined", room.room_id, peer_id)
        info = room.handle.peers.get(peer_id)
        peer = peer_json(info) if info is not None else {"id": peer_id}
        self.emit(events.PEER_JOINED, room.room_id, {"peer": peer})
        if room.agent is not None:
            room.agent.on_peer_join(peer_id)

    def _peer_left(self, room: P2PRoom, peer_id: str) -> None:
        log.info("room %s: peer %s left", room.room_id, peer_id)
        room.seen_rtts.pop(peer_id, None)
        self.emit(events.PEER_LEFT, room.room_id, {"peer": {"id": peer_id}})
        if room.agent is not None:
            room.agent.on_peer_leave(peer_id)

    def watch_once(self, room: P2PRoom) -> None:
        """Publish relay state and peer RTT changes since the last look."""
        for url, state in room.handle.relay_states.items():
            state = str(state)
            before = room.seen_relays.get(url)
            if state != before:
                room.seen_relays[url] = state
                data = {"url": mask_url(url), "state": state, "previous": before}
                self.emit(events.RELAY_STATE, room.room_id, data)
        peers = room.handle.peers
        for peer_id, info in peers.items():
            rtt = None if info.rtt_ms is None else round(info.rtt_ms, 1)
            if peer_id in room.seen_rtts and room.seen_rtts[peer_id] == rtt:
                continue
            first = peer_id not in room.seen_rtts
            room.seen_rtts[peer_id] = rtt
            if not (first and rtt is None):
                self.emit(events.PEER_RTT, room.room_id, {"peer": room.peer(info)})
        # Bounded by the room's active peers: forget the ones that are gone.
        for gone in room.seen_rtts.keys() - peers.keys():
            del room.seen_rtts[gone]

    def _watch_rooms(self) -> None:
        for room in list(self._rooms.values()):
            try:
                self.watch_once(room)
            except Exception:  # one broken room must not stop the others being watched
                log.exception("watching room %s failed", room.room_id)

    async def leave(self, room_id: str) -> bool:
        room = self._rooms.pop(room_id, None)
        if room is None:
            return False
        if room.agent is not None:
            await room.agent.close()
        await room.handle.leave()
        return True

    def rooms(self) -> list[HelperRoom]:
        return list(self._rooms.values())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await super().close()
        if self._session is not None:
            await self._session.close()
            self._session = None


def make_helper(config: P2PConfig) -> Helper:
    """The P2P helper, or API-only when ``[p2p] enabled`` is false (with a log line saying so).

    aiortc is a dependency of p2pdiff, not an option: an install where it does not import is broken
    and fails here, at start, instead of quietly serving without its helper peer. API-only is a
    choice made in the config, and such a server never imports aiortc at all."""
    if not config.enabled:
        log.info("p2p disabled in config: running api-only")
        return ApiOnlyHelper(config.wire)
    return P2PHelper(config)
