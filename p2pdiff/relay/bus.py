"""How the relay's traffic reaches the other nodes of a cluster.

A node publishes what its own clients sent (``channel`` "nostr": the accepted event's JSON;
"ws-relay": the ``{"topic","payload"}`` frame) and hears, through ``on_remote``, what the other
nodes' clients sent. The receiving node checks nothing again except dedupe, delivers to its local
subscribers and never re-publishes to the bus, so an event crosses the cluster once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

__all__ = ["LocalBus", "RelayBus"]


class RelayBus(ABC):
    """Carries relay traffic to the other nodes of a cluster (one node: LocalBus, which carries nothing)."""

    #: (channel, text) published by ANOTHER node; set by RelayServer.
    on_remote: Callable[[str, str], None] | None = None

    @abstractmethod
    def publish(self, channel: str, text: str) -> None:
        """Send ``text`` to the other nodes: never blocks, never raises; bounded backlog."""

    async def start(self) -> None:  # noqa: B027 (a bus without a connection has nothing to start)
        """Connect; called once when the app starts."""

    async def close(self) -> None:  # noqa: B027 (nor anything to close)
        """Disconnect; called once when the app stops."""


class LocalBus(RelayBus):
    """One node: there is nobody else to carry anything to."""

    def publish(self, channel: str, text: str) -> None:
        return None
