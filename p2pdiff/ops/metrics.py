"""Prometheus metrics at ``GET /metrics``.

Two kinds of numbers:
- HTTP requests, counted by the request middleware into plain dicts (a dict update per request is
  cheaper than prometheus_client's labelled metrics, which take a lock and build label tuples);
- queue, peer and relay state, read from the live objects at scrape time by a custom collector, so
  nothing has to be kept in step with the queue as it changes.

Each app has its own registry (tests get clean numbers; nothing global).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from p2pdiff.config import mask_url
from p2pdiff.ops.cluster import RoomLeases
from p2pdiff.rooms.helper import Helper
from p2pdiff.tasks.model import PENDING, STATUSES
from p2pdiff.tasks.queue import QueueManager

# Latency buckets (seconds): a cached GET takes well under a millisecond, a POST waits for an fsync.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Series are (method, route, status): routes and methods are a fixed set and statuses are few, so
# this cap is never reached in practice; it is a fuse against a bug that puts raw URLs in labels.
MAX_HTTP_SERIES = 1000
# Per-room gauges: one series per room. Rooms are created by clients, so only the busiest rooms
# (by pending tasks) get their own series; totals cover the rest.
MAX_ROOM_SERIES = 200
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
RELAY_STATES = ("connecting", "connected", "reconnecting", "closed")
UNMATCHED = "unmatched"  # 404/405 answered by the router: the raw path would be unbounded


class HttpMetrics:
    """Request counts and a latency histogram by method, route template and status."""

    def __init__(self) -> None:
        # key -> [bucket counts..., +Inf count, sum of seconds]; buckets not cumulative until scraped.
        self._series: dict[tuple[str, str, int], list[float]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            if method not in KNOWN_METHODS:
                key = ("other", route, status)
            if len(self._series) >= MAX_HTTP_SERIES:
                key = (key[0], "other", status)
            series = self._series.setdefault(key, [0.0] * (len(BUCKETS) + 2))
        series[bisect.bisect_left(BUCKETS, seconds)] += 1
        series[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        labels = ["method", "route", "status"]
        requests = CounterMetricFamily(
            "p2pdiff_http_requests", "HTTP requests answered, by route template and status", labels=labels
        )
        latency = HistogramMetricFamily(
            "p2pdiff_http_request_duration_seconds",
            "Time from routing to the handler's response, by route template and status",
            labels=labels,
        )
        for (method, route, status), series in sorted(self._series.items()):
            values = [method, route, str(status)]
            cumulative, running = [], 0.0
            for bound, count in zip([*BUCKETS, float("inf")], series[:-1], strict=True):
                running += count
                cumulative.append((_bound(bound), running))
            requests.add_metric(values, running)
            latency.add_metric(values, cumulative, series[-1])
        yield requests
        yield latency


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class StateCollector(Collector):
    """Queue, helper, relay and security numbers, computed from the live objects at each scrape."""

    def __init__(self, queue: QueueManager, helper: Helper, http: HttpMetrics, counters: Any) -> None:
        self.queue = queue
        self.helper = helper
        self.http = http
        # Anything with a ``metrics() -> dict[str, int]`` of cumulative counters (the security guard).
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        yield from self.http.collect()
        yield from self._queue()
        yield from self._helper()
        for name, (help_text, value) in self.counters.metrics().items():
            yield CounterMetricFamily(f"p2pdiff_{name}", help_text, value=value)

    def _queue(self) -> Iterator[Metric]:
        queue = self.queue
        by_status = dict.fromkeys(STATUSES, 0)
        for room in queue.rooms.values():
            for status in STATUSES:
                by_status[status] += room.counts[status]
        tasks = GaugeMetricFamily("p2pdiff_tasks", "Tasks held, by state", labels=["state"])
        for status, count in by_status.items():
            tasks.add_metric([status], count)
        yield tasks
        yield GaugeMetricFamily("p2pdiff_rooms", "Rooms with tasks or a helper", value=len(queue.rooms))
        length = GaugeMetricFamily(
            "p2pdiff_queue_length",
            f"Pending tasks per room (the {MAX_ROOM_SERIES} longest queues)",
            labels=["room"],
        )
        busiest = sorted(queue.rooms.values(), key=lambda r: r.counts[PENDING], reverse=True)
        for room in busiest[:MAX_ROOM_SERIES]:
            length.add_metric([room.id], room.counts[PENDING])
        yield length
        yield CounterMetricFamily(
            "p2pdiff_requeues",
            "Tasks put back to pending (worker requeue or lease expiry) since start",
            value=queue.requeues,
        )
        yield from self._store()

    def _store(self) -> Iterator[Metric]:
        queue = self.queue
        store = queue.store.stats()
        yield CounterMetricFamily(
            "p2pdiff_store_commits", "Store commits (group commits)", value=store["commits"]
        )
        failures = CounterMetricFamily(
            "p2pdiff_store_failures", "Failed store commits, by the code REST answers", labels=["code"]
        )
        for code, count in store["failures"].items():
            failures.add_metric([code], count)
        yield failures
        yield CounterMetricFamily(
            "p2pdiff_store_refused",
            "Changes refused at once (503) while the store backed off after a failed commit",
            value=store["refused"],
        )
        yield CounterMetricFamily(
            "p2pdiff_store_rollbacks",
            "Times memory went back to the last commit because a commit failed",
            value=queue.rollbacks,
        )
        yield GaugeMetricFamily(
            "p2pdiff_store_failing",
            "1 while the last store commit failed, 0 once one works",
            value=int(bool(store["failing"])),
        )

    def _helper(self) -> Iterator[Metric]:
        helper = self.helper
        rooms = helper.rooms()
        info = GaugeMetricFamily("p2pdiff_helper_info", "The helper peer's mode (always 1)", labels=["mode"])
        info.add_metric([helper.mode], 1)
        yield info
        yield GaugeMetricFamily("p2pdiff_helper_rooms", "Rooms the helper is in", value=len(rooms))
        peers = GaugeMetricFamily("p2pdiff_peers", "Connected peers per helper room", labels=["room"])
        relays = GaugeMetricFamily(
            "p2pdiff_relay_state",
            "Signaling relay connection state per helper room (1 for the current state)",
            labels=["room", "relay", "state"],
        )
        traffic = CounterMetricFamily(
            "p2pdiff_datachannel_bytes",
            "Data-channel bytes per helper room and direction",
            labels=["room", "direction"],
        )
        signaling_dropped = CounterMetricFamily(
            "p2pdiff_signaling_dropped",
            "Signals, frames and connections a helper room dropped, by reason (bad input, limits)",
            labels=["room", "reason"],
        )
        strangers = CounterMetricFamily(
            "p2pdiff_foreign_wire_peers",
            "Peers found speaking the other Trystero wire per helper room (the room may need the other wire)",
            labels=["room"],
        )
        received = CounterMetricFamily(
            "p2pdiff_protocol_received",
            "App protocol messages received from peers per helper room and action",
            labels=["room", "action"],
        )
        ignored = CounterMetricFamily(
            "p2pdiff_protocol_dropped",
            "App protocol messages ignored per helper room, action and reason",
            labels=["room", "action", "reason"],
        )
        for room in rooms:
            peers.add_metric([room.room_id], len(room.peers()))
            received_by_action, dropped_by_reason = room.protocol_counts()
            # Actions are the app's own (only registered ones are delivered); reasons are ours.
            for action, count in sorted(received_by_action.items()):
                received.add_metric([room.room_id, action], count)
            for key, count in sorted(dropped_by_reason.items()):
                action, _, reason = key.partition(".")
                ignored.add_metric([room.room_id, action, reason], count)
            stats = room.signaling_stats()
            if stats is None:  # api-only: no signaling room, no relays
                continue
            for url, state in dict(room.relay_states()).items():
                relay = mask_url(url)
                for candidate in RELAY_STATES:
                    relays.add_metric([room.room_id, relay, candidate], 1 if state == candidate else 0)
            traffic.add_metric([room.room_id, "in"], stats.get("bytes_in", 0))
            traffic.add_metric([room.room_id, "out"], stats.get("bytes_out", 0))
            # Reasons are the library's fixed counter names, never remote text.
            for reason, count in sorted((stats.get("dropped") or {}).items()):
                signaling_dropped.add_metric([room.room_id, reason], count)
            strangers.add_metric([room.room_id], stats.get("foreign_wire_peers", 0))
        yield peers
        yield relays
        yield traffic
        yield signaling_dropped
        yield strangers
        yield received
        yield ignored


class ClusterCollector(Collector):
    """This node's id, and on a PostgreSQL store its view of the cluster (the last lease round's)."""

    def __init__(self, node: str, leases: RoomLeases | None) -> None:
        self.node = node
        self.leases = leases

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("p2pdiff_node_info", "This node's id (always 1)", labels=["node"])
        info.add_metric([self.node], 1)
        yield info
        leases = self.leases
        if leases is None:
            return
        yield GaugeMetricFamily(
            "p2pdiff_cluster_nodes", "Live nodes on the store (seen within a lease)", value=len(leases.nodes)
        )
        yield GaugeMetricFamily(
            "p2pdiff_cluster_rooms_held", "Helper rooms this node holds the lease of", value=len(leases.rooms)
        )
        for name, help_text, value in (
            ("claimed", "Room leases this node claimed (free or lapsed)", leases.claimed),
            ("lost", "Rooms this node left because its lease lapsed to another node", leases.lost),
            (
                "released",
                "Room leases this node gave up (unwanted, or handed to a node with fewer)",
                leases.released,
            ),
        ):
            yield CounterMetricFamily(f"p2pdiff_room_leases_{name}", help_text, value=value)


class Metrics:
    """The app's registry: the state and cluster collectors plus the standard process and Python ones."""

    def __init__(
        self,
        queue: QueueManager,
        helper: Helper,
        counters: Any,
        http: HttpMetrics,
        *,
        node: str,
        leases: RoomLeases | None = None,
    ) -> None:
        self.http = http
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StateCollector(queue, helper, self.http, counters))
        self.registry.register(ClusterCollector(node, leases))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def add_routes(app: web.Application, metrics: Metrics) -> None:
    async def scrape(request: web.Request) -> web.Response:
        # Runs on the loop: a scrape walks the rooms once (cheap next to a Prometheus interval).
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app.router.add_get("/metrics", scrape)
