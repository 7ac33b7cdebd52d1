"""Who hears which event: the relay's subscriptions, indexed for fan-out, and the dedupe of events.

Fan-out is the relay's hot path (a room's announce reaches every peer of the room), so:
- subscriptions are indexed by their ``#x`` values (Trystero puts each topic into an ``x`` tag, and
  its filters always name ``#x``): an event is matched only against the subscriptions of its own
  topics. Subscriptions with a filter that names no ``#x`` are kept in a short scan list, checked
  for every event;
- the event is serialised once (when it was checked); each ``["EVENT",subId,event]`` frame is the
  subscription's ready-made prefix + that JSON + ``]``;
- delivering is a non-blocking :meth:`~p2pdiff.relay.link.ClientLink.send` per subscriber, no
  awaits on the publisher's path: a slow subscriber is dropped by its own link, nobody waits.

Dedupe: the ids of the last :data:`SEEN_EVENTS` events relayed. A second copy of one (a replay,
or the same event from another node) reaches nobody. Events from other nodes (the
:class:`~p2pdiff.relay.bus.RelayBus`) are delivered to this node's subscribers and never published
to the bus again.
"""

from __future__ import annotations

import logging

import orjson

from p2pdiff.relay.bus import RelayBus
from p2pdiff.relay.link import ClientLink
from p2pdiff.relay.metrics import RelayMetrics
from p2pdiff.relay.nip01 import Event, Filter, event_from_json
from signaling.bounded import LruSet

__all__ = ["NOSTR", "SEEN_EVENTS", "NostrHub", "Subscription"]

log = logging.getLogger(__name__)

NOSTR = "nostr"  # the protocol label in metrics, and the bus channel
# Ids of recent events kept for dedupe: several minutes of a busy relay's traffic, ~15 MB at most.
SEEN_EVENTS = 65_536
TOPIC_TAG = "x"


class Subscription:
    """One REQ of one client: its filters and the start of every frame it is sent."""

    __slots__ = ("filters", "link", "prefix", "sub_id", "topics", "values")

    def __init__(self, link: ClientLink, sub_id: str, filters: tuple[Filter, ...], values: int = 0) -> None:
        self.link = link
        self.sub_id = sub_id
        self.filters = filters
        #: How many filter values it holds (its session's budget: max_values_per_connection).
        self.values = values
        self.prefix = '["EVENT",' + orjson.dumps(sub_id).decode() + ","
        # Every filter names #x: the topics to index it under. None: it must see every event.
        topics: set[str] = set()
        for f in filters:
            named = f.tag(TOPIC_TAG)
            if named is None:
                self.topics: frozenset[str] | None = None
                return
            topics |= named
        self.topics = frozenset(topics)

    def matches(self, event: Event) -> bool:
        return any(f.matches(event) for f in self.filters)


class NostrHub:
    """The subscriptions of every client of this node's Nostr relay (see the module docstring)."""

    def __init__(self, metrics: RelayMetrics, bus: RelayBus, *, seen_capacity: int = SEEN_EVENTS) -> None:
        self._metrics = metrics
        self._bus = bus
        self._by_topic: dict[str, dict[Subscription, None]] = {}
        self._scan: dict[Subscription, None] = {}
        self._seen: LruSet[str] = LruSet(seen_capacity)

    def __len__(self) -> int:
        """Subscriptions in the index (each counted once)."""
        subs = set(self._scan)
        for bucket in self._by_topic.values():
            subs.update(bucket)
        return len(subs)

    def subscribe(self, sub: Subscription) -> None:
        if sub.topics is None:
            self._scan[sub] = None
            return
        for topic in sub.topics:
            self._by_topic.setdefault(topic, {})[sub] = None

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.topics is None:
            self._scan.pop(sub, None)
            return
        for topic in sub.topics:
            bucket = self._by_topic.get(topic)
            if bucket is not None:
                bucket.pop(sub, None)
                if not bucket:
                    del self._by_topic[topic]

    def seen(self, event_id: str) -> bool:
        """Whether an event with this id was relayed lately (a replay, answered ``duplicate:``)."""
        return event_id in self._seen

    def publish(self, event: Event) -> int:
        """Relay a checked event from one of this node's clients (to the other nodes too);
        returns to how many subscriptions here it went."""
        self._seen.add(event.id)
        delivered = self._fan_out(event)
        self._bus.publish(NOSTR, event.json)
        return delivered

    def on_remote(self, text: str) -> None:
        """An event another node's client published (checked there)."""
        try:
            event = event_from_json(text)
        except (ValueError, TypeError, KeyError):
            log.warning("relay: a malformed event from another node was dropped: %.200s", text)
            return
        if event.id in self._seen:
            return
        self._seen.add(event.id)
        self._fan_out(event)

    def _fan_out(self, event: Event) -> int:
        tail = event.json + "]"
        delivered = 0
        topics = event.tag_values(TOPIC_TAG)
        if len(topics) == 1:  # Trystero's events: one topic each
            bucket = self._by_topic.get(topics[0])
            if bucket:
                for sub in bucket:
                    if sub.matches(event) and sub.link.send(sub.prefix + tail):
                        delivered += 1
        elif topics:
            reached: set[Subscription] = set()
            for topic in topics:
                for sub in self._by_topic.get(topic, ()):
                    if sub not in reached and sub.matches(event):
                        reached.add(sub)
                        if sub.link.send(sub.prefix + tail):
                            delivered += 1
        for sub in self._scan:
            if sub.matches(event) and sub.link.send(sub.prefix + tail):
                delivered += 1
        self._metrics.deliveries[NOSTR] += delivered
        return delivered
