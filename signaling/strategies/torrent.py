"""Trystero's torrent strategy (spec §4) on the shared signalling core.

A WebTorrent tracker is not a topic relay: a peer *announces* a room's info_hash together with a
few SDP offers, and the tracker hands each offer to one random member of the swarm; answers come
back through the tracker by offer id. :class:`~signaling.relays.torrent.TorrentRelay` speaks the
tracker protocol (its docstring says how a strategy must drive it); this module is that strategy.
It reuses everything above the relay: the app's :class:`~signaling.signaller.Negotiator` (one
negotiation per remote peer, dedupe of offers by (peer, offer id), caps, timers) and the session's
links, admission and shared connections, so rooms behave exactly as over MQTT or nostr.

:class:`TorrentRoomSignaller` (one per room; a :class:`~signaling.signaller.RoomSignaller`, so the
negotiator and the session treat it like any room)
    * Announces the room on every tracker of the room with the room's offer pool
      (:class:`OfferPool`). The tracker relay owns the announce cadence (Trystero's warm-up, then
      the tracker's interval clamped to 10-120 s); there is no announce without offers.
    * An incoming offer is answered only if our id is larger than the offerer's, or if we have no
      outstanding offer (Trystero always has some, so it answers only larger-to-smaller, spec §4;
      mirroring it means two peers never answer each other's offers). Otherwise we ask the tracker
      to announce at once (``announce_now``), so our offers reach the newcomer, which answers one.
      The answer goes back through the tracker that delivered the offer (the negotiator calls
      :meth:`TorrentRoomSignaller.signal` with it).
    * An answer to one of our pooled offers becomes a negotiation with the answering peer
      (:meth:`~signaling.signaller.Negotiator.adopt_answer`).

:class:`OfferPool` (one per room, shared by its trackers, as in Trystero)
    Up to ``size`` (3) outstanding offers: aiortc initiator Peers with their full, non-trickled
    SDP (aiortc gathers every candidate before it returns one; Trystero's torrent peers do not
    trickle either), sealed with the room key. Every announce re-sends the same offer ids until an
    offer is answered or ``retention`` (120 s) old; then it is closed and replaced at the next
    announce. Offers are made only when a tracker is about to announce (never while disconnected).

Trackers are shared by all rooms of a session, one :class:`SharedTracker` per URL, kept in the
session's :class:`~signaling.relay_hub.RelayHub` (reference counted, closed with the last room);
it routes offers and answers to rooms by info_hash.

0.22 (:class:`TorrentRoomSignaller022`, spec §9.5)
    Trystero 0.22 announces **10 fresh offers** at every announce, on every tracker separately,
    uses only answers to its latest announce's offers, and answers **every** forwarded offer (no
    tie-break). Its signaller differs from the 0.25 one only there: :class:`OfferBatches`
    instead of the pool (one batch per tracker, replaced at each announce, the previous batch
    closed), SDPs without the ``a=ice-options:trickle`` line, offers always handed to the
    negotiator (the 0.22 one: it answers one offer per peer at a time, a newer one from the same
    tracker replacing it until answered, and while it answers, an answer to one of our offers
    from the same peer is dropped, so a pair that crosses offers still ends up with one
    connection), and its own trackers (policy ``TORRENT_022``: numwant
    10, every 33.333 s raised by the tracker's interval, dedupe by offer id forever) that are
    not shared with 0.25 rooms.

Bounds: offers per room (``size``); Peers made per room are bounded by the tracker's announce
rate (at most one ``announce_now`` per second, otherwise the tracker interval) times ``size``;
answers only take an offer once they decrypt and the negotiator admits them (caps and rate limit,
``Limits``); peer ids that are not Trystero-shaped (20 printable ASCII characters) are dropped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from signaling import crypto
from signaling.background import BackgroundTasks
from signaling.errors import PeerError
from signaling.relays.torrent import (
    ID_LENGTH,
    TORRENT_022,
    TORRENT_025,
    TorrentOffer,
    TorrentPolicy,
    TorrentRelay,
)
from signaling.signaller import RoomSignaller, Signal
from signaling.strategies.base import Strategy
from signaling.wire import v022, v025

if TYPE_CHECKING:  # Peers come from the negotiator: the strategy needs no WebRTC import
    from signaling.peer import Peer

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TRACKER_URLS",
    "DEFAULT_TRACKER_URLS_022",
    "OFFER_POOL_SIZE",
    "OFFER_RETENTION_S",
    "PROFILE_022",
    "STRATEGY",
    "OfferBatches",
    "OfferPool",
    "SharedTracker",
    "TorrentProfile",
    "TorrentRoomSignaller",
    "TorrentRoomSignaller022",
    "default_trackers",
]

TORRENT = "torrent"
#: Trystero 0.25.4's offerPoolSize and offerRetentionMs (spec §4).
OFFER_POOL_SIZE = 3
OFFER_RETENTION_S = 120.0
#: 0.22 rooms on trackers: how long a new connection's silent peer waits before it joins (a 0.25
#: peer sends presence and ``@_hsready`` the moment its channel opens).
CHANNEL_SCREEN_S = 0.5
#: What a pooled offer's Peer is called until an answer names its peer (Negotiator.new_offer_peer).
POOL_PEER_NAME = "offer-pool"


@dataclass(frozen=True, slots=True)
class TorrentProfile:
    """``trystero/torrent`` 0.22 (§9.5). The tracker client side of this (frames, cadence,
    dedupe) is ``signaling.relays.torrent.TORRENT_022``; default trackers are
    ``default_trackers(wire="0.22")`` below. The rest is for the strategy."""

    redundancy: int = 3
    #: Offers per announce (0.25: 3) and ``numwant``; all fresh each announce, never re-sent:
    #: the strategy must hand the relay 10 new sealed offers (and PCs) per announce.
    offers_per_announce: int = 10
    fresh_offers_each_announce: bool = True
    offer_id_length: int = 20
    #: First announce at subscribe, then this period; a larger tracker ``interval`` raises it up
    #: to ``max_announce_interval`` (never lowers it).
    announce_interval: float = 33.333
    max_announce_interval: float = 120.333
    #: JS uses only answers to its latest announce's offer ids: an answer to an older offer of
    #: a JS peer is lost, so answer a forwarded offer at once (within one announce period).
    answers_latest_announce_only: bool = True
    #: JS answers every forwarded offer, whatever the ids (no glare check on torrent); so both
    #: sides may connect twice: keep the first channel to open, as JS does.
    glare_check: bool = False
    #: JS ignores any tracker message whose offer_id it has seen before, forever.
    dedupe_offer_ids_forever: bool = True
    trickle_candidates: bool = False


PROFILE_022: Final = TorrentProfile()

#: ``@trystero-p2p/torrent`` 0.25.4 defaultRelayUrls (spec §4), in its order.
DEFAULT_TRACKER_URLS: tuple[str, ...] = tuple(
    "wss://" + host
    for host in (
        "open.ftorrent.com",
        "tracker.webtorrent.dev",
        "tracker.openwebtorrent.com",
        "tracker.btorrent.xyz",
        "tracker.files.fm:7073/announce",
    )
)
#: ``trystero`` 0.22.0 torrent defaultRelayUrls (spec §9.5).
DEFAULT_TRACKER_URLS_022: tuple[str, ...] = DEFAULT_TRACKER_URLS[1:]
DEFAULT_REDUNDANCY = 3  # both versions
_DEFAULT_LISTS = {v025.WIRE_VERSION: DEFAULT_TRACKER_URLS, v022.WIRE_VERSION: DEFAULT_TRACKER_URLS_022}


def default_trackers(count: int = DEFAULT_REDUNDANCY, *, wire: str = v025.WIRE_VERSION) -> list[str]:
    """The trackers a Trystero browser uses without ``relayConfig.urls``: the first ``count``
    (no per-app shuffle for torrent, unlike nostr)."""
    if count < 0:
        raise ValueError("count must be >= 0")
    urls = _DEFAULT_LISTS.get(wire)
    if urls is None:
        raise ValueError(f"unknown wire {wire!r} (known: {', '.join(_DEFAULT_LISTS)})")
    return list(urls[:count])


def _is_trystero_id(value: str) -> bool:
    # bittorrent-tracker takes ids as 20-byte binary strings; we send them back as to_peer_id.
    return len(value) == ID_LENGTH and value.isascii() and value.isprintable()


# ---------------------------------------------------------------------- offer pool


@dataclass(eq=False)
class _Offer:
    offer_id: str
    peer: Peer
    sealed: str
    created: float = field(default_factory=time.monotonic)


class _OfferMaker:
    """Makes sealed offers (an initiator Peer each) and closes the ones no longer wanted."""

    def __init__(
        self, *, make_peer: Callable[[], Peer], seal: Callable[[str], str], size: int, name: str
    ) -> None:
        if size < 1:
            raise ValueError("need size >= 1")
        self._make_peer = make_peer
        self._seal = seal
        self._size = size
        self._name = name
        self._closing = BackgroundTasks(log)
        self._closed = False
        self.made = 0  # Peers created so far (diagnostics and tests)

    async def _make_many(self, count: int) -> list[_Offer] | None:
        """Up to ``count`` new offers (those that fail are left out); None when the maker was closed
        meanwhile, the offers made then released."""
        made = await asyncio.gather(*(self._make() for _ in range(count)))
        offers = [offer for offer in made if offer is not None]
        if self._closed:
            for offer in offers:
                self._release(offer.peer, "pool closed")
            return None
        return offers

    async def _make(self) -> _Offer | None:
        peer = self._make_peer()
        self.made += 1
        try:
            sdp = await peer.create_offer()  # every local candidate included: no trickle
        except PeerError as exc:
            log.warning("%s: could not make an offer: %s", self._name, exc)
            return None
        except BaseException:  # cancelled (the tracker's offers timeout): no Peer left behind
            self._release(peer, "offer abandoned")
            raise
        return _Offer(crypto.gen_id(ID_LENGTH), peer, self._seal(sdp))

    def _release_all(self, offers: list[_Offer], reason: str) -> None:
        for offer in offers:
            self._release(offer.peer, reason)

    def _release(self, peer: Peer, reason: str) -> None:
        self._closing.spawn(peer.close(reason), "%s: closing an offer's connection", self._name)

    async def _wait_closed(self) -> None:
        await self._closing.wait(timeout=5)


class OfferPool(_OfferMaker):
    """A room's outstanding offers, shared by its trackers (0.25; see the module docstring)."""

    def __init__(
        self,
        *,
        make_peer: Callable[[], Peer],
        seal: Callable[[str], str],
        size: int = OFFER_POOL_SIZE,
        retention: float = OFFER_RETENTION_S,
        name: str = "",
    ) -> None:
        if retention <= 0:
            raise ValueError("need retention > 0")
        super().__init__(make_peer=make_peer, seal=seal, size=size, name=name)
        self._retention = retention
        self._offers: dict[str, _Offer] = {}  # by offer id, oldest first
        # One refill at a time: every tracker of the room asks at about the same moment (after a
        # start or a reconnect), and they must all announce the same offers, as in Trystero.
        self._lock = asyncio.Lock()

    @property
    def outstanding(self) -> int:
        return len(self._offers)

    def __contains__(self, offer_id: object) -> bool:
        return offer_id in self._offers

    async def current(self, tracker_url: str = "") -> list[TorrentOffer]:
        """The offers to announce now on any tracker: expired ones replaced, missing ones made
        (the tracker relay bounds this call with its offers timeout)."""
        async with self._lock:
            if self._closed:
                return []
            self._expire()
            missing = self._size - len(self._offers)
            if missing > 0:
                for offer in await self._make_many(missing) or ():
                    self._offers[offer.offer_id] = offer
            return [TorrentOffer(o.offer_id, o.sealed) for o in self._offers.values()]

    def claim(self, offer_id: str) -> Peer | None:
        """Take an answered offer's Peer out of the pool (the next announce replaces it)."""
        offer = self._offers.pop(offer_id, None)
        return offer.peer if offer is not None else None

    async def close(self) -> None:
        self._closed = True
        offers, self._offers = list(self._offers.values()), {}
        self._release_all(offers, "room left")
        await self._wait_closed()

    def _expire(self) -> None:
        now = time.monotonic()
        expired = [o for o in self._offers.values() if now - o.created > self._retention]
        for offer in expired:
            del self._offers[offer.offer_id]
        self._release_all(expired, "offer expired unanswered")


class OfferBatches(_OfferMaker):
    """0.22: a fresh batch of ``size`` offers per announce and tracker (see the module docstring).

    Only each tracker's latest batch can be answered, as in Trystero 0.22; the batch it replaces
    is closed when the new one is ready. Peers alive at once: at most two batches per tracker
    (the old one while the new one is made).
    """

    def __init__(
        self,
        *,
        make_peer: Callable[[], Peer],
        seal: Callable[[str], str],
        size: int = PROFILE_022.offers_per_announce,
        name: str = "",
    ) -> None:
        super().__init__(make_peer=make_peer, seal=seal, size=size, name=name)
        self._batches: dict[str, dict[str, _Offer]] = {}  # by tracker URL, then offer id

    @property
    def outstanding(self) -> int:
        return sum(len(batch) for batch in self._batches.values())

    def __contains__(self, offer_id: object) -> bool:
        return any(offer_id in batch for batch in self._batches.values())

    async def current(self, tracker_url: str = "") -> list[TorrentOffer]:
        """A new batch for ``tracker_url``'s announce; that tracker's previous batch is closed."""
        if self._closed:
            return []
        made = await self._make_many(self._size)
        if made is None:
            return []
        previous = self._batches.pop(tracker_url, {})
        self._release_all(list(previous.values()), "offer superseded by a newer announce")
        self._batches[tracker_url] = {offer.offer_id: offer for offer in made}
        return [TorrentOffer(o.offer_id, o.sealed) for o in made]

    def claim(self, offer_id: str) -> Peer | None:
        for batch in self._batches.values():
            offer = batch.pop(offer_id, None)
            if offer is not None:
                return offer.peer
        return None

    async def close(self) -> None:
        self._closed = True
        batches, self._batches = list(self._batches.values()), {}
        for batch in batches:
            self._release_all(list(batch.values()), "room left")
        await self._wait_closed()


# ---------------------------------------------------------------------- shared tracker


class SharedTracker(TorrentRelay):
    """A tracker connection shared by the rooms of one session and wire; routes signals by
    info_hash."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.signallers: dict[str, TorrentRoomSignaller] = {}
        self.on_offer = self._route_offer
        self.on_answer = self._route_answer
        # Set by RelayHub for topic relays; a tracker has no topics, so it is never called.
        self.on_message: Callable[[str, str], None] | None = None

    def _route_offer(self, info_hash: str, peer_id: str, offer_id: str, sealed: str) -> None:
        signaller = self.signallers.get(info_hash)
        if signaller is not None:
            signaller.on_offer(self, peer_id, offer_id, sealed)

    def _route_answer(self, info_hash: str, peer_id: str, offer_id: str, sealed: str) -> None:
        signaller = self.signallers.get(info_hash)
        if signaller is not None:
            signaller.on_answer(self, peer_id, offer_id, sealed)


# ---------------------------------------------------------------------- signaller


class TorrentRoomSignaller(RoomSignaller):
    """Tracker side of one room on wire 0.25 (see the module docstring)."""

    #: Tracker cadence and dedupe of this wire's JS peers.
    POLICY: TorrentPolicy = TORRENT_025
    #: Key of this wire's trackers in the session's RelayHub (one tracker client per policy).
    HUB_KEY = TORRENT
    #: Tracker frames carry offers and answers alike for both wires.
    signals_show_wire = False

    def __init__(self, **kwargs: Any) -> None:
        # Tracker clients speak as the session's selfId and announce offers, not topics, so this
        # signaller makes its own (RelayHub's type is the topic Relay; a tracker only uses its
        # lifecycle and on_state).
        tracker = functools.partial(SharedTracker, peer_id=kwargs["self_id"], policy=self.POLICY)
        super().__init__(relay_factory=tracker, **kwargs)  # type: ignore[arg-type]
        self.info_hash = crypto.torrent_info_hash(self.root_topic)
        self.pool = self._make_pool()
        self._trackers: dict[str, SharedTracker] = {}

    def _make_pool(self) -> OfferPool | OfferBatches:
        return OfferPool(
            make_peer=self._negotiator.new_offer_peer,
            seal=functools.partial(crypto.encrypt, self.key),
            name=f"room {self.room_id}",
        )

    def start(self) -> None:
        """Announce the room with its offers on every tracker (returns at once)."""
        for url in self._urls:
            relay = self._hub.acquire(self.HUB_KEY, url, self._relay_factory)
            tracker: SharedTracker = relay  # type: ignore[assignment]
            tracker.signallers[self.info_hash] = self
            tracker.set_announce(self.info_hash, functools.partial(self._offers_for_announce, url))
            self._trackers[url] = tracker
            self._relays[url] = relay
            self._unwatch.append(self._hub.watch(relay, self._on_state))

    async def _offers_for_announce(self, url: str) -> list[TorrentOffer]:
        # The tracker relay calls this once per announce (only while connected).
        self.counters["announces_out"] += 1
        return await self.pool.current(url)

    async def stop(self) -> None:
        """Leave every swarm (``stopped`` announce), release the trackers, close the offers."""
        if self._stopped:
            return
        self._stopped = True
        for unwatch in self._unwatch:
            unwatch()
        for url, tracker in self._trackers.items():
            if tracker.signallers.get(self.info_hash) is self:
                del tracker.signallers[self.info_hash]
                tracker.remove(self.info_hash)
            self._hub.release(self.HUB_KEY, url)
        self._trackers.clear()
        self._relays.clear()
        await self.pool.close()

    def signal(self, url: str, peer_id: str, payload: dict[str, Any]) -> None:
        """Send the negotiator's answer to ``peer_id``'s offer through tracker ``url`` (the only
        signal a torrent room sends; there are no announce-replies or candidates)."""
        tracker = self._trackers.get(url)
        answer, offer_id = payload.get("answer"), payload.get("offerId")
        if isinstance(answer, dict):
            answer = answer.get("sdp")  # 0.22's description object; the tracker frame wraps it anyway
        if tracker is None or self._stopped or not isinstance(answer, str) or not isinstance(offer_id, str):
            self.counters["dropped.unsendable_signal"] += 1
            return
        if tracker.send_answer(self.info_hash, peer_id, offer_id, answer):
            self.counters["signals_out"] += 1
        else:
            # Disconnected meanwhile: the offer is stale by the time the tracker is back, and the
            # offerer re-announces (with this offer or a new one) anyway.
            self.counters["dropped.answer_unsent"] += 1

    # ------------------------------------------------------------------ from the trackers

    def on_offer(self, tracker: SharedTracker, peer_id: str, offer_id: str, sealed: str) -> None:
        if not self._accepts(peer_id):
            return
        negotiator = self._negotiator
        if not negotiator.busy_with(peer_id) and self._leaves_offer_to_peer(peer_id):
            # It answers one of ours instead (spec §4); make sure one reaches it soon.
            self.counters["offers_left_to_peer"] += 1
            tracker.announce_now(self.info_hash)
            return
        try:
            negotiator.handle(self, tracker.url, Signal(peer_id, offer_id, offer=sealed))
        except Exception:
            self.counters["dropped.internal_error"] += 1
            log.exception("room %s: error handling an offer from %s", self.room_id, peer_id)

    def _accepts(self, peer_id: str) -> bool:
        """Count a signal from the tracker; whether to look at it at all."""
        if self._stopped:
            return False
        self.counters["signals_in"] += 1
        if not _is_trystero_id(peer_id):
            self.counters["dropped.relay_bad_peer_id"] += 1
            return False
        if peer_id in self.strangers:
            # Found on its data channel to speak the other wire; it re-offers every announce.
            self.counters["dropped.foreign_wire"] += 1
            return False
        return True

    def _leaves_offer_to_peer(self, peer_id: str) -> bool:
        """Whether an offer from ``peer_id`` is left unanswered because it answers ours: JS 0.25
        always has outstanding offers, so it answers only offers from smaller ids (spec §4)."""
        return self.self_id < peer_id and self.pool.outstanding > 0

    def _claim(self, offer_id: str, peer_id: str) -> Peer | None:
        peer = self.pool.claim(offer_id)
        if peer is not None:
            # Made before anyone was chosen to get it: name it after the peer now, for the logs.
            peer.name = peer.name.replace(POOL_PEER_NAME, peer_id)
        return peer

    def on_answer(self, tracker: SharedTracker, peer_id: str, offer_id: str, sealed: str) -> None:
        if not self._accepts(peer_id):
            return
        if offer_id not in self.pool:
            # Already answered by someone else, or expired and closed.
            self.counters["dropped.unexpected_answer"] += 1
            return
        try:
            self._negotiator.adopt_answer(
                self, peer_id, offer_id, sealed, functools.partial(self._claim, offer_id, peer_id)
            )
        except Exception:
            self.counters["dropped.internal_error"] += 1
            log.exception("room %s: error handling an answer from %s", self.room_id, peer_id)


class TorrentRoomSignaller022(TorrentRoomSignaller):
    """Tracker side of one room on wire 0.22 (see the module docstring)."""

    POLICY = TORRENT_022
    HUB_KEY = f"{TORRENT}/{v022.WIRE_VERSION}"
    channel_screen = CHANNEL_SCREEN_S

    def __init__(self, **kwargs: Any) -> None:
        kwargs["wire"] = v022.WIRE_VERSION
        super().__init__(**kwargs)

    def _make_pool(self) -> OfferBatches:
        return OfferBatches(
            make_peer=self._negotiator.new_offer_peer,
            seal=self._seal_022,
            name=f"room {self.room_id}",
        )

    def _seal_022(self, sdp: str) -> str:
        # JS 0.22 drops this line from every SDP it sends (spec §9.2); look the same.
        return crypto.encrypt(self.key, v022.strip_trickle_option(sdp))

    def _leaves_offer_to_peer(self, peer_id: str) -> bool:
        # JS 0.22 answers every forwarded offer (spec §9.5), so an unanswered one may never be
        # matched by an answer to ours; the negotiator answers one offer per peer at a time.
        return False


STRATEGY: Final = Strategy(
    name=TORRENT,
    signallers={v025.WIRE_VERSION: TorrentRoomSignaller, v022.WIRE_VERSION: TorrentRoomSignaller022},
    default_relays=lambda _app_id, wire: tuple(default_trackers(wire=wire)),
)
