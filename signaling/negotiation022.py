"""Trystero 0.22 at the strategy/session seam: what a room on ``wire="0.22"`` does differently.

The byte layer lives in :mod:`signaling.wire.v022`; its capability flags and ``PROFILE`` say how
the protocol around it differs from 0.25 (spec §9). Everything below reads those flags, so the
session and room code stay one copy for both wires:

Connections (:class:`~signaling.wire.interface.WireTraits`, :func:`context_key`)
    0.25 shares one RTCPeerConnection per (app id, remote peer) between rooms (room frames,
    presence frames, ``@_hsready`` admission per room). 0.22 has none of that: one connection per
    (room, remote peer), bare action chunks, a peer is active once its channel opens. The session
    gets this by giving every 0.22 room its *own* :class:`~signaling.session.AppContext` (its
    own negotiator and links, keyed by :func:`context_key`), i.e. the scope of connection
    sharing shrinks to one room; the session branches on the wire's traits only where a
    concept is missing (no presence frames, no admission, no idle grace, finish every chunk run).

Signalling (:class:`RoomSignaller022`, :class:`Negotiator022`)
    Object-shaped offers/answers without offer ids, no ``candidate`` messages, no announce-reply
    leader rule, glare won by the *larger* id, announces every 5.333 s from the start. Who offers:
    JS 0.22 offers to every peer it hears and, in glare, keeps the larger id's offer. We follow
    the same glare rule up front, which avoids wasted offers: if our id is larger we offer (JS
    answers us even while its own offer is pending); if it is smaller we publish ``{"peerId":S}``
    to the peer's self topic, which JS takes for an announcement and answers with an offer at
    once (spec §9.9), and we answer that. Either way a JS offer that reaches us first is answered
    (glare rule), and we answer at most one offer per peer at a time: the newest one on its
    relay. JS sends two when it handles two announcements from us at once (our announce and our
    request), and applies our answer to the one it made last, so an answer waits a moment
    (:data:`NEWER_OFFER_WAIT`) and a newer offer on the same relay replaces the one being
    answered until it is sent (:func:`_superseded_by`, issue 11).

    Timing (spec §9.9): JS destroys its pending offer 4.8 s after sending it unless the channel is
    open, so an answering negotiation is given up shortly after that; our own offer waits
    ``Timeouts.offer`` (30 s by default; JS may gather for up to 5 s before answering) and is sent
    once, on one relay: JS answers every copy of an offer with a new connection.

Announce cadence (:func:`cadence_timeouts`)
    ``Timeouts.announce_*`` left at their (0.25) defaults follow the room's wire: 0.22 announces
    right after subscribing, then every 5.333 s, without warm-up.

Peers speaking the other wire are screened by :class:`~signaling.foreign_wire.ForeignWireWatch`
in both signallers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from signaling import crypto
from signaling.bounded import LruDict
from signaling.errors import DecryptError
from signaling.limits import Timeouts
from signaling.signaller import Negotiation, Negotiator, RoomSignaller, Signal
from signaling.wire import v022
from signaling.wire.interface import Wire

log = logging.getLogger(__name__)

__all__ = [
    "ContextKey",
    "Negotiator022",
    "RoomSignaller022",
    "announce_delays",
    "cadence_timeouts",
    "context_key",
    "negotiator_class",
]

#: Session key of an AppContext: the app id where connections are shared per app (0.25), or
#: (app id, wire, room id) where every room has its own connections (0.22).
ContextKey = str | tuple[str, str, str]

#: Peers we asked for an offer recently (smaller-id side), remembered to ask each at most once
#: per announce interval; oldest forgotten beyond this.
_ASKED_CAPACITY = 256
#: After JS's pending-offer TTL, how long we still wait for the channel of an offer we answered
#: (ICE checks already under way when JS gives up still fail; this only covers clock skew).
ANSWER_GRACE = 1.0
#: How long our own offer waits for its answer: JS gathers for up to 5 s before it answers
#: (spec §9.9: wait at least 10 s). Shorter than 0.25's 30 s because an offer is never re-sent
#: here: after this the next announcement from the peer starts a fresh one.
OFFER_WAIT = 12.0
#: How long after an offer arrives our answer to it is sent at the earliest (topic relays). A JS
#: peer that handles two announcements from us at once creates two offers within milliseconds,
#: but they reach us up to ~50 ms apart (nostr: each event is signed after the offer is
#: recorded as pending), and JS applies our answer to whichever it recorded last. A newer offer
#: in this time replaces the one being answered (:func:`_superseded_by`); aiortc's work on the
#: answer runs meanwhile, so this costs a join only what is left of it.
NEWER_OFFER_WAIT = 0.25

_DEFAULT_TIMEOUTS = Timeouts()


def context_key(app_id: str, room_id: str, wire: Wire) -> ContextKey:
    """Which AppContext of a session serves ``room_id`` of ``app_id`` (see :data:`ContextKey`)."""
    if wire.shared_connections:
        return app_id
    return (app_id, wire.version, room_id)


def cadence_timeouts(timeouts: Timeouts, wire: Wire) -> Timeouts:
    """``timeouts`` with the wire's announce cadence where the caller left the 0.25 defaults."""
    cadence = wire.cadence
    if cadence is None:
        return timeouts
    changes: dict[str, Any] = {}
    if timeouts.announce_warmup == _DEFAULT_TIMEOUTS.announce_warmup:
        changes["announce_warmup"] = tuple(cadence.warmup)
    if timeouts.announce_interval == _DEFAULT_TIMEOUTS.announce_interval:
        changes["announce_interval"] = cadence.interval
    return dataclasses.replace(timeouts, **changes) if changes else timeouts


def announce_delays(timeouts: Timeouts, count: int) -> list[float]:
    """The first ``count`` waits between announces, as the announce loop computes them."""
    warmup = timeouts.announce_warmup
    return [warmup[i] if i < len(warmup) else timeouts.announce_interval for i in range(count)]


# ------------------------------------------------------------------------------------ signalling


class RoomSignaller022(RoomSignaller):
    """A room's relay side on the 0.22 wire: 0.22 parsing, 0.22 cadence, foreign-wire screening."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["timeouts"] = cadence_timeouts(kwargs["timeouts"], v022.WIRE)
        kwargs["wire"] = v022.WIRE_VERSION
        super().__init__(**kwargs)

    def _on_text(self, url: str, topic: str, text: str) -> None:
        if self._stopped:
            return
        self.counters["signals_in"] += 1
        parsed = v022.parse_relay_payload(
            text,
            self.self_id,
            max_bytes=self._limits.max_signal_bytes,
            max_peer_id_length=self._limits.max_peer_id_length,
        )
        peer_id = None if isinstance(parsed, str) else parsed.peer_id
        # A 0.25 string offer/answer, or a 0.25 candidate (0.22 reads it as an announcement).
        suspicious = parsed == "relay_foreign_shape" or (
            not isinstance(parsed, str) and parsed.is_announcement
        )
        if self.strangers.screen(text, peer_id, suspicious=suspicious):
            return
        if isinstance(parsed, str):
            self._count_drop(url, parsed)
            return
        negotiator = self._negotiator
        assert isinstance(negotiator, Negotiator022)
        try:
            negotiator.handle_022(self, url, parsed, on_root=topic == self.root_topic)
        except Exception:
            self.counters["dropped.internal_error"] += 1
            log.exception("room %s: error handling a signal from %s", self.room_id, parsed.peer_id)


class Negotiator022(Negotiator):
    """0.22 offer/answer for the one room of a 0.22 AppContext (see the module docstring).

    Reuses the base class's bookkeeping (caps, rate limits, eviction, timers, hand-over of an
    open channel to the session) and replaces the protocol: who offers, message shapes, glare.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._asked: LruDict[str, float] = LruDict(_ASKED_CAPACITY)
        profile = v022.PROFILE
        self._answer_ttl = min(self._timeouts.connect, profile.pending_offer_ttl + ANSWER_GRACE)
        self._offer_ttl = min(self._timeouts.offer, OFFER_WAIT)

    def handle(self, room: RoomSignaller, url: str, sig: Signal) -> None:
        """Base entry point, used by the torrent signaller (a tracker-forwarded offer, which has
        an id to answer to); topic relays' signals come through :meth:`handle_022`."""
        relay_signal = v022.RelaySignal(sig.peer_id, sig.offer, sig.answer)
        self.handle_022(room, url, relay_signal, on_root=True, offer_id=sig.offer_id or "")

    def handle_022(
        self, room: RoomSignaller, url: str, sig: v022.RelaySignal, *, on_root: bool, offer_id: str = ""
    ) -> None:
        peer_id = sig.peer_id
        if not self._wants_signal_from(peer_id, room):
            return
        neg = self._pending.get(peer_id)
        if sig.offer is not None:
            self._on_offer_022(room, url, peer_id, sig.offer, neg, offer_id)
        elif sig.answer is not None:
            self._on_answer_022(room, peer_id, sig.answer, neg)
        else:
            self._on_announcement_022(room, url, peer_id, neg, on_root)

    # ------------------------------------------------------------------ announcements

    def _on_announcement_022(
        self, room: RoomSignaller, url: str, peer_id: str, neg: Negotiation | None, on_root: bool
    ) -> None:
        if neg is not None:
            return  # offering or answering already; an offer is never re-sent (see _send_offer)
        if v022.wins_glare(self.self_id, peer_id):
            # Our offer is the one both sides keep in glare: JS answers it even if it has sent
            # us one of its own (which we then ignore).
            self._start_offer(room, url, peer_id)
            return
        if not on_root:
            # Only ask peers heard on the root topic: a {"peerId"} on our self topic is someone
            # asking *us* (a 0.25 peer's announce-reply, or a smaller Python 0.22 peer), and
            # asking back would ping-pong. JS 0.22 never sends one.
            return
        now = time.monotonic()
        last = self._asked.get(peer_id)
        if last is not None and now - last < v022.PROFILE.pending_offer_ttl:
            return  # JS offers at most once per relay per pending-offer TTL anyway
        if not self._reply_budget.take():
            room.counters["dropped.reply_rate_limited"] += 1
            return
        self._asked[peer_id] = now
        # "Please offer me": JS 0.22 takes any {"peerId"} as an announcement and offers at once.
        room.signal(url, peer_id, {"peerId": self.self_id})

    def _new_offer_id(self) -> str:
        return ""  # 0.22 offers carry no id

    def _outgoing_offer_sdp(self, sdp: str) -> str:
        # JS removes this line before sending; harmless either way, but keeps us looking like 0.22.
        return v022.strip_trickle_option(sdp)

    def _send_offer(self, neg: Negotiation, url: str) -> None:
        if neg.offer_sealed is None:
            neg.waiting_relays.add(url)
            return
        if neg.sent_on:
            # Once, on one relay: JS answers *every* offer it receives with a new connection, and
            # matches answers to its offers by (sender, relay) only.
            return
        neg.sent_on[url] = time.monotonic()
        neg.room.signal(url, neg.peer_id, {"peerId": self.self_id, "offer": _sdp("offer", neg.offer_sealed)})
        log.debug("room %s: 0.22 offer sent to %s via %s", neg.room.room_id, neg.peer_id, url)

    # ------------------------------------------------------------------ offers and answers

    def _on_offer_022(
        self, room: RoomSignaller, url: str, peer_id: str, sealed: str, neg: Negotiation | None, offer_id: str
    ) -> None:
        if neg is not None:
            if neg.role == "answerer":
                if not _superseded_by(neg, url):
                    return  # one answer per peer at a time; see _superseded_by for the exception
            elif neg.answered:
                return  # JS answered our offer; ICE is running
            elif v022.wins_glare(self.self_id, peer_id):
                room.counters["glare_ignored"] += 1
                return  # glare: the larger id's offer (ours) stands; JS answers it
        try:
            sdp = crypto.decrypt(room.key, sealed)
        except DecryptError as exc:
            # 0.22 has no password handshake: a wrong password shows only here (spec §9.6).
            self._decrypt_failed(room, peer_id, "offer", exc)
            return
        if neg is not None:
            if neg.role == "answerer":
                room.counters["offers_superseded"] += 1
                log.debug("room %s: a newer offer from %s replaces the one answered", room.room_id, peer_id)
                self._drop(neg, "superseded by a newer offer")
            else:
                self._drop(neg, "glare: answering the remote offer")
        if not self._admit_new(room):
            return
        peer = self._links.make_peer(False, peer_id)
        # Topic relays' offers carry no id; a tracker-forwarded one does, and the answer names it.
        neg = Negotiation(peer_id, "answerer", peer, room, offer_id, answer_relay=url)
        # JS drops its offer 4.8 s after sending it unless the channel is open by then.
        self._register(neg, self._answer_ttl)
        self._spawn(neg, self._answer(neg, sdp))

    async def _accept(self, neg: Negotiation, sdp: str) -> str | None:
        started = time.monotonic()
        answer = await super()._accept(neg, sdp)
        elapsed = time.monotonic() - started
        if answer is not None and not neg.offer_id:
            # Topic relays: give a newer offer from the peer time to arrive and replace this one
            # (NEWER_OFFER_WAIT). Tracker-forwarded offers are answered by id: no such doubt.
            await asyncio.sleep(neg.created + NEWER_OFFER_WAIT - time.monotonic())
        if answer is not None and elapsed > v022.PROFILE.pending_offer_ttl / 2:
            # Typically a STUN server that does not answer (aioice waits 5 s for it): JS gives
            # up on its offer 4.8 s after sending it, so this answer is probably too late.
            log.warning(
                "room %s: answering %s took %.1f s; Trystero 0.22 waits %.1f s at most "
                "(use reachable STUN servers or none)",
                neg.room.room_id,
                neg.peer_id,
                elapsed,
                v022.PROFILE.pending_offer_ttl,
            )
        return answer

    def _answer_payload(self, neg: Negotiation, answer: str) -> dict[str, Any]:
        sealed = crypto.encrypt(neg.room.key, v022.strip_trickle_option(answer))
        return {"peerId": self.self_id, "answer": _sdp("answer", sealed)}

    def _on_answer_022(self, room: RoomSignaller, peer_id: str, sealed: str, neg: Negotiation | None) -> None:
        if neg is None or neg.role != "offerer" or neg.answered or neg.offer_sealed is None:
            # Also what a JS answer to an offer we already abandoned looks like (no offer ids).
            room.counters["dropped.unexpected_answer"] += 1
            return
        try:
            sdp = crypto.decrypt(room.key, sealed)
        except DecryptError as exc:
            self._decrypt_failed(room, peer_id, "answer", exc)
            return
        neg.answered = True
        self._arm(neg, self._timeouts.connect)
        self._spawn(neg, self._apply_answer(neg, sdp))


def _superseded_by(neg: Negotiation, url: str) -> bool:
    """Whether a new offer from the peer we are answering in ``neg``, received via ``url``,
    replaces the offer being answered.

    Trystero 0.22 keeps one pending offer per (peer, relay) and applies any answer from that
    peer on that relay to it, without an offer id (spec §9.2). It checks for a pending offer
    before an ``await`` and records the new one after, so two announcements from us handled
    together (issue 11: our announce and our offer request) make it send two offers, and the
    second is the pending one: an answer to the first is applied to it, which leaves both dead
    (ICE checks with the other offer's credentials) until JS prunes them 4.8 s later. The first
    is never answered or destroyed; only the newest can connect. So the newest offer on the
    relay wins until our answer is sent, which waits :data:`NEWER_OFFER_WAIT` for it. Once it is
    sent, the older negotiation stays: JS either took our answer for its first offer before it
    made the second (that connection is coming up, and JS ignores relay messages from us once it
    is open), or they crossed, and then JS's newest offer holds our answer and cannot take another.

    An offer via another relay never replaces ours: JS keeps a pending offer per relay, any of
    them can connect, and the first open channel wins. The same goes for tracker-forwarded
    offers (torrent): JS answers by offer id, but only its latest announce's ids on each tracker.
    """
    return not neg.answered and url == neg.answer_relay


def _sdp(kind: str, sealed: str) -> dict[str, str]:
    """0.22's description object: only the SDP is encrypted, ``type`` is plaintext."""
    return {"type": kind, "sdp": sealed}


def negotiator_class(wire: Wire) -> type[Negotiator]:
    """The negotiator for a wire."""
    return Negotiator022 if wire is v022.WIRE else Negotiator
