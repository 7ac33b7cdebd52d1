from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from p2pdiff.errors import Unavailable
from p2pdiff.tasks import sqlite_store
from p2pdiff.tasks.journal import Journal
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.sqlite_store import SqliteStore, check_store
from p2pdiff.tasks.store import StoreCorrupt, StoreError
from p2pdiff.tasks.validate import NewTask, TaskUpdate
from tests.app_room import until
from tests.faults import BIG_PROMPT, Clock, fill_disk, free_disk, held_lock, on_disk


def new(tid: str) -> NewTask:
    return NewTask(id=tid, prompt="p", options={}, extra={"type": "generate"}, created_at=None)


async def test_fresh_store_is_migrated_to_latest(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    assert store.schema_version() == sqlite_store.MIGRATIONS[-1][0]
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    await store.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match="schema version 99, newer than"):
        asyncio.run(SqliteStore(path).open())


async def test_migration_path_keeps_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path)
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    queue.add("r", new("t1"))
    await queue.flush()
    await store.close()
    following = sqlite_store.MIGRATIONS[-1][0] + 1
    step = (following, ["ALTER TABLE tasks ADD COLUMN note TEXT", "UPDATE tasks SET note = 'migrated'"])
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", [*sqlite_store.MIGRATIONS, step])
    store = SqliteStore(path)
    await store.open()
    assert store.schema_version() == following
    assert store.db.execute("SELECT id, note FROM tasks").fetchall() == [("t1", "migrated")]
    again = QueueManager(store, lease_seconds=10)
    await again.load()
    assert [t["id"] for t in again.list_tasks("r")] == ["t1"]


async def test_v1_store_gains_the_helper_wire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema 2 adds rooms.helper_wire: rooms of a v1 store keep everything and follow the default."""
    path = tmp_path / "s.sqlite3"
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", sqlite_store.MIGRATIONS[:1])
    v1 = SqliteStore(path)
    await v1.open()
    v1.db.execute(
        "INSERT INTO rooms (room_id, generated, last_activity, helper_joined) VALUES ('old', 3, 7, 1)"
    )
    await v1.close()
    monkeypatch.undo()

    store = SqliteStore(path)
    await store.open()
    assert store.schema_version() == len(sqlite_store.MIGRATIONS)
    queue = QueueManager(store, lease_seconds=10)
    await queue.load()
    room = queue.get_room("old")
    assert room is not None and (room.generated, room.helper_joined, room.helper_wire) == (3, True, None)
    queue.set_helper_options("old", wire="0.22")
    await queue.flush()
    await store.close()

    store = SqliteStore(path)
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    await queue.load()
    assert queue.get_room("old").helper_wire == "0.22"  # type: ignore[union-attr]
    queue.set_helper_joined("old", False)  # leaving forgets the choice
    await queue.flush()
    assert store.db.execute("SELECT helper_wire FROM rooms").fetchall() == [(None,)]
    await store.close()


async def test_concurrent_commits_share_one_transaction(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    queue = QueueManager(store, lease_seconds=10)

    async def add(i: int) -> None:
        queue.add("r", new(f"t{i}"))
        await queue.flush()

    await asyncio.gather(*(add(i) for i in range(50)))
    assert store.commits == 1
    assert store.db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 50


# -- faults: a full disk, another process's write lock ----------------------------------------------


def big(tid: str) -> NewTask:
    return NewTask(id=tid, prompt=BIG_PROMPT, options={}, extra={}, created_at=None)


async def test_a_failed_commit_puts_back_only_what_changed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3", clock=Clock())
    await store.open()
    events: list[tuple[str, Any]] = []
    queue = QueueManager(store, lease_seconds=10, publish=lambda t, r, d, origin: events.append((t, d)))
    for i in range(50):
        queue.add("r", new(f"t{i}"))
    queue.add("other", new("o1"))
    await queue.flush()
    kept = queue.get_task("r", "t0")
    fill_disk(store)
    queue.add("r", big("lost"))
    queue.update("r", "t0", TaskUpdate("claim", "w", None, None, None))
    queue.add("new-room", new("n1"))
    with pytest.raises(Unavailable) as info:
        await queue.flush()
    assert (info.value.code, info.value.retry_after) == ("store_unavailable", 1.0)
    # The very objects of the last commit, as they were: no reload, only the changed rows put back.
    assert queue.get_task("r", "t0") is kept and (kept.status, kept.claimed_by) == ("pending", None)
    assert [t["id"] for t in queue.list_tasks("r")] == [f"t{i}" for i in range(50)]
    assert queue.get_room("new-room") is None and queue.rollbacks == 1
    assert events[-1] == ("queue.reloaded", {"reason": "store_unavailable", "rooms": ["new-room", "r"]})
    assert queue.list_tasks("r") == (await on_disk(store.path)).list_tasks("r")


async def test_when_putting_memory_back_fails_the_queue_reloads_and_callers_hear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3", clock=Clock())
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    queue.add("r", new("kept"))
    await queue.flush()

    def broken(self: Journal, rooms: Any) -> list[str]:
        raise KeyError("a change the journal missed")

    monkeypatch.setattr(Journal, "rollback", broken)
    fill_disk(store)
    queue.add("r", big("lost"))
    with pytest.raises(Unavailable):
        await queue.flush()
    assert [t["id"] for t in queue.list_tasks("r")] == ["kept"] and queue.rollbacks == 1


async def test_a_failing_store_refuses_changes_until_its_backoff_ends(tmp_path: Path) -> None:
    clock = Clock()
    store = SqliteStore(tmp_path / "s.sqlite3", clock=clock)
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    queue.add("r", new("kept"))
    await queue.flush()
    fill_disk(store)
    waits = []
    for i in range(5):
        queue.check_writable()  # the back-off is over: this change may try the disk
        queue.add("r", big(f"lost{i}"))
        with pytest.raises(Unavailable) as info:
            await queue.flush()
        waits.append(info.value.retry_after)
        for _ in range(100):  # every request meanwhile is refused at once, nothing is tried
            with pytest.raises(Unavailable) as refused:
                queue.check_writable()
            assert refused.value.code == "store_unavailable" and refused.value.retry_after == waits[-1]
        # A change made anyway (a peer's, a lease expiring) is put back without touching the disk.
        queue.add("r", new(f"peer{i}"))
        with pytest.raises(Unavailable):
            await queue.flush()
        clock.now += waits[-1]
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert store.failures == {"store_unavailable": 5} and store.refused == 505 and queue.rollbacks == 10
    assert store.stats()["failing"] == "store_unavailable"
    free_disk(store)
    queue.add("r", big("saved"))
    await queue.flush()
    queue.check_writable()
    assert store.stats()["failing"] is None
    assert [t["id"] for t in (await on_disk(store.path)).list_tasks("r")] == ["kept", "saved"]


async def test_a_lock_held_briefly_is_waited_for_off_the_loop(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    holder = held_lock(store.path)
    # Released by a loop timer before the retries run out (their waits add up to about 0.5 s).
    asyncio.get_running_loop().call_later(0.05, holder.rollback)
    queue.add("r", new("t1"))
    flush = asyncio.ensure_future(queue.flush())
    turns = 0
    while not flush.done():  # the loop keeps turning while the commit waits for the lock
        turns += 1
        await asyncio.sleep(0)
    await flush
    assert turns > 1 and store.busy_retries >= 1 and not store.failures
    assert [t["id"] for t in (await on_disk(store.path)).list_tasks("r")] == ["t1"]
    holder.close()


async def test_a_lock_held_on_fails_the_commit_as_busy(tmp_path: Path) -> None:
    clock = Clock()
    store = SqliteStore(tmp_path / "s.sqlite3", clock=clock)
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    queue.add("r", new("t1"))
    await queue.flush()
    holder = held_lock(store.path)
    queue.add("r", new("t2"))
    with pytest.raises(Unavailable) as info:
        await queue.flush()
    assert (info.value.code, info.value.retry_after) == ("store_busy", 1.0)
    assert store.busy_retries == len(sqlite_store.BUSY_RETRY_SECONDS)
    assert [t["id"] for t in queue.list_tasks("r")] == ["t1"]
    holder.rollback()
    holder.close()
    clock.now += 1
    queue.add("r", new("t2"))
    await queue.flush()
    assert [t["id"] for t in (await on_disk(store.path)).list_tasks("r")] == ["t1", "t2"]


async def test_close_commits_what_waits_for_a_lock(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    holder = held_lock(store.path)
    queue.add("r", new("t1"))
    flush = asyncio.ensure_future(queue.flush())
    await until(lambda: store.busy_retries)
    holder.rollback()
    await store.close()  # shutdown while the commit waits for its next try: it is made now
    await flush
    assert [t["id"] for t in (await on_disk(store.path)).list_tasks("r")] == ["t1"]
    holder.close()


async def test_a_change_after_close_is_refused_not_left_waiting(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    await store.close()
    queue.add("r", new("late"))
    with pytest.raises(Unavailable):
        await queue.flush()
    assert queue.list_tasks("r") == []


async def test_filled_in_options_and_fields_are_saved(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    queue.add("r", NewTask(id="t", prompt="p", options={}, extra={}, created_at=None))
    await queue.flush()
    queue.add(
        "r", NewTask(id="t", prompt="p", options={"steps": 3}, extra={"negativePrompt": "x"}, created_at=None)
    )
    await queue.flush()
    task = (await on_disk(store.path)).get_task("r", "t")
    assert (task.options, task.extra) == ({"steps": 3}, {"negativePrompt": "x"})


# -- damage: rows and pages that cannot be read --------------------------------------------------

# Modest and deterministic: the suite stays fast and CI sees the same examples every run.
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with rooms, tasks in every state and a counter, closed (no WAL left)."""
    path = tmp_path_factory.mktemp("template") / "s.sqlite3"

    async def build() -> None:
        store = SqliteStore(path)
        await store.open()
        queue = QueueManager(store, lease_seconds=10)
        for i in range(300):
            queue.add(f"room{i % 3}", NewTask(f"t{i}", f"prompt {i}", {"steps": i}, {"type": "g"}, None))
        queue.update("room0", "t0", TaskUpdate("claim", "w", None, None, None))
        queue.update("room0", "t0", TaskUpdate("complete", "w", None, {"data": "x"}, None))
        queue.update("room1", "t1", TaskUpdate("claim", "w", None, None, None))
        queue.update("room1", "t1", TaskUpdate("requeue", "w", None, None, None))
        queue.set_helper_joined("room2", True)
        queue.set_helper_options("room2", wire="0.22", dispatch=True)
        await queue.flush()
        await store.close()

    asyncio.run(build())
    return path


def damaged_copy(template: Path, directory: str) -> Path:
    path = Path(directory) / "s.sqlite3"
    shutil.copy(template, path)
    return path


def start_up(path: Path) -> StoreCorrupt | None:
    """What start-up makes of the file: None (it loads) or the one error it stops with."""

    async def run() -> StoreCorrupt | None:
        store = SqliteStore(path)
        try:
            await store.open()
            await QueueManager(store, lease_seconds=10).load()
        except StoreCorrupt as exc:
            return exc
        finally:
            await store.close()
        return None

    return asyncio.run(run())


COLUMNS = (
    [("tasks", c) for c in sqlite_store.TASK_COLUMNS.split(", ")]
    + [("rooms", c) for c in sqlite_store.ROOM_COLUMNS.split(", ")]
    + [("counters", "name"), ("counters", "value")]
)
GARBAGE = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=8),
    st.sampled_from(['{"a": 1}', "[]", "{", "null", '"x"', "pending", "complete", "0.22", "\n\x00"]),
)


@PROPERTY
@given(where=st.sampled_from(COLUMNS), value=GARBAGE)
def test_any_value_in_any_column_loads_or_stops_start_up_with_one_line(
    template: Path, where: tuple[str, str], value: Any
) -> None:
    table, column = where
    with tempfile.TemporaryDirectory() as directory:
        path = damaged_copy(template, directory)
        db = sqlite3.connect(path)
        try:
            with db:
                rowid = db.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0]
                db.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (value, rowid))
        except sqlite3.IntegrityError:
            assume(False)  # NOT NULL, or a key another row has: SQLite itself refuses the value
        finally:
            db.close()
        problems, _ = check_store(path)
        error = start_up(path)
        event("loads" if error is None else "stops start-up")
        if error is None:
            assert problems == []
            return
        message = str(error)
        assert "\n" not in message and len(message) < 1000
        assert message.startswith(f"table {table}, row ") and f"(rowid {rowid}): column " in message
        assert f"DELETE FROM {table} WHERE rowid IN ({rowid})" in message and '".recover"' in message
        assert problems == [error.damage]


@PROPERTY
@given(nth=st.integers(0, 10**6), fill=st.sampled_from([b"\x00", b"\xff", b"\x0d"]))
def test_a_damaged_page_stops_start_up_with_one_line_and_the_check_finds_it(
    template: Path, nth: int, fill: bytes
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = damaged_copy(template, directory)
        size = 4096  # SQLite's default page size, the template's
        page = 1 + nth % (path.stat().st_size // size)
        with path.open("r+b") as f:
            f.seek((page - 1) * size)
            f.write(fill * size)
        problems, _ = check_store(path)
        try:
            error = start_up(path)
        except StoreError as exc:  # not damage SQLite can tell: still one line, no traceback
            error = exc
        event(f"start-up: {type(error).__name__}, check: {'problems' if problems else 'ok'}")
        if error is None:
            return  # a page start-up does not read (an index): the check may still report it
        message = str(error)
        assert "\n" not in message and ".recover" in message, message
        assert problems, "the check finds whatever stops start-up"


def test_check_store_of_a_sound_store(template: Path) -> None:
    problems, summary = check_store(template)
    assert problems == [] and summary == "schema 3, 3 rooms, 300 tasks"
    with pytest.raises(StoreError, match=r"no store at .* \(is store\.path right\?\)"):
        check_store(template.parent / "nope.sqlite3")
    assert not (template.parent / "nope.sqlite3").exists()
