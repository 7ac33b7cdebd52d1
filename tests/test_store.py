from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from p2pdiff import store as store_module
from p2pdiff.errors import Unavailable
from p2pdiff.queue import QueueManager
from p2pdiff.store import Store, StoreError
from p2pdiff.validate import NewTask


def new(tid: str) -> NewTask:
    return NewTask(id=tid, prompt="p", options={}, extra={"type": "generate"}, created_at=None)


def test_fresh_store_is_migrated_to_latest(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    store.open()
    assert store.schema_version() == store_module.MIGRATIONS[-1][0]
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match="schema version 99, newer than"):
        Store(path).open()


async def test_migration_path_keeps_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    store.open()
    queue = QueueManager(store, lease_seconds=10)
    queue.add("r", new("t1"))
    await queue.flush()
    store.close()
    following = store_module.MIGRATIONS[-1][0] + 1
    step = (following, ["ALTER TABLE tasks ADD COLUMN note TEXT", "UPDATE tasks SET note = 'migrated'"])
    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, step])
    store = Store(path)
    store.open()
    assert store.schema_version() == following
    assert store.db.execute("SELECT id, note FROM tasks").fetchall() == [("t1", "migrated")]
    again = QueueManager(store, lease_seconds=10)
    again.load()
    assert [t["id"] for t in again.list_tasks("r")] == ["t1"]


async def test_v1_store_gains_the_helper_wire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema 2 adds rooms.helper_wire: rooms of a v1 store keep everything and follow the default."""
    path = tmp_path / "s.sqlite3"
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    v1 = Store(path)
    v1.open()
    v1.db.execute(
        "INSERT INTO rooms (room_id, generated, last_activity, helper_joined) VALUES ('old', 3, 7, 1)"
    )
    v1.close()
    monkeypatch.undo()

    store = Store(path)
    store.open()
    assert store.schema_version() == len(store_module.MIGRATIONS)
    queue = QueueManager(store, lease_seconds=10)
    queue.load()
    room = queue.get_room("old")
    assert room is not None and (room.generated, room.helper_joined, room.helper_wire) == (3, True, None)
    queue.set_helper_options("old", wire="0.22")
    await queue.flush()
    store.close()

    store = Store(path)
    store.open()
    queue = QueueManager(store, lease_seconds=10)
    queue.load()
    assert queue.get_room("old").helper_wire == "0.22"  # type: ignore[union-attr]
    queue.set_helper_joined("old", False)  # leaving forgets the choice
    await queue.flush()
    assert store.db.execute("SELECT helper_wire FROM rooms").fetchall() == [(None,)]
    store.close()


async def test_concurrent_commits_share_one_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    store.open()
    queue = QueueManager(store, lease_seconds=10)

    async def add(i: int) -> None:
        queue.add("r", new(f"t{i}"))
        await queue.flush()

    await asyncio.gather(*(add(i) for i in range(50)))
    assert store.commits == 1
    assert store.db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 50


async def test_failed_commit_reloads_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "s.sqlite3")
    store.open()
    queue = QueueManager(store, lease_seconds=10)
    queue.add("r", new("kept"))
    await queue.flush()
    queue.add("r", new("lost"))

    def broken() -> None:
        store.db.execute("ROLLBACK")
        store._in_tx = False
        raise StoreError("disk full")

    monkeypatch.setattr(store, "_commit_now", broken)
    with pytest.raises(Unavailable):
        await queue.flush()
    # Memory is back in line with what was committed: the caller was told the task was not accepted.
    assert [t["id"] for t in queue.list_tasks("r")] == ["kept"]
