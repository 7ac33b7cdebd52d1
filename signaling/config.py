"""What a room is joined with: :class:`RoomConfig` (alias :class:`JoinConfig`) plus its caps and timers.

Mirrors Trystero's ``joinRoom(config, roomId)`` config: ``app_id``, ``password``, relay URLs and
ICE settings. Everything a remote party can make us allocate is capped in :class:`Limits`; every
wait on a remote party has a timer in :class:`Timeouts` (both in :mod:`signaling.limits`).

Pluggable parts are looked up by name, so adding a transport or a wire version adds a module, not
a branch here:

- ``strategy`` names a registered strategy (:mod:`signaling.strategies`): its relay client,
  default relays per wire (:meth:`RoomConfig.effective_relay_urls`) and room signallers;
- ``wire`` names a wire version (:mod:`signaling.wire`; ``"0.25"`` or ``"0.22"``; what the session
  and signaller do differently for 0.22 is in :mod:`signaling.negotiation022`). Room and session
  code only use the typed :class:`~signaling.wire.interface.Wire` of it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from signaling import strategies
from signaling.limits import Limits, Timeouts
from signaling.wire import WIRE_VERSIONS, wire_for

__all__ = [
    "DEFAULT_ICE_SERVERS",
    "JoinConfig",
    "Limits",
    "RoomConfig",
    "Timeouts",
]

#: Used when ``ice_servers`` is None. Trystero lists four STUN servers, but aiortc only uses the
#: first STUN URL it is given, so one is all that matters.
DEFAULT_ICE_SERVERS: tuple[str, ...] = ("stun:stun.l.google.com:19302",)


@dataclass(slots=True)
class RoomConfig:
    """How to join a room (Trystero's config map). Validated on creation.

    ``relay_urls`` empty means the strategy's defaults (Trystero's public brokers); a strategy
    without defaults (ws-relay) needs them.
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
    strategy: str = strategies.DEFAULT
    password: str = ""
    ice_servers: Sequence[Any] | None = None
    ice_host_addresses: Sequence[str] | None = None
    trickle: bool = True
    wire: str = WIRE_VERSIONS[0]
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)

    def __post_init__(self) -> None:
        if not isinstance(self.app_id, str) or not self.app_id:
            raise ValueError("app_id must be a non-empty string")
        strategy = strategies.get(self.strategy)  # ValueError if unknown
        wire_for(self.wire)
        if self.wire not in strategy.wires:
            raise ValueError(f"strategy {self.strategy!r} does not support wire {self.wire}")
        if isinstance(self.relay_urls, str):
            raise TypeError("relay_urls must be a list of URLs, not a string")
        self.relay_urls = tuple(dict.fromkeys(self.relay_urls))
        if not self.relay_urls and not strategy.default_relays(self.app_id, self.wire):
            # e.g. ws-relay: self-hosted only, so nothing to fall back on (JS requires the URLs too)
            raise ValueError(f"strategy {self.strategy!r} has no default relays: relay_urls must name one")
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
        return strategies.get(self.strategy).default_relays(self.app_id, self.wire)

    @property
    def effective_ice_servers(self) -> tuple[Any, ...]:
        return DEFAULT_ICE_SERVERS if self.ice_servers is None else tuple(self.ice_servers)


JoinConfig = RoomConfig
