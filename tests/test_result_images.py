"""Result images with several nodes on one PostgreSQL (tasks/results.py, "Several nodes"): an image
stored by one node is served by every other, byte for byte with one ETag; its row commits in the
transaction of the task change that references it (a failed turn leaves neither); a node killed
right after its commit loses nothing; and the gc of unreferenced images runs once per period in
the cluster and never takes a fresh image."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from p2pdiff.app import _referenced_results
from p2pdiff.appkeys import QUEUE
from p2pdiff.config import Config
from p2pdiff.errors import Unavailable
from p2pdiff.tasks.pg_store import PgStore
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.results import RESULTS, ResultStore, StoredImage
from p2pdiff.tasks.validate import NewTask, TaskUpdate
from tests.app_room import PNG, RoomFactory, data_url, until
from tests.conftest import ClientFactory
from tests.services import PostgresServer, refuse_task_rows

pytestmark = pytest.mark.timeout(60)

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4


def node_config(config: Config, pg_url: str, results: Path, node: str) -> Config:
    cfg = copy.deepcopy(config)
    cfg.store.url = pg_url
    cfg.store.results_dir = str(results)  # each node its own: nodes are separate machines
    cfg.cluster.node_id = node
    return cfg


Starter = Callable[[str], Awaitable[TestClient]]


@pytest.fixture
async def start(pg_url: str, make_client: ClientFactory, config: Config, tmp_path: Path) -> Starter:
    """``await start("a")``: node node-a on one fresh database (set up before the clients, so it
    is dropped after them), with its own results directory tmp_path/a."""

    async def node(name: str) -> TestClient:
        return await make_client(node_config(config, pg_url, tmp_path / name, f"node-{name}"))

    return node


def complete_with_image(queue: QueueManager, results: ResultStore, task_id: str, data: bytes) -> StoredImage:
    """In a write turn, as the helper does it for a peer's result: a task is added, claimed and
    completed with the image ``data``, which is stored (ResultStore.save) in the same turn."""
    new = NewTask(id=task_id, prompt="a cat", options={}, extra={}, created_at=None)
    queue.add("r", new)
    queue.update("r", task_id, TaskUpdate("claim", "w", None, None, None))
    image = results.save(data)
    queue.worker_complete("r", task_id, "w", {"image": image.to_json("r", task_id)})
    return image


async def store_one_and_wait(url: str, results_dir: str, task_id: str) -> None:
    """A node that stores one image, says so on stdout once it is committed, and waits to be
    killed (run as a separate process by the kill -9 test)."""
    store = PgStore(url, display="node-a", node="node-a")
    queue = QueueManager(store, lease_seconds=10, publish=store.publish)
    results = ResultStore(results_dir, max_bytes=1_000_000, shared=store)
    await store.open()
    await queue.load()
    async with queue.writing():
        complete_with_image(queue, results, task_id, PNG)
    await queue.flush()
    print("committed", flush=True)
    await asyncio.sleep(3600)


async def image_rows(url: str) -> dict[str, tuple[str, bytes]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT name, content_type, bytes FROM result_images")
    finally:
        await conn.close()
    return {row["name"]: (row["content_type"], row["bytes"]) for row in rows}


async def _count_rows(url: str, count: int) -> bool:
    return len(await image_rows(url)) == count


async def test_an_image_a_peer_gave_one_node_is_served_by_another_byte_for_byte(
    pg_url: str, make_room: RoomFactory, start: Starter, config: Config, tmp_path: Path
) -> None:
    config.store.url = pg_url
    config.store.results_dir = str(tmp_path / "a")
    config.cluster.node_id = "node-a"
    room = await make_room()  # node A, with the helper in room lobby
    b = await start("b")
    await room.post("t0")
    room.join("w")
    room.say("w", "progress", {"taskId": "t0", "progress": 0.1})
    room.say("w", "result", {"taskId": "t0", "data": data_url(PNG)})
    await until(lambda: room.task("t0")["status"] == "complete")
    await room.queue.flush()
    on_a = await room.client.get("/api/queue/lobby/t0/result")
    assert on_a.status == 200 and await on_a.read() == PNG
    assert not (tmp_path / "b").exists()  # B has no copy: a cold node
    on_b = await b.get("/api/queue/lobby/t0/result")
    assert on_b.status == 200 and await on_b.read() == PNG
    assert on_b.content_type == "image/png" and on_b.headers["X-Content-Type-Options"] == "nosniff"
    assert on_b.headers["ETag"] == on_a.headers["ETag"] == f'"{hashlib.sha256(PNG).hexdigest()}"'
    results_b: ResultStore = b.server.app[RESULTS]
    assert results_b.fetched == 1 and [p.read_bytes() for p in (tmp_path / "b").iterdir()] == [PNG]
    again = await b.get("/api/queue/lobby/t0/result")  # from B's cache now
    assert await again.read() == PNG and results_b.fetched == 1
    # A browser revalidating on the other node: 304 by the same ETag, no image read.
    revalidated = await b.get("/api/queue/lobby/t0/result", headers={"If-None-Match": on_a.headers["ETag"]})
    assert revalidated.status == 304 and await revalidated.read() == b""
    head = await b.head("/api/queue/lobby/t0/result")
    assert head.status == 200 and head.headers["Content-Length"] == str(len(PNG))


async def test_concurrent_first_requests_on_a_cold_node_read_the_image_once(
    start: Starter, pg_url: str, tmp_path: Path
) -> None:
    a = await start("a")
    b = await start("b")
    queue = a.server.app[QUEUE]
    async with queue.writing():
        complete_with_image(queue, a.server.app[RESULTS], "t1", JPEG)
    await queue.flush()
    answers = await asyncio.gather(*(b.get("/api/queue/r/t1/result") for _ in range(8)))
    assert [(r.status, r.content_type) for r in answers] == [(200, "image/jpeg")] * 8
    assert all([await r.read() == JPEG for r in answers])
    assert b.server.app[RESULTS].fetched == 1


async def test_the_image_row_commits_in_the_transaction_of_the_change_that_references_it(
    start: Starter, pg_url: str, tmp_path: Path
) -> None:
    a = await start("a")
    conn = await asyncpg.connect(pg_url)
    try:  # which transaction wrote each image and task row; and a database refusing one task
        await conn.execute("CREATE TABLE written (what TEXT, xid BIGINT)")
        await conn.execute(
            "CREATE FUNCTION note() RETURNS trigger AS $$ BEGIN "
            "INSERT INTO written VALUES (TG_TABLE_NAME, txid_current()); RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        await refuse_task_rows(conn)
        for table in ("tasks", "result_images"):
            await conn.execute(
                f"CREATE TRIGGER note BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION note()"
            )
        queue, results = a.server.app[QUEUE], a.server.app[RESULTS]
        async with queue.writing():
            image = complete_with_image(queue, results, "t1", PNG)
        await queue.flush()
        written = await conn.fetch("SELECT what, xid FROM written")
        assert sorted(r["what"] for r in written) == ["result_images", "tasks"]
        assert len({r["xid"] for r in written}) == 1
        assert list(await image_rows(pg_url)) == [image.path]
        # A turn that fails leaves neither its task nor its image.
        await conn.execute("DELETE FROM written")
        with pytest.raises(Unavailable):
            async with queue.writing():
                complete_with_image(queue, results, "t2", JPEG)
                queue.add("r", NewTask(id="t3", prompt="boom", options={}, extra={}, created_at=None))
            await queue.flush()
        assert await conn.fetchval("SELECT count(*) FROM tasks WHERE id IN ('t2', 't3')") == 0
        assert list(await image_rows(pg_url)) == [image.path]
        assert "t2" not in queue.rooms["r"].tasks
        # The failed turn's image goes with the next commit (the helper may hold it for a result
        # message still to come), before any change that references it.
        a.server.app[QUEUE].store.backoff.clear()
        async with queue.writing():
            queue.add("r", NewTask(id="t4", prompt="a dog", options={}, extra={}, created_at=None))
        await queue.flush()
        jpeg_name = f"{hashlib.sha256(JPEG).hexdigest()}.jpg"
        assert (await image_rows(pg_url))[jpeg_name] == ("image/jpeg", JPEG)
    finally:
        await conn.close()


async def test_an_image_saved_outside_a_write_turn_is_committed_on_its_own(
    start: Starter, pg_url: str, tmp_path: Path
) -> None:
    a = await start("a")
    image = a.server.app[RESULTS].save(PNG)
    await until(lambda: _count_rows(pg_url, 1))
    assert (await image_rows(pg_url))[image.path] == ("image/png", PNG)


async def test_a_node_killed_right_after_its_commit_keeps_the_image(
    start: Starter, pg_url: str, tmp_path: Path
) -> None:
    script = (
        "import asyncio, sys; from tests.test_result_images import store_one_and_wait; "
        "asyncio.run(store_one_and_wait(sys.argv[1], sys.argv[2], 't1'))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, pg_url, str(tmp_path / "a"), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"committed\n"
    finally:
        proc.kill()  # SIGKILL: no shutdown, no last commit
        await proc.wait()
    b = await start("b")
    resp = await b.get("/api/queue/r/t1/result")
    assert resp.status == 200 and await resp.read() == PNG and resp.content_type == "image/png"


async def test_gc_on_two_nodes_deletes_an_unreferenced_old_image_once_and_never_a_fresh_one(
    start: Starter, pg_url: str, tmp_path: Path
) -> None:
    a = await start("a")
    b = await start("b")
    queue_a = a.server.app[QUEUE]
    async with queue_a.writing():
        referenced = complete_with_image(queue_a, a.server.app[RESULTS], "t1", PNG)
        unreferenced = a.server.app[RESULTS].save(JPEG)
    await queue_a.flush()
    fresh = a.server.app[RESULTS].save(JPEG + b"fresh")
    await until(lambda: _count_rows(pg_url, 3))
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "UPDATE result_images SET created_at = now() - interval '2 hours' WHERE name = ANY($1::text[])",
            [referenced.path, unreferenced.path],
        )
    finally:
        await conn.close()

    async def gc(node: TestClient) -> int:
        app = node.server.app
        pruned: int = await app[RESULTS].prune_shared(lambda: _referenced_results(app), 60)
        return pruned

    # B has not seen A's task yet when its gc starts: it catches up before it decides.
    assert sorted(await asyncio.gather(gc(b), gc(a))) == [0, 1]
    assert sorted(await image_rows(pg_url)) == sorted([referenced.path, fresh.path])
    assert await asyncio.gather(gc(a), gc(b)) == [0, 0]  # once per period


async def test_a_missing_image_is_404_on_every_node(start: Starter, pg_url: str, tmp_path: Path) -> None:
    a = await start("a")
    b = await start("b")
    queue = a.server.app[QUEUE]
    async with queue.writing():
        image = complete_with_image(queue, a.server.app[RESULTS], "t1", PNG)
    await queue.flush()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("DELETE FROM result_images")
    finally:
        await conn.close()
    (tmp_path / "a" / image.path).unlink()
    for node in (a, b):
        resp = await node.get("/api/queue/r/t1/result")
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "result_missing"


async def test_a_cold_node_answers_503_while_the_database_is_away_and_serves_once_it_is_back(
    make_client: ClientFactory, config: Config, tmp_path: Path
) -> None:
    with PostgresServer(tmp_path / "pg") as server:
        url = await server.create_database("store")
        a = await make_client(node_config(config, url, tmp_path / "a", "node-a"))
        b = await make_client(node_config(config, url, tmp_path / "b", "node-b"))
        queue = a.server.app[QUEUE]
        async with queue.writing():
            complete_with_image(queue, a.server.app[RESULTS], "t1", PNG)
        await queue.flush()
        assert (await b.get("/api/queue/r/t1")).status == 200  # B knows the task
        server.stop()
        resp = await b.get("/api/queue/r/t1/result")
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "store_unavailable"
        assert resp.headers["Retry-After"]
        server.start()

        async def served() -> bool:
            resp = await b.get("/api/queue/r/t1/result")
            return resp.status == 200 and await resp.read() == PNG

        await until(served, within=10)
        for node in (a, b):
            await node.close()  # before the database goes
