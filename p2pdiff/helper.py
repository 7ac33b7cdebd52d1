"""The helper peer seam: how the app joins and leaves rooms, whatever the transport.

``ApiOnlyHelper`` is used while P2P is unavailable or disabled: it remembers rooms and reports mode
"api-only", so REST clients see the same API either way. ``P2PHelper`` joins each room as a
Trystero-compatible peer through the ``signaling`` library.

A helper publishes what it sees (peers joining and leaving, their RTT, relay states) through the
publisher that ``attach`` gives it; the queue publishes the task and room changes itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from p2pdiff import events
from p2pdiff.config import P2PConfig

log = logging.getLogger(__name__)

# How often the P2P helper compares relay states and peer RTTs with what it last published: the
# signaling library has no public change callbacks for these, and a dict comparison per room per
# second costs nothing.
WATCH_INTERVAL = 1.0


def p2p_available() -> bool:
    """True when the WebRTC stack (aiortc) can be imported."""
    return importlib.util.find_spec("aiortc") is not None


@dataclass(slots=True)
class HelperRoom:
    room_id: str
    joined_at: float = field(default_factory=time.time)

    def peers(self) -> list[dict[str, Any]]:
        return []

    def to_json(self) -> dict[str, Any]:
        return {"roomId": self.room_id, "joinedAt": int(self.joined_at * 1000), "peers": self.peers()}


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
    async def join(self, room_id: str) -> HelperRoom:
        """Join (or stay in) a room; idempotent."""

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

    def __init__(self) -> None:
        self._rooms: dict[str, HelperRoom] = {}

    async def join(self, room_id: str) -> HelperRoom:
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = HelperRoom(room_id)
        return room

    async def leave(self, room_id: str) -> bool:
        return self._rooms.pop(room_id, None) is not None

    def rooms(self) -> list[HelperRoom]:
        return list(self._rooms.values())


def peer_json(info: Any) -> dict[str, Any]:
    """A ``signaling.PeerInfo`` as the API shows it."""
    return {
        "id": info.id,
        "joinedAt": int(info.joined_at * 1000),
        "lastSeen": int(info.last_seen * 1000),
        "rttMs": None if info.rtt_ms is None else round(info.rtt_ms, 1),
    }


@dataclass(slots=True)
class P2PRoom(HelperRoom):
    handle: Any = None  # the signaling.Room
    # What the watcher last published, to publish changes only.
    seen_relays: dict[str, str] = field(default_factory=dict)
    seen_rtts: dict[str, float | None] = field(default_factory=dict)

    def peers(self) -> list[dict[str, Any]]:
        return [peer_json(info) for info in self.handle.peers.values()]

    def to_json(self) -> dict[str, Any]:
        data = HelperRoom.to_json(self)
        data["selfId"] = self.handle.self_id
        data["relays"] = dict(self.handle.relay_states)
        return data


class P2PHelper(Helper):
    """Joins rooms as a Trystero peer; one signaling session (one peer id) for the whole process."""

    mode = "p2p"

    def __init__(self, config: P2PConfig) -> None:
        import signaling  # here, so an api-only server never imports aiortc

        self._signaling = signaling
        self._room_config = signaling.RoomConfig(
            app_id=config.app_id,
            strategy=config.strategy,
            relay_urls=list(config.relay_urls),
            password=config.password,
            ice_servers=list(config.ice_servers),
            ice_host_addresses=list(config.ice_host_addresses) or None,
        )
        self._rooms: dict[str, P2PRoom] = {}
        self._session: Any = None  # created on first join: it needs the running loop
        self._watcher: asyncio.Task[None] | None = None

    async def join(self, room_id: str) -> HelperRoom:
        room = self._rooms.get(room_id)
        if room is not None:
            return room
        if self._session is None:
            self._session = self._signaling.Session()
        handle = self._signaling.join_room(self._room_config, room_id, session=self._session)
        room = self._rooms[room_id] = P2PRoom(room_id, handle=handle)
        handle.on_peer_join(lambda peer_id: self._peer_joined(room, peer_id))
        handle.on_peer_leave(lambda peer_id: self._peer_left(room, peer_id))
        log.info("helper joining room %s as %s over %s", room_id, handle.self_id, self._room_config.strategy)
        self.watch_once(room)
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="helper-watch")
        return room

    def _peer_joined(self, room: P2PRoom, peer_id: str) -> None:
        log.info("room %s: peer %s joined", room.room_id, peer_id)
        info = room.handle.peers.get(peer_id)
        peer = peer_json(info) if info is not None else {"id": peer_id}
        self.emit(events.PEER_JOINED, room.room_id, {"peer": peer})

    def _peer_left(self, room: P2PRoom, peer_id: str) -> None:
        log.info("room %s: peer %s left", room.room_id, peer_id)
        room.seen_rtts.pop(peer_id, None)
        self.emit(events.PEER_LEFT, room.room_id, {"peer": {"id": peer_id}})

    def watch_once(self, room: P2PRoom) -> None:
        """Publish relay state and peer RTT changes since the last look."""
        for url, state in room.handle.relay_states.items():
            state = str(state)
            before = room.seen_relays.get(url)
            if state != before:
                room.seen_relays[url] = state
                self.emit(events.RELAY_STATE, room.room_id, {"url": url, "state": state, "previous": before})
        peers = room.handle.peers
        for peer_id, info in peers.items():
            rtt = None if info.rtt_ms is None else round(info.rtt_ms, 1)
            if peer_id in room.seen_rtts and room.seen_rtts[peer_id] == rtt:
                continue
            first = peer_id not in room.seen_rtts
            room.seen_rtts[peer_id] = rtt
            if not (first and rtt is None):
                self.emit(events.PEER_RTT, room.room_id, {"peer": peer_json(info)})
        # Bounded by the room's active peers: forget the ones that are gone.
        for gone in room.seen_rtts.keys() - peers.keys():
            del room.seen_rtts[gone]

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            for room in list(self._rooms.values()):
                try:
                    self.watch_once(room)
                except Exception:
                    log.exception("watching room %s failed", room.room_id)

    async def leave(self, room_id: str) -> bool:
        room = self._rooms.pop(room_id, None)
        if room is None:
            return False
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
    """The P2P helper when enabled and importable, else API-only (and a log line saying why)."""
    if not config.enabled:
        log.info("p2p disabled in config: running api-only")
        return ApiOnlyHelper()
    if not p2p_available():
        log.warning("aiortc is not importable: running api-only")
        return ApiOnlyHelper()
    return P2PHelper(config)
