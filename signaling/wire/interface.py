"""What every wire module provides, as types: :class:`Wire`, one frozen instance per wire version
(``v025.WIRE``, ``v022.WIRE``), which the session and the room read instead of the module itself.

A wire is the data-channel side of a Trystero version: how actions are chunked and framed
(``layout``, ``new_encoder``/``new_decoder``), the internal action names the room layer answers,
and what the protocol around the bytes has or lacks (room and presence frames, admission, shared
connections). A concept a wire does not have is ``None`` (``encode_presence``, ``admission``), so
code that needs it narrows the type and cannot use it by accident. The decoded events are shared
by every wire, so ``isinstance`` works whatever the wire.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from signaling.framing import NO_METADATA, ChunkLayout, from_json

__all__ = [
    "Admission",
    "Cadence",
    "DecoderFactory",
    "Event",
    "FrameDecoder",
    "FrameEncoder",
    "Presence",
    "Progress",
    "Received",
    "Wire",
    "WireTraits",
]


# --- decoded events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Presence:
    """The remote says it is (``present=True``) or is no longer in the room with this token."""

    token: str
    present: bool


@dataclass(frozen=True, slots=True)
class Progress:
    """A non-final chunk of an action arrived; ``progress`` is in (0, 1)."""

    token: str
    action: str
    nonce: int
    progress: float
    metadata: Any = NO_METADATA


@dataclass(frozen=True, slots=True)
class Received:
    """A complete action: ``payload`` is ``str``, ``bytes`` or a parsed JSON value."""

    token: str
    action: str
    nonce: int
    payload: Any
    metadata: Any = NO_METADATA

    @property
    def has_metadata(self) -> bool:
        return self.metadata is not NO_METADATA


Event = Presence | Progress | Received


# --- the interface --------------------------------------------------------------------------------


class FrameDecoder(Protocol):
    """One remote peer's reassembly: data-channel messages in, events out (bounded; see v025)."""

    @property
    def buffered_bytes(self) -> int: ...

    def feed(self, message: bytes | bytearray | memoryview | str) -> Sequence[Event]: ...

    def forget_room(self, token: str) -> int: ...

    def reset(self) -> None: ...


class DecoderFactory(Protocol):
    """Makes the decoder of one connection; ``token`` is the room it serves where the wire has no
    room frames to name it (0.22), and unused otherwise."""

    def __call__(
        self, token: str, *, max_action_bytes: int, max_pending: int, max_buffered_bytes: int
    ) -> FrameDecoder: ...


class FrameEncoder(Protocol):
    """Sender state of one room: the frames of one ``send()``."""

    def encode(self, action: str, payload: Any, metadata: Any = NO_METADATA) -> list[bytes]: ...


@dataclass(frozen=True, slots=True)
class WireTraits:
    """What the session does differently per wire, in one comparable value."""

    version: str
    #: ``01``/``02`` room and presence frames around every chunk.
    room_frames: bool
    #: ``@_hsready`` (and the password challenge) before a peer is active.
    admission: bool
    #: One connection per (app id, peer) shared by rooms; else one per (room, peer).
    shared_connections: bool
    #: The receiver never purges a half-received chunk run and the nonce comes round again after
    #: this many sends, so a run must be finished even if the sender's caller is cancelled.
    complete_runs: bool


@dataclass(frozen=True, slots=True)
class Admission:
    """The per-room handshake a wire runs before a peer is active (``@_hsready``, and the password
    challenge/response over ``@_hsdata`` when the room has a password)."""

    ready_action: str
    data_action: str
    #: What a peer still in admission may send (anything else is dropped).
    pending_actions: frozenset[str]
    challenge_length: int
    #: (self_id, peer_id) -> whether we send the password challenge.
    is_initiator: Callable[[str, str], bool]
    #: challenge -> our ``@_hsdata`` challenge payload.
    challenge: Callable[[str], Any]
    #: payload -> the peer's challenge (HandshakeError on a wrong shape).
    parse_challenge: Callable[[Any], str]
    #: (challenge, password, app_id, room_id) -> our ``@_hsdata`` response payload.
    response: Callable[[str, str, str, str], Any]
    #: (payload, challenge, password, app_id, room_id); HandshakeError unless it answers ours.
    check_response: Callable[[Any, str, str, str, str], None]


@dataclass(frozen=True, slots=True)
class Cadence:
    """The announce schedule of a wire's JS peers, where it is not ``Timeouts``' default."""

    warmup: tuple[float, ...]
    interval: float


@dataclass(frozen=True, slots=True)
class Wire:
    """One Trystero wire version, as the session and the room use it."""

    version: str
    layout: ChunkLayout
    internal_prefix: str
    action_ping: str
    action_pong: str
    action_leave: str
    new_encoder: Callable[[str], FrameEncoder]
    new_decoder: DecoderFactory
    #: (token, present) -> a presence frame; None: the wire has no room frames.
    encode_presence: Callable[[str, bool], bytes] | None
    #: None: a peer is active as soon as its channel opens.
    admission: Admission | None
    shared_connections: bool
    #: None: ``Timeouts``' announce schedule applies as given.
    cadence: Cadence | None = None

    @property
    def traits(self) -> WireTraits:
        return WireTraits(
            version=self.version,
            room_frames=self.encode_presence is not None,
            admission=self.admission is not None,
            shared_connections=self.shared_connections,
            # 0.22: a 1-byte nonce; an unfinished run would be glued to the send 256 sends later.
            complete_runs=self.layout.nonce_modulus <= 256,
        )


def relay_envelope(
    text: str | bytes, self_id: str, *, max_bytes: int, max_peer_id_length: int
) -> tuple[str, dict[str, Any]] | str:
    """What every relay message of either wire is: a JSON object naming its sender in ``peerId``.

    Returns ``(peer_id, payload)``, or the reason (a counter name) the message is dropped:
    ``relay_oversize``, ``relay_not_json``, ``relay_not_object``, ``relay_no_peer_id`` (missing, empty
    or not a string), ``relay_bad_peer_id`` (too long) or ``relay_own`` (our own id).
    """
    if len(text) > max_bytes:
        return "relay_oversize"
    try:
        payload = from_json(text)
    except ValueError:
        return "relay_not_json"
    if not isinstance(payload, dict):
        return "relay_not_object"
    peer_id = payload.get("peerId")
    if not isinstance(peer_id, str) or not peer_id:
        return "relay_no_peer_id"
    if len(peer_id) > max_peer_id_length:
        return "relay_bad_peer_id"
    if peer_id == self_id:
        return "relay_own"
    return peer_id, payload
