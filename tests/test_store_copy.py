"""``p2pdiff --copy-store sqlite:///PATH``: a SQLite store into an empty PostgreSQL store (README
"Running several nodes"), run as the deployer runs it, and read back through both stores."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from p2pdiff.tasks.model import Task
from p2pdiff.tasks.pg_store import PgStore
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.results import ResultStore
from p2pdiff.tasks.sqlite_store import SqliteStore
from p2pdiff.tasks.store import Stored, TaskStore
from p2pdiff.tasks.validate import NewTask, TaskUpdate

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


async def _cli(cwd: Path, *args: str, env: dict[str, str]) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("P2PDIFF_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "p2pdiff",
        *args,
        cwd=cwd,
        env={**base, "P2PDIFF_P2P_ENABLED": "false", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert proc.returncode is not None
    return proc.returncode, out


async def _loaded(store: TaskStore) -> Stored:
    await store.open()
    try:
        return await store.load()
    finally:
        await store.close()


def _rooms(stored: Stored) -> list[tuple[Any, ...]]:
    return sorted(
        (r.id, r.generated, r.last_activity, r.helper_joined, r.helper_wire, r.helper_dispatch)
        for r in stored.rooms
    )


def _tasks(stored: Stored) -> list[tuple[Any, ...]]:
    return [tuple(getattr(t, name) for name in Task.__slots__) for t in stored.tasks]


async def _fill(path: Path, results: ResultStore) -> str:
    """A store with what a used one holds: tasks in every state, a result image, a helper room,
    counters. Returns the image's name."""
    store = SqliteStore(path)
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    await queue.load()
    for room_id in ("lobby", "art"):
        for i in range(3):
            queue.add(
                room_id,
                NewTask(id=f"t{i}", prompt=f"{room_id} {i}", options={"steps": i}, extra={}, created_at=None),
            )
    queue.update("lobby", "t0", TaskUpdate("claim", worker="w1", progress=None, result=None, error=None))
    queue.update("lobby", "t1", TaskUpdate("claim", worker="w2", progress=None, result=None, error=None))
    done = TaskUpdate("complete", worker="w2", progress=None, result={"text": "ok"}, error=None)
    queue.update("lobby", "t1", done)
    image = results.save(PNG)
    queue.attach_result("lobby", "t1", "w2", {"image": image.to_json("lobby", "t1")})
    queue.cancel("art", "t2")
    queue.set_helper_joined("lobby", True)
    await queue.flush()
    await store.close()
    return image.path


async def test_copy_store_moves_everything_into_an_empty_postgresql_store(
    tmp_path: Path, pg_url: str
) -> None:
    path = tmp_path / "old.sqlite3"
    image_name = await _fill(path, ResultStore(tmp_path / "results", max_bytes=1 << 20))
    before = await _loaded(SqliteStore(path))

    code, out = await _cli(tmp_path, "--copy-store", f"sqlite:///{path}", env={"P2PDIFF_STORE_URL": pg_url})
    assert code == 0, out
    assert "2 rooms, 6 tasks" in out and "1 result images" in out, out

    target = PgStore(pg_url, display="target", node="check")
    await target.open()
    try:
        after = await target.load()
        assert await target.read_image(image_name, 1 << 20) == PNG
    finally:
        await target.close()
    assert _rooms(after) == _rooms(before)
    assert _tasks(after) == _tasks(before)  # every field, in queue order
    assert after.counters == before.counters
    assert [t.status for t in after.tasks] == [
        "processing",
        "complete",
        "pending",
        "pending",
        "pending",
        "cancelled",
    ]

    # A node on the copy sees the same queue as one on the original.
    copied = QueueManager(PgStore(pg_url, display="target", node="node-a"), lease_seconds=10)
    await copied.store.open()
    original = QueueManager(SqliteStore(path), lease_seconds=10)
    await original.store.open()
    try:
        await copied.load()
        await original.load()
        for room_id in ("lobby", "art"):
            assert copied.list_tasks(room_id) == original.list_tasks(room_id)
        assert copied.helper_rooms() == original.helper_rooms() == ["lobby"]
    finally:
        await copied.store.close()
        await original.store.close()

    # Never into a store in use: the second copy is refused and changes nothing.
    code, out = await _cli(tmp_path, "--copy-store", f"sqlite:///{path}", env={"P2PDIFF_STORE_URL": pg_url})
    assert code == 1 and "already holds 2 rooms and 6 tasks" in out, out
    assert _tasks(await _loaded(PgStore(pg_url, display="target", node="check"))) == _tasks(before)


async def test_copy_store_refuses_other_directions_and_a_missing_file(tmp_path: Path, pg_url: str) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'absent.sqlite3'}"
    code, out = await _cli(tmp_path, "--copy-store", sqlite_url, env={"P2PDIFF_STORE_URL": pg_url})
    assert code == 2 and "no SQLite store at" in out, out
    assert not (tmp_path / "absent.sqlite3").exists()
    code, out = await _cli(tmp_path, "--copy-store", pg_url, env={"P2PDIFF_STORE_URL": pg_url})
    assert code == 2 and "copies a sqlite:/// store into the configured postgresql:// store" in out, out
    code, out = await _cli(tmp_path, "--copy-store", sqlite_url, env={"P2PDIFF_STORE_PATH": "x.sqlite3"})
    assert code == 2 and "copies a sqlite:/// store" in out, out
