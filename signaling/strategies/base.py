"""What a strategy plug-in provides: :class:`Strategy`, one frozen value per module of
:mod:`signaling.strategies`.

A strategy is how peers of a room find each other before they have a connection (Trystero's
``trystero/mqtt``, ``/nostr``, ``/torrent``): which relay client carries the signalling text, which
relays a browser of each wire uses by default, and which room signaller runs on it per wire. The
session and the config only ever read these fields; they name no strategy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from signaling.negotiation022 import RoomSignaller022
from signaling.relay_hub import RelayFactory
from signaling.signaller import RoomSignaller
from signaling.wire import v022, v025

__all__ = ["SignallerFactory", "Strategy", "topic_signallers"]

#: Makes one room's signaller; called with :class:`~signaling.signaller.RoomSignaller`'s keyword
#: arguments (app_id, room_id, self_id, password, strategy, relay_urls, hub, negotiator, limits,
#: timeouts, counters).
SignallerFactory = Callable[..., RoomSignaller]


@dataclass(frozen=True, slots=True)
class Strategy:
    """One strategy, as the registry holds it."""

    #: The ``RoomConfig.strategy`` value (Trystero's import path suffix, e.g. ``"mqtt"``).
    name: str
    #: Wire version -> the room signaller on that wire. Its keys are the wires the strategy supports.
    signallers: Mapping[str, SignallerFactory]
    #: (app_id, wire) -> the relays a Trystero browser of that wire picks without ``relayConfig.urls``.
    default_relays: Callable[[str, str], tuple[str, ...]]

    @property
    def wires(self) -> tuple[str, ...]:
        return tuple(self.signallers)

    def signaller(self, wire: str) -> SignallerFactory:
        """The signaller of this strategy on ``wire`` (ValueError if it does not support it)."""
        try:
            return self.signallers[wire]
        except KeyError:
            raise ValueError(f"strategy {self.name!r} does not support wire {wire}") from None


def topic_signallers(relay_factory: RelayFactory) -> dict[str, SignallerFactory]:
    """The signallers of a strategy whose relay moves text between topics (a room's root topic and
    each peer's self topic, as mqtt and nostr do): the core signaller on 0.25, the 0.22 flow's on
    0.22, both on relays made by ``relay_factory`` (one per URL, shared in the session's hub)."""
    return {
        v025.WIRE_VERSION: functools.partial(RoomSignaller, relay_factory=relay_factory),
        v022.WIRE_VERSION: functools.partial(RoomSignaller022, relay_factory=relay_factory),
    }
