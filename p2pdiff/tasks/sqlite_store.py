"""The SQLite task store (stdlib sqlite3, WAL): ``SqliteStore`` implements store.TaskStore.

Writes are collected as they happen (the latest row per task, room and counter), and ``await
commit()`` writes them all in one transaction. Callers that commit in the same event-loop turn share
a single COMMIT (and fsync), which is what keeps POST throughput high with ``synchronous=FULL``.
The schema carries a version (``PRAGMA user_version``) and is brought forward by the ordered
``MIGRATIONS`` list.

Faults. Every SQLite call runs on the event loop, so none may wait there: the busy timeout is 0 and
a write lock held by another process (a transaction open in the ``sqlite3`` shell) is waited for
by retrying the transaction's start from loop timers, for about half a second. A commit that fails
(that lock still held, a full disk, an I/O error) is rolled back, its listener puts memory back
(``on_rollback``), and for a back-off (1 s, doubling to 5 s while it keeps failing) the store
refuses changes at once (``StoreFault`` with ``retry_after``) instead of trying again for every
request; the first commit after the back-off tries the disk again. So a failing disk costs the loop
one attempt per back-off, not one per request.

Damage. Rows are checked as they are loaded; a row or page that cannot be read stops start-up with a
``StoreCorrupt`` naming the table, the row and a fix (``check_store``, ``p2pdiff --check-store``,
reports every problem).
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Literal

from p2pdiff.tasks.model import Room, Task
from p2pdiff.tasks.rows import (
    ROOM_COLUMNS,
    TASK_COLUMNS,
    BadRow,
    counter_from_row,
    room_from_row,
    room_row,
    show,
    task_from_row,
    task_row,
)
from p2pdiff.tasks.store import (
    BACKOFF_MAX_SECONDS,
    STORE_BUSY,
    STORE_UNAVAILABLE,
    CommitBackoff,
    Damage,
    LocalStore,
    StoreCorrupt,
    Stored,
    StoreError,
    StoreFault,
    StoreStats,
)

log = logging.getLogger(__name__)

# Each entry moves the schema from version N-1 to N. Append; never edit a released entry.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE rooms (
                room_id TEXT PRIMARY KEY,
                generated INTEGER NOT NULL DEFAULT 0,
                last_activity INTEGER NOT NULL DEFAULT 0,
                helper_joined INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE tasks (
                room_id TEXT NOT NULL,
                id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                prompt TEXT NOT NULL,
                options TEXT NOT NULL,
                extra TEXT NOT NULL,
                status TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                queued_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL,
                claimed_by TEXT,
                claimed_at INTEGER,
                finished_at INTEGER,
                progress REAL NOT NULL DEFAULT 0,
                result TEXT,
                error TEXT,
                requeues INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (room_id, id)
            )""",
            "CREATE INDEX tasks_by_seq ON tasks (seq)",
            "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        ],
    ),
    (
        2,
        [
            # The Trystero wire the helper was asked to use in the room (POST /api/join body);
            # NULL = follow [p2p] wire, so changing the config still moves rooms joined without one.
            "ALTER TABLE rooms ADD COLUMN helper_wire TEXT",
        ],
    ),
    (
        3,
        [
            # Whether the helper hands out this room's tasks (POST /api/join {"dispatch"}), 0 or 1;
            # NULL = follow [p2p] dispatch.
            "ALTER TABLE rooms ADD COLUMN helper_dispatch INTEGER",
        ],
    ),
]

# Every column but the key: a task's options and extra fields may be filled in after it was added.
_UPSERT_TASK = (
    f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES ({', '.join('?' * 17)}) "
    "ON CONFLICT (room_id, id) DO UPDATE SET "
    + ", ".join(f"{c}=excluded.{c}" for c in TASK_COLUMNS.split(", ")[2:])
)
_UPSERT_ROOM = (
    f"INSERT INTO rooms ({ROOM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (room_id) DO UPDATE SET "
    + ", ".join(f"{c}=excluded.{c}" for c in ROOM_COLUMNS.split(", ")[1:])
)
_UPSERT_COUNTER = (
    "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value=excluded.value"
)

# Waits between attempts to take the write lock from another process (about 0.5 s in all).
BUSY_RETRY_SECONDS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.2)
# At shutdown nothing else is left to serve: the final commit may wait for a lock this long (well
# within the shutdown bound, shutdown_timeout_seconds + 1 s).
CLOSE_BUSY_TIMEOUT_MS = 500
# At start-up the same: opening and migrating wait for a lock like any SQLite client would.
OPEN_BUSY_TIMEOUT_MS = 5000
MAX_REPORTED_PROBLEMS = 20
WAITING: Final = "waiting"  # _attempt: another try is scheduled


def repair_hint(path: Path, damage: list[Damage]) -> str:
    """What an operator should do about ``damage`` (one line)."""
    db = shlex.quote(str(path))
    new = shlex.quote(str(path.with_name(f"{path.stem}.recovered{path.suffix}")))
    # Debian's and Ubuntu's sqlite3 shells lack .recover (no sqlite_dbpage): README has a way without.
    recover = (
        f'sqlite3 {db} ".recover" | sqlite3 {new} and make that file store.path '
        '(no .recover in your sqlite3: README "Operations")'
    )
    rows: dict[str, list[int]] = {}
    for d in damage:
        if d.table is not None and d.rowid is not None:
            rows.setdefault(d.table, []).append(d.rowid)
    if sum(len(ids) for ids in rows.values()) == len(damage):
        # Readable rows with bad values: .recover would copy them as they are.
        deletes = "; ".join(
            f"DELETE FROM {table} WHERE rowid IN ({', '.join(map(str, ids))})" for table, ids in rows.items()
        )
        return (
            "the database is damaged: stop p2pdiff, back it up, then delete the bad rows: "
            f'sqlite3 {db} "{deletes}"'
            f" (if more is damaged, rebuild it from what is readable: {recover})"
        )
    return (
        f"the database is damaged: stop p2pdiff, back it up, then rebuild it from what is readable: {recover}"
    )


def _is_damage(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


# table -> (columns that name a row in messages, columns read, decoder, order)
_TABLES: dict[str, tuple[tuple[str, ...], str, Callable[[tuple[Any, ...]], Any], str]] = {
    "rooms": (("room_id",), ROOM_COLUMNS, room_from_row, "rowid"),
    "tasks": (("room_id", "id"), TASK_COLUMNS, task_from_row, "seq"),
    "counters": (("name",), "name, value", counter_from_row, "rowid"),
}


def _row_name(table: str, row: tuple[Any, ...]) -> str:
    keys = _TABLES[table][0]
    named = " ".join(f"{k}={show(v)}" for k, v in zip(keys, row[1:], strict=False))
    return f"table {table}, row {named} (rowid {row[0]})"


def _decoded(db: sqlite3.Connection, table: str) -> Iterator[tuple[Any, Damage | None]]:
    """Each row of ``table`` decoded, or the damage that stopped it; a page that cannot be read
    ends the table with one Damage naming the last row read."""
    _, columns, decode, order = _TABLES[table]
    last: tuple[Any, ...] | None = None
    try:
        for row in db.execute(f"SELECT rowid, {columns} FROM {table} ORDER BY {order}"):
            last = row
            try:
                yield decode(row[1:]), None
            except BadRow as exc:
                yield None, Damage(_row_name(table, row), str(exc), table, row[0])
    except sqlite3.Error as exc:
        if not _is_damage(exc):  # a lock, a missing table: an error, but not damage to repair
            raise StoreError(f"cannot read table {table}: {exc}") from None
        where = f"table {table}" if last is None else _row_name(table, last).replace(", row ", ", after row ")
        yield None, Damage(where, str(exc), table)


class SqliteStore(LocalStore):
    """store.TaskStore on a SQLite file, every call on the event loop (see the module docstring)."""

    def __init__(
        self, path: str | Path, synchronous: str = "full", *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self._db: sqlite3.Connection | None = None
        # Changes since the last commit: the newest row for each key, or its deletion.
        self._tasks: dict[tuple[str, str], tuple[Any, ...] | None] = {}
        self._rooms: dict[str, tuple[Any, ...] | None] = {}
        self._counters: dict[str, int] = {}
        self._pending_commit: asyncio.Future[None] | None = None
        self._busy_attempts = 0
        # After a failed commit, commits and check_writable() refuse at once for a while.
        self.backoff = CommitBackoff(str(self.path), clock)
        # Told synchronously, in the loop turn the commit ended, before any waiter resumes.
        self.on_commit: Callable[[], None] | None = None
        self.on_rollback: Callable[[StoreFault], None] | None = None
        self.commits = 0

    @property
    def clock(self) -> Callable[[], float]:
        """What the back-off measures time with (tests move it by hand)."""
        return self.backoff.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.backoff.clock = clock

    @property
    def failures(self) -> Counter[str]:
        return self.backoff.failures

    @property
    def refused(self) -> int:
        return self.backoff.refused

    @property
    def busy_retries(self) -> int:
        return self.backoff.busy_retries

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def location(self) -> str:
        return str(self.path)

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are opened explicitly so group commit controls them.
            db = sqlite3.connect(self.path, isolation_level=None)
            self._db = db
            db.execute(f"PRAGMA busy_timeout={OPEN_BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            self._migrate()
            # From now on SQLite calls run on the event loop: a lock is waited for by _run's timers.
            db.execute("PRAGMA busy_timeout=0")
        except (sqlite3.Error, OSError) as exc:
            self._close_quietly()
            if isinstance(exc, sqlite3.Error) and _is_damage(exc):
                hint = " (is store.path right?)" if "not a database" in str(exc) else ""
                damage = Damage(f"file {self.path}", f"{exc}{hint}")
                raise StoreCorrupt(damage, repair_hint(self.path, [damage])) from None
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc

    def _close_quietly(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def close(self) -> None:
        if self._db is None:
            return
        if self.dirty or self._pending_commit is not None:
            # The last commit, at shutdown: nothing is left to serve, so it may wait for a lock, and
            # no back-off applies. A pending attempt's timer finds the store closed and does nothing.
            self.db.execute(f"PRAGMA busy_timeout={CLOSE_BUSY_TIMEOUT_MS}")
            self.backoff.clear()
            outcome = self._attempt(final=True)
            assert outcome != WAITING  # a final attempt never schedules another
            self._finish(outcome)
        self._close_quietly()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.schema_version()
        latest = MIGRATIONS[-1][0]
        if current > latest:
            raise StoreError(
                f"store {self.path} has schema version {current}, newer than this p2pdiff knows ({latest})"
            )
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql in statements:
                    self.db.execute(sql)
                self.db.execute(f"PRAGMA user_version={version}")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            log.info("store %s migrated to schema version %d", self.path, version)

    # -- reads ----------------------------------------------------------------------------------

    async def load(self) -> Stored:
        """Every room, task and counter, checked: the first damaged row or page raises StoreCorrupt."""
        loaded: dict[str, list[Any]] = {}
        for table in ("rooms", "tasks", "counters"):
            items = loaded[table] = []
            for item, damage in _decoded(self.db, table):
                if damage is not None:
                    raise StoreCorrupt(damage, repair_hint(self.path, [damage]))
                items.append(item)
        return Stored(loaded["rooms"], loaded["tasks"], dict(loaded["counters"]))

    # -- writes (collected until the next commit) -----------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self._tasks or self._rooms or self._counters)

    def save_task(self, task: Task) -> None:
        self._tasks[(task.room_id, task.id)] = task_row(task)

    def save_room(self, room: Room) -> None:
        self._rooms[room.id] = room_row(room)

    def save_counter(self, name: str, value: int) -> None:
        self._counters[name] = value

    def delete_tasks(self, room_id: str, task_ids: list[str]) -> None:
        for task_id in task_ids:
            self._tasks[(room_id, task_id)] = None

    def delete_room(self, room_id: str) -> None:
        self._rooms[room_id] = None

    # -- durability -------------------------------------------------------------------------------

    def _write_changes(self) -> None:
        db = self.db
        db.executemany(
            "DELETE FROM tasks WHERE room_id = ? AND id = ?",
            [k for k, row in self._tasks.items() if row is None],
        )
        db.executemany(_UPSERT_TASK, [row for row in self._tasks.values() if row is not None])
        db.executemany(
            "DELETE FROM rooms WHERE room_id = ?", [(k,) for k, row in self._rooms.items() if row is None]
        )
        db.executemany(_UPSERT_ROOM, [row for row in self._rooms.values() if row is not None])
        db.executemany(_UPSERT_COUNTER, list(self._counters.items()))

    def _forget_changes(self) -> None:
        self._tasks.clear()
        self._rooms.clear()
        self._counters.clear()

    def check_writable(self) -> None:
        """Raise the back-off's StoreFault (and count the refusal) while the store is failing."""
        self.backoff.check()

    def _run(self) -> None:
        """One attempt at the pending commit (a loop callback)."""
        if self._pending_commit is None:
            return  # a retry's timer after close() made (or failed) this commit
        if self._db is None:  # changes after close(): nobody may wait forever for them
            self._finish(
                StoreFault(f"the store {self.path} is closed", STORE_UNAVAILABLE, BACKOFF_MAX_SECONDS)
            )
            return
        outcome = self._attempt(final=False)
        if outcome != WAITING:
            self._finish(outcome)

    def _attempt(self, final: bool) -> StoreFault | Literal["waiting"] | None:
        """Write and commit the collected changes: None when done, the fault when they failed (and
        are forgotten), WAITING when another try is scheduled (``final``: never)."""
        fault = self.backoff.refuse()
        if fault is not None:
            return fault
        db = self.db
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")  # left open by a rollback that failed last time
            db.execute("BEGIN IMMEDIATE")  # the write lock now, or SQLITE_BUSY at once
        except sqlite3.Error as exc:
            if _is_busy(exc) and not final and self._busy_attempts < len(BUSY_RETRY_SECONDS):
                # Another process writes (or holds the lock): try again shortly, the loop stays free.
                # Changes made meanwhile join this commit, and so do their callers.
                delay = BUSY_RETRY_SECONDS[self._busy_attempts]
                self._busy_attempts += 1
                self.backoff.busy_retries += 1
                asyncio.get_running_loop().call_later(delay, self._run)
                return WAITING
            return self._failed(exc)
        try:
            self._write_changes()
            db.execute("COMMIT")
        except Exception as exc:  # whatever it is, the transaction must end and the waiters hear
            if db.in_transaction:  # SQLite already rolled back after SQLITE_FULL and I/O errors
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("store %s: rollback after a failed commit failed too", self.path)
            return self._failed(exc)
        self.commits += 1
        self.backoff.succeeded()
        return None

    def _failed(self, exc: Exception) -> StoreFault:
        """The fault for a failed attempt; starts or lengthens the back-off."""
        if isinstance(exc, sqlite3.Error) and _is_busy(exc):
            message, code = f"another process holds the write lock of {self.path} ({exc})", STORE_BUSY
        else:
            hint = (
                "; check it with p2pdiff --check-store"
                if isinstance(exc, sqlite3.Error) and _is_damage(exc)
                else ""
            )
            message, code = f"commit to {self.path} failed: {exc}{hint}", STORE_UNAVAILABLE
        return self.backoff.fail(message, code)

    def _finish(self, fault: StoreFault | None) -> None:
        """End the pending commit: tell the listener, then the waiters."""
        future, self._pending_commit = self._pending_commit, None
        self._busy_attempts = 0
        self._forget_changes()
        try:
            # The listener runs before any waiter (or anything else) does: memory and disk agree again.
            if fault is None:
                if self.on_commit is not None:
                    self.on_commit()
            elif self.on_rollback is not None:
                self.on_rollback(fault)
        finally:  # even if the listener fails, nobody may wait forever
            if future is not None and fault is None:
                future.set_result(None)
            elif future is not None and fault is not None:
                future.set_exception(fault)
                future.exception()  # every waiter may be gone (cancelled): nobody has to read it

    async def commit(self) -> None:
        """Commit everything written so far; concurrent callers share one COMMIT."""
        if self._pending_commit is None:
            if not self.dirty:
                return
            loop = asyncio.get_running_loop()
            self._pending_commit = loop.create_future()
            # Deferred by one loop turn so handlers already runnable add their writes to this commit.
            loop.call_soon(self._run)
        # Shielded: a client that disconnects must not cancel the commit other callers wait on.
        await asyncio.shield(self._pending_commit)

    def stats(self) -> StoreStats:
        return self.backoff.stats(self.commits)


def check_store(path: str | Path) -> tuple[list[Damage], str]:
    """Check the database at ``path`` without changing it: SQLite's integrity check, then every row
    decoded as start-up would. Returns the problems found (at most MAX_REPORTED_PROBLEMS) and a
    summary of what was read; StoreError if there is no file."""
    path = Path(path)
    where = f"file {path}"
    if not path.is_file():
        raise StoreError(f"no store at {path} (is store.path right?)")
    problems: list[Damage] = []
    db = None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout={OPEN_BUSY_TIMEOUT_MS}")
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as exc:
        if db is not None:
            db.close()
        if _is_damage(exc):
            return [Damage(where, str(exc))], ""
        raise StoreError(f"cannot open store {path}: {exc}") from None
    try:
        try:
            for (line,) in db.execute(f"PRAGMA integrity_check({MAX_REPORTED_PROBLEMS})"):
                if line != "ok":
                    problems.append(Damage(where, "integrity_check: " + " ".join(str(line).split())))
        except sqlite3.Error as exc:  # damage bad enough to stop the check itself; the rows may tell more
            if not _is_damage(exc):
                raise StoreError(f"cannot check store {path}: {exc}") from None
            problems.append(Damage(where, f"integrity_check: {exc}"))
        latest = MIGRATIONS[-1][0]
        if version > latest:
            raise StoreError(
                f"store {path} has schema version {version}, newer than this p2pdiff knows ({latest})"
            )
        if version != latest:
            # Rows are checked in the current schema: an older file is migrated (and checked) at start.
            return problems, f"schema {version}, rows not checked (p2pdiff migrates it to {latest} at start)"
        counts = dict.fromkeys(_TABLES, 0)
        for table in _TABLES:
            for _, damage in _decoded(db, table):
                if damage is None:
                    counts[table] += 1
                elif len(problems) < MAX_REPORTED_PROBLEMS:
                    problems.append(damage)
        return problems, f"schema {version}, {counts['rooms']} rooms, {counts['tasks']} tasks"
    finally:
        db.close()
