"""Store faults (issue 12) against the whole app: a write lock held by another program, a full disk,
a damaged file.

A failing store answers changes with 503 and a documented code plus Retry-After, keeps serving
reads, never stalls the loop, does bounded work per failure (one rollback of the changed rows per
failed commit, requests refused at once during the back-off), and works again once the fault
clears; nothing acknowledged is lost and nothing refused appears. A damaged file stops start-up
with one line naming the table, the row and the fix, and ``p2pdiff --check-store`` reports it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from p2pdiff.appkeys import EVENTS, QUEUE, STORE
from p2pdiff.config import Config
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.results import ResultStore
from p2pdiff.tasks.sqlite_store import SqliteStore
from p2pdiff.tasks.validate import NewTask
from tests.app_room import PNG, RoomFactory, app_task, until
from tests.conftest import ClientFactory, post_task
from tests.faults import BIG_PROMPT, Clock, fill_disk, free_disk, held_lock, on_disk


async def refused(resp: Any, code: str) -> int:
    """Checks a 503 for a store fault; returns its Retry-After."""
    body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == code, body
    assert "nothing was changed" in body["error"]["message"]
    return int(resp.headers["Retry-After"])


async def post_until_accepted(client: TestClient, room: str, body: dict[str, Any]) -> None:
    """A client retrying one task until it is accepted (the back-off ends within seconds)."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        resp = await client.post(f"/api/queue/{room}", json=body)
        if resp.status == 201:
            return
        await refused(resp, (await resp.json())["error"]["code"])
        assert asyncio.get_running_loop().time() < deadline, "the store did not recover"
        await asyncio.sleep(0.1)


async def store_stats(client: TestClient) -> dict[str, Any]:
    return (await (await client.get("/api/stats")).json())["store"]


@pytest.fixture
def config(config: Config) -> Config:
    config.server.rate_limit_per_second = 0  # these tests send hundreds of changes from one address
    return config


async def test_a_held_write_lock_gets_503_at_once_and_loses_nothing(
    client: TestClient, config: Config
) -> None:
    accepted = [f"ok{i}" for i in range(5)]
    for tid in accepted:
        await post_task(client, "r", {"id": tid, "prompt": "p"})
    holder = held_lock(config.store.path)
    try:
        # Concurrent POSTs share one commit, which waits for the lock off the loop and then fails:
        # every one of them is refused, and the server answers everything else meanwhile.
        posts = [client.post("/api/queue/r", json={"id": f"no{i}", "prompt": "p"}) for i in range(30)]
        *answers, health = await asyncio.gather(*posts, client.get("/api/health"))
        assert health.status == 200
        assert {await refused(resp, "store_busy") for resp in answers} == {1}
        # Meanwhile (the back-off) changes are refused before anything is tried: no commit, no wait.
        for i in range(20):
            await refused(
                await client.patch("/api/queue/r/ok0", json={"action": "claim", "worker": "w"}), "store_busy"
            )
            await refused(
                await client.post("/api/queue/r", json={"id": f"later{i}", "prompt": "p"}), "store_busy"
            )
        listed = await (await client.get("/api/queue/r")).json()
        assert [t["id"] for t in listed["queue"]] == accepted  # reads go on; nothing refused shows
        stats = await store_stats(client)
        assert (
            stats["failures"] == {"store_busy": 1, "store_unavailable": 0}
            and stats["failing"] == "store_busy"
        )
        assert stats["rollbacks"] == 1 and stats["refused"] == 40
    finally:
        holder.rollback()
        holder.close()
    await post_until_accepted(client, "r", {"id": "after", "prompt": "p"})
    accepted.append("after")
    assert (await store_stats(client))["failing"] is None
    assert [t["id"] for t in (await on_disk(config.store.path)).list_tasks("r")] == accepted


async def test_a_lock_held_at_start_does_not_stop_the_server(
    make_client: ClientFactory, config: Config
) -> None:
    await fill_store(Path(config.store.path))
    config.p2p.rooms = ["lobby"]  # recording it at start is a write
    holder = held_lock(config.store.path)
    try:
        client = await make_client(config)
        assert (await client.get("/api/health")).status == 200
        listed = await (await client.get("/api/queue/room0")).json()
        assert len(listed["queue"]) == 100
        await refused(await client.post("/api/queue/r", json={"prompt": "p"}), "store_busy")
    finally:
        holder.rollback()
        holder.close()
    await post_until_accepted(client, "r", {"id": "after", "prompt": "p"})


async def test_a_full_disk_costs_one_rollback_per_failed_commit_and_recovers(
    make_client: ClientFactory, config: Config
) -> None:
    client = await make_client(config)
    queue, store = client.server.app[QUEUE], client.server.app[STORE]
    clock = store.clock = Clock()  # the back-off passes when the test says so
    for i in range(2000):
        queue.add("big", NewTask(f"t{i}", f"prompt {i}", {"steps": i}, {}, None))
    await queue.flush()
    first = queue.get_task("big", "t0")
    bus = client.server.app[EVENTS]
    mark = bus.last_id
    fill_disk(store)

    async def post(tid: str) -> Any:
        return await client.post("/api/queue/big", json={"id": tid, "prompt": BIG_PROMPT})

    answers = await asyncio.gather(*(post(f"no{i}") for i in range(50)))
    assert {await refused(resp, "store_unavailable") for resp in answers} == {1}
    for i in range(150):
        await refused(await post(f"later{i}"), "store_unavailable")
    await refused(await client.delete("/api/queue/big/t1"), "store_unavailable")
    await refused(await client.post("/api/join/big"), "store_unavailable")
    # 202 requests, one failed commit: one rollback of the rows it changed, and no reload (the same
    # task objects); reads still answer.
    stats = await store_stats(client)
    assert (stats["failures"]["store_unavailable"], stats["rollbacks"], stats["refused"]) == (1, 1, 152)
    assert queue.get_task("big", "t0") is first
    assert [e.type for e in bus.since(mark) if e.type == "queue.reloaded"] == ["queue.reloaded"]
    listing = await (await client.get("/api/queue/big?limit=5000")).json()
    assert len(listing["queue"]) == 2000 and (await client.get("/api/health")).status == 200
    metrics = await (await client.get("/metrics")).text()
    assert 'p2pdiff_store_failures_total{code="store_unavailable"} 1.0' in metrics
    assert "p2pdiff_store_rollbacks_total 1.0" in metrics and "p2pdiff_store_failing 1.0" in metrics
    # The back-off over, the next change tries the disk again: still full, a longer back-off.
    clock.now += 1
    assert await refused(await post("again"), "store_unavailable") == 2
    assert (await store_stats(client))["rollbacks"] == 2
    free_disk(store)
    clock.now += 2
    resp = await post("saved")
    assert resp.status == 201, await resp.text()
    ids = [t["id"] for t in (await on_disk(config.store.path)).list_tasks("big")]
    assert ids == [f"t{i}" for i in range(2000)] + ["saved"]


async def test_a_peer_change_the_store_cannot_save_is_put_back_and_counted(make_room: RoomFactory) -> None:
    room = await make_room()
    store = room.client.server.app[STORE]
    store.clock = clock = Clock()
    room.join("a")
    fill_disk(store)
    room.say("a", "queue", {"tasks": [app_task("t1", prompt=BIG_PROMPT)]})
    assert room.task("t1")["status"] == "pending"  # in memory until the background commit fails
    await until(lambda: room.queue.get_room("lobby").tasks.get("t1") is None)  # type: ignore[union-attr]
    assert (await room.dropped()) == {"*.store_error": 1}
    free_disk(store)
    clock.now += 1
    room.say("a", "queue", {"tasks": [app_task("t1", prompt=BIG_PROMPT)]})  # the app sends its queue again
    await until(lambda: store.commits and not store.dirty)
    assert [t["id"] for t in (await on_disk(store.path)).list_tasks("lobby")] == ["t1"]


async def test_a_result_image_the_disk_cannot_take_is_a_counted_store_error(
    make_room: RoomFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    room = await make_room(dispatch=True)
    room.join("g1", gpu=True)
    await room.post("t0")
    await until(lambda: room.handed("g1") == ["t0"])
    save = ResultStore.save

    def no_space(self: ResultStore, data: bytes) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ResultStore, "save", no_space)
    room.say("g1", "chunk", PNG, {"taskId": "t0", "chunkId": "t0_chunk_0"})
    assert await room.dropped() == {"chunk.store_error": 1}
    assert room.task("t0")["status"] == "processing"  # the worker may send it again
    monkeypatch.setattr(ResultStore, "save", save)
    room.say("g1", "chunk", PNG, {"taskId": "t0", "chunkId": "t0_chunk_0"})
    room.say("g1", "result", {"taskId": "t0", "chunkId": "t0_chunk_0", "status": "complete"})
    assert room.task("t0")["result"]["image"]["size"] == len(PNG)


# -- a damaged file: start-up and --check-store ---------------------------------------------------


def run(args: list[str], cwd: Path, store: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PDIFF_") and k != "PORT"}
    env.update(P2PDIFF_P2P_ENABLED="false", P2PDIFF_STORE_PATH=str(store), PORT="0")
    return subprocess.run(
        [sys.executable, "-m", "p2pdiff", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


async def fill_store(path: Path) -> None:
    """200 tasks in two rooms, committed and closed."""
    store = SqliteStore(path)
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    for i in range(200):
        queue.add(f"room{i % 2}", NewTask(f"t{i}", f"prompt {i}", {"steps": i}, {}, None))
    await queue.flush()
    await store.close()


def build_store(path: Path) -> None:
    asyncio.run(fill_store(path))


def sql(path: Path, statement: str) -> Any:
    db = sqlite3.connect(path)
    try:
        with db:
            return db.execute(statement).fetchall()
    finally:
        db.close()


def zero_page(path: Path, page: int) -> None:
    with path.open("r+b") as f:
        f.seek((page - 1) * 4096)  # SQLite's default page size
        f.write(bytes(4096))


DAMAGE: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "bad JSON": (
        lambda p: sql(p, "UPDATE tasks SET options = '{not json' WHERE id = 't7'"),
        [
            'table tasks, row room_id="room1" id="t7" (rowid 8): column options is not valid JSON',
            "rowid IN (8)",
        ],
    ),
    "wrong type": (
        lambda p: sql(p, "UPDATE tasks SET seq = 'soon' WHERE id = 't9'"),
        ['table tasks, row room_id="room1" id="t9" (rowid 10): column seq is "soon", not an integer'],
    ),
    "zeroed file": (
        lambda p: p.write_bytes(bytes(p.stat().st_size)),
        ["file is not a database"],
    ),
    "zeroed table page": (
        lambda p: zero_page(p, sql(p, "SELECT rootpage FROM sqlite_schema WHERE name = 'tasks'")[0][0]),
        ["table tasks", "database disk image is malformed"],
    ),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_store_stops_start_up_with_one_line_and_the_check_reports_it(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "db.sqlite3"
    build_store(path)
    assert run(["--check-store"], tmp_path, path).returncode == 0
    damage, needles = DAMAGE[kind]
    damage(path)
    started = run([], tmp_path, path)
    assert started.returncode == 1 and "Traceback" not in started.stderr
    # Everything else on stderr is a JSON log line of the start.
    (line,) = [line for line in started.stderr.splitlines() if not line.startswith("{")]
    assert all(json.loads(log)["level"] == "info" for log in started.stderr.splitlines() if log != line)
    assert line.startswith("p2pdiff: store error: ") and '".recover"' in line and "back it up" in line
    assert all(needle in line for needle in needles), line
    check = run(["--check-store"], tmp_path, path)
    assert check.returncode == 1 and check.stdout.startswith(f"store {path}: ")
    assert (
        all(needle in check.stdout for needle in needles) and "\nfix: the database is damaged" in check.stdout
    )


def test_check_store_of_a_sound_store_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    build_store(path)
    before = path.read_bytes()
    check = run(["--check-store"], tmp_path, path)
    assert (check.returncode, check.stdout) == (0, f"store {path}: ok (schema 3, 2 rooms, 200 tasks)\n")
    assert path.read_bytes() == before
    missing = run(["--check-store"], tmp_path, tmp_path / "nope.sqlite3")
    assert missing.returncode == 1 and "no store at" in missing.stderr
    assert not (tmp_path / "nope.sqlite3").exists()
