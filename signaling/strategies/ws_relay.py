"""Trystero's ws-relay strategy (``@trystero-p2p/ws-relay``, 0.23+): a room's topics through a
self-hosted WebSocket relay that forwards JSON messages between subscribers of a topic.

Relay client :class:`~signaling.relays.wsrelay.WsRelay` (one per relay URL, shared by the rooms of
a session). The room signaller is the 0.25 topic-relay one: ws-relay exists only for the core of
Trystero 0.23 and later, so wire 0.22 is refused. There are no public ws-relays, so there are no
defaults either: as in JS (``relayConfig.urls`` is required), a room names its relays.
"""

from __future__ import annotations

import functools
from typing import Final

from signaling.relays.wsrelay import WsRelay
from signaling.signaller import RoomSignaller
from signaling.strategies.base import Strategy
from signaling.wire import v025

__all__ = ["STRATEGY"]

STRATEGY: Final = Strategy(
    name="ws-relay",
    signallers={v025.WIRE_VERSION: functools.partial(RoomSignaller, relay_factory=WsRelay)},
    default_relays=lambda _app_id, _wire: (),
)
