"""Nostr relay: one NIP-01 WebSocket connection (aiohttp client), spoken the way Trystero 0.25's
nostr strategy speaks it (spec §5), so browsers on the same public relays hear us.

Wire (byte-compatible with ``@trystero-p2p/nostr`` 0.25.4)
----------------------------------------------------------
* Keys: a secp256k1 key pair (:class:`NostrKeys`); ``pubkey`` is the 32-byte x-only key in hex and
  signatures are BIP-340 Schnorr (libsecp256k1 via ``coincurve``) over the 32-byte event id.
  Trystero uses one pair per JS realm; by default every :class:`NostrRelay` of this process shares
  one too (:func:`process_keys`), pass ``keys=`` to scope it differently.
* Publishing ``text`` on topic T sends ``["EVENT",{kind,tags,created_at,content,pubkey,id,sig}]``
  in that field order, compact JSON with non-ASCII kept raw (orjson == ``JSON.stringify`` for
  these values): ``kind = nostr_kind(T)``, ``tags = [["x",T]]``, ``created_at`` = unix seconds at
  the moment the event goes to the socket (queued messages are signed when flushed, not stale).
* Subscribing: all topics go into ``["REQ",<64-char id>,{"kinds":[unique kinds],"since":S,
  "#x":[topics]}]``, up to 250 topics per REQ (one sub id per chunk, reused), re-sent whenever the
  topic set changes (coalesced per loop iteration, as Trystero's ``setTimeout(0)`` batcher) and
  after every reconnect; surplus sub ids get ``["CLOSE",id]``, all of them when no topic remains.
  A subscription counts as acknowledged on ``EOSE``; none within ``connect_timeout`` means the
  relay is not answering, so the connection is dropped and re-made.
* ``since``: Trystero sends its current time. We send ``now - since_slack`` (default 60 s): relays
  apply ``since`` to live events too, so an exact ``now`` would silently hide peers whose clock
  runs behind ours; the slack also lets relays that keep ephemeral events briefly hand us the
  last announce of each peer (one steady announce interval). Replays are removed by the event-id
  dedupe. Our own ``created_at`` must not be older than a browser's ``since``: keep the clock
  NTP-synced.

Receiving ``["EVENT",subId,ev]`` (Trystero checks nothing; we drop and count, see ``counters``)
------------------------------------------------------------------------------------------------
``unknown_sub`` (not one of our sub ids) -> ``malformed`` (field types / hex shapes) ->
``no_topic`` (no ``x`` tag; the first one is the topic, as in Trystero) -> ``wrong_kind`` (kind
is not ``nostr_kind(topic)``) -> ``bad_id`` (id is not the NIP-01 hash) -> ``unsubscribed`` ->
``duplicate`` (id already in the ``seen`` LRU) -> ``bad_sig`` (BIP-340 check) -> delivered as
``on_message(topic, content)``. The id is only remembered after the signature verified, so a
forged copy arriving first cannot suppress the genuine event. Our own events come back like
anyone's (as with MQTT); the strategy drops them by peerId.

Relay answers (decisions; Trystero's behaviour in brackets)
-----------------------------------------------------------
* ``OK true`` (also ``duplicate:``): counted; if it acknowledges one of our announces, it
  clears the rate-limit escalation. [Same.]
* ``OK false "rate-limited:..."``: announces are paused for 60 s, doubling per repeated episode up
  to 15 min, reset as above or after 15 quiet minutes. Rejections arriving while a pause runs
  (events already in flight) do not escalate it. An *announce* is a publish to a topic we are
  subscribed to (the root topic: the only topic both published and subscribed by Trystero's
  topic strategy); signals to other peers' self topics still go out. Suppressed announces are
  dropped and counted (``announce_suppressed``); :attr:`NostrRelay.announce_backoff` tells the
  strategy how long the pause lasts. [Same, except JS doubles on every rejection.]
* ``CLOSED`` for one of our subscriptions, or ``OK false`` with a policy reason (``blocked:``,
  ``restricted:``, ``auth-required:``, ``pow:``, ``mute:``): the relay will not serve us as we
  are. We log, drop the connection and reconnect no sooner than 60 s later, doubling per
  repeated episode up to 15 min, starting over after 15 quiet minutes. [JS closes the relay for
  good: too brittle for a long-running server, where a relay restart or a passing policy glitch
  would cost that relay until the process restarts.]
* Any other ``OK false`` (``invalid:``, ``error:``, unknown text): that one event was refused
  (e.g. a large SDP over the relay's size limit); logged once per reason per connection and
  counted, the connection stays. [JS closes the relay for good.]
* ``NOTICE``: logged (first of a connection at WARNING, then DEBUG) and counted; ``AUTH``
  (NIP-42) challenges are ignored: Trystero never authenticates either.

Reconnects and liveness
-----------------------
The base class supervises: reconnect with exponential backoff and jitter (default
:data:`NOSTR_BACKOFF`: ``random(0..p)`` with p = 3.333 s doubling to 60 s, as Trystero's
``makeSocket``, which however gives up at 60 s; we never give up). A relay penalty (above)
lengthens the next delay. The socket is a :class:`~signaling.relays.base.WebSocketLink` (shared
with the tracker client): aiohttp's WebSocket heartbeat (ping every ``heartbeat`` s, pong due in
half of it) detects a hung relay or a dead path; an accepted socket that never completes the
upgrade, or a relay that never sends EOSE, runs into ``connect_timeout``. A relay hosted in this
process is reached without a socket (:mod:`signaling.relays.local`), and behaves the same.

Bounded
-------
The send queue (base class), the outbox (high-water mark, then the base queue holds messages;
like the link, :class:`~signaling.relays.link_relay.LinkRelay`'s, shared with the ws-relay),
incoming messages (``MAX_MESSAGE_BYTES``; larger ones drop the connection), topics
(``max_topics``, i.e. at most ``max_topics / 250`` REQs, beyond which ``subscribe`` raises), topic
length, the dedupe LRU, and the counters (fixed keys plus the known rejection prefixes). The
link's reader yields to the loop every ``_READ_YIELD_EVERY`` messages (see
:mod:`~signaling.relays.base`), so a flooding relay cannot starve the loop.

Dedupe across relays
--------------------
Each relay has its own ``seen`` LRU unless one is passed in. Passing the same
:class:`~signaling.bounded.LruSet` to several relays makes the first copy of an event win across
all of them; the others are dropped as ``duplicate``. That only catches copies with the same id,
i.e. the same event forwarded by several relays (or JS publishing identical content within one
second); JS normally signs a separate event per relay, which a shared LRU does not merge, so the
strategy still needs its own semantic dedupe. A shared LRU also hides on which relays a peer
was heard; a strategy that tracks per-relay reachability (JS answers on the relay the offer came
from) should keep the default per-relay LRU.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeGuard

import orjson
from coincurve import PrivateKey, PublicKeyXOnly

from signaling.bounded import LruSet
from signaling.crypto import gen_id, nostr_event_id, nostr_kind

from .base import DEFAULT_CONNECT_TIMEOUT, DEFAULT_QUEUE_LIMIT, Backoff
from .link_relay import DEFAULT_HEARTBEAT_S, NOSTR_BACKOFF, LinkRelay

__all__ = [
    "MAX_SAFE_INTEGER",
    "MAX_TOPICS_PER_REQ",
    "NOSTR_BACKOFF",
    "InvalidEvent",
    "NostrKeys",
    "NostrRelay",
    "event_message",
    "event_topic",
    "make_event",
    "process_keys",
    "req_message",
    "verify_signature",
]

log = logging.getLogger(__name__)

TOPIC_TAG = "x"
SUB_ID_LENGTH = 64
MAX_TOPICS_PER_REQ = 250  # Trystero's maxTopicsPerSubscription
# 16 REQs on one connection: most relays allow 20 subscriptions per client (strfry's default),
# and 4000 topics is 2000 rooms, far beyond what one helper joins.
DEFAULT_MAX_TOPICS = 16 * MAX_TOPICS_PER_REQ
DEFAULT_SINCE_SLACK_S = 60
# Enough ids for several minutes of busy signalling on one relay (or on all, when shared).
DEFAULT_SEEN_CAPACITY = 4096
# An SDP event is a few KiB; relays cap events at 64-512 KiB. Larger frames are abuse.
MAX_MESSAGE_BYTES = 1024 * 1024
# Trystero: 60 s pause doubling up to 15 min (steadyAnnounceIntervalMs, maxRelayBackoffMs).
ESCALATION_INITIAL_S = 60.0
ESCALATION_CAP_S = 15 * 60.0

# OK-false reasons that say the relay refuses us as such, not just one event (NIP-01 prefixes).
_POLICY_REJECTIONS = frozenset({"blocked", "restricted", "auth-required", "pow", "mute"})
_KNOWN_PREFIXES = _POLICY_REJECTIONS | {"duplicate", "rate-limited", "invalid", "error"}

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
#: JS Number.MAX_SAFE_INTEGER: the bound of created_at, and the modulus of Trystero's strToNum.
MAX_SAFE_INTEGER = 2**53 - 1


# ---------------------------------------------------------------------- keys and events


class NostrKeys:
    """A secp256k1 key pair for signing events (BIP-340 Schnorr)."""

    __slots__ = ("_secret", "pubkey")

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = PrivateKey(secret) if secret is not None else PrivateKey()
        #: 32-byte x-only public key, lower-case hex (the event's ``pubkey``).
        self.pubkey: str = self._secret.public_key_xonly.format().hex()

    def __repr__(self) -> str:  # never show the secret
        return f"<NostrKeys {self.pubkey[:16]}…>"

    def sign(self, event_id: str) -> str:
        """BIP-340 signature (hex) of a 32-byte event id given as hex, with fresh aux randomness."""
        return self._secret.sign_schnorr(bytes.fromhex(event_id)).hex()


_process_keys: NostrKeys | None = None


def process_keys() -> NostrKeys:
    """The key pair shared by this process's relays (Trystero: one per JS realm)."""
    global _process_keys
    if _process_keys is None:
        _process_keys = NostrKeys()
    return _process_keys


def make_event(keys: NostrKeys, topic: str, content: str, created_at: int) -> dict[str, Any]:
    """A signed event for ``topic`` in Trystero's field order (the order is kept on the wire)."""
    kind = nostr_kind(topic)
    tags = [[TOPIC_TAG, topic]]
    event_id = nostr_event_id(keys.pubkey, created_at, kind, tags, content)
    return {
        "kind": kind,
        "tags": tags,
        "created_at": created_at,
        "content": content,
        "pubkey": keys.pubkey,
        "id": event_id,
        "sig": keys.sign(event_id),
    }


def event_message(event: dict[str, Any]) -> str:
    """``["EVENT",event]`` as compact JSON, exactly as ``JSON.stringify`` writes it."""
    return orjson.dumps(["EVENT", event]).decode()


def req_message(sub_id: str, topics: Sequence[str], since: int) -> str:
    """One batched subscription: unique kinds in first-seen order, then ``since``, then ``#x``."""
    kinds = list(dict.fromkeys(nostr_kind(t) for t in topics))
    return orjson.dumps(["REQ", sub_id, {"kinds": kinds, "since": since, "#x": list(topics)}]).decode()


class InvalidEvent(ValueError):
    """An incoming event that must not be delivered; ``reason`` is the counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def event_topic(event: object) -> str:
    """Check an event's shape, topic tag, kind and id; return its topic (the first ``x`` tag).

    Raises :class:`InvalidEvent` with reason ``malformed``, ``no_topic``, ``wrong_kind`` or
    ``bad_id``. The signature is checked separately (:func:`verify_signature`), as it is the
    expensive part and only worth doing for events that pass everything else.
    """
    if not isinstance(event, dict):
        raise InvalidEvent("malformed", "event is not an object")
    kind, created_at = event.get("kind"), event.get("created_at")
    tags, content = event.get("tags"), event.get("content")
    pubkey, event_id, sig = event.get("pubkey"), event.get("id"), event.get("sig")
    if not (_is_int(kind) and 0 <= kind <= 65535 and _is_int(created_at)):
        raise InvalidEvent("malformed", "kind or created_at")
    if not 0 <= created_at <= MAX_SAFE_INTEGER:
        raise InvalidEvent("malformed", "created_at out of range")
    if not isinstance(content, str) or not isinstance(tags, list):
        raise InvalidEvent("malformed", "content or tags")
    if not all(isinstance(t, list) and all(isinstance(v, str) for v in t) for t in tags):
        raise InvalidEvent("malformed", "tags")
    if not (
        isinstance(pubkey, str)
        and _HEX64.fullmatch(pubkey)
        and isinstance(event_id, str)
        and _HEX64.fullmatch(event_id)
        and isinstance(sig, str)
        and _HEX128.fullmatch(sig)
    ):
        raise InvalidEvent("malformed", "pubkey, id or sig")
    # every tag was checked above to be a list of str
    topic: str | None = next((t[1] for t in tags if len(t) >= 2 and t[0] == TOPIC_TAG), None)
    if not topic:
        raise InvalidEvent("no_topic")
    if kind != nostr_kind(topic):
        raise InvalidEvent("wrong_kind", f"kind {kind} on topic {topic}")
    try:
        expected = nostr_event_id(pubkey, created_at, kind, tags, content)
    except (TypeError, ValueError) as exc:  # e.g. a lone surrogate, which has no UTF-8 form
        raise InvalidEvent("malformed", str(exc)) from exc
    if expected != event_id:
        raise InvalidEvent("bad_id")
    return topic


def verify_signature(event: dict[str, Any]) -> bool:
    """BIP-340 check of ``sig`` over ``id`` by ``pubkey`` (all hex, shapes already checked)."""
    try:
        key = PublicKeyXOnly(bytes.fromhex(event["pubkey"]))  # raises if x is not on the curve
        return key.verify(bytes.fromhex(event["sig"]), bytes.fromhex(event["id"]))
    except (ValueError, TypeError, KeyError):
        return False


# ---------------------------------------------------------------------- relay


class _Escalation:
    """A pause of ``initial`` seconds that doubles each time it is entered again, up to ``cap``.

    Forgotten on ``reset`` or after ``cap`` quiet seconds past the end of the last pause.
    Entering while a pause runs does nothing: rejections of events sent before the pause began
    must not stretch it.
    """

    def __init__(self, initial: float, cap: float, clock: Callable[[], float] = time.monotonic) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError(f"invalid escalation {initial}..{cap}")
        self.initial = initial
        self.cap = cap
        self._clock = clock
        self._delay = 0.0
        self._until = 0.0

    def remaining(self) -> float:
        return max(0.0, self._until - self._clock())

    def enter(self) -> float | None:
        """Start a pause; returns its length, or None if one is already running."""
        now = self._clock()
        if now < self._until:
            return None
        if self._delay and now - self._until > self.cap:
            self._delay = 0.0
        self._delay = min(self._delay * 2, self.cap) if self._delay else self.initial
        self._until = now + self._delay
        return self._delay

    def reset(self) -> None:
        self._delay = 0.0
        self._until = 0.0


@dataclass(frozen=True)
class _PenaltyAwareBackoff(Backoff):
    """The supervisor's reconnect delay, stretched to the end of a running relay penalty."""

    penalty: Callable[[], float] = field(default=lambda: 0.0, compare=False)

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        return max(super().delay(attempt, rand), self.penalty())


@dataclass(eq=False)
class _PendingAck:
    """REQs sent and not yet answered by EOSE, plus the futures waiting for that."""

    sub_ids: set[str]
    waiters: list[asyncio.Future[None]]
    timer: asyncio.TimerHandle | None = None


def _reason_prefix(reason: str) -> str:
    prefix, sep, _ = reason.partition(":")
    prefix = prefix.strip().lower()
    # Only known prefixes become counter keys, so a relay cannot grow the counters.
    return prefix if sep and prefix in _KNOWN_PREFIXES else "other"


class NostrRelay(LinkRelay):
    """A Trystero-compatible connection to one nostr relay (see the module docstring)."""

    _protocol: ClassVar[str] = "nostr"
    _server_kind: ClassVar[str] = "nostr relay"
    _max_message_bytes: ClassVar[int] = MAX_MESSAGE_BYTES
    _relay_log: ClassVar[logging.Logger] = log

    def __init__(
        self,
        url: str,
        *,
        keys: NostrKeys | None = None,
        seen: LruSet[str] | None = None,
        since_slack: int = DEFAULT_SINCE_SLACK_S,
        heartbeat: float | None = DEFAULT_HEARTBEAT_S,
        max_topics: int = DEFAULT_MAX_TOPICS,
        ssl_context: ssl.SSLContext | None = None,
        rate_limit_backoff: tuple[float, float] = (ESCALATION_INITIAL_S, ESCALATION_CAP_S),
        penalty_backoff: tuple[float, float] = (ESCALATION_INITIAL_S, ESCALATION_CAP_S),
        clock: Callable[[], float] = time.time,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        backoff: Backoff | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        if since_slack < 0:
            raise ValueError("since_slack must be >= 0")
        super().__init__(
            url,
            heartbeat=heartbeat,
            max_topics=max_topics,
            ssl_context=ssl_context,
            queue_limit=queue_limit,
            backoff=backoff,
            connect_timeout=connect_timeout,
        )
        self._keys = keys or process_keys()
        self._seen: LruSet[str] = seen if seen is not None else LruSet(DEFAULT_SEEN_CAPACITY)
        self._since_slack = since_slack
        self._clock = clock  # wall clock: created_at and since are unix seconds
        self._rate_limit = _Escalation(*rate_limit_backoff)
        # Ids of our recent announces: only their acceptance ends a rate-limit episode (JS).
        self._announce_ids: LruSet[str] = LruSet(64)
        self._penalty = _Escalation(*penalty_backoff)
        b = self._backoff
        self._backoff = _PenaltyAwareBackoff(b.initial, b.factor, b.cap, b.jitter, self._penalty.remaining)

        # One id per chunk of 250 topics, kept across reconnects (re-sending a REQ with the same
        # id replaces that subscription, NIP-01).
        self._sub_ids: list[str] = []
        self._flush_handle: asyncio.Handle | None = None
        self._flush_waiters: list[asyncio.Future[None]] = []
        self._pending_ack: _PendingAck | None = None

    # -------------------------------------------------------------- public extras

    @property
    def keys(self) -> NostrKeys:
        return self._keys

    @property
    def pubkey(self) -> str:
        return self._keys.pubkey

    @property
    def seen(self) -> LruSet[str]:
        """The event-id LRU used for dedupe (pass one LRU to several relays to share it)."""
        return self._seen

    @property
    def sub_ids(self) -> tuple[str, ...]:
        """Subscription ids in use, one per chunk of up to 250 topics."""
        return tuple(self._sub_ids)

    @property
    def announce_backoff(self) -> float:
        """Seconds until announces go out again after a ``rate-limited:`` answer (0 = now).

        A strategy may use it to schedule its next announce on this relay, as Trystero does
        (``max(60 s, remaining)``); announces published meanwhile are dropped here anyway.
        """
        return self._rate_limit.remaining()

    @property
    def penalty_remaining(self) -> float:
        """Seconds until a reconnect after a ``CLOSED`` or policy rejection is allowed."""
        return self._penalty.remaining()

    # -------------------------------------------------------------- transport hooks

    def _request_subscribe(self, topics: list[str]) -> asyncio.Future[None]:
        # The REQ always carries the whole topic set, so which topics are new does not matter.
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(fut)
        self._schedule_flush()
        return fut

    def _request_unsubscribe(self, topic: str) -> None:
        self._schedule_flush()

    def _send(self, topic: str, text: str) -> bool:
        if not self._link.connected:
            return False
        if topic in self._topics and self._rate_limit.remaining() > 0:
            # An announce (see the module docstring) during a rate-limit pause: skip it, as JS does.
            self._counters["announce_suppressed"] += 1
            log.debug("%s: announce on %s suppressed (rate-limited)", self.name, topic)
            return True
        event = make_event(self._keys, topic, text, int(self._clock()))
        if topic in self._topics:
            self._announce_ids.add(event["id"])
        self._link.send(event_message(event))
        self._counters["published"] += 1
        return True

    def _abort_connection(self) -> None:
        """Forget the current connection at once: fail what waits on it, stop its tasks, and
        close the socket in the background. Idempotent."""
        super()._abort_connection()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        lost = ConnectionError(f"{self.name}: connection lost")
        waiters, self._flush_waiters = self._flush_waiters, []
        pending, self._pending_ack = self._pending_ack, None
        if pending is not None:
            waiters += pending.waiters
            if pending.timer is not None:
                pending.timer.cancel()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(lost)

    # -------------------------------------------------------------- subscriptions

    def _schedule_flush(self) -> None:
        # Coalesce a burst of subscribe/unsubscribe calls into one REQ per chunk.
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_subscriptions)

    def _flush_subscriptions(self) -> None:
        self._flush_handle = None
        waiters, self._flush_waiters = self._flush_waiters, []
        if not self._link.connected:
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(ConnectionError(f"{self.name}: not connected"))
            return
        topics = list(self._topics)
        chunks = [topics[i : i + MAX_TOPICS_PER_REQ] for i in range(0, len(topics), MAX_TOPICS_PER_REQ)]
        while len(self._sub_ids) > len(chunks):
            self._link.send(orjson.dumps(["CLOSE", self._sub_ids.pop()]).decode())
        previous, self._pending_ack = self._pending_ack, None
        if previous is not None:
            # The new REQs replace the old ones: whoever waited on those now waits on these.
            waiters = previous.waiters + waiters
            if previous.timer is not None:
                previous.timer.cancel()
        if not chunks:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
            return
        since = max(0, int(self._clock()) - self._since_slack)
        for i, chunk in enumerate(chunks):
            if i == len(self._sub_ids):
                self._sub_ids.append(gen_id(SUB_ID_LENGTH))
            self._link.send(req_message(self._sub_ids[i], chunk, since))
        ack = _PendingAck(set(self._sub_ids), waiters)
        if self.state == "connected":
            # While connecting, the base class's connect timeout already bounds the wait.
            ack.timer = asyncio.get_running_loop().call_later(
                self._connect_timeout, self._on_ack_timeout, ack
            )
        self._pending_ack = ack
        self._counters["req"] += len(chunks)

    def _on_ack_timeout(self, ack: _PendingAck) -> None:
        if ack is not self._pending_ack:
            return
        self._counters["eose_timeout"] += 1
        log.warning(
            "%s: no EOSE within %.1f s; the relay is not answering, reconnecting",
            self.name,
            self._connect_timeout,
        )
        self._abort_connection()

    # -------------------------------------------------------------- inbound messages

    def _on_text(self, data: str) -> None:
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._drop("malformed", "not JSON")
            return
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
            self._drop("malformed", "not a relay message")
            return
        try:
            match msg[0]:
                case "EVENT":
                    self._on_event(msg)
                case "EOSE":
                    self._on_eose(msg)
                case "OK":
                    self._on_ok(msg)
                case "CLOSED":
                    self._on_closed(msg)
                case "NOTICE":
                    self._counters["notice"] += 1
                    text = msg[1] if len(msg) > 1 and isinstance(msg[1], str) else ""
                    self._link.warn_once("notice", "%s: NOTICE from relay: %.200s", self.name, text)
                case "AUTH":
                    self._counters["auth_challenge"] += 1  # NIP-42: we never authenticate (JS neither)
                case _:
                    self._counters["unknown_message"] += 1
        except Exception:  # remote input must never take the connection down
            log.exception("%s: failed to handle a relay message", self.name)
            self._drop("malformed", "handler error")

    def _on_event(self, msg: list[Any]) -> None:
        self._counters["received"] += 1
        if len(msg) < 3 or not isinstance(msg[1], str) or msg[1] not in self._sub_ids:
            self._drop("unknown_sub")
            return
        event = msg[2]
        try:
            topic = event_topic(event)
        except InvalidEvent as exc:
            self._drop(exc.reason, str(exc))
            return
        if topic not in self._topics:
            self._drop("unsubscribed", topic)  # e.g. arriving just after an unsubscribe
            return
        event_id = event["id"]
        if event_id in self._seen:
            self._drop("duplicate")
            return
        if not verify_signature(event):
            self._drop("bad_sig", event_id)
            return
        self._seen.add(event_id)
        self._counters["delivered"] += 1
        # surrogatepass: a lone surrogate (valid JSON escape) is then refused by _deliver's decode.
        self._deliver(topic, event["content"].encode("utf-8", "surrogatepass"))

    def _on_eose(self, msg: list[Any]) -> None:
        self._counters["eose"] += 1
        ack = self._pending_ack
        if ack is None or len(msg) < 2 or not isinstance(msg[1], str) or msg[1] not in ack.sub_ids:
            return
        ack.sub_ids.discard(msg[1])
        if ack.sub_ids:
            return
        self._pending_ack = None
        if ack.timer is not None:
            ack.timer.cancel()
        for fut in ack.waiters:
            if not fut.done():
                fut.set_result(None)

    def _on_ok(self, msg: list[Any]) -> None:
        if len(msg) < 3 or not isinstance(msg[1], str) or not isinstance(msg[2], bool):
            self._drop("malformed", "OK")
            return
        reason = msg[3] if len(msg) > 3 and isinstance(msg[3], str) else ""
        if msg[2]:
            self._counters["accepted"] += 1
            if msg[1] in self._announce_ids:
                self._rate_limit.reset()
            return
        prefix = _reason_prefix(reason)
        self._counters[f"rejected:{prefix}"] += 1
        if prefix == "duplicate":
            return
        if prefix == "rate-limited":
            pause = self._rate_limit.enter()
            if pause is not None:
                log.warning(
                    "%s: rate-limited (%.200s); pausing announces for %.0f s", self.name, reason, pause
                )
            return
        if prefix in _POLICY_REJECTIONS:
            self._impose_penalty(f"event refused ({reason[:200]})")
            return
        self._link.warn_once(f"rejected:{prefix}", "%s: event refused: %.200s", self.name, reason)

    def _on_closed(self, msg: list[Any]) -> None:
        if len(msg) < 2 or msg[1] not in self._sub_ids:
            return  # not (or no longer) ours
        self._counters["closed"] += 1
        reason = msg[2] if len(msg) > 2 and isinstance(msg[2], str) else ""
        self._impose_penalty(f"subscription closed by the relay ({reason[:200]})")

    def _impose_penalty(self, why: str) -> None:
        pause = self._penalty.enter()
        if pause is not None:
            self._counters["penalty"] += 1
            log.warning("%s: %s; reconnecting in %.0f s at the earliest", self.name, why, pause)
        self._abort_connection()
