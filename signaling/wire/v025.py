"""Trystero 0.25 data-channel wire (spec §6.3, §6.4, §7). Pure and network-free.

Every data-channel message is one binary *frame*: a room frame carrying one 36-byte-header action
chunk, or a presence frame. Frames are addressed by room token (``signaling.crypto.room_token``),
so one connection per remote peer carries all rooms of an appId.

Sending
    ``RoomEncoder(token)``                 per-room sender state (nonce per action name)
        ``.encode(action, payload, metadata=NO_METADATA) -> list[bytes]``  frames for one send();
                                           write them in order to every target peer's channel
        ``.presence(present) -> bytes``    presence frame for this room
    ``encode_action(token, action, payload, *, nonce, metadata=NO_METADATA) -> list[bytes]``
                                           stateless variant with an explicit nonce
    ``encode_chunks(action, payload, *, nonce, metadata=NO_METADATA) -> list[bytes]``  inner chunks
    ``wrap_room_frame(token, chunk) -> bytes`` / ``encode_presence(token, present) -> bytes``
    ``progress_byte(index, total) -> int``  send progress of frame ``index`` of ``total`` is ``/255``
Payload types: ``str`` → text; ``bytes``/``bytearray``/``memoryview`` → binary; any other JSON
value (dict, list, int, float, bool, None) → JSON. ``metadata`` is any JSON value; omit it (leave
``NO_METADATA``) for none, ``None`` sends JSON ``null``.

Receiving
    ``Decoder(max_action_bytes=, max_pending=, max_buffered_bytes=)``  one per remote peer
        ``.feed(message: bytes) -> list[Event]``  ``Event = Presence | Progress | Received``
        ``.forget_room(token)``            drop half-received actions of a room (peer left it)
        ``.reset()``, ``.pending_count``, ``.buffered_bytes``  housekeeping and monitoring
        ``.ignored``                       count of frames dropped silently, as JS drops them
    ``Presence(token, present)``; ``Progress(token, action, nonce, progress, metadata)`` for every
    chunk but the last; ``Received(token, action, nonce, payload, metadata)`` when complete.
    ``feed`` raises :class:`~signaling.errors.FramingError` (drop the peer) for a truncated chunk
    header, an empty action name or a passed reassembly cap, and
    :class:`~signaling.errors.PayloadError` if a completed action's JSON payload or metadata does
    not parse; the decoder stays usable after a PayloadError (JS drops just that message).

Admission (``@_hsready`` / ``@_hsdata``)
    ``ACTION_*`` names, ``PENDING_ACTIONS`` (accepted before admission), ``HANDSHAKE_TIMEOUT_S``
    ``is_handshake_initiator(self_id, peer_id) -> bool``   smaller id sends the challenge
    ``pw_challenge(challenge=None) -> dict``               ``@_hsdata`` payload of the initiator
    ``parse_pw_challenge(payload) -> str``                 responder: extract ``c``
    ``pw_response(challenge, password, app_id, room_id) -> dict``  responder's ``@_hsdata`` payload
    ``check_pw_response(payload, challenge, password, app_id, room_id) -> None``  initiator check
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from signaling.crypto import gen_id, password_response, verify_password_response
from signaling.errors import HandshakeError, PayloadError
from signaling.framing import (
    NO_METADATA,
    ChunkHeader,
    ChunkLayout,
    Reassembler,
    decode_payload,
    decode_text,
    encode_text,
    from_json,
    progress_byte,
)
from signaling.wire.interface import Admission, Event, Presence, Progress, Received, Wire

__all__ = [
    "ACTION_HSDATA",
    "ACTION_HSREADY",
    "ACTION_LEAVE",
    "ACTION_PING",
    "ACTION_PONG",
    "ACTION_RESPONSE",
    "ACTION_SIGNAL",
    "ACTION_STREAM",
    "ACTION_TRACK",
    "CHALLENGE_LENGTH",
    "CHUNK_PAYLOAD_SIZE",
    "HANDSHAKE_TIMEOUT_S",
    "HEADER_SIZE",
    "INTERNAL_PREFIX",
    "LAYOUT",
    "MAX_ACTION_NAME_BYTES",
    "NO_METADATA",
    "PENDING_ACTIONS",
    "PRESENCE_FRAME",
    "ROOM_FRAME",
    "WIRE",
    "WIRE_VERSION",
    "Decoder",
    "Event",
    "Presence",
    "Progress",
    "Received",
    "RoomEncoder",
    "check_pw_response",
    "encode_action",
    "encode_chunks",
    "encode_presence",
    "is_handshake_initiator",
    "new_decoder",
    "parse_pw_challenge",
    "progress_byte",
    "pw_challenge",
    "pw_response",
    "wrap_room_frame",
]

# --- constants ------------------------------------------------------------------------------------

ROOM_FRAME: Final = 0x01
PRESENCE_FRAME: Final = 0x02

LAYOUT: Final = ChunkLayout(type_size=32, nonce_size=2)
HEADER_SIZE: Final = LAYOUT.header_size  # 36
CHUNK_PAYLOAD_SIZE: Final = LAYOUT.payload_size  # 16348
MAX_ACTION_NAME_BYTES: Final = LAYOUT.type_size  # 32

WIRE_VERSION: Final = "0.25"
INTERNAL_PREFIX: Final = "@_"
ACTION_HSREADY: Final = "@_hsready"
ACTION_HSDATA: Final = "@_hsdata"
ACTION_PING: Final = "@_ping"
ACTION_PONG: Final = "@_pong"
ACTION_LEAVE: Final = "@_leave"
ACTION_SIGNAL: Final = "@_signal"
ACTION_STREAM: Final = "@_stream"
ACTION_TRACK: Final = "@_track"
ACTION_RESPONSE: Final = "@_response"

# JS drops everything else from a peer that is still pending admission.
PENDING_ACTIONS: Final = frozenset({ACTION_HSREADY, ACTION_HSDATA, ACTION_LEAVE})
HANDSHAKE_TIMEOUT_S: Final = 10.0
CHALLENGE_LENGTH: Final = 36
PW_FIELD: Final = "__trystero_pw"

_TOKEN_LENGTH_MAX = 0xFFFF


# --- sending --------------------------------------------------------------------------------------


def _token_bytes(token: str) -> bytes:
    raw = encode_text(token)
    if not 0 < len(raw) <= _TOKEN_LENGTH_MAX:
        raise ValueError(f"room token must be 1..{_TOKEN_LENGTH_MAX} bytes, got {len(raw)}")
    return raw


def encode_chunks(action: str, payload: Any, *, nonce: int, metadata: Any = NO_METADATA) -> list[bytes]:
    """Inner 36-byte-header chunks of one send(), byte-identical to Trystero 0.25."""
    return LAYOUT.encode(action, payload, nonce=nonce, metadata=metadata)


def wrap_room_frame(token: str, chunk: bytes) -> bytes:
    """Room frame: ``01``, token length (uint16 BE), token (ASCII), then one chunk."""
    raw = _token_bytes(token)
    return b"".join((bytes((ROOM_FRAME,)), len(raw).to_bytes(2, "big"), raw, chunk))


def encode_action(
    token: str, action: str, payload: Any, *, nonce: int, metadata: Any = NO_METADATA
) -> list[bytes]:
    """The data-channel messages, in order, that Trystero sends for one ``send()`` in a room."""
    raw = _token_bytes(token)
    prefix = bytes((ROOM_FRAME,)) + len(raw).to_bytes(2, "big") + raw
    return [prefix + chunk for chunk in encode_chunks(action, payload, nonce=nonce, metadata=metadata)]


def encode_presence(token: str, present: bool) -> bytes:
    """Presence frame: ``02``, ``01`` joined / ``00`` left, token length (uint16 BE), token."""
    raw = _token_bytes(token)
    return b"".join((bytes((PRESENCE_FRAME, int(present))), len(raw).to_bytes(2, "big"), raw))


class RoomEncoder:
    """Sender state of one room: a nonce counter per action name, as JS keeps per (room, action).

    The counter map grows only with the local application's own action names.
    """

    def __init__(self, token: str) -> None:
        _token_bytes(token)  # validate early
        self.token = token
        self._nonces: dict[str, int] = {}

    def encode(self, action: str, payload: Any, metadata: Any = NO_METADATA) -> list[bytes]:
        """Frames for one send(); the action's nonce advances only if encoding succeeds."""
        nonce = self._nonces.get(action, 0)
        frames = encode_action(self.token, action, payload, nonce=nonce, metadata=metadata)
        self._nonces[action] = (nonce + 1) % LAYOUT.nonce_modulus
        return frames

    def presence(self, present: bool) -> bytes:
        return encode_presence(self.token, present)


# --- receiving ------------------------------------------------------------------------------------




@dataclass(frozen=True, slots=True)
class _RoomFrame:
    token: str
    chunk: memoryview


def _parse_frame(buf: memoryview) -> _RoomFrame | Presence | None:
    """Outer frame, or None for anything JS's ``unwrapFrame`` drops."""
    if len(buf) < 3:
        return None
    if buf[0] == ROOM_FRAME:
        end = 3 + int.from_bytes(buf[1:3], "big")
        if end == 3 or len(buf) < end:
            return None
        return _RoomFrame(decode_text(buf[3:end]), buf[end:])
    if buf[0] != PRESENCE_FRAME or len(buf) < 4:
        return None
    end = 4 + int.from_bytes(buf[2:4], "big")
    if end == 4 or len(buf) < end:
        return None
    return Presence(decode_text(buf[4:end]), buf[1] == 1)


class ChunkDecoder:
    """Reassembly shared by both wires' decoders (v022.Decoder too): chunks in, events out.

    Half-received actions are bounded by the caps below; passing one raises FramingError and the
    caller should drop the peer. The defaults allow a 16 MiB action; raise ``max_action_bytes``
    if the application sends larger blobs.
    """

    def __init__(
        self,
        *,
        max_action_bytes: int = 16 * 1024 * 1024,
        max_pending: int = 32,
        max_buffered_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        # Keys are (token, action, nonce) on 0.25 and (action, nonce) on 0.22.
        self._reassembler: Reassembler[tuple[Any, ...]] = Reassembler(
            max_message_bytes=max_action_bytes,
            max_pending=max_pending,
            max_buffered_bytes=max_buffered_bytes,
        )
        self.ignored = 0

    @property
    def buffered_bytes(self) -> int:
        return self._reassembler.buffered_bytes

    @property
    def pending_count(self) -> int:
        return self._reassembler.pending_count

    def reset(self) -> None:
        self._reassembler.clear()

    def _chunk(
        self, token: str, key: Any, header: ChunkHeader, payload: bytes, *, meta_with_binary_only: bool
    ) -> Progress | Received:
        """Add one chunk of the action ``key``; a Progress, or the Received that completes it."""
        meta: Any = NO_METADATA
        if header.is_meta:
            try:
                meta = from_json(payload)
            except ValueError as exc:
                raise PayloadError(f"metadata of {header.action!r} is not JSON") from exc
        done = self._reassembler.add(key, payload, last=header.is_last, meta=meta)
        if done is None:
            metadata = self._reassembler.metadata(key)
            return Progress(token, header.action, header.nonce, header.progress / 255, metadata)
        try:
            # JS decodes by the flags of the last chunk, binary first.
            value = decode_payload(done.data, header.flags)
        except ValueError as exc:
            raise PayloadError(f"payload of {header.action!r} is not JSON") from exc
        # 0.22 calls onComplete(data, id, meta) for binary and onComplete(data, id) otherwise.
        keep_meta = header.is_binary or not meta_with_binary_only
        metadata = done.metadata if keep_meta else NO_METADATA
        return Received(token, header.action, header.nonce, value, metadata)


class Decoder(ChunkDecoder):
    """Turns one remote peer's data-channel messages into events, across all rooms it shares.

    Half-received actions are keyed by (token, action, nonce).
    """

    def feed(self, message: bytes | bytearray | memoryview | str) -> list[Event]:
        """Decode one data-channel message into zero or one event.

        Messages JS would silently drop (text messages, unknown first byte, shorter than their
        token) are counted in ``ignored`` and yield no event, so a newer Trystero's extra frame
        kinds stay harmless. A ``Received`` stands for progress 1.0; no Progress precedes it for
        the last chunk.
        """
        if isinstance(message, str):
            self.ignored += 1
            return []
        frame = _parse_frame(memoryview(message))
        if frame is None:
            self.ignored += 1
            return []
        if isinstance(frame, Presence):
            return [frame]
        header, payload = LAYOUT.parse(frame.chunk)
        return [
            self._chunk(
                frame.token,
                (frame.token, header.action, header.nonce),
                header,
                payload,
                meta_with_binary_only=False,
            )
        ]

    def forget_room(self, token: str) -> int:
        """Drop half-received actions of one room; returns how many were dropped."""
        return self._reassembler.discard(lambda key: key[0] == token)


# --- admission ------------------------------------------------------------------------------------


def is_handshake_initiator(self_id: str, peer_id: str) -> bool:
    """The peer with the smaller id (plain code-point order, as JS ``<``) sends the challenge."""
    return self_id < peer_id


def pw_challenge(challenge: str | None = None) -> dict[str, str]:
    """Initiator's ``@_hsdata`` payload; a fresh 36-char challenge is drawn if none is given."""
    return {PW_FIELD: "challenge", "c": challenge if challenge is not None else gen_id(CHALLENGE_LENGTH)}


def parse_pw_challenge(payload: Any) -> str:
    """Responder side: the challenge string ``c``, or HandshakeError on a wrong shape."""
    if not isinstance(payload, dict) or payload.get(PW_FIELD) != "challenge":
        raise HandshakeError("expected a password challenge")
    challenge = payload.get("c")
    if not isinstance(challenge, str):
        raise HandshakeError("password challenge has no string 'c'")
    return challenge


def pw_response(challenge: str, password: str, app_id: str, room_id: str) -> dict[str, str]:
    """Responder's ``@_hsdata`` payload answering ``challenge``."""
    return {PW_FIELD: "response", "h": password_response(challenge, password, app_id, room_id)}


def check_pw_response(payload: Any, challenge: str, password: str, app_id: str, room_id: str) -> None:
    """Initiator side: HandshakeError unless ``payload`` correctly answers our ``challenge``."""
    if not isinstance(payload, dict) or payload.get(PW_FIELD) != "response":
        raise HandshakeError("expected a password response")
    answer = payload.get("h")
    if not isinstance(answer, str):
        raise HandshakeError("password response has no string 'h'")
    if not verify_password_response(answer, challenge, password, app_id, room_id):
        raise HandshakeError("incorrect password")


# --- the wire as the session and room use it ------------------------------------------------------


def new_decoder(token: str, *, max_action_bytes: int, max_pending: int, max_buffered_bytes: int) -> Decoder:
    """The decoder of one connection; ``token`` is unused: room frames name the room of each chunk."""
    return Decoder(
        max_action_bytes=max_action_bytes, max_pending=max_pending, max_buffered_bytes=max_buffered_bytes
    )


WIRE: Final = Wire(
    version=WIRE_VERSION,
    layout=LAYOUT,
    internal_prefix=INTERNAL_PREFIX,
    action_ping=ACTION_PING,
    action_pong=ACTION_PONG,
    action_leave=ACTION_LEAVE,
    new_encoder=RoomEncoder,
    new_decoder=new_decoder,
    encode_presence=encode_presence,
    admission=Admission(
        ready_action=ACTION_HSREADY,
        data_action=ACTION_HSDATA,
        pending_actions=PENDING_ACTIONS,
        challenge_length=CHALLENGE_LENGTH,
        is_initiator=is_handshake_initiator,
        challenge=pw_challenge,
        parse_challenge=parse_pw_challenge,
        response=pw_response,
        check_response=check_pw_response,
    ),
    shared_connections=True,
)
