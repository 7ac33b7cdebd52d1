"""What one client of the relay may hold and do, and the book of open connections per address.

:class:`RelayLimits` is ``[relay]``'s limits, frozen (config.toml says why each default is what it
is). Per-connection event rates use :class:`signaling.bounded.TokenBucket`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from p2pdiff.config import RelayConfig

__all__ = ["ConnectionBook", "RelayLimits"]

# aiohttp pings every client this often and drops one whose pong is not back within half of it:
# a dead TCP path is noticed within 1.5x this, whatever idle_seconds says.
HEARTBEAT_SECONDS = 30.0
# A reader handles this many frames in a row, then lets the loop run others: a client flooding
# frames that arrive faster than they are handled cannot starve everybody else.
READ_YIELD_EVERY = 32


@dataclass(frozen=True, slots=True)
class RelayLimits:
    max_connections: int
    max_connections_per_address: int
    max_subscriptions: int
    max_filters: int
    max_filter_values: int
    max_values_per_connection: int
    events_per_second: float
    events_burst: int
    max_event_bytes: int
    max_message_bytes: int
    idle_seconds: float
    outbox_bytes: int

    @classmethod
    def from_config(cls, relay: RelayConfig) -> RelayLimits:
        return cls(
            max_connections=relay.max_connections,
            max_connections_per_address=relay.max_connections_per_address,
            max_subscriptions=relay.max_subscriptions,
            max_filters=relay.max_filters,
            max_filter_values=relay.max_filter_values,
            max_values_per_connection=relay.max_values_per_connection,
            events_per_second=relay.events_per_second,
            events_burst=relay.events_burst,
            max_event_bytes=relay.max_event_bytes,
            max_message_bytes=relay.max_message_bytes,
            idle_seconds=relay.idle_seconds,
            outbox_bytes=relay.outbox_bytes,
        )


class ConnectionBook:
    """Open connections in all and per client address, shared by every protocol of the relay.

    In-process clients (the helper) are not entered: they are this server's own.
    """

    def __init__(self, limits: RelayLimits) -> None:
        self._limits = limits
        self._by_address: Counter[str] = Counter()
        self.total = 0

    def admit(self, address: str) -> tuple[str, str] | None:
        """Enter a connection from ``address``; or, when a limit is reached, enter nothing and
        return why not: (the metrics reason, a NIP-01 ``rate-limited:`` text)."""
        if self.total >= self._limits.max_connections:
            return "connections", "rate-limited: the relay is full; try again later"
        if self._by_address.get(address, 0) >= self._limits.max_connections_per_address:
            return "connections_per_address", "rate-limited: too many connections from your address"
        self._by_address[address] += 1
        self.total += 1
        return None

    def release(self, address: str) -> None:
        """Forget one connection :meth:`admit` entered."""
        self.total -= 1
        left = self._by_address[address] - 1
        if left > 0:
            self._by_address[address] = left
        else:
            del self._by_address[address]
