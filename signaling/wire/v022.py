"""Trystero 0.22.0 wire (spec §9): data-channel framing plus what signalling does differently.
Pure and network-free, shaped like :mod:`signaling.wire.v025`; :data:`WIRE` is what the session
and the room use of it (``signaling.wire.wire_for("0.22")``).

0.22 has no room frames, no presence frames, no shared connections and no admission: every
data-channel message is one bare action chunk with a 15-byte header (12-byte name, 1-byte nonce,
flags, progress), one RTCPeerConnection serves one (room, peer), and a peer is active as soon as
its channel opens. Signalling uses object-shaped offers and answers without offer ids or
candidate messages, and *every* peer offers to every peer it hears (:data:`PROFILE`).

Sending (same names as v025)
    ``RoomEncoder(token=None)``            per-room sender state (1-byte nonce per action name);
        ``.encode(action, payload, metadata=NO_METADATA) -> list[bytes]``  messages of one send()
                                           (no ``.presence()``: 0.22 has no presence frames)
    ``encode_chunks(action, payload, *, nonce, metadata=NO_METADATA) -> list[bytes]``
    ``encode_action(token, action, payload, *, nonce, metadata=NO_METADATA) -> list[bytes]``
                                           same as ``encode_chunks``; ``token`` is ignored
    ``progress_byte(index, total) -> int``
Metadata (0.22 rule, spec §9.7): only with a binary payload, and only a JSON object or array
(``dict``/``list``/``tuple``); anything else raises before the nonce advances. ``None`` and
``NO_METADATA`` both mean "none" (JS treats a falsy ``meta`` as absent, so ``null`` is never sent).

Receiving (same event classes as v025, imported from it so ``isinstance`` works for both wires)
    ``Decoder(token="", max_action_bytes=, max_pending=, max_buffered_bytes=, accepts=None)``
        one per (room, remote peer) connection; ``token`` is only stamped on events so room code
        that dispatches by ``event.token`` works unchanged; ``accepts(action) -> bool`` mirrors
        JS dropping unregistered types before buffering anything.
        ``.feed(message) -> list[Event]``  ``Event = Progress | Received`` (``Presence`` is
        exported for ``isinstance`` checks but never produced)
        ``.forget_room(token)``, ``.reset()``, ``.pending_count``, ``.buffered_bytes``, ``.ignored``
    Errors as in v025: :class:`~signaling.errors.FramingError` (drop the peer) for a header
    shorter than 15 bytes, an empty action name or a passed reassembly cap;
    :class:`~signaling.errors.PayloadError` (drop one message) for bad JSON.
    ``Received.metadata`` is only set for binary payloads, as JS hands ``meta`` to binary only.

Session capabilities (what v025 does through admission and presence)
    ``WIRE_VERSION``, ``ROOM_FRAMES``, ``ADMISSION``, ``SHARED_CONNECTIONS``,
    ``QUEUE_UNHANDLED``, ``METADATA_BINARY_ONLY``; ``ACTION_*``, ``INTERNAL_PREFIX``,
    ``INTERNAL_ACTIONS``. Deliberately absent (no such concept in 0.22): ``ACTION_HSREADY``,
    ``ACTION_HSDATA``, ``ACTION_RESPONSE``, ``PENDING_ACTIONS``, ``encode_presence``, the
    password helpers, ``CHALLENGE_LENGTH``; ``HANDSHAKE_TIMEOUT_S`` is ``None``.

Signalling (spec §9.2-9.6)
    ``PROFILE: WireProfile``               timing, who offers, glare (what each strategy does
                                           differently on 0.22 is in its module under
                                           :mod:`signaling.strategies`)
    ``make_announce_payload(self_id)``, ``make_offer_payload(self_id, sealed_sdp)``,
    ``make_answer_payload(self_id, sealed_sdp)`` -> JSON text for MQTT bodies / nostr content
    ``parse_relay_payload(text, self_id, ...) -> RelaySignal | str``  (str = drop reason)
    ``detect_wire_version(payload) -> "0.22" | "0.25" | None``  by the signal's shape (§9.10)
    ``is_offerer(self_id, peer_id)``, ``wins_glare(self_id, peer_id)``
    ``strip_trickle_option(sdp)``          the SDP edit JS makes before sending
    Tracker frames are the same in both versions and live in :mod:`signaling.relays.torrent`
    (``announce_message``/``answer_message``, ``policy=TORRENT_022``);
    :mod:`signaling.strategies.torrent` says what the strategy must do around them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from signaling.framing import (
    NO_METADATA,
    ChunkLayout,
    from_json,
    progress_byte,
    to_json,
)
from signaling.wire.interface import Cadence, Presence, Progress, Received, Wire, relay_envelope
from signaling.wire.v025 import ChunkDecoder

__all__ = [
    "ACTION_LEAVE",
    "ACTION_PING",
    "ACTION_PONG",
    "ACTION_SIGNAL",
    "ACTION_STREAM",
    "ACTION_TRACK",
    "ADMISSION",
    "CHUNK_PAYLOAD_SIZE",
    "HANDSHAKE_TIMEOUT_S",
    "HEADER_SIZE",
    "INTERNAL_ACTIONS",
    "INTERNAL_PREFIX",
    "LAYOUT",
    "MAX_ACTION_NAME_BYTES",
    "METADATA_BINARY_ONLY",
    "NO_METADATA",
    "PROFILE",
    "QUEUE_UNHANDLED",
    "ROOM_FRAMES",
    "SHARED_CONNECTIONS",
    "WIRE",
    "WIRE_VERSION",
    "Decoder",
    "Event",
    "Presence",
    "Progress",
    "Received",
    "RelaySignal",
    "RoomEncoder",
    "WireProfile",
    "detect_wire_version",
    "encode_action",
    "encode_chunks",
    "is_offerer",
    "make_announce_payload",
    "make_answer_payload",
    "make_offer_payload",
    "new_decoder",
    "parse_relay_payload",
    "progress_byte",
    "strip_trickle_option",
    "wins_glare",
]

# --- capabilities ---------------------------------------------------------------------------------

WIRE_VERSION: Final = "0.22"
#: Data-channel messages are bare chunks: no ``01``/``02`` room or presence frames (§9.1, §9.7).
ROOM_FRAMES: Final = False
#: No ``@_hsready``/``@_hsdata``: JS fires onPeerJoin when the channel opens (§9.6).
ADMISSION: Final = False
#: One RTCPeerConnection per (room, peer), not per (appId, peer) (§9.1).
SHARED_CONNECTIONS: Final = False
#: JS drops data for an action type it has not registered instead of queueing it (§9.7).
QUEUE_UNHANDLED: Final = False
#: JS throws on metadata with non-binary data and never delivers it for non-binary (§9.7).
METADATA_BINARY_ONLY: Final = True
#: There is no handshake to time out; kept (as None) so ``wire.HANDSHAKE_TIMEOUT_S`` resolves.
HANDSHAKE_TIMEOUT_S: Final[float | None] = None

# --- framing constants ----------------------------------------------------------------------------

LAYOUT: Final = ChunkLayout(type_size=12, nonce_size=1)
HEADER_SIZE: Final = LAYOUT.header_size  # 15
CHUNK_PAYLOAD_SIZE: Final = LAYOUT.payload_size  # 16369
MAX_ACTION_NAME_BYTES: Final = LAYOUT.type_size  # 12: "capabilities" fits exactly

INTERNAL_PREFIX: Final = "@_"
ACTION_PING: Final = "@_ping"
ACTION_PONG: Final = "@_pong"
ACTION_LEAVE: Final = "@_leave"
ACTION_SIGNAL: Final = "@_signal"
ACTION_STREAM: Final = "@_stream"
ACTION_TRACK: Final = "@_track"
#: Every type a 0.22 room registers itself (§9.8); all of them are handled by the room layer.
INTERNAL_ACTIONS: Final = frozenset(
    {ACTION_PING, ACTION_PONG, ACTION_LEAVE, ACTION_SIGNAL, ACTION_STREAM, ACTION_TRACK}
)

Event = Progress | Received


# --- sending --------------------------------------------------------------------------------------


def _check_metadata(payload: Any, metadata: Any) -> Any:
    """Metadata as 0.22 sends it (NO_METADATA for none); raises where JS ``send()`` throws."""
    if metadata is NO_METADATA or metadata is None:
        return NO_METADATA
    # JS: `meta && typeof meta !== 'object'` throws. It lets falsy scalars (0, "", false) through
    # as "no meta"; we reject every scalar, since a Python caller passing one is a bug.
    if not isinstance(metadata, Mapping | list | tuple):
        raise TypeError(f"0.22 metadata must be a JSON object or array, got {type(metadata).__name__}")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ValueError("0.22 sends metadata only with binary data")
    return metadata


def encode_chunks(action: str, payload: Any, *, nonce: int, metadata: Any = NO_METADATA) -> list[bytes]:
    """The data-channel messages of one ``send()``, byte-identical to Trystero 0.22.0.

    Each message is one chunk: 12-byte NUL-padded name, nonce byte, flags, progress, payload.
    """
    return LAYOUT.encode(action, payload, nonce=nonce, metadata=_check_metadata(payload, metadata))


def encode_action(
    token: str | None, action: str, payload: Any, *, nonce: int, metadata: Any = NO_METADATA
) -> list[bytes]:
    """v025-compatible signature; 0.22 has no room frames, so ``token`` is ignored."""
    del token
    return encode_chunks(action, payload, nonce=nonce, metadata=metadata)


class RoomEncoder:
    """Sender state of one room: a nonce per action name, +1 per send, wrapping at 256 (§9.7).

    ``token`` is accepted (and kept) only so room code can construct either wire's encoder the
    same way; nothing of it goes on the wire. The counter map grows only with our own names.
    """

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self._nonces: dict[str, int] = {}

    def encode(self, action: str, payload: Any, metadata: Any = NO_METADATA) -> list[bytes]:
        """Messages for one send(); the nonce advances only if encoding succeeds.

        Write them in order and completely: a 0.22 receiver never purges an unfinished transfer,
        so a half-sent run would be glued to the send that reuses its nonce 256 sends later.
        """
        nonce = self._nonces.get(action, 0)
        chunks = encode_chunks(action, payload, nonce=nonce, metadata=metadata)
        self._nonces[action] = (nonce + 1) % LAYOUT.nonce_modulus
        return chunks


# --- receiving ------------------------------------------------------------------------------------


class Decoder(ChunkDecoder):
    """Turns the messages of one (room, remote peer) channel into v025's event types.

    Chunks are keyed by (action, nonce) and concatenated in arrival order, bounded by the same
    caps as v025 (passing one raises FramingError; drop the peer). ``accepts``, if given, is
    asked for each chunk's action name; a False answer drops the chunk before anything is
    buffered, as JS does for an unregistered type. Without it every action is reassembled and
    the room decides.
    """

    def __init__(
        self,
        *,
        token: str = "",
        max_action_bytes: int = 16 * 1024 * 1024,
        max_pending: int = 32,
        max_buffered_bytes: int = 32 * 1024 * 1024,
        accepts: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__(
            max_action_bytes=max_action_bytes, max_pending=max_pending, max_buffered_bytes=max_buffered_bytes
        )
        self.token = token
        self._accepts = accepts

    def feed(self, message: bytes | bytearray | memoryview | str) -> list[Event]:
        """Decode one data-channel message into zero or one event.

        Text messages and empty binary messages decode as an empty type in JS and are dropped;
        here they are counted in ``ignored``. So are chunks ``accepts`` refuses. A ``Received``
        stands for progress 1.0; no Progress precedes it for the last chunk.
        """
        if isinstance(message, str) or len(message) == 0:
            self.ignored += 1
            return []
        # JS would read a short message as a header with missing fields and buffer it forever;
        # a real 0.22 peer never sends one, so it is treated as a broken peer (as in v025).
        header, payload = LAYOUT.parse(memoryview(message))
        if self._accepts is not None and not self._accepts(header.action):
            self.ignored += 1
            return []
        key = (header.action, header.nonce)
        return [self._chunk(self.token, key, header, payload, meta_with_binary_only=True)]

    def forget_room(self, token: str) -> int:
        """Drop half-received actions if ``token`` is this decoder's room; returns how many."""
        if token != self.token:
            return 0
        return self._reassembler.discard(lambda _key: True)


# --- signalling profile (spec §9.2-9.6) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WireProfile:
    """What the strategy and session must do for one wire version. Times are in seconds.

    Fields describe the JS peer's protocol; the docstrings say what that means for us. The
    0.25 values are given in brackets for contrast (they live in ``config.Timeouts`` and
    ``signaller.py`` today).
    """

    version: str = WIRE_VERSION

    # --- data channel and lifecycle (§9.6-9.8) ---
    header_size: int = HEADER_SIZE  # [36]
    room_frames: bool = ROOM_FRAMES  # [True]
    #: Active (onPeerJoin, user actions accepted, ours delivered) when the channel opens. [False:
    #: pending until @_hsready both ways, 10 s timeout]
    admission: bool = ADMISSION
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT_S  # [10.0]
    #: A wrong password only fails SDP decryption (JS: onJoinError). [@_hsdata challenge]
    password_handshake: bool = False
    #: One PC per (room, peer); several rooms with the same peer = several PCs. [per appId]
    shared_connections: bool = SHARED_CONNECTIONS
    queue_unhandled_actions: bool = QUEUE_UNHANDLED  # [True]
    metadata_binary_only: bool = METADATA_BINARY_ONLY  # [False]
    #: ``@_leave`` to every peer, then this long before closing the PCs. [same]
    leave_grace: float = 0.099
    #: JS ends the peer *immediately* on connectionState disconnected/failed/closed or channel
    #: close/error. [5.0 s grace for disconnected]
    disconnect_grace: float = 0.0
    buffered_amount_low_threshold: int = 0xFFFF
    #: The JS sender waits for ``bufferedamountlow`` with no timeout. [10.0]
    buffered_low_timeout: float | None = None

    # --- relay payloads and who offers (§9.2) ---
    #: ``offer``/``answer`` are ``{"type","sdp":ENC}`` objects. ["string": ENC only]
    offer_shape: Literal["object", "string"] = "object"
    offer_ids: bool = False  # [True: 12-char offerId]
    #: JS never sends ``candidate`` messages and takes ours for announcements (extra offers):
    #: send complete SDPs only. [trickled candidates]
    trickle_candidates: bool = False
    passive_rooms: bool = False  # [True]
    #: Every peer offers to every peer it hears (no leader). [only the smaller id offers]
    everyone_offers: bool = True
    announce_reply: bool = False  # [True: the larger id replies {"peerId"} to the self topic]
    #: In glare (both sides have an offer pending) the larger id's offer wins. ["smaller"]
    glare_winner: Literal["larger", "smaller"] = "larger"
    #: JS answers every offer with a new PC (no dedupe); the first channel to open wins and
    #: later ones are closed. Answer at most one offer per peer ourselves: the newest on its
    #: relay (signaling.negotiation022: JS applies an answer to its newest offer). [dedupe by offerId]
    dedupes_offers: bool = False
    #: One offer per relay the peer was heard on, each answered on the relay it came from;
    #: JS matches an answer by (sender, relay) only, so a late answer can hit a newer offer.
    #: [one offer per peer, answers matched by offerId]
    offer_per_relay: bool = True
    #: JS waits this long for ICE gathering, then sends what it has. [15.0 non-trickle]
    ice_gather_timeout: float = 5.0

    # --- cadence (§9.2, §9.9) ---
    #: Announce on the root topic at subscribe, then every ``announce_interval``. [(0.233,
    #: 0.533, 1.333) then 60.0]
    announce_warmup: tuple[float, ...] = ()
    announce_interval: float = 5.333
    #: JS destroys its pending offer this long after sending it unless a channel to the peer is
    #: open: our answer must lead to an open channel within it (§9.9 budget ~4.8 s). The next
    #: announcement after that gets a fresh offer. [offer re-sent after 0.9 x 5.333]
    pending_offer_ttl: float = 0.9 * 5.333
    #: Pre-gathered offer PCs shared by the rooms of a strategy module, swept for age.
    offer_pool_size: int = 20
    offer_pool_ttl: float = 57.333
    offer_pool_sweep: float = 57.333 * 1.03
    #: JS has no connect timeout for an answering PC (only the offerer's pending-offer TTL). [23.333]
    connect_timeout: float | None = None


PROFILE: Final = WireProfile()


def is_offerer(self_id: str, peer_id: str) -> bool:
    """Whether we send an offer when we hear ``peer_id`` announce: always in 0.22 (§9.2).

    [0.25: ``self_id < peer_id``; the larger id sends an announce-reply instead.]
    """
    del self_id, peer_id
    return True


def wins_glare(self_id: str, peer_id: str) -> bool:
    """With offers pending both ways, whether *our* offer stands (ignore theirs; §9.2).

    0.22: the larger id wins, plain code-point order as JS ``>``. [0.25: the smaller id wins.]
    Not for torrent, where JS answers every offer (``signaling.strategies.torrent.PROFILE_022.glare_check``).
    """
    return self_id > peer_id


# --- relay payloads (MQTT body / nostr content) ---------------------------------------------------


def _json_text(value: Any) -> str:
    return to_json(value).decode()


def make_announce_payload(self_id: str) -> str:
    """``{"peerId":S}``: the announce on the root topic (and what JS answers with an offer)."""
    return _json_text({"peerId": self_id})


def make_offer_payload(self_id: str, sealed_sdp: str) -> str:
    """``{"peerId":S,"offer":{"type":"offer","sdp":ENC}}`` for the target's self topic.

    ``sealed_sdp`` is ``crypto.encrypt(key, sdp)``; only the SDP is encrypted.
    """
    return _json_text({"peerId": self_id, "offer": {"type": "offer", "sdp": sealed_sdp}})


def make_answer_payload(self_id: str, sealed_sdp: str) -> str:
    """``{"peerId":S,"answer":{"type":"answer","sdp":ENC}}`` for the offerer's self topic."""
    return _json_text({"peerId": self_id, "answer": {"type": "answer", "sdp": sealed_sdp}})


@dataclass(frozen=True, slots=True)
class RelaySignal:
    """A 0.22 relay message. ``offer``/``answer`` hold the *sealed* SDP (decrypt with the key).

    Neither set = an announcement, wherever it arrived (root or self topic).
    """

    peer_id: str
    offer: str | None = None
    answer: str | None = None

    @property
    def is_announcement(self) -> bool:
        return self.offer is None and self.answer is None

    @property
    def kind(self) -> Literal["announce", "offer", "answer"]:
        return "offer" if self.offer is not None else "answer" if self.answer is not None else "announce"


def _js_truthy(value: Any) -> bool:
    # JSON values JS treats as false: null, false, 0 (and -0), "".
    if value is None or value is False or value == "":
        return False
    return not (isinstance(value, int | float) and not isinstance(value, bool) and value == 0)


def _sealed_sdp(value: Any, sdp_type: str) -> str | None:
    """The sealed SDP of a ``{"type","sdp"}`` object, or None if the shape is wrong."""
    if not isinstance(value, dict) or value.get("type") != sdp_type:
        return None
    sdp = value.get("sdp")
    return sdp if isinstance(sdp, str) and sdp else None


def parse_relay_payload(
    text: str | bytes,
    self_id: str,
    *,
    max_bytes: int = 128 * 1024,
    max_peer_id_length: int = 128,
) -> RelaySignal | str:
    """A relay message as JS 0.22 reads it, or the reason (a counter name) to drop it.

    JS rules (§9.2, checked in Node): ``offer`` wins over ``answer``; a *falsy* ``offer`` or
    ``answer`` (null, false, 0, "") counts as absent, so such a message, one with only unknown
    fields, and a 0.25 ``candidate`` message are all announcements. Reasons:

    - ``relay_oversize``, ``relay_not_json``, ``relay_not_object``;
    - ``relay_no_peer_id`` (missing, empty or not a string; JS would still act on a number),
      ``relay_bad_peer_id`` (too long), ``relay_own`` (our own id);
    - ``relay_foreign_shape``: ``offer``/``answer`` is a string, i.e. a 0.25 peer. JS reports
      onJoinError("incorrect password (…) when decrypting offer") for such an offer; a strategy
      may log it the same way;
    - ``relay_bad_field``: any other ``offer``/``answer`` that is not ``{"type":"offer"|"answer",
      "sdp":<non-empty string>}`` (JS fails decryption or errors in the peer).
    """
    envelope = relay_envelope(text, self_id, max_bytes=max_bytes, max_peer_id_length=max_peer_id_length)
    if isinstance(envelope, str):
        return envelope
    peer_id, payload = envelope
    for key in ("offer", "answer"):  # JS: `else if (offer) … else if (answer)`
        value = payload.get(key)
        if not _js_truthy(value):
            continue
        if isinstance(value, str):
            return "relay_foreign_shape"
        sealed = _sealed_sdp(value, key)
        if sealed is None:
            return "relay_bad_field"
        return RelaySignal(peer_id, **{key: sealed})
    return RelaySignal(peer_id)


def detect_wire_version(payload: str | bytes | Mapping[str, Any]) -> Literal["0.22", "0.25"] | None:
    """Which wire a relay message comes from, by shape alone (§9.10); None if it cannot tell.

    Object ``offer``/``answer`` → 0.22; string ``offer``/``answer``, or any ``offerId``,
    ``candidate`` or ``passive`` field → 0.25. Plain announcements look the same in both.
    """
    if not isinstance(payload, Mapping):
        try:
            payload = from_json(payload)
        except ValueError:
            return None
        if not isinstance(payload, dict):
            return None
    for key in ("offer", "answer"):
        value = payload.get(key)
        if isinstance(value, dict):
            return "0.22"
        if isinstance(value, str) and value:
            return "0.25"
    if any(key in payload for key in ("offerId", "candidate", "passive")):
        return "0.25"
    return None


# JS `\s`: ECMAScript WhiteSpace + LineTerminator (differs from Python's Unicode `\s`).
_JS_SPACE = "\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_TRICKLE_LINE = re.compile(f"a=ice-options:trickle[{_JS_SPACE}]\n")


def strip_trickle_option(sdp: str) -> str:
    """JS ``sdp.replace(/a=ice-options:trickle\\s\\n/g, '')`` before sending an offer or answer.

    With CRLF SDP this removes exactly the ``a=ice-options:trickle`` line. Optional for us (JS
    accepts SDPs with it), but it makes our SDP look like a 0.22 peer's.
    """
    return _TRICKLE_LINE.sub("", sdp)


# --- the wire as the session and room use it ------------------------------------------------------


def new_decoder(token: str, *, max_action_bytes: int, max_pending: int, max_buffered_bytes: int) -> Decoder:
    """The decoder of the one (room, peer) connection: it stamps ``token`` on every event, so room
    code that dispatches by ``event.token`` works for both wires."""
    return Decoder(
        token=token,
        max_action_bytes=max_action_bytes,
        max_pending=max_pending,
        max_buffered_bytes=max_buffered_bytes,
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
    encode_presence=None,  # no room frames (ROOM_FRAMES)
    admission=None,  # active once the channel opens (ADMISSION)
    shared_connections=SHARED_CONNECTIONS,
    cadence=Cadence(PROFILE.announce_warmup, PROFILE.announce_interval),
)
