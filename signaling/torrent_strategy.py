"""Trystero's torrent strategy (spec §4) on the shared strategy core.

A WebTorrent tracker is not a topic relay: a peer *announces* a room's info_hash together with a
few SDP offers, and the tracker hands each offer to one random member of the swarm; answers come
back through the tracker by offer id. :class:`~signaling.relays.torrent.TorrentRelay` speaks the
tracker protocol (its docstring says how a strategy must drive it); this module is that strategy.
It reuses everything above the relay: the app's :class:`~signaling.strategy.Negotiator` (one
negotiation per remote peer, dedupe of offers by (peer, offer id), caps, timers) and the session's
links, admission and shared connections, so rooms behave exactly as over MQTT or nostr.

:class:`TorrentRoomSignaller` (one per room; a :class:`~signaling.strategy.RoomSignaller`, so the
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
      (:meth:`~signaling.strategy.Negotiator.adopt_answer`).

:class:`OfferPool` (one per room, shared by its trackers, as in Trystero)
    Up to ``size`` (3) outstanding offers: aiortc initiator Peers with their full, non-trickled
    SDP (aiortc gathers every candidate before it returns one; Trystero's torrent peers do not
    trickle either), sealed with the room key. Every announce re-sends the same offer ids until an
    offer is answered or ``retention`` (120 s) old; then it is closed and replaced at the next
    announce. Offers are made only when a tracker is about to announce (never while disconnected).

Trackers are shared by all rooms of a session, one :class:`SharedTracker` per URL, kept in the
session's :class:`~signaling.relay_hub.RelayHub` (reference counted, closed with the last room);
it routes offers and answers to rooms by info_hash.

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
from typing import Any

from signaling import crypto
from signaling.config import RoomConfig
from signaling.peer import Peer, PeerError
from signaling.relays.torrent import ID_LENGTH, TorrentOffer, TorrentRelay
from signaling.strategy import RoomSignaller, Signal

log = logging.getLogger(__name__)

__all__ = [
    "OFFER_POOL_SIZE",
    "OFFER_RETENTION_S",
    "OfferPool",
    "SharedTracker",
    "TorrentRoomSignaller",
    "signaller_class",
]

TORRENT = "torrent"
#: Trystero 0.25.4's offerPoolSize and offerRetentionMs (spec §4).
OFFER_POOL_SIZE = 3
OFFER_RETENTION_S = 120.0
#: What a pooled offer's Peer is called until an answer names its peer (Negotiator.new_offer_peer).
POOL_PEER_NAME = "offer-pool"


def signaller_class(config: RoomConfig) -> type[RoomSignaller]:
    """The signaller for a room's strategy: torrent has its own, topic strategies share one."""
    return TorrentRoomSignaller if config.strategy == TORRENT else RoomSignaller


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


class OfferPool:
    """A room's outstanding offers (see the module docstring)."""

    def __init__(
        self,
        *,
        make_peer: Callable[[], Peer],
        seal: Callable[[str], str],
        size: int = OFFER_POOL_SIZE,
        retention: float = OFFER_RETENTION_S,
        name: str = "",
    ) -> None:
        if size < 1 or retention <= 0:
            raise ValueError("need size >= 1 and retention > 0")
        self._make_peer = make_peer
        self._seal = seal
        self._size = size
        self._retention = retention
        self._name = name
        self._offers: dict[str, _Offer] = {}  # by offer id, oldest first
        # One refill at a time: every tracker of the room asks at about the same moment (after a
        # start or a reconnect), and they must all announce the same offers, as in Trystero.
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.made = 0  # Peers created so far (diagnostics and tests)

    @property
    def outstanding(self) -> int:
        return len(self._offers)

    def __contains__(self, offer_id: object) -> bool:
        return offer_id in self._offers

    async def current(self) -> list[TorrentOffer]:
        """The offers to announce now: expired ones replaced, missing ones made (the tracker
        relay bounds this call with its offers timeout)."""
        async with self._lock:
            if self._closed:
                return []
            self._expire()
            missing = self._size - len(self._offers)
            if missing > 0:
                made = await asyncio.gather(*(self._make() for _ in range(missing)))
                for offer in made:
                    if offer is None:
                        continue
                    if self._closed:
                        self._release(offer.peer, "pool closed")
                    else:
                        self._offers[offer.offer_id] = offer
            return [TorrentOffer(o.offer_id, o.sealed) for o in self._offers.values()]

    def claim(self, offer_id: str) -> Peer | None:
        """Take an answered offer's Peer out of the pool (the next announce replaces it)."""
        offer = self._offers.pop(offer_id, None)
        return offer.peer if offer is not None else None

    async def close(self) -> None:
        self._closed = True
        offers, self._offers = list(self._offers.values()), {}
        for offer in offers:
            self._release(offer.peer, "room left")
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=5)

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

    def _expire(self) -> None:
        now = time.monotonic()
        for offer in [o for o in self._offers.values() if now - o.created > self._retention]:
            del self._offers[offer.offer_id]
            self._release(offer.peer, "offer expired unanswered")

    def _release(self, peer: Peer, reason: str) -> None:
        task = asyncio.ensure_future(peer.close(reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


# ---------------------------------------------------------------------- shared tracker


class SharedTracker(TorrentRelay):
    """A tracker connection shared by the rooms of one session; routes signals by info_hash."""

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
    """Tracker side of one room (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.info_hash = crypto.torrent_info_hash(self.root_topic)
        self.pool = OfferPool(
            make_peer=self._negotiator.new_offer_peer,
            seal=functools.partial(crypto.encrypt, self.key),
            name=f"room {self.room_id}",
        )
        self._trackers: dict[str, SharedTracker] = {}

    def __repr__(self) -> str:
        return f"<TorrentRoomSignaller {self.app_id}/{self.room_id}>"

    def start(self) -> None:
        """Announce the room with its offers on every tracker (returns at once)."""
        factory = functools.partial(SharedTracker, peer_id=self.self_id)
        for url in self._urls:
            # RelayHub's type is the topic Relay; a tracker only uses its lifecycle and on_state.
            relay = self._hub.acquire(TORRENT, url, factory=factory)  # type: ignore[arg-type]
            tracker: SharedTracker = relay  # type: ignore[assignment]
            tracker.signallers[self.info_hash] = self
            tracker.set_announce(self.info_hash, self._offers_for_announce)
            self._trackers[url] = tracker
            self._relays[url] = relay
            self._unwatch.append(self._hub.watch(relay, self._on_state))

    async def _offers_for_announce(self) -> list[TorrentOffer]:
        # The tracker relay calls this once per announce (only while connected).
        self.counters["announces_out"] += 1
        return await self.pool.current()

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
            self._hub.release(TORRENT, url)
        self._trackers.clear()
        self._relays.clear()
        await self.pool.close()

    def signal(self, url: str, peer_id: str, payload: dict[str, Any]) -> None:
        """Send the negotiator's answer to ``peer_id``'s offer through tracker ``url`` (the only
        signal a torrent room sends; there are no announce-replies or candidates)."""
        tracker = self._trackers.get(url)
        answer, offer_id = payload.get("answer"), payload.get("offerId")
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
        if self._stopped:
            return
        self.counters["signals_in"] += 1
        if not _is_trystero_id(peer_id):
            self.counters["dropped.relay_bad_peer_id"] += 1
            return
        negotiator = self._negotiator
        if not negotiator.busy_with(peer_id) and self.self_id < peer_id and self.pool.outstanding:
            # It answers one of ours instead (spec §4); make sure one reaches it soon.
            self.counters["offers_left_to_peer"] += 1
            tracker.announce_now(self.info_hash)
            return
        try:
            negotiator.handle(self, tracker.url, Signal(peer_id, offer_id, offer=sealed))
        except Exception:
            self.counters["dropped.internal_error"] += 1
            log.exception("room %s: error handling an offer from %s", self.room_id, peer_id)

    def _claim(self, offer_id: str, peer_id: str) -> Peer | None:
        peer = self.pool.claim(offer_id)
        if peer is not None:
            # Made before anyone was chosen to get it: name it after the peer now, for the logs.
            peer.name = peer.name.replace(POOL_PEER_NAME, peer_id)
        return peer

    def on_answer(self, tracker: SharedTracker, peer_id: str, offer_id: str, sealed: str) -> None:
        if self._stopped:
            return
        self.counters["signals_in"] += 1
        if not _is_trystero_id(peer_id):
            self.counters["dropped.relay_bad_peer_id"] += 1
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
