"""Caps and timers of a room's app: :class:`Limits` (everything a remote party can make us allocate)
and :class:`Timeouts` (every wait on a remote party). Defaults are Trystero's where it has one
(spec §2.3). Kept apart from :mod:`signaling.config` so the signalling core and the strategies,
which the config looks up, can use them without importing the config.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from signaling.wire import v025

__all__ = ["Limits", "Timeouts"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on what remote parties can make us hold. Each says what happens when it is reached."""

    #: Concurrent offer/answer negotiations per app id (each is an RTCPeerConnection with a UDP
    #: socket). When full, the oldest unanswered negotiation is closed to make room.
    max_pending_connections: int = 32
    #: Established connections per app id. When full, new negotiations are refused.
    max_connections: int = 256
    #: New outgoing offers per second (burst = 2x). Above it an announcement is ignored; a real
    #: peer announces again (warm-up: 4 times in 2 s) or replies to our announce.
    offer_rate: float = 10.0
    #: Announce-replies ("please offer me") per second (burst = 2x); above it they are skipped.
    reply_rate: float = 20.0
    #: Largest relay message we parse (an SDP with many candidates is a few KiB).
    max_signal_bytes: int = 128 * 1024
    #: Peer ids longer than this are ignored (Trystero's are 20 characters).
    max_peer_id_length: int = 128
    #: Offers remembered per app to drop re-deliveries from several relays (LRU).
    seen_offers: int = 1024
    #: Candidates held for an offer we have not seen yet: keys (LRU) and candidates per key.
    early_candidate_keys: int = 32
    early_candidates_per_key: int = 16
    #: Per remote peer reassembly caps (signaling.wire.v025.Decoder): one message, unfinished
    #: messages, bytes held by them. Passing one drops the peer.
    max_action_bytes: int = 32 * 1024 * 1024
    max_pending_actions: int = 32
    max_buffered_bytes: int = 48 * 1024 * 1024
    #: Bytes held in unfinished messages by all peers of an app together; the peer whose chunk
    #: passes it is dropped.
    max_total_buffered_bytes: int = 256 * 1024 * 1024
    #: Room tokens a peer may announce via presence frames (LRU).
    max_remote_tokens: int = 64
    #: Messages kept per action while nobody listens (Trystero replays them to a late handler),
    #: and per async iterator. Oldest dropped.
    action_queue: int = 256
    #: Distinct unregistered action names with queued messages per room (LRU).
    unclaimed_actions: int = 16
    #: Bytes of received messages waiting for a consumer (the queues above) per room; past it
    #: the oldest messages of the queue being added to are dropped.
    max_queued_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"Limits.{f.name} must be positive")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Timers in seconds (Trystero's values where it has one, spec §2.3)."""

    #: An offer nobody answered is dropped after this (Trystero keeps pooled offers 57 s, but it
    #: answers in well under a second; a shorter life bounds what fake announcements cost).
    offer: float = 30.0
    #: From an applied answer (offerer) or a received offer (answerer) to an open channel.
    connect: float = 23.333
    #: ``@_hsready`` (and the password check) must complete within this after binding a room.
    handshake: float = v025.HANDSHAKE_TIMEOUT_S
    #: Between sending ``@_leave`` and tearing down.
    leave_grace: float = 0.099
    #: A connection no room uses any more is closed after this (Trystero: 123.333 s).
    idle_connection: float = 123.333
    #: ``room.ping()`` gives up after this.
    ping: float = 10.0
    #: How often every active peer is pinged to keep ``PeerInfo.rtt_ms`` fresh.
    rtt_interval: float = 20.0
    #: A connection silent this long is pinged (at most this often, via a room where the peer
    #: is active) ...
    keepalive: float = 5.0
    #: ... and dropped once silent this long. aiortc has no ``disconnected`` state and its ICE
    #: consent check needs ~30 s to notice a vanished peer (Trystero: ~5-10 s). Not shorter: a
    #: browser whose main thread is busy (e.g. compiling WebGPU shaders) answers pings late, and
    #: a wrongly dropped peer only comes back at its next announce (60 s).
    peer_timeout: float = 20.0
    #: Announce warm-up delays after subscribing, then the steady interval (spec §2.3).
    announce_warmup: tuple[float, ...] = (0.233, 0.533, 1.333)
    announce_interval: float = 60.0
    #: ... stretched to this while the room has active peers and no negotiation (relay etiquette;
    #: why this is safe and why not longer: signaling.pacing). Equal to announce_interval = off.
    announce_interval_stable: float = 120.0
    #: A pending offer is re-sent on a relay only if it was last sent there this long ago
    #: (Trystero: 0.9 x 5333 ms).
    offer_resend: float = 0.9 * 5.333

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if any(v <= 0 for v in values):
                raise ValueError(f"Timeouts.{f.name} must be positive")
