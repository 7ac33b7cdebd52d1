"""WebTorrent tracker client: one WebSocket per tracker URL, spoken exactly as Trystero 0.25.4's
torrent strategy speaks it (spec §4), so browsers on the same trackers find us.

A tracker is not a topic pub/sub: peers *announce* an info_hash with a handful of SDP offers and
the tracker forwards each offer to one random member of that swarm; answers go back through the
tracker by peer id. So this class is not a :class:`~signaling.relays.base.Relay`; it has its own
small API shaped for the strategy that drives it. What does not depend on the tracker protocol
comes from :mod:`signaling.relays.base`, as for the relays: the lifecycle and reconnects from
:class:`~signaling.relays.base.ConnectionLifecycle` (same states, ``on_state``, ``Backoff`` and
supervisor as :class:`~signaling.relays.base.Relay`), the socket from
:class:`~signaling.relays.base.WebSocketLink` (shared with the nostr relay; none for a tracker
in this process, :mod:`signaling.relays.local`). SDPs are opaque
strings here: the strategy seals and opens them (AES-GCM, spec §1).

Public API
----------
::

    relay = TorrentRelay(url, peer_id=self_id)           # one per tracker URL, shared by rooms
    relay.on_offer = lambda info_hash, peer_id, offer_id, sealed_sdp: ...
    relay.on_answer = lambda info_hash, peer_id, offer_id, sealed_sdp: ...
    relay.on_state = lambda state: ...                   # connecting/connected/reconnecting/closed
    relay.set_announce(info_hash, offers_provider)       # join a swarm (any time, before/after start)
    await relay.start()                                  # returns at once; connects in the background
    relay.send_answer(info_hash, to_peer_id, offer_id, sealed_sdp) -> bool
    relay.announce_now(info_hash)                        # e.g. when an offer shows a new peer
    relay.remove(info_hash)                              # leave the swarm
    await relay.close()

``offers_provider()`` returns (or returns an awaitable of) the room's *current* offers, a sequence
of :class:`TorrentOffer` ``(offer_id, sealed_sdp)``; the relay calls it at every announce, only
while connected. The relay owns the announce cadence; the strategy owns the offer pool.

Wire (byte-compatible with ``@trystero-p2p/torrent`` 0.25.4; compact JSON, this field order)
--------------------------------------------------------------------------------------------
* announce: ``{"action":"announce","info_hash":IH,"peer_id":S,"numwant":3,"offers":[{"offer_id":
  ID,"offer":{"type":"offer","sdp":SEALED}}, …]}`` (at most ``policy.max_offers`` offers).
* passive announce: ``{"action":"announce","info_hash":IH,"peer_id":S,"left":0,"numwant":3,
  "offers":[]}``.
* answer: ``{"action":"announce","info_hash":IH,"peer_id":S,"answer":{"type":"answer","sdp":
  SEALED},"offer_id":ID,"to_peer_id":OFFERER}``.
* leaving a swarm (**not sent by JS**, our addition): ``{"action":"announce","info_hash":IH,
  "peer_id":S,"event":"stopped","numwant":0,"offers":[]}``. Without it the tracker keeps us in
  the swarm until the socket closes (bittorrent-tracker: up to 20 min), and every JS announce in
  that room would waste one of its three offers on us. ``announce_stopped=False`` turns it off.
* ``info_hash`` = :func:`signaling.crypto.torrent_info_hash` of the room's root topic (20 chars,
  sent as-is); ``peer_id`` = our selfId (20 chars). Both are checked to be 20 printable ASCII
  characters, as bittorrent-tracker takes them as binary strings.

Announce cadence, per room (spec §2.3, §4; the JS core's ``queueAnnounce`` + torrent module)
-------------------------------------------------------------------------------------------
* First announce as soon as the room is added (or the socket opens), then after 0.233, 0.533 and
  1.333 s (each capped by the current interval), then every interval.
* The interval is 10 s until the tracker names one; a reply's ``interval`` (seconds) becomes
  ``min(max(interval, 10), 120)`` (``policy.min_interval`` / ``max_interval``). A reply that
  arrives while we wait re-times the running wait (JS applies it one announce later, as its
  delay is fixed when the announce is sent; no difference on the wire beyond that one delay).
* Passive rooms: the passive shape, now and then every ``max(interval, 120 s)``.
* After every (re)connect, every room is announced at once (JS: ``onReconnect``); the warm-up is
  not restarted. ``announce_now`` announces at once, but at most once per
  ``ANNOUNCE_NOW_MIN_GAP_S`` per room and connection (a flood of remote offers must not turn into
  a flood of announces).
* Nothing is announced while disconnected (JS drops sends on a closed socket), so a tracker
  outage costs no offers.

Receiving (JS validates little; we drop and count, see ``counters``)
--------------------------------------------------------------------
Every text frame goes through, in order: ``dropped:not_json`` -> ``dropped:not_object`` ->
``failure reason`` (counted as ``failure``, logged, dropped: JS does the same) -> ``warning
message`` (counted as ``warning``, logged, processing continues) -> ``dropped:bad_action``
(an ``action`` other than ``announce``) -> ``dropped:unknown_room`` (``info_hash`` missing or not
one of ours) -> ``interval`` (a positive finite number, else ``bad_interval`` and ignored) ->
a frame without ``offer``/``answer`` is a reply (``reply``) -> ``dropped:bad_field`` (both offer
and answer; ``offer_id``/``peer_id`` not a 1..64-char string; ``offer``/``answer`` not an object
with a non-empty string ``sdp`` and, if present, the matching ``type``) -> ``dropped:oversize``
(sdp longer than ``max_sdp_chars``) -> ``dropped:own`` (our own peer_id) -> ``dropped:unknown_offer``
(an answer to an offer_id we never announced in that room on this tracker; JS drops these too,
one layer up) -> ``dropped:duplicate`` (same (info_hash, offer|answer, offer_id, peer_id) handled
less than 4 s ago, as JS; 0.22: the same offer_id ever, bounded) -> delivered
(``offers_received`` / ``answers_received``) to ``on_offer`` / ``on_answer``.

Decisions (JS behaviour in brackets)
------------------------------------
* Reconnect: ``random(0..p)``, p = 3.333 s doubling, capped at 60 s (:data:`TORRENT_BACKOFF`),
  and p restarts only after a connection that lived 10 s. [JS restarts p on every open and gives
  up for good at p = 60 s: a long-running server must not lose a tracker to a passing outage.]
* A tracker that accepts the socket but does not reply to an announce within ``reply_timeout``
  (15 s) is dropped and reconnected (``reply_timeout`` counter); a hung tracker or a dead path is
  also caught by the WebSocket heartbeat (ping every ``heartbeat`` s). A ``failure reason`` that
  names the room counts as a reply (the tracker is alive; reconnecting would not change its
  mind). [JS waits forever.]
* ``send_answer`` while disconnected returns False (counted ``answer_unsent``); nothing is
  queued: the offer will be stale by the time the socket is back. [JS drops it silently.]
* An offers provider that raises or exceeds ``offers_timeout`` skips that announce
  (``offers_failed``); the cadence continues. [JS: same, the core logs "announce failed".]

Bounded
-------
Rooms (``max_rooms``; ``set_announce`` raises beyond), offers per announce (``policy.max_offers``),
offer ids remembered per room for the answer check (LRU), the dedupe map (``DEDUPE_CAPACITY``,
oldest first; entries older than the window are pruned as they age), incoming frames
(``MAX_MESSAGE_BYTES``, larger ones drop the connection), the outbox (``_OUTBOX_HIGH_WATER``
characters; beyond it frames are dropped and counted ``send_backlog``), counters (fixed keys).
The link's reader yields to the loop every ``_READ_YIELD_EVERY`` frames (see
:mod:`~signaling.relays.base`). No threads: aiohttp on the
caller's loop, and IP-literal tracker URLs skip the resolver (host names use aiohttp's default
resolver, which may use the loop's executor for ``getaddrinfo``).

Driving it from the strategy
----------------------------
* One ``TorrentRelay`` per tracker URL (and wire version), shared by all rooms, with the
  session's selfId; route ``on_offer`` / ``on_answer`` to rooms by ``info_hash``.
* Per room, keep an offer pool (0.25: up to 3 outstanding offers, each kept until answered or
  120 s old, then replaced; the provider returns the current pool, so re-announces repeat the
  same offer_ids, as JS). Match ``on_answer`` to the pool by ``offer_id`` (the relay has
  already dropped answers to offer ids it never announced) and take that offer out of the pool.
* Who answers (spec §4): JS always has outstanding offers, so it answers an incoming offer only
  if its id is larger than the offerer's. Mirror it: answer iff our id > offerer id (or we have
  no outstanding offer in that room), via ``send_answer`` on the relay that delivered the offer.
  When we do not answer, call ``announce_now`` so our offers reach the newcomer soon rather than
  after the tracker interval (up to 120 s); a low-sorting selfId makes JS answer us at once.
* An offer whose window passed (4 s) is delivered again when the offerer re-announces the same
  offer_id: keep per-(peer, offer_id) state so one offer is answered once.

0.22 seam (spec §9.5)
---------------------
Everything that differs between wire versions sits in :class:`TorrentPolicy`: pass
``policy=TORRENT_022`` for Trystero 0.22 peers (numwant 10, up to 10 offers, every 33.333 s raised
by the tracker's interval up to 120.333 s, no warm-up, dedupe by offer_id forever). The frames are
the same. What 0.22 does above the relay is the provider's and strategy's business: fresh offers
at every announce, only answers to the latest announce's offer ids used, and every incoming
offer answered (no tie-break). One policy per relay: a session speaking both versions uses
one ``TorrentRelay`` per (version, URL).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeGuard

import aiohttp
import orjson

from signaling.bounded import LruDict, LruSet

from .base import (
    DEFAULT_CONNECT_TIMEOUT,
    Backoff,
    ConnectionLifecycle,
    check_websocket_url,
    describe,
)
from .local import make_link

__all__ = [
    "ANNOUNCE_NOW_MIN_GAP_S",
    "TORRENT_022",
    "TORRENT_025",
    "TORRENT_BACKOFF",
    "OffersProvider",
    "SignalCallback",
    "TorrentOffer",
    "TorrentPolicy",
    "TorrentRelay",
    "announce_message",
    "answer_message",
    "passive_announce_message",
    "stopped_message",
]

log = logging.getLogger(__name__)

TRACKER_ACTION = "announce"
ID_LENGTH = 20  # info_hash, peer_id, to_peer_id and Trystero's offer_id
MAX_OFFER_ID_LENGTH = 64  # what we accept from trackers (JS sends 20)
MAX_PEER_ID_LENGTH = 64
# A non-trickled SDP with every candidate, AES-GCM sealed and base64'd, is a few KiB.
DEFAULT_MAX_SDP_CHARS = 64 * 1024
# An announce carries at most 10 such offers (0.22); anything far larger is abuse.
MAX_MESSAGE_BYTES = 1024 * 1024
DEFAULT_MAX_ROOMS = 1024
DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_REPLY_TIMEOUT_S = 15.0
# JS gathers for at most 15 s before it gives up and sends what it has; a provider gets a bit more.
DEFAULT_OFFERS_TIMEOUT_S = 20.0
ANNOUNCE_NOW_MIN_GAP_S = 1.0
# Keys handled in the last dedupe window; at 4 s that is thousands of signals per second.
DEDUPE_CAPACITY = 4096
_OUTBOX_HIGH_WATER = 1024 * 1024
# Drops that happen in normal operation (JS re-sends the same offer ids on every announce).
_EXPECTED_DROPS = frozenset({"duplicate", "own"})

#: Trystero's makeSocket retry: random(0..p), p = 3333 ms doubling, capped (JS gives up there).
TORRENT_BACKOFF = Backoff(initial=3.333, factor=2.0, cap=60.0, jitter=1.0)


# ---------------------------------------------------------------------- policy (the 0.22 seam)


@dataclass(frozen=True)
class TorrentPolicy:
    """What differs between Trystero versions' torrent strategies (all times in seconds)."""

    name: str
    #: The ``numwant`` field (bittorrent-tracker ignores it and uses ``len(offers)``).
    numwant: int
    #: Offers per announce; a provider returning more is truncated (and logged).
    max_offers: int
    #: Delays after the first announce, each capped by the current interval.
    warmup: tuple[float, ...]
    #: Interval until the tracker names one.
    default_interval: float
    #: The tracker's ``interval`` is clamped to [min_interval, max_interval]...
    min_interval: float
    max_interval: float
    #: ...and, if True, only ever raises the current interval (0.22).
    interval_raise_only: bool
    #: Passive rooms announce every max(interval, passive_interval).
    passive_interval: float
    #: Dedupe window for (info_hash, kind, offer_id, peer_id); None = by offer_id alone, forever
    #: (bounded by ``DEDUPE_CAPACITY``), as 0.22 does.
    dedupe_window: float | None

    def __post_init__(self) -> None:
        if self.numwant < 0 or self.max_offers < 0:
            raise ValueError("numwant and max_offers must be >= 0")
        if not 0 < self.min_interval <= self.max_interval:
            raise ValueError("need 0 < min_interval <= max_interval")
        if self.default_interval <= 0 or self.passive_interval <= 0:
            raise ValueError("intervals must be > 0")
        if any(d < 0 for d in self.warmup):
            raise ValueError("warm-up delays must be >= 0")
        if self.dedupe_window is not None and self.dedupe_window <= 0:
            raise ValueError("dedupe_window must be > 0 or None")

    def next_interval(self, current: float, tracker_interval: float) -> float:
        """The steady delay after a tracker reply naming ``tracker_interval`` seconds."""
        clamped = min(max(tracker_interval, self.min_interval), self.max_interval)
        return max(current, clamped) if self.interval_raise_only else clamped


#: ``@trystero-p2p/torrent`` 0.25.4 (spec §2.3, §4).
TORRENT_025 = TorrentPolicy(
    name="0.25",
    numwant=3,
    max_offers=3,
    warmup=(0.233, 0.533, 1.333),
    default_interval=10.0,
    min_interval=10.0,
    max_interval=120.0,
    interval_raise_only=False,
    passive_interval=120.0,
    dedupe_window=4.0,
)

#: ``trystero`` 0.22.0 torrent (spec §9.5). Passive rooms do not exist there.
TORRENT_022 = TorrentPolicy(
    name="0.22",
    numwant=10,
    max_offers=10,
    warmup=(),
    default_interval=33.333,
    min_interval=33.333,
    max_interval=120.333,
    interval_raise_only=True,
    passive_interval=120.333,
    dedupe_window=None,
)


# ---------------------------------------------------------------------- frames


class TorrentOffer(NamedTuple):
    """One of our outstanding offers: its id (Trystero: 20 chars) and the sealed SDP."""

    offer_id: str
    sdp: str


OfferLike = TorrentOffer | tuple[str, str]
#: Returns the room's current offers, or an awaitable of them (None = no offers).
OffersProvider = Callable[[], Sequence[OfferLike] | Awaitable[Sequence[OfferLike]] | None]
SignalCallback = Callable[[str, str, str, str], None]  # (info_hash, peer_id, offer_id, sealed sdp)


def _dumps(obj: dict[str, Any]) -> str:
    # orjson keeps insertion order and writes compact JSON like JSON.stringify for these values.
    return orjson.dumps(obj).decode()


def announce_message(
    info_hash: str, peer_id: str, offers: Sequence[tuple[str, str]], numwant: int = 3
) -> str:
    """An active announce, exactly as ``@trystero-p2p/torrent`` 0.25.4 writes it."""
    return _dumps(
        {
            "action": TRACKER_ACTION,
            "info_hash": info_hash,
            "peer_id": peer_id,
            "numwant": numwant,
            "offers": [{"offer_id": oid, "offer": {"type": "offer", "sdp": sdp}} for oid, sdp in offers],
        }
    )


def passive_announce_message(info_hash: str, peer_id: str, numwant: int = 3) -> str:
    """A passive/dormant announce (no offers, ``left: 0``)."""
    return _dumps(
        {
            "action": TRACKER_ACTION,
            "info_hash": info_hash,
            "peer_id": peer_id,
            "left": 0,
            "numwant": numwant,
            "offers": [],
        }
    )


def answer_message(info_hash: str, peer_id: str, to_peer_id: str, offer_id: str, sdp: str) -> str:
    """An answer to ``to_peer_id``'s offer ``offer_id``, in Trystero's field order."""
    return _dumps(
        {
            "action": TRACKER_ACTION,
            "info_hash": info_hash,
            "peer_id": peer_id,
            "answer": {"type": "answer", "sdp": sdp},
            "offer_id": offer_id,
            "to_peer_id": to_peer_id,
        }
    )


def stopped_message(info_hash: str, peer_id: str) -> str:
    """Leave a swarm (standard WebTorrent ``event: stopped``; Trystero never sends it)."""
    return _dumps(
        {
            "action": TRACKER_ACTION,
            "info_hash": info_hash,
            "peer_id": peer_id,
            "event": "stopped",
            "numwant": 0,
            "offers": [],
        }
    )


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) != ID_LENGTH or not (value.isascii() and value.isprintable()):
        raise ValueError(f"{what} must be {ID_LENGTH} printable ASCII characters, got {value!r}")
    return value


def _is_short_str(value: object, limit: int) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= limit


# ---------------------------------------------------------------------- rooms


@dataclass(eq=False)
class _Room:
    info_hash: str
    provider: OffersProvider | None
    passive: bool
    interval: float
    #: Offer ids we announced here, for the answer check; sized for several announces' worth.
    announced: LruSet[str]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: announce_now() or a (re)connect asked for an announce before the timer is due.
    requested: bool = False
    #: Announces sent (selects the warm-up step).
    attempt: int = 0
    last_sent: float | None = None
    last_generation: int = -1
    task: asyncio.Task[None] | None = None
    reply_timer: asyncio.TimerHandle | None = None


class TorrentRelay(ConnectionLifecycle):
    """A Trystero-compatible connection to one WebTorrent tracker (see the module docstring).

    Owner contract (as :class:`~signaling.relays.base.ConnectionLifecycle`): set the callbacks
    and rooms at any time, ``await start()`` once, ``await close()`` at the end; call everything
    from the loop that runs the relay; callbacks run on that loop and must not block.
    ``start()`` never waits for the tracker. States: ``closed`` -> ``connecting`` ->
    ``connected`` (socket open) -> ``reconnecting`` -> ``connected`` ... -> ``closed``.
    ``close()`` closes the socket, so the tracker drops us from every swarm. Rooms survive
    ``close()``: a later ``start()`` announces them again.
    """

    _log = log
    _task_label = "torrent"
    _connect_errors = (OSError, TimeoutError, aiohttp.ClientError)

    def __init__(
        self,
        url: str,
        *,
        peer_id: str,
        policy: TorrentPolicy = TORRENT_025,
        backoff: Backoff | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reply_timeout: float | None = DEFAULT_REPLY_TIMEOUT_S,
        offers_timeout: float = DEFAULT_OFFERS_TIMEOUT_S,
        heartbeat: float | None = DEFAULT_HEARTBEAT_S,
        announce_stopped: bool = True,
        max_rooms: int = DEFAULT_MAX_ROOMS,
        max_sdp_chars: int = DEFAULT_MAX_SDP_CHARS,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_websocket_url(url, "tracker")
        _check_id(peer_id, "peer_id")
        if connect_timeout <= 0 or offers_timeout <= 0:
            raise ValueError("timeouts must be > 0")
        if reply_timeout is not None and reply_timeout <= 0:
            raise ValueError("reply_timeout must be > 0 or None")
        if max_rooms < 1 or max_sdp_chars < 1:
            raise ValueError("max_rooms and max_sdp_chars must be >= 1")
        super().__init__(url, backoff=backoff or TORRENT_BACKOFF, connect_timeout=connect_timeout)
        self._peer_id = peer_id
        self._policy = policy
        self._reply_timeout = reply_timeout
        self._offers_timeout = offers_timeout
        self._announce_stopped = announce_stopped
        self._max_rooms = max_rooms
        self._max_sdp_chars = max_sdp_chars
        self._clock = clock  # monotonic: dedupe window (the cadence uses the loop's clock)

        self.on_offer: SignalCallback | None = None
        self.on_answer: SignalCallback | None = None

        self._rooms: dict[str, _Room] = {}
        # Its outbox is bounded by _OUTBOX_HIGH_WATER characters (_send_frame).
        self._link = make_link(
            url,
            label="torrent",
            peer="tracker",
            logger=log,
            heartbeat=heartbeat,
            max_msg_size=MAX_MESSAGE_BYTES,
            ssl_context=ssl_context,
            on_text=self._on_text,
            on_binary=functools.partial(self._drop, "not_json", "binary frame"),
            on_lost=self._teardown,
        )
        # Bumped on every teardown, so timers and tasks of an old connection recognise it.
        self._generation = 0
        self._up = asyncio.Event()  # set while a connection is open

        # key -> time it was handled; oldest first == earliest first (a key is only ever added new).
        self._handled: LruDict[tuple[str, ...], float] = LruDict(DEDUPE_CAPACITY)
        # Rooms removed lately: the tracker's reply to our stopped announce (and offers already in
        # flight) still name them; those are expected, so they are counted as ``late``, not warned.
        self._removed: LruSet[str] = LruSet(64)
        # Fixed names only; nothing keyed by remote input.
        self._counters: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return f"<TorrentRelay {self._name} {self._state} rooms={len(self._rooms)}>"

    # ------------------------------------------------------------------ properties

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def policy(self) -> TorrentPolicy:
        return self._policy

    @property
    def rooms(self) -> tuple[str, ...]:
        """Info hashes announced on this tracker, in the order they were added."""
        return tuple(self._rooms)

    @property
    def counters(self) -> dict[str, int]:
        """What happened so far: ``announce``, ``announce_passive``, ``stopped``, ``answer_sent``,
        ``answer_unsent``, ``reply``, ``interval``, ``bad_interval``, ``failure``, ``warning``,
        ``offers_received``, ``answers_received``, ``offers_failed``, ``offers_invalid``,
        ``offers_truncated``, ``announce_skipped``, ``reply_timeout``, ``send_backlog``, ``late``
        (frames for a room removed lately), ``dropped:<reason>``."""
        return dict(self._counters)

    def interval(self, info_hash: str) -> float:
        """The room's current steady announce delay in seconds (warm-up aside)."""
        return self._rooms[info_hash].interval

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Begin connecting in the background; returns immediately."""
        await super().start()
        for room in self._rooms.values():
            self._start_room(room)

    # ------------------------------------------------------------------ rooms

    def set_announce(self, info_hash: str, offers: OffersProvider | None, *, passive: bool = False) -> None:
        """Announce ``info_hash`` on this tracker from now on (until ``remove``).

        ``offers`` is called at every active announce and returns the room's current offers
        (or an awaitable of them); ``None`` announces without offers. ``passive=True`` sends the
        passive shape on the slow passive cadence and never calls ``offers``. Calling it again
        for the same room replaces the provider; switching passive -> active announces at once
        (as JS does when a passive room wakes up).
        """
        _check_id(info_hash, "info_hash")
        room = self._rooms.get(info_hash)
        if room is None:
            if len(self._rooms) >= self._max_rooms:
                raise ValueError(f"{self._name}: already announcing {self._max_rooms} rooms")
            capacity = max(64, 8 * self._policy.max_offers)
            room = _Room(info_hash, offers, passive, self._policy.default_interval, LruSet(capacity))
            self._removed.discard(info_hash)
            self._rooms[info_hash] = room
            if self._task is not None:
                self._start_room(room)
            return
        woke = room.passive and not passive
        room.provider, room.passive = offers, passive
        if woke:
            self.announce_now(info_hash)

    def remove(self, info_hash: str) -> None:
        """Stop announcing ``info_hash``; offers and answers for it are dropped from now on."""
        room = self._rooms.pop(info_hash, None)
        if room is None:
            return
        self._removed.add(info_hash)
        if room.task is not None:
            room.task.cancel()
            room.task = None
        self._clear_reply_timer(room)
        # Only if this connection announced the room: otherwise the tracker has not heard of us.
        announced_here = self._link.connected and room.last_generation == self._generation
        if (
            self._announce_stopped
            and announced_here
            and self._send_frame(stopped_message(info_hash, self._peer_id))
        ):
            self._counters["stopped"] += 1

    def announce_now(self, info_hash: str) -> None:
        """Announce the room as soon as possible (at most once per ANNOUNCE_NOW_MIN_GAP_S per
        connection); e.g. after an offer revealed a peer our offers should reach. No-op for an
        unknown room."""
        room = self._rooms.get(info_hash)
        if room is None:
            return
        room.requested = True
        room.wake.set()

    # ------------------------------------------------------------------ answers

    def send_answer(self, info_hash: str, to_peer_id: str, offer_id: str, sdp: str) -> bool:
        """Send our answer to ``to_peer_id``'s offer ``offer_id`` through this tracker (the one
        that delivered the offer). Returns False if it could not go out now (not connected,
        room removed meanwhile, outbox full); nothing is queued."""
        _check_id(to_peer_id, "to_peer_id")
        if not _is_short_str(offer_id, MAX_OFFER_ID_LENGTH):
            raise ValueError(f"offer_id must be a 1..{MAX_OFFER_ID_LENGTH}-character string")
        if not isinstance(sdp, str) or not sdp:
            raise ValueError("sdp must be a non-empty string")
        if info_hash not in self._rooms or not self._link.connected:
            self._counters["answer_unsent"] += 1
            return False
        if not self._send_frame(answer_message(info_hash, self._peer_id, to_peer_id, offer_id, sdp)):
            self._counters["answer_unsent"] += 1
            return False
        self._counters["answer_sent"] += 1
        return True

    # ------------------------------------------------------------------ lifecycle hooks

    async def _connect(self) -> None:
        await self._link.open()

    def _on_connected(self) -> None:
        self._up.set()
        # JS re-announces every topic as soon as a socket (re)opens.
        for room in self._rooms.values():
            room.requested = True
            room.wake.set()

    async def _wait_disconnected(self) -> None:
        await self._link.wait_closed()

    def _abort_connection(self) -> None:
        self._teardown()

    def _detach_tasks(self) -> list[asyncio.Task[None]]:
        tasks = [r.task for r in self._rooms.values() if r.task is not None]
        for room in self._rooms.values():
            room.task = None
        return tasks

    async def _shutdown(self) -> None:
        if not await self._link.drain():  # e.g. a stopped announce from remove()
            log.info("%s: tracker did not take our last frames in time; closing anyway", self._name)
        self._teardown()
        await self._link.release()

    def _teardown(self) -> None:
        """Forget the current connection at once and close it in the background. Idempotent."""
        if self._link.drop():
            self._generation += 1
        self._up.clear()
        for room in self._rooms.values():
            self._clear_reply_timer(room)

    # ------------------------------------------------------------------ announcing

    def _start_room(self, room: _Room) -> None:
        room.task = asyncio.create_task(self._run_room(room), name=f"torrent room {room.info_hash}")

    async def _run_room(self, room: _Room) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._up.wait()
                await self._announce(room)
                await self._wait_next(room, loop)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not end the room silently
            log.exception("%s: announcer of %s failed", self._name, room.info_hash)

    def _delay(self, room: _Room) -> float:
        if room.passive:
            return max(room.interval, self._policy.passive_interval)
        warmup = self._policy.warmup
        if room.attempt - 1 < len(warmup):
            return min(room.interval, warmup[room.attempt - 1])
        return room.interval

    async def _wait_next(self, room: _Room, loop: asyncio.AbstractEventLoop) -> None:
        """Sleep until the next announce is due, a (re)connect or announce_now asks for one, or
        the interval changed (then recompute)."""
        while True:
            base = room.last_sent if room.last_sent is not None else loop.time()
            due = base + self._delay(room)
            if room.requested:
                # A new connection announces at once; on the same one, announce_now is rate-limited.
                if room.last_generation != self._generation or room.last_sent is None:
                    return
                due = min(due, room.last_sent + ANNOUNCE_NOW_MIN_GAP_S)
            remaining = due - loop.time()
            if remaining <= 0:
                return
            room.wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await room.wake.wait()
            except TimeoutError:
                return

    async def _announce(self, room: _Room) -> None:
        room.requested = False
        if room.passive:
            frame = passive_announce_message(room.info_hash, self._peer_id, self._policy.numwant)
            offers: list[TorrentOffer] = []
        else:
            got = await self._collect_offers(room)
            if got is None:
                self._mark_attempt(room)
                return
            offers = got
            frame = announce_message(room.info_hash, self._peer_id, offers, self._policy.numwant)
        if not self._link.connected or self._rooms.get(room.info_hash) is not room:
            # Lost the connection (or the room) while the offers were made: the reconnect
            # announces again; nothing is queued.
            self._counters["announce_skipped"] += 1
            return
        if not self._send_frame(frame):
            self._mark_attempt(room)
            return
        self._counters["announce_passive" if room.passive else "announce"] += 1
        for offer in offers:
            room.announced.add(offer.offer_id)
        self._mark_attempt(room)
        room.last_generation = self._generation
        self._arm_reply_timer(room)

    def _mark_attempt(self, room: _Room) -> None:
        room.attempt += 1
        room.last_sent = asyncio.get_running_loop().time()

    async def _collect_offers(self, room: _Room) -> list[TorrentOffer] | None:
        provider = room.provider
        if provider is None:
            return []
        try:
            result = provider()
            if inspect.isawaitable(result):
                async with asyncio.timeout(self._offers_timeout):
                    result = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._counters["offers_failed"] += 1
            self._link.warn_once(
                "offers_failed", "%s: no offers for %s: %s", self._name, room.info_hash, describe(exc)
            )
            return None
        offers: list[TorrentOffer] = []
        for item in result or ():
            offer_id: object
            sdp: object
            try:
                offer_id, sdp = item
            except (TypeError, ValueError):
                offer_id = sdp = None
            if not _is_short_str(offer_id, MAX_OFFER_ID_LENGTH) or not isinstance(sdp, str) or not sdp:
                self._counters["offers_invalid"] += 1
                log.error(
                    "%s: offers provider of %s returned an invalid offer: %.80r",
                    self._name,
                    room.info_hash,
                    item,
                )
                continue
            offers.append(TorrentOffer(offer_id, sdp))
        if len(offers) > self._policy.max_offers:
            self._counters["offers_truncated"] += 1
            self._link.warn_once(
                "offers_truncated",
                "%s: %d offers for %s, announcing the first %d",
                self._name,
                len(offers),
                room.info_hash,
                self._policy.max_offers,
            )
            del offers[self._policy.max_offers :]
        return offers

    def _arm_reply_timer(self, room: _Room) -> None:
        if self._reply_timeout is None or room.reply_timer is not None:
            return
        room.reply_timer = asyncio.get_running_loop().call_later(
            self._reply_timeout, self._reply_overdue, room, self._generation
        )

    def _clear_reply_timer(self, room: _Room) -> None:
        if room.reply_timer is not None:
            room.reply_timer.cancel()
            room.reply_timer = None

    def _reply_overdue(self, room: _Room, generation: int) -> None:
        room.reply_timer = None
        if generation != self._generation or not self._link.connected:
            return
        self._counters["reply_timeout"] += 1
        log.warning(
            "%s: no reply to an announce of %s within %.1f s; the tracker is not answering, reconnecting",
            self._name,
            room.info_hash,
            self._reply_timeout,
        )
        self._teardown()

    # ------------------------------------------------------------------ socket I/O

    def _send_frame(self, frame: str) -> bool:
        if not self._link.connected:
            return False
        if self._link.backlog >= _OUTBOX_HIGH_WATER:
            self._counters["send_backlog"] += 1
            self._link.warn_once(
                "send_backlog", "%s: outbox full (stalled link?); dropping frames", self._name
            )
            return False
        self._link.send(frame)
        return True

    # ------------------------------------------------------------------ inbound

    def _on_text(self, data: str) -> None:
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._drop("not_json")
            return
        if not isinstance(msg, dict):
            self._drop("not_object")
            return
        try:
            self._on_message(msg)
        except Exception:  # remote input must never take the connection down
            log.exception("%s: failed to handle a tracker message", self._name)
            self._drop("bad_field", "handler error")

    def _on_message(self, msg: dict[str, Any]) -> None:
        failure = msg.get("failure reason")
        if failure:
            self._counters["failure"] += 1
            self._link.warn_once(
                "failure",
                "%s: tracker failure: %.200s (info_hash %.40r)",
                self._name,
                str(failure),
                msg.get("info_hash"),
            )
            # A refusal naming one of our rooms is still an answer: the tracker is alive, and
            # reconnecting would not change its mind.
            info_hash = msg.get("info_hash")
            refused = self._rooms.get(info_hash) if isinstance(info_hash, str) else None
            if refused is not None:
                self._clear_reply_timer(refused)
            return
        warning = msg.get("warning message")
        if warning:
            self._counters["warning"] += 1
            self._link.warn_once("warning", "%s: tracker warning: %.200s", self._name, str(warning))
        action = msg.get("action", TRACKER_ACTION)
        if action != TRACKER_ACTION:
            self._drop("bad_action", f"{action!r:.40}")
            return
        info_hash = msg.get("info_hash")
        room = self._rooms.get(info_hash) if isinstance(info_hash, str) else None
        if room is None:
            if isinstance(info_hash, str) and info_hash in self._removed:
                self._counters["late"] += 1
            else:
                self._drop("unknown_room", f"{info_hash!r:.40}")
            return
        has_offer, has_answer = "offer" in msg, "answer" in msg
        if "interval" in msg:
            self._on_interval(room, msg["interval"])
        if not (has_offer or has_answer):
            self._counters["reply"] += 1
            self._clear_reply_timer(room)
            return
        if has_offer and has_answer:
            self._drop("bad_field", "both offer and answer")
            return
        kind = "offer" if has_offer else "answer"
        peer_id, offer_id, payload = msg.get("peer_id"), msg.get("offer_id"), msg[kind]
        if not _is_short_str(peer_id, MAX_PEER_ID_LENGTH) or not _is_short_str(offer_id, MAX_OFFER_ID_LENGTH):
            self._drop("bad_field", "peer_id or offer_id")
            return
        sdp = payload.get("sdp") if isinstance(payload, dict) else None
        if not isinstance(sdp, str) or not sdp or payload.get("type", kind) != kind:
            self._drop("bad_field", f"{kind} is not {{type, sdp}}")
            return
        if len(sdp) > self._max_sdp_chars:
            self._drop("oversize", f"{kind} sdp of {len(sdp)} chars")
            return
        if peer_id == self._peer_id:
            self._drop("own")
            return
        if kind == "answer" and offer_id not in room.announced:
            self._drop("unknown_offer", f"{offer_id!r:.40}")
            return
        if self._seen(room.info_hash, kind, offer_id, peer_id):
            self._drop("duplicate")
            return
        self._counters["offers_received" if has_offer else "answers_received"] += 1
        callback = self.on_offer if has_offer else self.on_answer
        if callback is None:
            return
        try:
            callback(room.info_hash, peer_id, offer_id, sdp)
        except Exception:
            log.exception("%s: on_%s callback failed", self._name, kind)

    def _on_interval(self, room: _Room, value: object) -> None:
        # JS: `if (interval && ...)`, so 0 is silently ignored; a non-number would make JS's
        # setTimeout fire at once (NaN), so we refuse it instead.
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            self._counters["bad_interval"] += 1
            self._link.warn_once("bad_interval", "%s: ignored tracker interval %.40r", self._name, value)
            return
        if value == 0:
            return
        new = self._policy.next_interval(room.interval, float(value))
        self._counters["interval"] += 1
        if new != room.interval:
            log.debug(
                "%s: %s announce interval %.1f s -> %.1f s", self._name, room.info_hash, room.interval, new
            )
            room.interval = new
            room.wake.set()  # the running wait recomputes its deadline

    def _seen(self, info_hash: str, kind: str, offer_id: str, peer_id: str) -> bool:
        """Dedupe as JS does; records the signal as handled when it is new (or its window expired)."""
        window = self._policy.dedupe_window
        handled = self._handled
        if window is None:  # 0.22: by offer_id alone, for as long as the map remembers it
            key: tuple[str, ...] = (offer_id,)
            if key in handled:
                return True
            handled[key] = 0.0
        else:
            now = self._clock()
            while (oldest := handled.oldest()) is not None:  # forget what aged out of the window
                if now - oldest[1] < window:
                    break
                handled.pop(oldest[0])
            key = (info_hash, kind, offer_id, peer_id)
            if key in handled:
                return True
            handled[key] = now
        return False

    def _drop(self, reason: str, detail: str = "") -> None:
        self._counters[f"dropped:{reason}"] += 1
        if reason in _EXPECTED_DROPS:
            log.debug("%s: dropped a tracker message (%s)", self._name, reason)
            return
        self._link.warn_once(
            f"dropped:{reason}", "%s: dropped a tracker message (%s) %s", self._name, reason, detail
        )
