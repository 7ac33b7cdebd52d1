"""When a room announces on one relay: Trystero's cadence plus our relay etiquette.

Trystero (spec §2.3) announces right after subscribing, then after 233, 533 and 1333 ms, then every
60 s, for as long as the room is joined, and re-starts that warm-up after a relay reconnects. We do
the same, with two changes that only ever make us quieter than a browser:

Rate-limit backoff (nostr)
    A relay that answered ``OK false "rate-limited:"`` pauses our announces there
    (:attr:`~signaling.relays.nostr.NostrRelay.announce_backoff` > 0). As in Trystero's nostr
    strategy, the announce that falls due during the pause is skipped, and the next one is tried
    ``max(steady interval, remaining pause)`` later.

Stable rooms
    Newcomers find us through *their* announces (every Trystero peer announces at join and every
    60 s; we answer any announce we hear), so our own steady announces only matter to peers that
    do not announce: passive Trystero rooms, which stay silent until they hear a non-passive peer.
    While the room has at least one active peer and no negotiation in progress, those peers
    announce every 60 s themselves (Trystero never stops announcing, connected or not), so a
    passive newcomer hears them, activates, announces, and we hear it. Our steady interval then
    stretches to ``stable_interval`` (default 120 s, i.e. 2x Trystero's). It is not stretched
    further because the connected peers may be helpers like us, not browsers: with only helpers
    in a room, a passive browser finds it within 120 s instead of Trystero's 60 s, and a
    non-passive browser is unaffected (its own warm-up reaches us at once). When the room stops
    being stable (its last peer left, or a negotiation started), the normal 60 s applies again
    within ``_RECHECK_S`` seconds.

The pacer is pure bookkeeping (no tasks, no sleeping): the signaller asks :meth:`AnnouncePacer.due_in`
how long to wait, publishes when it says 0, and reports it with :meth:`AnnouncePacer.sent`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = ["DEFAULT_STABLE_INTERVAL_S", "AnnouncePacer"]

#: Steady announce interval while the room is stable (see the module docstring): 2x Trystero's.
DEFAULT_STABLE_INTERVAL_S = 120.0
# How often a stretched wait re-checks whether the room is still stable.
_RECHECK_S = 10.0


class AnnouncePacer:
    """The announce schedule of one room on one relay (see the module docstring)."""

    def __init__(
        self,
        *,
        warmup: Sequence[float],
        interval: float,
        stable_interval: float = DEFAULT_STABLE_INTERVAL_S,
        stable: Callable[[], bool] = lambda: False,
        backoff: Callable[[], float] = lambda: 0.0,
        counters: Counter[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0 or stable_interval < interval or any(d < 0 for d in warmup):
            raise ValueError("need interval > 0, stable_interval >= interval and warm-up delays >= 0")
        self._warmup = tuple(warmup)
        self._interval = interval
        self._stable_interval = stable_interval
        self._stable = stable
        self._backoff = backoff
        self._counters = counters if counters is not None else Counter()
        self._clock = clock
        self._attempt = 0  # announces sent since the last (re)start
        self._last: float | None = None
        self._deferred_until: float | None = None
        self._stretched_since: float | None = None  # the _last whose interval was stretched

    def restart(self) -> None:
        """Announce at once and run the warm-up again (subscribed anew, e.g. after a reconnect)."""
        self._attempt = 0
        self._last = None
        self._deferred_until = None
        self._stretched_since = None

    def sent(self) -> None:
        """An announce went out now."""
        self._attempt += 1
        self._last = self._clock()
        self._deferred_until = None

    def due_in(self) -> float:
        """Seconds until the next announce; 0 means announce now."""
        now = self._clock()
        if self._deferred_until is not None:
            if now < self._deferred_until:
                return self._deferred_until - now
            self._deferred_until = None
        if self._last is not None:
            warmup = self._attempt - 1 < len(self._warmup)
            delay = min(self._warmup[self._attempt - 1], self._interval) if warmup else self._interval
            due = self._last + delay
            if due > now:
                return due - now
            if not warmup and self._stable():
                # Checked when the normal interval is up, so a room that became unstable meanwhile
                # announces on time; a stable one waits for the stretched interval.
                stretched = self._last + self._stable_interval
                if stretched > now:
                    if self._stretched_since != self._last:
                        self._stretched_since = self._last
                        self._counters["announces_stretched"] += 1
                    # Look again now and then: a peer leaving ends the stretch within seconds.
                    return min(stretched - now, _RECHECK_S)
        pause = self._backoff()
        if pause > 0:
            # Trystero's nostr strategy: skip this one, try again max(60 s, remaining pause) later.
            self._counters["announces_deferred"] += 1
            self._deferred_until = now + max(self._interval, pause)
            return self._deferred_until - now
        return 0.0
