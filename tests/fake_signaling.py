"""A stand-in for the ``signaling`` package, so the P2P helper's events can be tested without relays."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest

from p2pdiff.config import P2PConfig

RELAY = "mqtt://127.0.0.1:1883"


class FakeAction:
    """``signaling.Action``: records what is sent; ``deliver`` plays a message from a peer."""

    def __init__(self, room: FakeRoom, name: str) -> None:
        self.room = room
        self.name = name
        self.handler: Any = None
        self.sent: list[tuple[Any, Any, Any]] = []  # (payload, target, metadata)

    async def send(self, payload: Any, target: Any = None, metadata: Any = None) -> None:
        self.sent.append((payload, target, metadata))

    def on_receive(self, callback: Any) -> Any:
        self.handler = callback
        return callback


class FakeRoom:
    """What P2PHelper uses of ``signaling.Room``: peers, relay states, join/leave callbacks, actions."""

    self_id = "helper-self-id"

    def __init__(self) -> None:
        self.peers: dict[str, Any] = {}
        self.relay_states: dict[str, str] = {RELAY: "connecting"}
        self.joins: list[Any] = []
        self.leaves: list[Any] = []
        self.actions: dict[str, FakeAction] = {}

    def make_action(self, name: str) -> FakeAction:
        if name not in self.actions:
            self.actions[name] = FakeAction(self, name)
        return self.actions[name]

    def deliver(self, name: str, payload: Any, peer_id: str, metadata: Any = None) -> None:
        """A message from ``peer_id`` on action ``name`` (dropped if nobody registered it, as 0.22 does)."""
        action = self.actions.get(name)
        if action is not None and action.handler is not None:
            action.handler(payload, peer_id, metadata)

    def sent(self, name: str) -> list[tuple[Any, Any, Any]]:
        action = self.actions.get(name)
        return list(action.sent) if action is not None else []

    def on_peer_join(self, cb: Any) -> Any:
        self.joins.append(cb)
        return cb

    def on_peer_leave(self, cb: Any) -> Any:
        self.leaves.append(cb)
        return cb

    def add_peer(self, peer_id: str, rtt: float | None = None) -> None:
        now = time.time()
        self.peers[peer_id] = SimpleNamespace(id=peer_id, joined_at=now, last_seen=now, rtt_ms=rtt)
        for cb in self.joins:
            cb(peer_id)

    def set_rtt(self, peer_id: str, rtt: float) -> None:
        self.peers[peer_id] = SimpleNamespace(**{**vars(self.peers[peer_id]), "rtt_ms": rtt})

    def drop_peer(self, peer_id: str) -> None:
        del self.peers[peer_id]
        for cb in self.leaves:
            cb(peer_id)

    async def leave(self) -> None:
        for peer_id in list(self.peers):
            self.drop_peer(peer_id)


def fake_p2p_helper(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, FakeRoom]]:
    """A real ``P2PHelper`` whose ``signaling`` import is the stand-in; returns it and its rooms."""
    rooms: dict[str, FakeRoom] = {}

    class Session:
        def __init__(self, *, id_prefix: str = "") -> None:
            self.id_prefix = id_prefix

        async def close(self) -> None:
            pass

    def join_room(cfg: Any, room_id: str, session: Any) -> FakeRoom:
        rooms[room_id] = FakeRoom()
        return rooms[room_id]

    fake = SimpleNamespace(
        RoomConfig=lambda **kw: SimpleNamespace(**kw), Session=Session, join_room=join_room
    )
    monkeypatch.setitem(sys.modules, "signaling", fake)
    from p2pdiff.rooms.helper import P2PHelper

    return P2PHelper(P2PConfig(relay_urls=[RELAY])), rooms
