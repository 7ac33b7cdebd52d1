"""The helper's rooms shared out among nodes on one PostgreSQL database (p2pdiff/ops/cluster.py):
each wanted room is in exactly one node's helper, a join on any node gets the room joined
somewhere, a graceful stop hands rooms over at once, a node cut off loses them within a lease, a
node that starts gets its share, and a room no longer wanted is left."""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from p2pdiff.appkeys import HELPER, STORE
from p2pdiff.config import Config
from p2pdiff.ops.cluster import LEASES
from p2pdiff.rooms.helper import ApiOnlyHelper, HelperRoom
from p2pdiff.tasks.pg_store import PgStore
from tests.conftest import ClientFactory


class RecordingHelper(ApiOnlyHelper):
    """An API-only helper that remembers every join and leave, for the rooms' history."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[str, str]] = []
        self.dispatch: dict[str, bool] = {}

    async def join(self, room_id: str, wire: str | None = None) -> HelperRoom:
        if room_id not in {room.room_id for room in self.rooms()}:
            self.history.append(("join", room_id))
        return await super().join(room_id, wire)

    async def leave(self, room_id: str) -> bool:
        left = await super().leave(room_id)
        if left:
            self.history.append(("leave", room_id))
        return left

    def set_dispatch(self, room_id: str, enabled: bool) -> None:
        self.dispatch[room_id] = enabled

    @property
    def in_rooms(self) -> set[str]:
        return {room.room_id for room in self.rooms()}

    def in_room(self, room_id: str) -> bool:
        return room_id in self.in_rooms


Starter = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def start(pg_url: str, make_client: ClientFactory, config: Config, tmp_path: Path) -> Starter:
    """``await start(name, lease_seconds)``: a node on one fresh database, with a RecordingHelper."""

    async def node(name: str, lease_seconds: float = 3.0, **cluster: Any) -> TestClient:
        cfg = copy.deepcopy(config)
        cfg.store.url = pg_url
        cfg.store.results_dir = str(tmp_path / "results")
        cfg.cluster.node_id = name
        cfg.cluster.lease_seconds = lease_seconds
        for key, value in cluster.items():
            setattr(cfg.p2p, key, value)
        return await make_client(cfg, helper=RecordingHelper())

    return node


def helper(client: TestClient) -> RecordingHelper:
    found = client.app[HELPER]
    assert isinstance(found, RecordingHelper)
    return found


def placement(clients: list[TestClient]) -> dict[str, list[str]]:
    """Room -> the nodes whose helper is in it."""
    where: dict[str, list[str]] = {}
    for client in clients:
        for room in helper(client).in_rooms:
            where.setdefault(room, []).append(client.app[LEASES].node)
    return where


async def until(check: Callable[[], Any], within: float, what: str) -> float:
    """Poll ``check()`` (sync or async) until truthy; the seconds it took."""
    started = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.02)


def spread(clients: list[TestClient], rooms: set[str]) -> bool:
    """Every room in exactly one helper, and no helper in any other room."""
    where = placement(clients)
    return set(where) == rooms and all(len(nodes) == 1 for nodes in where.values())


async def join(client: TestClient, room: str, **body: Any) -> dict[str, Any]:
    resp = await client.post(f"/api/join/{room}", json=body or None)
    data: dict[str, Any] = await resp.json()
    assert resp.status == 202, data
    return data


async def test_each_room_is_held_by_one_node_and_the_join_answer_names_it(start: Starter) -> None:
    a, b, c = [await start(name) for name in ("a", "b", "c")]
    await until(lambda: all(len(n.app[LEASES].nodes) == 3 for n in (a, b, c)), 5, "three live nodes")
    rooms = {f"r{i}" for i in range(6)}
    for i, room in enumerate(sorted(rooms)):
        answer = await join((a, b, c)[i % 3], room, dispatch=True)
        # The answer names the node that holds the room's lease; that node's helper joins it.
        holder = helper(next(n for n in (a, b, c) if n.app[LEASES].node == answer["node"]))
        await until(functools.partial(holder.in_room, room), 1, f"{answer['node']} joins {room}")
        assert holder.dispatch.get(room) is True
    await until(lambda: spread([a, b, c], rooms), 10, "each room in one helper")
    # Shared out evenly: two each.
    await until(lambda: sorted(len(helper(n).in_rooms) for n in (a, b, c)) == [2, 2, 2], 10, "two each")
    assert spread([a, b, c], rooms)

    async def health_shows_the_spread() -> bool:
        # As of b's last round (a third of a lease at most behind).
        health = await (await b.get("/api/health")).json()
        assert health["node"] == "b"
        return sorted(health["cluster"]["rooms"]) == sorted(helper(b).in_rooms) and {
            n["id"]: n["rooms"] for n in health["cluster"]["nodes"]
        } == {"a": 2, "b": 2, "c": 2}

    await until(health_shows_the_spread, 3, "/api/health shows the spread")
    metrics = await (await c.get("/metrics")).text()
    assert 'p2pdiff_node_info{node="c"} 1.0' in metrics
    assert "p2pdiff_cluster_nodes 3.0" in metrics
    assert "p2pdiff_cluster_rooms_held 2.0" in metrics
    assert "p2pdiff_room_leases_claimed_total" in metrics


async def test_a_join_on_a_node_that_has_its_share_is_taken_by_another(start: Starter) -> None:
    a, b = await start("a"), await start("b")
    await until(lambda: len(a.app[LEASES].nodes) == 2, 5, "two live nodes")
    first = await join(a, "one")
    owner, other = (a, b) if first["node"] == "a" else (b, a)
    await until(lambda: helper(owner).in_rooms == {"one"}, 1, "the first room joined")
    second = await join(owner, "two", wire="0.22")
    # The owner holds its share (two rooms, two nodes: one each): the other node takes the room
    # asked for on it, and the answer says so.
    assert second["node"] == other.app[LEASES].node and second["wire"] == "0.22"
    await until(lambda: helper(other).in_rooms == {"two"}, 1, "the other node joins")
    assert helper(other).room("two").wire == "0.22"  # type: ignore[union-attr]
    assert helper(owner).in_rooms == {"one"}
    # The same room asked for with another wire: refused, as with one node.
    resp = await owner.post("/api/join/two", json={"wire": "0.25"})
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "wire_mismatch"


async def test_a_graceful_stop_hands_the_rooms_over_at_once(start: Starter) -> None:
    lease = 10.0  # a takeover by a lapsed lease would take 2/3 of this at least
    a, b = await start("a", lease), await start("b", lease)
    await until(lambda: len(a.app[LEASES].nodes) == 2, 5, "two live nodes")
    rooms = {f"r{i}" for i in range(4)}
    for room in sorted(rooms):
        await join(a, room)
    await until(lambda: spread([a, b], rooms) and len(helper(a).in_rooms) == 2, 10, "two each")
    handed = helper(a).in_rooms
    started = time.monotonic()
    await a.close()  # the app's cleanup: leases given up, NOTIFY
    took = await until(lambda: helper(b).in_rooms == rooms, lease, "b holds every room")
    took = time.monotonic() - started
    print(f"\ngraceful handover of {len(handed)} rooms: {took * 1000:.0f} ms after the stop began")
    assert took < lease / 3, f"handover took {took:.2f} s: it waited for the leases to lapse"
    assert helper(a).in_rooms == set()
    assert ("leave", sorted(handed)[0]) in helper(a).history


async def test_a_node_cut_off_from_the_database_loses_its_rooms_within_a_lease(start: Starter) -> None:
    lease = 3.0
    a, b = await start("a", lease), await start("b", lease)
    await until(lambda: len(a.app[LEASES].nodes) == 2, 5, "two live nodes")
    rooms = {f"r{i}" for i in range(4)}
    for room in sorted(rooms):
        await join(b, room)
    await until(lambda: spread([a, b], rooms) and len(helper(a).in_rooms) == 2, 10, "two each")
    store = a.app[STORE]
    assert isinstance(store, PgStore)
    overlaps: list[dict[str, list[str]]] = []

    def b_holds_all() -> bool:
        where = placement([a, b])
        if any(len(nodes) > 1 for nodes in where.values()):
            overlaps.append(where)
        return helper(b).in_rooms == rooms

    # Its renewals stop as on a dead machine: every connection it has to the database is cut.
    store.pool.terminate()
    listener = a.app[LEASES]._listener
    assert listener is not None
    listener.terminate()
    started = time.monotonic()
    took = await until(b_holds_all, lease * 2, "b holds every room")
    print(f"\nfailover of 2 rooms: {took:.2f} s after the renewals stopped (lease {lease} s)")
    assert took <= lease + 0.5, f"took {took:.2f} s"
    # a left its rooms by itself before b took them: never two helpers in one room.
    assert helper(a).in_rooms == set() and not overlaps, overlaps
    assert time.monotonic() - started <= lease + 0.5


async def test_a_node_that_starts_gets_its_share(start: Starter) -> None:
    a = await start("a")
    rooms = {f"r{i}" for i in range(4)}
    for room in sorted(rooms):
        assert (await join(a, room))["node"] == "a"
    assert helper(a).in_rooms == rooms
    b = await start("b")
    await until(lambda: len(helper(b).in_rooms) == 2, 10, "b holds two rooms")
    await until(lambda: spread([a, b], rooms), 5, "each room in one helper")
    assert len(helper(a).in_rooms) == 2


async def test_a_room_left_over_rest_is_left_by_its_owner(start: Starter) -> None:
    a, b = await start("a"), await start("b")
    await until(lambda: len(a.app[LEASES].nodes) == 2, 5, "two live nodes")
    await join(a, "one")
    await join(a, "two")
    owner = b if "two" in helper(b).in_rooms else a
    other = a if owner is b else b
    resp = await other.delete("/api/join/two")
    assert resp.status == 200, await resp.text()
    store = a.app[STORE]
    assert isinstance(store, PgStore)

    async def released() -> bool:
        held = await store.pool.fetchval("SELECT count(*) FROM room_leases WHERE room_id = 'two'")
        return held == 0 and "two" not in helper(owner).in_rooms

    await until(released, 3, "the owner leaves and gives the lease up")
    assert ("leave", "two") in helper(owner).history
    assert "two" not in placement([a, b])
    assert (await other.delete("/api/join/two")).status == 404


async def test_config_rooms_are_wanted_across_the_cluster(start: Starter) -> None:
    a = await start("a", rooms=["lobby", "studio"])
    b = await start("b")
    await until(lambda: spread([a, b], {"lobby", "studio"}), 10, "each [p2p] room in one helper")


async def test_a_second_process_with_the_same_node_id_is_reported(
    start: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="p2pdiff.ops.cluster")
    await start("twin", 1.0)
    await start("twin", 1.0)
    await until(
        lambda: any("another live process uses node id twin" in r.getMessage() for r in caplog.records),
        5,
        "the clash logged",
    )


async def test_one_node_on_sqlite_shows_its_id_and_no_cluster(
    make_client: ClientFactory, config: Config
) -> None:
    config.cluster.node_id = "solo"
    client = await make_client(config, helper=RecordingHelper())
    assert LEASES not in client.app
    assert (await client.post("/api/join/r")).status == 202
    assert helper(client).in_rooms == {"r"}  # joined by the request itself, as always
    health = await (await client.get("/api/health")).json()
    assert health["node"] == "solo" and "cluster" not in health
    metrics = await (await client.get("/metrics")).text()
    assert 'p2pdiff_node_info{node="solo"} 1.0' in metrics
    assert "p2pdiff_cluster_nodes" not in metrics
