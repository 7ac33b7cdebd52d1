"""Trystero's nostr strategy (spec §5, 0.22: §9.4): topics as tagged events on public nostr relays.

Relay client :class:`~signaling.relays.nostr.NostrRelay` (one key pair per process, as Trystero has
one per JS realm; per-relay event-id dedupe, as the signaller sends offers on every relay where it
heard a peer). Default relays depend on the app id: a seeded shuffle of each wire's public list
(:func:`~signaling.relays.nostr.default_relays`), so every browser of an app meets on the same five.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from signaling.relays.nostr import NostrRelay, default_relays
from signaling.strategies.base import Strategy, topic_signallers

__all__ = ["PROFILE_022", "STRATEGY", "NostrProfile"]


@dataclass(frozen=True, slots=True)
class NostrProfile:
    """``trystero/nostr`` 0.22 (§9.4). Events are built exactly as for 0.25 (§5)."""

    #: The 18-entry default list is shuffled per appId and cut to ``redundancy``; use
    #: ``signaling.relays.nostr.default_relays(app_id, wire="0.22")``. It does not overlap the
    #: 0.25 pick for some apps, so a helper serving both joins the union.
    redundancy: int = 5
    shuffled_by_app_id: bool = True
    #: One REQ per topic (root, then self) with a single kind; a batched REQ on our side is fine.
    req_per_topic: bool = True
    #: 0.22 bug: after a socket reconnect JS does not re-send its REQs. It still announces there
    #: but no longer hears that relay, so signal on every relay where the peer was heard.
    resubscribe_on_reconnect: bool = False
    #: Socket retry: 3.333 s doubling without a cap (0.25 gives up at 60 s).
    reconnect_initial: float = 3.333
    reconnect_cap: float | None = None
    #: ``OK false`` and ``NOTICE`` only log; JS never closes a relay for them (0.25 does).
    closes_relay_on_reject: bool = False
    #: JS checks neither signatures nor the ``x`` tag; events route by subscription id. Our
    #: ``created_at`` must not be older than the browser's ``since`` (its clock at subscribe).
    verifies_events: bool = False


PROFILE_022: Final = NostrProfile()

STRATEGY: Final = Strategy(
    name="nostr",
    signallers=topic_signallers(NostrRelay),
    default_relays=lambda app_id, wire: tuple(default_relays(app_id, wire=wire)),
)
