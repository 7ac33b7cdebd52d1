"""Trystero's self-hosted relay protocol (``@trystero-p2p/ws-relay``) at ``[relay] ws_relay_path``:
the topic hub, one client's session, and the frame parser.

The protocol (docs/nostr-relay.md; our client of it is :mod:`signaling.relays.wsrelay`), JSON text
frames: ``{"type":"subscribe","topic":T}``, ``{"type":"unsubscribe","topic":T}`` and
``{"type":"publish","topic":T,"payload":P}`` from a client; ``{"topic":T,"payload":P}`` to every
subscriber of ``T``, the publisher too if it subscribed. ``P`` is Trystero's StrategyMessage: a
JSON string or object (Trystero's own server takes any JSON value; its client ignores the rest, so
we refuse them here). There is no acknowledgement and no error message, so nothing a client does
is ever answered: whatever we refuse is counted in ``/metrics`` and otherwise ignored.

What a client may do (``[relay]``'s limits, shared with the Nostr endpoint):
- topics per connection: ``max_filter_values`` (a Nostr client's topics fit in one REQ's ``#x``;
  the same number here), each at most :data:`MAX_TOPIC_LENGTH` characters;
- publishes per second: ``events_per_second`` with ``events_burst``; a payload of at most
  ``max_event_bytes`` (as relayed), a message of at most ``max_message_bytes`` (aiohttp closes a
  socket that sends a bigger one);
- garbage (not JSON, not one of the three messages, a bad topic or payload): counted and ignored,
  and a connection that sent :data:`GARBAGE_LIMIT` such frames is closed: a real client sends none.

Closing a real client's socket costs it more than the socket: Trystero's ws-relay client reconnects
but never subscribes again, so it stays deaf on this relay until it rejoins its rooms. The limits
are therefore sized so a browser never meets them (config.toml), and what is over them is ignored
rather than closed, except garbage, message size, slow reading and idleness.

Fan-out builds each ``{"topic","payload"}`` frame once and hands it to every subscriber's bounded
link (a slow reader is dropped by its link, nobody waits); the frame also goes to the other nodes
of a cluster over the :class:`~p2pdiff.relay.bus.RelayBus` (channel ``"ws-relay"``), whose frames
are delivered here and never published to the bus again. There is nothing to dedupe: the bus
carries each frame once, and the protocol has no ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from aiohttp import WSCloseCode

from p2pdiff.config import RelayConfig
from p2pdiff.relay.bus import RelayBus
from p2pdiff.relay.link import ClientLink
from p2pdiff.relay.metrics import RelayMetrics
from signaling.bounded import TokenBucket
from signaling.relays.wsrelay import MAX_TOPIC_LENGTH

__all__ = [
    "GARBAGE_LIMIT",
    "MAX_TOPIC_LENGTH",
    "WS_RELAY",
    "Garbage",
    "Publish",
    "Subscribe",
    "Unsubscribe",
    "WsRelayHub",
    "WsRelaySession",
    "parse_frame",
    "relay_frame",
]

log = logging.getLogger(__name__)

WS_RELAY = "ws-relay"  # the protocol label in metrics, and the bus channel
# Garbage frames a connection may send before it is closed. Trystero sends none; a few leave room
# for a client of a later protocol version whose new messages we do not know.
GARBAGE_LIMIT = 16


@dataclass(frozen=True, slots=True)
class Subscribe:
    topic: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topic: str


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    #: The payload as compact JSON (a JSON string or object), as it is relayed.
    payload: str
    #: Its length in UTF-8 bytes.
    size: int


class Garbage(ValueError):
    """A frame that is none of the protocol's messages; the text says why."""


def parse_frame(text: str) -> Subscribe | Unsubscribe | Publish:
    """One client frame as a message, or :class:`Garbage`. Sizes are the session's business."""
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise Garbage("not JSON") from None
    if not isinstance(message, dict):
        raise Garbage("not a JSON object")
    kind, topic = message.get("type"), message.get("topic")
    if not isinstance(topic, str) or not topic:
        raise Garbage("no topic")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise Garbage(f"topic longer than {MAX_TOPIC_LENGTH} characters")
    if kind == "subscribe":
        return Subscribe(topic)
    if kind == "unsubscribe":
        return Unsubscribe(topic)
    if kind != "publish":
        raise Garbage("unknown message type")
    payload = message.get("payload")
    if not isinstance(payload, str | dict):
        raise Garbage("payload is neither a string nor an object")
    try:
        encoded = orjson.dumps(payload)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes
        raise Garbage("payload nested too deeply") from None
    return Publish(topic, encoded.decode(), len(encoded))


def relay_frame(topic: str, payload: str) -> str:
    """``{"topic":T,"payload":P}`` (``payload`` is JSON already), as Trystero's server writes it."""
    return '{"topic":' + orjson.dumps(topic).decode() + ',"payload":' + payload + "}"


class WsRelayHub:
    """The topics of every ws-relay client of this node and who subscribed to each."""

    def __init__(self, metrics: RelayMetrics, bus: RelayBus) -> None:
        self._metrics = metrics
        self._bus = bus
        self._by_topic: dict[str, dict[ClientLink, None]] = {}

    def __len__(self) -> int:
        """Topics with at least one subscriber."""
        return len(self._by_topic)

    def subscribe(self, link: ClientLink, topic: str) -> None:
        self._by_topic.setdefault(topic, {})[link] = None

    def unsubscribe(self, link: ClientLink, topic: str) -> None:
        subscribers = self._by_topic.get(topic)
        if subscribers is not None:
            subscribers.pop(link, None)
            if not subscribers:
                del self._by_topic[topic]

    def publish(self, topic: str, payload: str) -> int:
        """Relay a publish of one of this node's clients (to the other nodes too); returns to how
        many subscribers here it went."""
        frame = relay_frame(topic, payload)
        delivered = self._fan_out(topic, frame)
        self._bus.publish(WS_RELAY, frame)
        return delivered

    def on_remote(self, frame: str) -> None:
        """A frame another node's client published (checked there)."""
        try:
            message = orjson.loads(frame)
            topic = message["topic"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            topic = None
        if not isinstance(topic, str):
            log.warning("relay: a malformed ws-relay frame from another node was dropped: %.200s", frame)
            return
        self._fan_out(topic, frame)

    def _fan_out(self, topic: str, frame: str) -> int:
        delivered = 0
        # A send that drops a slow reader unsubscribes it later (on_closed runs via call_soon).
        for link in self._by_topic.get(topic, ()):
            if link.send(frame):
                delivered += 1
        self._metrics.deliveries[WS_RELAY] += delivered
        return delivered


class WsRelaySession:
    """The ws-relay side of one client link (see the module docstring)."""

    def __init__(
        self,
        hub: WsRelayHub,
        link: ClientLink,
        limits: RelayConfig,
        metrics: RelayMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hub = hub
        self._link = link
        self._limits = limits
        self._metrics = metrics
        self._topics: dict[str, None] = {}
        self._publishes = TokenBucket(limits.events_per_second, limits.events_burst, clock)
        self._garbage = 0

    def handle(self, text: str) -> None:
        """One text frame from the client."""
        if len(text) > self._limits.max_message_bytes:  # sockets are capped by aiohttp already
            self._metrics.events[WS_RELAY, "too_large"] += 1
            return
        try:
            message = parse_frame(text)
        except Garbage:
            self._garbage_frame()
            return
        if isinstance(message, Publish):
            self._publish(message)
        elif isinstance(message, Subscribe):
            self._subscribe(message.topic)
        else:
            self._unsubscribe(message.topic)

    def binary(self) -> None:
        """A binary frame: garbage (the protocol is JSON text)."""
        self._garbage_frame()

    def _garbage_frame(self) -> None:
        """Count one frame that is none of the protocol's; close the link at :data:`GARBAGE_LIMIT`."""
        self._metrics.refused[WS_RELAY, "garbage"] += 1
        self._garbage += 1
        if self._garbage >= GARBAGE_LIMIT:
            self._link.drop("garbage", WSCloseCode.POLICY_VIOLATION, "not the ws-relay protocol")

    def end(self) -> None:
        """The client is gone: its subscriptions end. Idempotent."""
        for topic in self._topics:
            self._hub.unsubscribe(self._link, topic)
        self._topics.clear()

    def _subscribe(self, topic: str) -> None:
        if topic in self._topics:
            return
        if len(self._topics) >= self._limits.max_filter_values:
            self._metrics.refused[WS_RELAY, "subscriptions"] += 1
            return
        self._topics[topic] = None
        self._hub.subscribe(self._link, topic)

    def _unsubscribe(self, topic: str) -> None:
        if topic in self._topics:
            del self._topics[topic]
            self._hub.unsubscribe(self._link, topic)

    def _publish(self, message: Publish) -> None:
        events = self._metrics.events
        if message.size > self._limits.max_event_bytes:
            events[WS_RELAY, "too_large"] += 1
            return
        if not self._publishes.take():
            events[WS_RELAY, "rate_limited"] += 1
            return
        events[WS_RELAY, "accepted"] += 1
        self._hub.publish(message.topic, message.payload)
