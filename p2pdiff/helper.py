"""The helper peer seam: how the app joins and leaves rooms, whatever the transport.

``ApiOnlyHelper`` is the implementation used while P2P is unavailable or disabled: it remembers rooms
and reports mode "api-only", so REST clients see the same API either way.
"""

from __future__ import annotations

import importlib.util
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


def p2p_available() -> bool:
    """True when the WebRTC stack (aiortc) can be imported."""
    return importlib.util.find_spec("aiortc") is not None


@dataclass(slots=True)
class HelperRoom:
    room_id: str
    joined_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"roomId": self.room_id, "joinedAt": int(self.joined_at * 1000), "peers": []}


class Helper(ABC):
    """What the REST layer and start-up may ask of the helper peer."""

    mode: str

    @abstractmethod
    async def join(self, room_id: str) -> HelperRoom:
        """Join (or stay in) a room; idempotent."""

    @abstractmethod
    async def leave(self, room_id: str) -> bool:
        """Leave a room; False when the helper was not in it."""

    @abstractmethod
    def rooms(self) -> list[HelperRoom]: ...

    def peer_count(self) -> int:
        return 0

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
