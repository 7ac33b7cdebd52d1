"""Trystero's nostr strategy (spec §5, 0.22: §9.4): topics as tagged events on public nostr relays.

Relay client :class:`~signaling.relays.nostr.NostrRelay` (one key pair per process, as Trystero has
one per JS realm; per-relay event-id dedupe, as the signaller sends offers on every relay where it
heard a peer). Default relays depend on the app id: a seeded shuffle of each wire's public list,
so every browser of an app meets on the same five.

:func:`default_relays` reproduces Trystero's per-appId pick (spec §5; 0.22 list and the same
shuffle via ``wire="0.22"`` / :func:`default_relays_022`, spec §9.4). The PRNG is
``frac(sin(seed++) * 1e4)``: CPython's ``math.sin`` (glibc) differs from Node 20's V8 in the last
bit for about 3 % of integer inputs, but for every seed 0..300000 (appIds up to ~2700 ASCII
characters) both produce identical 28- and 18-entry shuffles (checked once against Node 20;
``tests/signaling/test_strategy_nostr.py`` re-checks a sample against the real JS when Node is there).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from signaling.relays.nostr import MAX_SAFE_INTEGER, NostrRelay
from signaling.strategies.base import Strategy, topic_signallers
from signaling.wire import v022, v025

__all__ = [
    "DEFAULT_RELAY_URLS",
    "DEFAULT_RELAY_URLS_022",
    "PROFILE_022",
    "STRATEGY",
    "NostrProfile",
    "default_relays",
    "default_relays_022",
    "trystero_shuffle",
]


@dataclass(frozen=True, slots=True)
class NostrProfile:
    """``trystero/nostr`` 0.22 (§9.4). Events are built exactly as for 0.25 (§5)."""

    #: The 18-entry default list is shuffled per appId and cut to ``redundancy``; use
    #: ``default_relays(app_id, wire="0.22")`` below. It does not overlap the
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


#: ``@trystero-p2p/nostr`` 0.25.4 defaultRelayUrls (spec §5), in its order.
DEFAULT_RELAY_URLS: tuple[str, ...] = tuple(
    "wss://" + host
    for host in (
        "basspistol.org",
        "bucket.coracle.social",
        "chorus.pjv.me",
        "koru.bitcointxoko.org",
        "nos.lol",
        "nostr-01.uid.ovh",
        "nostr-01.yakihonne.com",
        "nostr-relay.corb.net",
        "nostr.data.haus",
        "nostr.islandarea.net",
        "nostr.sathoarder.com",
        "nostr.tegila.com.br",
        "nostr.vulpem.com",
        "purplerelay.com",
        "relay-can.zombi.cloudrodion.com",
        "relay-rpi.edufeed.org",
        "relay.agorist.space",
        "relay.artio.inf.unibe.ch",
        "relay.mostr.pub",
        "relay.mostro.network",
        "relay.sigit.io",
        "relay02.lnfi.network",
        "schnorr.me",
        "social.amanah.eblessing.co",
        "staging.yabu.me",
        "strfry.shock.network",
        "top.testrelay.top",
        "yabu.me/v2",
    )
)

#: ``trystero`` 0.22.0 ``nostr.js`` defaultRelayUrls (spec §9.4), in its order.
DEFAULT_RELAY_URLS_022: tuple[str, ...] = tuple(
    "wss://" + host
    for host in (
        "black.nostrcity.club",
        "ftp.halifax.rwth-aachen.de/nostr",
        "nos.lol",
        "nostr.cool110.xyz",
        "nostr.data.haus",
        "nostr.sathoarder.com",
        "nostr.vulpem.com",
        "relay.agorist.space",
        "relay.binaryrobot.com",
        "relay.damus.io",
        "relay.fountain.fm",
        "relay.mostro.network",
        "relay.nostraddress.com",
        "relay.nostrdice.com",
        "relay.nostromo.social",
        "relay.oldenburg.cool",
        "relay.verified-nostr.com",
        "yabu.me/v2",
    )
)

_DEFAULT_LISTS = {v025.WIRE_VERSION: DEFAULT_RELAY_URLS, v022.WIRE_VERSION: DEFAULT_RELAY_URLS_022}
DEFAULT_REDUNDANCY = 5  # both versions


def _js_str_to_num(text: str, limit: int = MAX_SAFE_INTEGER) -> int:
    """Trystero's ``strToNum``: the sum of UTF-16 code units, modulo ``limit``."""
    units = text.encode("utf-16-le", "surrogatepass")
    return sum(int.from_bytes(units[i : i + 2], "little") for i in range(0, len(units), 2)) % limit


def trystero_shuffle(items: Iterable[str], seed: int) -> list[str]:
    """Trystero's deterministic Fisher-Yates (``shuffle`` in core/utils), seeded per appId."""
    a = list(items)
    i = len(a)
    while i:
        x = math.sin(seed) * 1e4
        seed += 1
        j = math.floor((x - math.floor(x)) * i)
        i -= 1
        a[i], a[j] = a[j], a[i]
    return a


def default_relays(
    app_id: str, count: int = DEFAULT_REDUNDANCY, *, wire: str = v025.WIRE_VERSION
) -> list[str]:
    """The relays a Trystero browser of ``wire`` picks for ``app_id`` when
    given no ``relayConfig.urls`` (``count`` = its redundancy, 5 by default).

    0.25.4 and 0.22 choose disjoint sets for some apps (spec §9.4): a helper serving both
    versions should join the union.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    try:
        urls = _DEFAULT_LISTS[wire]
    except KeyError:
        raise ValueError(f"unknown wire {wire!r} (known: {', '.join(_DEFAULT_LISTS)})") from None
    return trystero_shuffle(urls, _js_str_to_num(app_id))[:count]


def default_relays_022(app_id: str, count: int = DEFAULT_REDUNDANCY) -> list[str]:
    """:func:`default_relays` for Trystero 0.22 browsers."""
    return default_relays(app_id, count, wire=v022.WIRE_VERSION)

STRATEGY: Final = Strategy(
    name="nostr",
    signallers=topic_signallers(NostrRelay),
    default_relays=lambda app_id, wire: tuple(default_relays(app_id, wire=wire)),
)
