"""Trystero's signalling core (spec §2) on top of any topic relay. Knows SDP only as sealed text.

Two classes, split along what is shared:

:class:`RoomSignaller` (one per joined room)
    Subscribes the room's self topic, then its root topic, on every relay of the room; announces
    ``{"peerId":S}`` on the root topic right after subscribing, then after 233, 533 and 1333 ms,
    then every 60 s (spec §2.3), and again at once after a relay reconnects (cadence, relay
    rate-limit pauses and the stretch in stable rooms: :mod:`signaling.pacing`). Parses and
    validates every relay message exactly as JS does (§2.1) and hands valid ones to the app's
    negotiator.
    Knows the room's topics and AES key; sends signals to a peer's self topic on one relay.

:class:`Negotiator` (one per app id, shared by its rooms)
    One offer/answer negotiation per remote peer, whichever room found it, because the session
    keeps one RTCPeerConnection per (app id, remote peer) (§2.4). Implements who offers (§2.2:
    the smaller id offers; the larger sends an announce-reply), the glare rule (the smaller id's
    offer wins), offer ids, dedupe of offers re-delivered by several relays (by (peerId, offerId)),
    candidates buffered until their negotiation exists (the Peer buffers them further until the
    remote description is set), and the timers. Relay messages from a peer we already have a
    live connection to are not negotiated: they only tell the session the peer is in that room.

Resource bounds (``Limits``/``Timeouts``): at most ``max_pending_connections`` negotiations
(oldest unanswered one evicted), each closed after ``offer`` s unanswered or ``connect`` s without
an open channel; new connections are rate-limited (``offer_rate``) so a flood of fake
announcements cannot make us generate certificates and sockets without bound; announce-replies
are rate-limited (``reply_rate``); seen offer ids and early candidates live in LRU maps.

aiortc gathers all local candidates before it returns an SDP, so we never send ``candidate``
messages; JS accepts complete SDPs (see signaling.peer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from signaling import crypto
from signaling.background import BackgroundTasks
from signaling.bounded import LruDict, LruSet, TokenBucket
from signaling.errors import DecryptError, InvalidDescription, PeerError
from signaling.foreign_wire import ForeignWireWatch
from signaling.limits import Limits, Timeouts
from signaling.pacing import AnnouncePacer
from signaling.relay_hub import RelayFactory, RelayHub
from signaling.relays import Relay, RelayState
from signaling.wire import WIRE_VERSIONS
from signaling.wire.interface import relay_envelope

if TYPE_CHECKING:  # the Peer type only: this module never makes one, so it needs no WebRTC
    from signaling.peer import Peer

log = logging.getLogger(__name__)

__all__ = ["OFFER_ID_LENGTH", "LinkDirectory", "Negotiation", "Negotiator", "RoomSignaller", "Signal"]

OFFER_ID_LENGTH = 12
_SIGNAL_KEYS = ("offer", "answer", "candidate")
_MAX_OFFER_ID_LENGTH = 64


@dataclass(frozen=True, slots=True)
class Signal:
    """A validated relay message (spec §2.1). No offer/answer/candidate = an announcement."""

    peer_id: str
    offer_id: str | None = None
    offer: str | None = None
    answer: str | None = None
    candidate: str | None = None

    @property
    def is_announcement(self) -> bool:
        return self.offer is None and self.answer is None and self.candidate is None


def parse_signal(text: str, self_id: str, limits: Limits) -> Signal | str:
    """The message as a :class:`Signal`, or the reason (a counter name) it is dropped."""
    envelope = relay_envelope(
        text, self_id, max_bytes=limits.max_signal_bytes, max_peer_id_length=limits.max_peer_id_length
    )
    if isinstance(envelope, str):
        return envelope
    peer_id, payload = envelope
    # JS drops the whole message if any signal field is present but not a non-empty string.
    fields: dict[str, str] = {}
    for key in _SIGNAL_KEYS:
        if key in payload:
            value = payload[key]
            if not isinstance(value, str) or not value:
                return "relay_bad_field"
            fields[key] = value
    offer_id = payload.get("offerId")
    if not isinstance(offer_id, str) or not offer_id or len(offer_id) > _MAX_OFFER_ID_LENGTH:
        offer_id = None
    return Signal(peer_id, offer_id, **fields)


class LinkDirectory(Protocol):
    """What the negotiator needs from the session that owns the established connections."""

    def is_connected(self, peer_id: str) -> bool:
        """A live connection to ``peer_id`` exists (so relay messages from it are not negotiated)."""

    def on_signal_from_connected(self, peer_id: str, room: RoomSignaller) -> None:
        """A connected peer spoke in ``room``: it is in that room too (bind it, spec §2.4)."""

    def can_accept(self) -> bool:
        """Whether another connection may be negotiated (connection cap)."""

    def make_peer(self, initiator: bool, peer_id: str) -> Peer:
        """A new, unconnected Peer with the app's ICE settings."""

    def on_peer_open(self, peer_id: str, peer: Peer, room: RoomSignaller) -> None:
        """The data channel of a negotiated Peer opened; the session owns it from now on."""


# ------------------------------------------------------------------------------- room signaller


class RoomSignaller:
    """Relay side of one room: topics, announces, message validation, sending signals."""

    #: 0.22 only: seconds a new connection's peer waits before it joins, unless its first
    #: message comes sooner; where strangers of the other wire can connect (trackers), their
    #: first message gives them away before they join (signaling.foreign_wire.channel_wire).
    channel_screen: float = 0.0
    #: Whether the relay signals of this strategy show the peer's Trystero wire: on topic relays
    #: a 0.23+ peer's offers and answers are strings with an ``offerId`` and a 0.22 peer's are
    #: objects (spec §9.10), so a peer negotiated with here speaks this room's wire. Tracker
    #: frames are the same for both wires; there only the data channel tells (foreign_wire).
    signals_show_wire: bool = True

    def __init__(
        self,
        *,
        app_id: str,
        room_id: str,
        self_id: str,
        password: str,
        strategy: str,
        relay_factory: RelayFactory,
        relay_urls: Sequence[str],
        hub: RelayHub,
        negotiator: Negotiator,
        limits: Limits,
        timeouts: Timeouts,
        counters: Counter[str],
        wire: str = WIRE_VERSIONS[0],
    ) -> None:
        self.app_id = app_id
        self.room_id = room_id
        self.self_id = self_id
        #: Peers heard here that speak another Trystero wire (signaling.foreign_wire): logged once,
        #: then ignored, and any negotiation with them is abandoned.
        self.strangers = ForeignWireWatch(
            wire=wire,
            room_id=room_id,
            counters=counters,
            on_stranger=lambda peer_id: negotiator.drop_peer(peer_id, self),
            max_peer_id_length=limits.max_peer_id_length,
        )
        self.token = crypto.room_token(app_id, room_id)
        self.key = crypto.derive_key(password, app_id, room_id)
        self.root_topic = crypto.root_topic(app_id, room_id)
        self.self_topic = crypto.self_topic(app_id, room_id, self_id)
        self.counters = counters
        self._strategy = strategy
        self._relay_factory = relay_factory
        self._urls = tuple(relay_urls)
        self._hub = hub
        self._negotiator = negotiator
        self._limits = limits
        self._timeouts = timeouts
        self._announce_text = orjson.dumps({"peerId": self_id}).decode()
        self._relays: dict[str, Relay] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        self._unwatch: list[Any] = []
        self._tasks = BackgroundTasks(log)
        self._stopped = False
        self._peer_topics: LruDict[str, str] = LruDict(256)
        #: Whether the room has an active peer (set by the session); stretches announces (pacing).
        self.has_active_peers: Callable[[], bool] = lambda: False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.app_id}/{self.room_id}>"

    @property
    def relay_states(self) -> dict[str, RelayState]:
        return {url: relay.state for url, relay in self._relays.items()}

    def start(self) -> None:
        """Subscribe and start announcing on every relay (returns at once)."""
        for url in self._urls:
            relay = self._hub.acquire(self._strategy, url, self._relay_factory)
            self._relays[url] = relay
            self._wakeups[url] = asyncio.Event()
            # Trystero subscribes to its self topic first, then the root topic (spec §3).
            acks = [
                self._hub.route(relay, topic, self._on_text) for topic in (self.self_topic, self.root_topic)
            ]
            self._unwatch.append(self._hub.watch(relay, self._on_state))
            self._tasks.spawn(
                self._announce_loop(url, relay, acks),
                "room %s: announcing on %s",
                self.room_id,
                url,
                name=f"announce {self.room_id} {url}",
            )

    async def stop(self) -> None:
        """Stop announcing, unsubscribe both topics and release the relays."""
        if self._stopped:
            return
        self._stopped = True
        await self._tasks.close()
        for unwatch in self._unwatch:
            unwatch()
        for url, relay in self._relays.items():
            for topic in (self.self_topic, self.root_topic):
                self._hub.unroute(relay, topic)
            self._hub.release(self._strategy, url)
        self._relays.clear()

    def signal(self, url: str, peer_id: str, payload: dict[str, Any]) -> None:
        """Publish ``payload`` to ``peer_id``'s self topic on relay ``url``."""
        relay = self._relays.get(url)
        if relay is None or self._stopped:
            return
        topic = self._peer_topics.get(peer_id)
        if topic is None:
            topic = self._peer_topics.setdefault(
                peer_id, lambda: crypto.self_topic(self.app_id, self.room_id, peer_id)
            )
        relay.publish(topic, orjson.dumps(payload).decode())
        self.counters["signals_out"] += 1

    def announce_again(self) -> None:
        """Announce at once on every relay and restart the warm-up, as JS does when it loses a
        connection to a peer (``requeueAnnounce``): the peer hears us and a new negotiation
        starts (the smaller id offers, spec §2.2)."""
        for wakeup in self._wakeups.values():
            wakeup.set()

    # ------------------------------------------------------------------ internals

    def _on_state(self, url: str, state: RelayState) -> None:
        if state == "connected" and url in self._wakeups:
            # Subscriptions are restored by now; re-announce and restart the warm-up (as JS does
            # after a reconnect).
            self._wakeups[url].set()

    async def _announce_loop(self, url: str, relay: Relay, acks: list[asyncio.Future[None]]) -> None:
        # Announce only once both topics are acknowledged, or an answer could go unheard.
        await asyncio.gather(*acks)
        wakeup = self._wakeups[url]
        wakeup.clear()
        pacer = AnnouncePacer(
            warmup=self._timeouts.announce_warmup,
            interval=self._timeouts.announce_interval,
            stable_interval=self._timeouts.announce_interval_stable,
            stable=self._is_stable,
            # nostr relays pause announces after a rate-limit answer; other relays never do
            backoff=lambda: float(getattr(relay, "announce_backoff", 0.0)),
            counters=self.counters,
        )
        while True:
            delay: float | None = None
            if relay.state == "connected":
                delay = pacer.due_in()
                if delay <= 0:
                    relay.publish(self.root_topic, self._announce_text)
                    self.counters["announces_out"] += 1
                    pacer.sent()
                    delay = pacer.due_in()
            try:
                async with asyncio.timeout(delay):
                    await wakeup.wait()
            except TimeoutError:
                continue
            wakeup.clear()
            pacer.restart()

    def _is_stable(self) -> bool:
        """Active peers and no negotiation running over this room (signaling.pacing)."""
        if not self.has_active_peers():
            return False
        return not any(n.room is self for n in self._negotiator.pending.values())

    def _count_drop(self, url: str, reason: str) -> None:
        """A relay message that goes no further, counted by ``reason`` (our own echo is not news)."""
        if reason != "relay_own":
            self.counters[f"dropped.{reason}"] += 1
            log.debug("room %s: dropped relay message on %s: %s", self.room_id, url, reason)

    def _on_text(self, url: str, topic: str, text: str) -> None:
        if self._stopped:
            return
        self.counters["signals_in"] += 1
        parsed = parse_signal(text, self.self_id, self._limits)
        # A 0.22 peer's object-shaped offer/answer fails parse_signal as a bad field.
        peer_id = None if isinstance(parsed, str) else parsed.peer_id
        if self.strangers.screen(text, peer_id, suspicious=parsed == "relay_bad_field"):
            return
        if isinstance(parsed, str):
            self._count_drop(url, parsed)
            return
        try:
            self._negotiator.handle(self, url, parsed)
        except Exception:
            # Remote input must never take the relay down; count it and carry on.
            self.counters["dropped.internal_error"] += 1
            log.exception("room %s: error handling a signal from %s", self.room_id, parsed.peer_id)


# ------------------------------------------------------------------------------- negotiations


@dataclass(eq=False)
class Negotiation:
    """One offer/answer exchange with one remote peer (before the data channel opens)."""

    peer_id: str
    role: Literal["offerer", "answerer"]
    peer: Peer
    room: RoomSignaller
    offer_id: str
    created: float = field(default_factory=time.monotonic)
    #: offerer: the sealed offer, once created; sent on every relay where the peer announced.
    offer_sealed: str | None = None
    waiting_relays: set[str] = field(default_factory=set)
    sent_on: dict[str, float] = field(default_factory=dict)
    #: offerer: an answer was applied; answerer: our answer was sent.
    answered: bool = False
    answer_relay: str = ""
    timer: asyncio.TimerHandle | None = None
    tasks: BackgroundTasks = field(default_factory=lambda: BackgroundTasks(log))


class Negotiator:
    """Offer/answer state per remote peer for one app id (see the module docstring)."""

    def __init__(
        self,
        *,
        self_id: str,
        links: LinkDirectory,
        limits: Limits,
        timeouts: Timeouts,
    ) -> None:
        self.self_id = self_id
        self._links = links
        self._limits = limits
        self._timeouts = timeouts
        self._pending: dict[str, Negotiation] = {}  # insertion order = age, for eviction
        self._seen_offers: LruSet[tuple[str, str]] = LruSet(limits.seen_offers)
        self._early: LruDict[tuple[str, str | None], list[str]] = LruDict(limits.early_candidate_keys)
        self._warned: LruSet[tuple[str, str]] = LruSet(256)
        self._new_conn_budget = TokenBucket(limits.offer_rate, max(1.0, 2 * limits.offer_rate))
        self._reply_budget = TokenBucket(limits.reply_rate, max(1.0, 2 * limits.reply_rate))
        self._closing = BackgroundTasks(log)
        self._closed = False
        #: How long an offer waits for its answer (a wire may wait less: ``Negotiator022``).
        self._offer_ttl = timeouts.offer

    @property
    def pending(self) -> dict[str, Negotiation]:
        """Negotiations in progress by remote peer id (read-only view for stats and tests)."""
        return dict(self._pending)

    # ------------------------------------------------------------------ entry point

    def handle(self, room: RoomSignaller, url: str, sig: Signal) -> None:
        """One validated relay message from ``room`` via relay ``url``."""
        peer_id = sig.peer_id
        if not self._wants_signal_from(peer_id, room):
            return
        neg = self._pending.get(peer_id)
        if sig.offer is not None:
            self._on_offer(room, url, sig, sig.offer, neg)
        elif sig.candidate is not None:
            self._on_candidate(room, sig, sig.candidate, neg)
        elif sig.answer is not None:
            self._on_answer(room, sig, sig.answer, neg)
        else:
            self._on_announcement(room, url, peer_id, neg)

    def _wants_signal_from(self, peer_id: str, room: RoomSignaller) -> bool:
        """False once closed, or for a peer with a live channel: JS ignores relay traffic from
        those (spec §2.2, §9.2); it only means that peer is in this room as well (§2.4)."""
        if self._closed:
            return False
        if self._links.is_connected(peer_id):
            self._links.on_signal_from_connected(peer_id, room)
            return False
        return True

    def drop_room(self, room: RoomSignaller) -> None:
        """Abandon negotiations that run over ``room``'s topics (the room is being left)."""
        for neg in [n for n in self._pending.values() if n.room is room]:
            self._drop(neg, "room left")

    def drop_peer(self, peer_id: str, room: RoomSignaller) -> None:
        """Abandon a negotiation with ``peer_id`` found via ``room`` (it speaks another wire)."""
        neg = self._pending.get(peer_id)
        if neg is not None and neg.room is room:
            self._drop(neg, "speaks another Trystero wire")

    async def close(self) -> None:
        self._closed = True
        for neg in list(self._pending.values()):
            self._drop(neg, "session closed")
        await self._closing.wait(timeout=5)

    # ------------------------------------------------------------------ announcements

    def _on_announcement(self, room: RoomSignaller, url: str, peer_id: str, neg: Negotiation | None) -> None:
        if neg is not None and (neg.role == "answerer" or neg.answered):
            return  # already answering, or our offer was answered and ICE is running
        if self.self_id < peer_id:
            if neg is None:
                self._start_offer(room, url, peer_id)
            elif neg.room is room:
                self._send_offer(neg, url)
            # else: we are negotiating with that peer via another room; once connected, presence
            # frames bind this room to the same connection.
            return
        if neg is None:
            if self._reply_budget.take():
                # "Please offer me": the smaller id leads (spec §2.2).
                room.signal(url, peer_id, {"peerId": self.self_id})
            else:
                room.counters["dropped.reply_rate_limited"] += 1

    def _start_offer(self, room: RoomSignaller, url: str, peer_id: str) -> None:
        if not self._admit_new(room):
            return
        peer = self._links.make_peer(True, peer_id)
        neg = Negotiation(peer_id, "offerer", peer, room, self._new_offer_id())
        neg.waiting_relays.add(url)
        self._register(neg, self._offer_ttl)
        self._spawn(neg, self._create_offer(neg))

    async def _create_offer(self, neg: Negotiation) -> None:
        try:
            sdp = await neg.peer.create_offer()
        except PeerError as exc:
            self._drop(neg, f"offer failed: {exc}")
            return
        neg.offer_sealed = crypto.encrypt(neg.room.key, self._outgoing_offer_sdp(sdp))
        for url in sorted(neg.waiting_relays):
            self._send_offer(neg, url)
        neg.waiting_relays.clear()

    def _new_offer_id(self) -> str:
        return crypto.gen_id(OFFER_ID_LENGTH)

    def _outgoing_offer_sdp(self, sdp: str) -> str:
        """The offer SDP as this wire sends it (sealed afterwards)."""
        return sdp

    def _send_offer(self, neg: Negotiation, url: str) -> None:
        if neg.offer_sealed is None:
            neg.waiting_relays.add(url)
            return
        now = time.monotonic()
        last = neg.sent_on.get(url)
        if last is not None and now - last < self._timeouts.offer_resend:
            return  # Trystero re-sends a pending offer at most once per announce interval
        neg.sent_on[url] = now
        neg.room.signal(
            url, neg.peer_id, {"peerId": self.self_id, "offerId": neg.offer_id, "offer": neg.offer_sealed}
        )
        log.debug("room %s: offer %s sent to %s via %s", neg.room.room_id, neg.offer_id, neg.peer_id, url)

    # ------------------------------------------------------------------ offers

    def _on_offer(
        self, room: RoomSignaller, url: str, sig: Signal, sealed: str, neg: Negotiation | None
    ) -> None:
        peer_id = sig.peer_id
        if neg is not None:
            if neg.role == "answerer" or neg.answered:
                return  # a re-delivered offer, or a new one while we are busy with the last
            if self.self_id < peer_id:
                room.counters["glare_ignored"] += 1
                return  # glare: both offered; the smaller id's offer (ours) wins
        if sig.offer_id is not None and (peer_id, sig.offer_id) in self._seen_offers:
            return
        try:
            sdp = crypto.decrypt(room.key, sealed)
        except DecryptError as exc:
            self._decrypt_failed(room, peer_id, "offer", exc)
            return
        if sig.offer_id is not None:
            self._seen_offers.add((peer_id, sig.offer_id))
        if neg is not None:
            self._drop(neg, "glare: answering the remote offer")
        if not self._admit_new(room):
            return
        peer = self._links.make_peer(False, peer_id)
        neg = Negotiation(peer_id, "answerer", peer, room, sig.offer_id or "", answer_relay=url)
        self._register(neg, self._timeouts.connect)
        for key in ((peer_id, sig.offer_id), (peer_id, None)):
            for candidate in self._early.pop(key) or ():
                self._spawn(neg, peer.add_remote_candidate(candidate))
        self._spawn(neg, self._answer(neg, sdp))

    async def _accept(self, neg: Negotiation, sdp: str) -> str | None:
        """The answer SDP to ``neg``'s offer, or None (then the negotiation is dropped)."""
        try:
            return await neg.peer.accept_offer(sdp)
        except InvalidDescription as exc:
            neg.room.counters["dropped.bad_sdp"] += 1
            log.info("room %s: offer from %s rejected: %s", neg.room.room_id, neg.peer_id, exc)
            self._drop(neg, "bad offer SDP")
        except PeerError as exc:
            self._drop(neg, f"answer failed: {exc}")
        return None

    def _answer_payload(self, neg: Negotiation, answer: str) -> dict[str, Any]:
        return {"peerId": self.self_id, "answer": crypto.encrypt(neg.room.key, answer)}

    async def _answer(self, neg: Negotiation, sdp: str) -> None:
        answer = await self._accept(neg, sdp)
        if answer is None:
            return
        payload = self._answer_payload(neg, answer)
        if neg.offer_id:
            payload["offerId"] = neg.offer_id
        neg.answered = True
        neg.room.signal(neg.answer_relay, neg.peer_id, payload)
        log.debug("room %s: answered offer %s from %s", neg.room.room_id, neg.offer_id, neg.peer_id)

    # ------------------------------------------------------------------ answers and candidates

    def _on_answer(self, room: RoomSignaller, sig: Signal, sealed: str, neg: Negotiation | None) -> None:
        if neg is None or neg.role != "offerer" or neg.answered or neg.offer_sealed is None:
            room.counters["dropped.unexpected_answer"] += 1
            return
        if sig.offer_id is not None and sig.offer_id != neg.offer_id:
            room.counters["dropped.stale_answer"] += 1
            return
        try:
            sdp = crypto.decrypt(room.key, sealed)
        except DecryptError as exc:
            self._decrypt_failed(room, sig.peer_id, "answer", exc)
            return
        neg.answered = True
        self._arm(neg, self._timeouts.connect)
        self._spawn(neg, self._apply_answer(neg, sdp))

    async def _apply_answer(self, neg: Negotiation, sdp: str) -> None:
        try:
            await neg.peer.accept_answer(sdp)
        except InvalidDescription as exc:
            neg.room.counters["dropped.bad_sdp"] += 1
            log.info("room %s: answer from %s rejected: %s", neg.room.room_id, neg.peer_id, exc)
            self._drop(neg, "bad answer SDP")
        except PeerError as exc:
            self._drop(neg, f"answer not applied: {exc}")

    def _on_candidate(self, room: RoomSignaller, sig: Signal, sealed: str, neg: Negotiation | None) -> None:
        try:
            plain = crypto.decrypt(room.key, sealed)
        except DecryptError:
            room.counters["dropped.candidate_decrypt_failed"] += 1  # JS drops these silently too
            return
        if neg is not None and (sig.offer_id is None or sig.offer_id == neg.offer_id):
            self._spawn(neg, neg.peer.add_remote_candidate(plain))
            return
        # Its offer (or our negotiation) is not there yet: relays may reorder; keep a few.
        held = self._early.setdefault((sig.peer_id, sig.offer_id), list)
        if plain in held:
            return  # the same candidate via another relay (JS trickles on every relay it heard us on)
        if len(held) < self._limits.early_candidates_per_key:
            held.append(plain)
        else:
            room.counters["dropped.early_candidate_overflow"] += 1

    # ------------------------------------------------------------------ pooled offers (torrent)

    def busy_with(self, peer_id: str) -> bool:
        """A live connection to ``peer_id`` exists, or a negotiation with it runs."""
        return self._links.is_connected(peer_id) or peer_id in self._pending

    def new_offer_peer(self) -> Peer:
        """An initiator Peer for an offer that names no remote peer yet (torrent's offer pool)."""
        return self._links.make_peer(True, "offer-pool")  # renamed once an answer names the peer

    def adopt_answer(
        self,
        room: RoomSignaller,
        peer_id: str,
        offer_id: str,
        sealed: str,
        claim: Callable[[], Peer | None],
    ) -> bool:
        """``peer_id`` answered one of ``room``'s pooled offers (torrent announces offers before
        anyone is chosen to get them, so only the answer names the peer).

        ``claim()`` takes the offer's Peer out of the pool; it is called only once the answer is
        known to be wanted: decryptable (so a forged answer cannot burn our offers), from a peer
        we are not connected to or negotiating with, and admitted by the caps. The Peer then
        becomes that peer's negotiation, as if we had offered to it directly. Returns whether
        the answer was taken.
        """
        if not self._wants_signal_from(peer_id, room):
            return False
        if peer_id in self._pending:
            # e.g. it answered one of ours while we answer one of its (possible only when our
            # pool was empty): the negotiation already running goes on.
            room.counters["dropped.duplicate_negotiation"] += 1
            return False
        try:
            sdp = crypto.decrypt(room.key, sealed)
        except DecryptError as exc:
            self._decrypt_failed(room, peer_id, "answer", exc)
            return False
        if not self._admit_new(room):
            return False
        peer = claim()
        if peer is None:
            room.counters["dropped.unexpected_answer"] += 1  # claimed or expired meanwhile
            return False
        neg = Negotiation(peer_id, "offerer", peer, room, offer_id, answered=True)
        self._register(neg, self._timeouts.connect)
        self._spawn(neg, self._apply_answer(neg, sdp))
        log.debug("room %s: %s answered pooled offer %s", room.room_id, peer_id, offer_id)
        return True

    # ------------------------------------------------------------------ bookkeeping

    def _admit_new(self, room: RoomSignaller) -> bool:
        """Room for one more negotiation: caps, rate limit, eviction of the oldest."""
        if not self._links.can_accept():
            room.counters["dropped.connection_cap"] += 1
            return False
        if not self._new_conn_budget.take():
            room.counters["dropped.connection_rate_limited"] += 1
            return False
        while len(self._pending) >= self._limits.max_pending_connections:
            # Evict the oldest negotiation nobody answered (the cheapest for a faker to cause);
            # if all are answered, the oldest one.
            victim = next(
                (n for n in self._pending.values() if not n.answered), next(iter(self._pending.values()))
            )
            room.counters["evicted_negotiations"] += 1
            self._drop(victim, "evicted: too many pending connections")
        return True

    def _register(self, neg: Negotiation, timeout: float) -> None:
        self._pending[neg.peer_id] = neg
        neg.peer.on_open = lambda: self._opened(neg)
        neg.peer.on_close = lambda: self._peer_closed(neg)
        self._arm(neg, timeout)

    def _arm(self, neg: Negotiation, timeout: float) -> None:
        if neg.timer is not None:
            neg.timer.cancel()
        neg.timer = asyncio.get_running_loop().call_later(timeout, self._expired, neg, timeout)

    def _expired(self, neg: Negotiation, timeout: float) -> None:
        if self._pending.get(neg.peer_id) is neg:
            neg.room.counters["negotiation_timeouts"] += 1
            what = "no answer" if neg.role == "offerer" and not neg.answered else "no connection"
            log.info("room %s: %s from %s within %.0f s", neg.room.room_id, what, neg.peer_id, timeout)
            self._drop(neg, "timed out")

    def _opened(self, neg: Negotiation) -> None:
        if self._pending.get(neg.peer_id) is not neg:
            self._close_peer(neg.peer, "superseded")
            return
        self._forget(neg)
        neg.peer.on_open = None
        neg.peer.on_close = None
        log.debug(
            "room %s: channel to %s open (%s, %.0f ms)",
            neg.room.room_id,
            neg.peer_id,
            neg.role,
            (time.monotonic() - neg.created) * 1000,
        )
        self._links.on_peer_open(neg.peer_id, neg.peer, neg.room)

    def _peer_closed(self, neg: Negotiation) -> None:
        if self._pending.get(neg.peer_id) is neg:
            neg.room.counters["negotiation_failures"] += 1
            log.debug(
                "room %s: negotiation with %s ended: %s", neg.room.room_id, neg.peer_id, neg.peer.close_reason
            )
            self._forget(neg)

    def _forget(self, neg: Negotiation) -> None:
        if self._pending.get(neg.peer_id) is neg:
            del self._pending[neg.peer_id]
        if neg.timer is not None:
            neg.timer.cancel()
            neg.timer = None

    def _drop(self, neg: Negotiation, reason: str) -> None:
        self._forget(neg)
        neg.tasks.cancel()
        neg.peer.on_open = None
        neg.peer.on_close = None
        self._close_peer(neg.peer, reason)

    def _close_peer(self, peer: Peer, reason: str) -> None:
        self._closing.spawn(peer.close(reason), "closing a negotiation's connection")

    def _spawn(self, neg: Negotiation, coro: Coroutine[Any, Any, Any]) -> None:
        neg.tasks.spawn(
            coro,
            "negotiation with %s: task",
            neg.peer_id,
            on_error=lambda _exc: self._drop(neg, "internal error"),
        )

    def _decrypt_failed(self, room: RoomSignaller, peer_id: str, what: str, exc: Exception) -> None:
        room.counters["dropped.decrypt_failed"] += 1
        if (room.room_id, peer_id) not in self._warned:
            self._warned.add((room.room_id, peer_id))
            # Trystero's onJoinError says the same: almost always a different password.
            log.warning(
                "room %s: cannot decrypt %s from %s (wrong room password?): %s",
                room.room_id,
                what,
                peer_id,
                exc,
            )
