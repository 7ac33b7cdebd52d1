"""The relay's numbers for ``/metrics``: counters kept as plain dicts on the hot paths (a dict
update, no prometheus_client lock), turned into metric families at scrape time.

Every label set is bounded: protocols, results and reasons are fixed words of this package.

What the relay refuses or drops is logged too (:class:`LoggedCounter`), so an operator reading the
log sees a limit being hit without scraping ``/metrics``; a flood costs one line per minute each.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["LoggedCounter", "RelayMetrics"]

log = logging.getLogger("p2pdiff.relay")

# At most one log line per (protocol, reason) in this many seconds; the line says how many since.
LOG_EVERY_S = 60.0


class LoggedCounter(Counter[tuple[str, str]]):
    """Counts (protocol, reason) and logs it: the first time at once, then at most one line per
    key per :data:`LOG_EVERY_S`, with the count since the previous line."""

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._what = what
        self._clock = clock
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}

    def __setitem__(self, key: tuple[str, str], value: int) -> None:
        super().__setitem__(key, value)
        now = self._clock()
        last = self._logged.get(key)
        if last is None or now - last[0] >= LOG_EVERY_S:
            since = value - last[1] if last is not None else value
            protocol, reason = key
            log.info("relay (%s): %s %s: %d since the last such line", protocol, self._what, reason, since)
            self._logged[key] = (now, value)


class RelayMetrics(Collector):
    """Counters of every relay protocol, and the live connection count of each (``connections``)."""

    def __init__(self) -> None:
        #: protocol -> a function giving its open connections now.
        self.connections: dict[str, Callable[[], int]] = {}
        #: (protocol, result): accepted | duplicate | invalid | bad_signature | not_ephemeral |
        #: rate_limited | too_large.
        self.events: Counter[tuple[str, str]] = Counter()
        #: (protocol, reason): what was refused short of closing the socket.
        self.refused = LoggedCounter("refused")
        #: protocol -> frames handed to subscribers.
        self.deliveries: Counter[str] = Counter()
        #: (protocol, reason): sockets the relay closed: slow_reader | idle | too_large | ...
        self.dropped = LoggedCounter("closed a connection:")

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
