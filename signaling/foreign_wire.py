"""Peers that speak another Trystero wire version than the room they announce in.

Trystero 0.22 and 0.23+ announce identically (``{"peerId":S}`` on the same root topic), so both
kinds of peer hear each other but can never connect (spec §9.10): 0.22 drops 0.25's string
offers, 0.25 drops 0.22's object offers, and the data layers differ anyway. All a room can do is
notice, by the *shape* of a signal (:func:`signaling.wire.v022.detect_wire_version`), that a
peer speaks the other wire, then leave it alone and tell the operator once, so a misconfigured
room ("the browsers run 0.22 but the helper joined with 0.25") is a one-line diagnosis instead of
a silent "nobody joins".

:class:`ForeignWireWatch` (one per room signaller) does that: every relay message is screened
before the negotiator sees it; a peer found to speak another wire is remembered (bounded LRU),
counted (``foreign_wire_peers``, ``dropped.foreign_wire``), logged at WARNING once, and every
later message from it is dropped, so it costs no more offers, answers or RTCPeerConnections.
Plain announcements carry no version: a stranger that only ever announces stays unrecognised
(for a 0.25 peer in a 0.22 room that happens when its id sorts after ours: it leaves the offer
to us and silently drops ours), which is harmless but means there is no log line for it.

WebTorrent trackers carry the same frames for both wires, so there a stranger connects, and
only its data channel gives it away: :func:`channel_wire` reads the first message of a new
connection (0.25 wraps every chunk in a room or presence frame, first byte 1 or 2; 0.22 sends
bare chunks that start with a 12-byte action name), and the session reports what it finds with
:meth:`ForeignWireWatch.report`, which logs and counts exactly as relay screening does. A
connection that stays silent through the handshake time is taken for a 0.22 stranger only there:
on topic relays the offer and answer already showed the wire
(:attr:`~signaling.signaller.RoomSignaller.signals_show_wire`), so silence there is a handshake
timeout on our own wire (the session closes that connection and announces again).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from signaling.bounded import LruSet
from signaling.framing import from_json
from signaling.wire import v022, v025
from signaling.wire.v022 import detect_wire_version

log = logging.getLogger(__name__)

__all__ = ["STRANGER_CAPACITY", "ForeignWireWatch", "channel_wire", "describe_shape"]

#: Strangers remembered per room; beyond it the oldest is forgotten (and, if it keeps talking,
#: found and logged again). A real room has a handful; a flood of fake ids costs this much.
STRANGER_CAPACITY = 256


def describe_shape(payload: dict[str, Any]) -> str:
    """What gave the version away, for the log line (never echoes remote text)."""
    for key in ("offer", "answer"):
        value = payload.get(key)
        if isinstance(value, dict):
            return f"object-shaped {key}"
        if isinstance(value, str) and value:
            return f"string-shaped {key}" + (" with offerId" if "offerId" in payload else "")
    for key in ("candidate", "offerId", "passive"):
        if key in payload:
            return f"'{key}' field"
    return "signal shape"


#: First bytes of a 0.25 data-channel message: a room frame or a presence frame (spec §6.3).
_FRAME_TYPES_025 = (0x01, 0x02)
_NAME_BYTES_022 = 12
_HEADER_BYTES_022 = 15


def channel_wire(data: bytes | str, wire: str) -> tuple[str, str] | None:
    """``(version, evidence)`` if the first message on a connection of a ``wire`` room shows
    that the remote speaks the other wire, else None (also for anything unclear)."""
    if not isinstance(data, bytes | bytearray | memoryview) or not data:
        return None
    data = bytes(data)
    if wire == v022.WIRE_VERSION:
        if data[0] in _FRAME_TYPES_025:
            return v025.WIRE_VERSION, "room frames on the data channel"
        return None
    if data[0] in _FRAME_TYPES_025 or len(data) < _HEADER_BYTES_022:
        return None
    try:
        name = data[:_NAME_BYTES_022].rstrip(b"\0").decode()
    except UnicodeDecodeError:
        return None
    if name and name.isprintable():
        return v022.WIRE_VERSION, "bare action chunks on the data channel"
    return None


class ForeignWireWatch:
    """Screens one room's relay messages for peers speaking another wire (see module docstring).

    ``on_stranger(peer_id)`` is called once when a peer is first recognised, so the owner can
    abandon a negotiation it may already have started with it.
    """

    def __init__(
        self,
        *,
        wire: str,
        room_id: str,
        counters: Counter[str],
        on_stranger: Callable[[str], None] | None = None,
        capacity: int = STRANGER_CAPACITY,
        max_peer_id_length: int = 128,
    ) -> None:
        self.wire = wire
        self.room_id = room_id
        self._counters = counters
        self._on_stranger = on_stranger
        self._max_peer_id_length = max_peer_id_length
        self._known: LruSet[str] = LruSet(capacity)
        # Separate from _known so a stranger that is evicted and comes back is not logged twice
        # within this (larger) window; bounds the log volume a flood of fresh ids can cause.
        self._warned: LruSet[str] = LruSet(4 * capacity)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._known

    def __len__(self) -> int:
        return len(self._known)

    def screen(self, text: str, peer_id: str | None, *, suspicious: bool) -> bool:
        """True if the message comes from a peer speaking another wire: the caller drops it.

        ``peer_id``: the sender if the caller already parsed it (None otherwise). ``suspicious``:
        the caller's parser could not use the message as its own wire (a foreign shape) or it may
        hide a version marker (a 0.25 ``candidate`` reads as a 0.22 announcement); only then is
        the text parsed again here, so ordinary traffic costs one set lookup.
        """
        if peer_id is not None and peer_id in self._known:
            self._counters["dropped.foreign_wire"] += 1
            return True
        if not suspicious:
            return False
        try:
            payload = from_json(text)
        except ValueError:
            return False
        if not isinstance(payload, dict):
            return False
        sender = payload.get("peerId")
        if not isinstance(sender, str) or not sender or len(sender) > self._max_peer_id_length:
            return False
        version = detect_wire_version(payload)
        if version is None or version == self.wire:
            return False
        self._counters["dropped.foreign_wire"] += 1
        if sender not in self._known:
            self.report(sender, version, describe_shape(payload))
        return True

    def report(self, peer_id: str, version: str, evidence: str) -> None:
        """``peer_id`` was found to speak Trystero wire ``version`` (``evidence`` is for the log
        line): remember it, count it, log it once, and tell the owner."""
        if peer_id in self._known:
            return
        self._known.add(peer_id)
        self._counters["foreign_wire_peers"] += 1
        if peer_id not in self._warned:
            self._warned.add(peer_id)
            log.warning(
                "room %s (Trystero wire %s): peer %s seems to speak Trystero wire %s (%s); "
                "it cannot join this room: both sides must use the same wire",
                self.room_id,
                self.wire,
                peer_id,
                version,
                evidence,
            )
        if self._on_stranger is not None:
            try:
                self._on_stranger(peer_id)
            except Exception:
                log.exception("room %s: dropping the negotiation with %s failed", self.room_id, peer_id)
