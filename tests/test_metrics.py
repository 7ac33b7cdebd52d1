from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from p2pdiff.config import Config
from p2pdiff.ops.metrics import MAX_HTTP_SERIES, HttpMetrics
from p2pdiff.rooms.helper import ApiOnlyHelper, HelperRoom, P2PRoom
from tests.conftest import ClientFactory, post_task


class FakeHandle:
    """The parts of a signaling.Room that the helper and the metrics read."""

    self_id = "helper-self"

    def __init__(self) -> None:
        self.relay_states = {
            "mqtts://user:relaypass@broker.test/mqtt": "connected",
            "wss://b.test": "reconnecting",
        }
        self.peers = {
            pid: SimpleNamespace(id=pid, joined_at=1.0, last_seen=2.0, rtt_ms=3.0) for pid in ("p1", "p2")
        }
        self.stats = {
            "peers": 2,
            "bytes_in": 1234,
            "bytes_out": 567,
            "dropped": {"decrypt_failed": 3, "foreign_wire": 2},
            "foreign_wire_peers": 1,
        }


class FakeAgent:
    """The parts of a RoomAgent that the metrics read."""

    def __init__(self) -> None:
        self.received = Counter({"task": 4, "result": 2})
        self.dropped = Counter({"result.unknown_task": 1, "task.invalid": 2})

    def peer_info(self, peer_id: str) -> dict[str, Any]:
        return {}


class FakeP2PHelper(ApiOnlyHelper):
    mode = "p2p"

    async def join(self, room_id: str, wire: str | None = None) -> HelperRoom:
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = P2PRoom(room_id, wire=wire or "0.25", handle=FakeHandle())
        return room


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: TestClient | aiohttp.ClientSession, url: str = "/metrics") -> Samples:
    """Every sample of ``/metrics`` (from a TestClient, or a session given the server's full URL)."""
    resp = await client.get(url)
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    samples: Samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_count_requests_tasks_rooms_and_requeues(client: TestClient) -> None:
    for i in range(3):
        await post_task(client, "room-a", {"id": f"a{i}", "prompt": "x"})
    await post_task(client, "room-b", {"id": "b0", "prompt": "x"})
    for action in ("claim", "requeue", "claim"):
        resp = await client.patch("/api/queue/room-a/a0", json={"action": action, "worker": "w1"})
        assert resp.status == 200, await resp.text()
    await client.delete("/api/queue/room-b/b0")
    assert (await client.get("/api/queue/room-a/nope")).status == 404
    assert (await client.get("/no/such/path")).status == 404

    m = await scrape(client)
    post = {"method": "POST", "route": "/api/queue/{room_id}", "status": "201"}
    assert value(m, "p2pdiff_http_requests_total", **post) == 4
    assert value(m, "p2pdiff_http_request_duration_seconds_count", **post) == 4
    assert value(m, "p2pdiff_http_request_duration_seconds_bucket", le="+Inf", **post) == 4
    assert value(m, "p2pdiff_http_request_duration_seconds_sum", **post) > 0
    patch = {"method": "PATCH", "route": "/api/queue/{room_id}/{task_id}", "status": "200"}
    assert value(m, "p2pdiff_http_requests_total", **patch) == 3
    # Routes are templates, never raw URLs: an unknown path is one "unmatched" series.
    assert value(m, "p2pdiff_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert (
        value(
            m,
            "p2pdiff_http_requests_total",
            method="GET",
            route="/api/queue/{room_id}/{task_id}",
            status="404",
        )
        == 1
    )
    assert not any("room-a" in dict(labels).get("route", "") for _, labels in m)

    assert value(m, "p2pdiff_tasks", state="pending") == 2
    assert value(m, "p2pdiff_tasks", state="processing") == 1
    assert value(m, "p2pdiff_tasks", state="cancelled") == 1
    assert value(m, "p2pdiff_queue_length", room="room-a") == 2
    assert value(m, "p2pdiff_queue_length", room="room-b") == 0
    assert (
        value(
            m,
            "p2pdiff_rooms",
        )
        == 2
    )
    assert value(m, "p2pdiff_requeues_total") == 1
    assert value(m, "p2pdiff_helper_info", mode="api-only") == 1
    assert ("process_resident_memory_bytes", ()) in m  # the standard collectors are there too


async def test_metrics_show_peers_relays_and_traffic(make_client: ClientFactory, config: Config) -> None:
    client = await make_client(config, helper=FakeP2PHelper())
    assert (await client.post("/api/join/lobby")).status == 202
    m = await scrape(client)
    assert value(m, "p2pdiff_helper_rooms") == 1
    assert value(m, "p2pdiff_peers", room="lobby") == 2
    relay = "mqtts://user:***@broker.test/mqtt"  # credentials in relay URLs are masked
    assert value(m, "p2pdiff_relay_state", room="lobby", relay=relay, state="connected") == 1
    assert value(m, "p2pdiff_relay_state", room="lobby", relay=relay, state="reconnecting") == 0
    assert value(m, "p2pdiff_relay_state", room="lobby", relay="wss://b.test", state="reconnecting") == 1
    assert value(m, "p2pdiff_datachannel_bytes_total", room="lobby", direction="in") == 1234
    assert value(m, "p2pdiff_datachannel_bytes_total", room="lobby", direction="out") == 567
    text = await (await client.get("/metrics")).text()
    assert "relaypass" not in text


async def test_metrics_show_dropped_input_strangers_and_protocol(
    make_client: ClientFactory, config: Config
) -> None:
    helper = FakeP2PHelper()
    client = await make_client(config, helper=helper)
    assert (await client.post("/api/join/lobby")).status == 202
    room = helper.room("lobby")
    assert isinstance(room, P2PRoom)
    room.agent = FakeAgent()  # type: ignore[assignment]
    m = await scrape(client)
    assert value(m, "p2pdiff_signaling_dropped_total", room="lobby", reason="decrypt_failed") == 3
    assert value(m, "p2pdiff_signaling_dropped_total", room="lobby", reason="foreign_wire") == 2
    assert value(m, "p2pdiff_foreign_wire_peers_total", room="lobby") == 1
    assert value(m, "p2pdiff_protocol_received_total", room="lobby", action="task") == 4
    assert value(m, "p2pdiff_protocol_received_total", room="lobby", action="result") == 2
    assert value(m, "p2pdiff_protocol_dropped_total", room="lobby", action="task", reason="invalid") == 2
    assert (
        value(m, "p2pdiff_protocol_dropped_total", room="lobby", action="result", reason="unknown_task") == 1
    )


def test_http_series_are_bounded() -> None:
    http = HttpMetrics()
    for i in range(MAX_HTTP_SERIES + 500):
        http.observe("GET", f"/route/{i}", 200, 0.001)
    http.observe("BREW", "/x", 418, 0.001)
    families = list(http.collect())
    series: Any = {tuple(s.labels.values()) for s in families[0].samples}
    assert len(series) <= MAX_HTTP_SERIES + 2
    assert ("other", "/x", "418") in series or ("other", "other", "418") in series
