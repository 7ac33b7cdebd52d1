"""The relay's numbers for ``/metrics``: counters kept as plain dicts on the hot paths (a dict
update, no prometheus_client lock), turned into metric families at scrape time.

Every label set is bounded: protocols, results and reasons are fixed words of this package.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["RelayMetrics"]


class RelayMetrics(Collector):
    """Counters of every relay protocol, and the live connection count of each (``connections``)."""

    def __init__(self) -> None:
        #: protocol -> a function giving its open connections now.
        self.connections: dict[str, Callable[[], int]] = {}
        #: (protocol, result): accepted | duplicate | invalid | bad_signature | not_ephemeral |
        #: rate_limited | too_large.
        self.events: Counter[tuple[str, str]] = Counter()
        #: (protocol, reason): what was refused short of closing the socket.
        self.refused: Counter[tuple[str, str]] = Counter()
        #: protocol -> frames handed to subscribers.
        self.deliveries: Counter[str] = Counter()
        #: (protocol, reason): sockets the relay closed: slow_reader | idle | too_large | ...
        self.dropped: Counter[tuple[str, str]] = Counter()

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "p2pdiff_relay_connections", "Open client connections of the room relay", labels=["protocol"]
        )
        for protocol, count in sorted(self.connections.items()):
            gauge.add_metric([protocol], count())
        yield gauge
        yield _counter(
            "p2pdiff_relay_events",
            "Events clients published, by outcome",
            ["protocol", "result"],
            self.events,
        )
        yield _counter(
            "p2pdiff_relay_refused",
            "Client requests refused (connections, subscriptions, filters, garbage frames...)",
            ["protocol", "reason"],
            self.refused,
        )
        deliveries = CounterMetricFamily(
            "p2pdiff_relay_deliveries", "Frames delivered to subscribers", labels=["protocol"]
        )
        for protocol, value in sorted(self.deliveries.items()):
            deliveries.add_metric([protocol], value)
        yield deliveries
        yield _counter(
            "p2pdiff_relay_dropped",
            "Client connections closed by the relay, by reason",
            ["protocol", "reason"],
            self.dropped,
        )


def _counter(name: str, help_text: str, labels: list[str], values: Counter[tuple[str, str]]) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family
