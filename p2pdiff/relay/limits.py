"""The book of open connections per address, and the relay's fixed timings.

What one client may hold and do is ``[relay]`` itself (:class:`p2pdiff.config.RelayConfig`;
config.toml says why each default is what it is). Per-connection event rates use
:class:`signaling.bounded.TokenBucket`.
"""

from __future__ import annotations

from collections import Counter

from p2pdiff.config import RelayConfig

__all__ = ["ConnectionBook"]

# aiohttp pings every client this often and drops one whose pong is not back within half of it:
# a dead TCP path is noticed within 1.5x this, whatever idle_seconds says.
HEARTBEAT_SECONDS = 30.0
# A reader handles this many frames in a row, then lets the loop run others: a client flooding
# frames that arrive faster than they are handled cannot starve everybody else.
READ_YIELD_EVERY = 32


class ConnectionBook:
    """Open connections in all and per client address, shared by every protocol of the relay.

    In-process clients (the helper) are not entered: they are this server's own.
    """

    def __init__(self, limits: RelayConfig) -> None:
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
