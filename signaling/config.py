"""What a room is joined with: :class:`RoomConfig` (alias :class:`JoinConfig`) plus its caps and timers.

Mirrors Trystero's ``joinRoom(config, roomId)`` config: ``app_id``, ``password``, relay URLs and
ICE settings. Everything a remote party can make us allocate is capped in :class:`Limits`; every
wait on a remote party has a timer in :class:`Timeouts` (defaults are Trystero's, spec §2.3).

Pluggable parts are looked up by name, so adding a transport or a wire version adds an entry
here instead of a copy of the room code:

- ``strategy`` selects the relay class (``RELAY_FACTORIES``: ``"mqtt"``, ``"nostr"``, ``"torrent"``)
  and its default relay list (:meth:`RoomConfig.effective_relay_urls`);
- ``wire`` selects the data-channel wire module (``wire_module()``: ``"0.25"`` or ``"0.22"``;
  what the session and strategy do differently for 0.22 is in :mod:`signaling.negotiation022`). Room and
  session code only use the names a wire module exports (``Decoder``, ``RoomEncoder``,
  ``ACTION_*``, ...) and its capability flags (no presence frames, no admission in 0.22).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import Any

from signaling.relays import MqttRelay, NostrRelay, Relay
from signaling.relays.nostr import default_relays
from signaling.relays.torrent import default_trackers
from signaling.wire import v022, v025

__all__ = [
    "DEFAULT_ICE_SERVERS",
    "DEFAULT_RELAY_URLS",
    "RELAY_FACTORIES",
    "JoinConfig",
    "Limits",
    "RelayFactory",
    "RoomConfig",
    "Timeouts",
    "wire_module",
]

RelayFactory = Callable[[str], Relay]


def _tracker_factory(url: str) -> Relay:
    # A tracker client speaks as the session's selfId, which a URL alone does not carry, and it
    # announces offers instead of topics: signaling.torrent_strategy creates its relays itself
    # (RelayHub.acquire(..., factory=...)). The entry only makes "torrent" a known strategy.
    raise TypeError(f"{url}: torrent relays are created by signaling.torrent_strategy")


#: strategy name -> relay class. Topic strategies (mqtt, nostr) run on the generic RoomSignaller;
#: torrent has its own signaller (signaling.torrent_strategy) on the same Negotiator.
RELAY_FACTORIES: dict[str, RelayFactory] = {
    "mqtt": MqttRelay,
    # One key pair per process (Trystero: one per JS realm); per-relay event-id dedupe, as the
    # strategy sends offers on every relay where it heard a peer.
    "nostr": NostrRelay,
    "torrent": _tracker_factory,
}

#: Trystero 0.25.4's default MQTT brokers, first 4 (its default redundancy), spec §3.
DEFAULT_RELAY_URLS: dict[str, tuple[str, ...]] = {
    "mqtt": (
        "wss://test.mosquitto.org:8081/mqtt",
        "wss://broker.emqx.io:8084/mqtt",
        "wss://public:public@public.cloud.shiftr.io",
        "wss://broker-cn.emqx.io:8084/mqtt",
    ),
}

#: Used when ``ice_servers`` is None. Trystero lists four STUN servers, but aiortc only uses the
#: first STUN URL it is given, so one is all that matters.
DEFAULT_ICE_SERVERS: tuple[str, ...] = ("stun:stun.l.google.com:19302",)

#: Wire version name -> module. What the session does differently per wire is read from the
#: module's capability flags (signaling.negotiation022.traits), so a wire is one entry here.
_WIRES: dict[str, ModuleType] = {"0.25": v025, "0.22": v022}


def wire_module(name: str) -> ModuleType:
    """The wire module for a Trystero wire version name (ValueError if unknown)."""
    try:
        return _WIRES[name]
    except KeyError:
        raise ValueError(f"unsupported wire {name!r} (known: {', '.join(_WIRES)})") from None


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


@dataclass(slots=True)
class RoomConfig:
    """How to join a room (Trystero's config map). Validated on creation.

    ``relay_urls`` empty means the strategy's defaults (Trystero's public brokers).
    ``ice_servers``: ``None`` means :data:`DEFAULT_ICE_SERVERS`, ``[]`` means none (LAN/loopback
    only); entries are URLs or ``{"urls", "username", "credential"}`` dicts.
    ``ice_host_addresses``: ``None`` lets aioice pick interfaces (it skips loopback); a list
    restricts host candidates to those IPs, e.g. ``["127.0.0.1"]`` in tests.
    ``trickle``: Trystero's ``trickleIce``. aiortc never trickles (its SDPs carry every
    candidate, see signaling.peer) and remote candidates are always used, so over MQTT this changes
    nothing; it is kept for strategies where it matters (torrent: JS peers do not trickle).
    Rooms of one app id share connections, so the first room's ICE settings and limits apply
    to the app.
    """

    app_id: str
    relay_urls: Sequence[str] = ()
    strategy: str = "mqtt"
    password: str = ""
    ice_servers: Sequence[Any] | None = None
    ice_host_addresses: Sequence[str] | None = None
    trickle: bool = True
    wire: str = "0.25"
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)

    def __post_init__(self) -> None:
        if not isinstance(self.app_id, str) or not self.app_id:
            raise ValueError("app_id must be a non-empty string")
        if self.strategy not in RELAY_FACTORIES:
            known = ", ".join(RELAY_FACTORIES)
            raise ValueError(f"strategy {self.strategy!r} is not available (known: {known})")
        wire_module(self.wire)
        if isinstance(self.relay_urls, str):
            raise TypeError("relay_urls must be a list of URLs, not a string")
        self.relay_urls = tuple(dict.fromkeys(self.relay_urls))
        self.password = self.password or ""
        if self.ice_host_addresses is not None:
            if isinstance(self.ice_host_addresses, str):
                raise TypeError("ice_host_addresses must be a list of IPs, not a string")
            self.ice_host_addresses = tuple(str(ipaddress.ip_address(a)) for a in self.ice_host_addresses)
        if self.ice_servers is not None:
            self.ice_servers = tuple(self.ice_servers)

    @property
    def effective_relay_urls(self) -> tuple[str, ...]:
        """``relay_urls``, or the relays a Trystero browser of this app and wire picks by default.

        Like Trystero's ``getRelays``, explicit URLs are used as given (its redundancy only trims
        the default list). Nostr's defaults depend on the app id (a seeded shuffle of the public
        relay list, spec §5), so every browser of the app meets on the same five relays.
        """
        if self.relay_urls:
            return tuple(self.relay_urls)
        if self.strategy == "nostr":
            return tuple(default_relays(self.app_id, wire=self.wire))
        if self.strategy == "torrent":
            return tuple(default_trackers(wire=self.wire))
        if self.strategy == "mqtt" and self.wire == "0.22":
            return v022.PROFILE.mqtt.default_urls  # 0.22 has its own broker list (spec §9.3)
        return DEFAULT_RELAY_URLS.get(self.strategy, ())

    @property
    def effective_ice_servers(self) -> tuple[Any, ...]:
        return DEFAULT_ICE_SERVERS if self.ice_servers is None else tuple(self.ice_servers)


JoinConfig = RoomConfig
