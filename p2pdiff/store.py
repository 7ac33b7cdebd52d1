"""SQLite persistence (stdlib sqlite3, WAL) with group commit.

Writes go into one open transaction as they happen; ``await commit()`` makes them durable. Callers
that commit in the same event-loop turn share a single COMMIT (and fsync), which is what keeps POST
throughput high with ``synchronous=FULL``. The schema carries a version (``PRAGMA user_version``) and
is brought forward by the ordered ``MIGRATIONS`` list.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from p2pdiff.queue import Room, Task

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

TASK_COLUMNS = (
    "room_id, id, seq, prompt, options, extra, status, created_at, queued_at, updated_at, "
    "claimed_by, claimed_at, finished_at, progress, result, error, requeues"
)
_UPSERT_TASK = (
    f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES ({', '.join('?' * 17)}) "
    "ON CONFLICT (room_id, id) DO UPDATE SET status=excluded.status, updated_at=excluded.updated_at, "
    "claimed_by=excluded.claimed_by, claimed_at=excluded.claimed_at, finished_at=excluded.finished_at, "
    "progress=excluded.progress, result=excluded.result, error=excluded.error, requeues=excluded.requeues"
)
_UPSERT_ROOM = (
    "INSERT INTO rooms (room_id, generated, last_activity, helper_joined, helper_wire, helper_dispatch) "
    "VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (room_id) DO UPDATE SET generated=excluded.generated, "
    "last_activity=excluded.last_activity, helper_joined=excluded.helper_joined, "
    "helper_wire=excluded.helper_wire, helper_dispatch=excluded.helper_dispatch"
)


class StoreError(Exception):
    """The database could not be opened, migrated or written."""


@dataclass(slots=True)
class RoomRow:
    id: str
    generated: int
    last_activity: int
    helper_joined: bool
    helper_wire: str | None = None
    helper_dispatch: bool | None = None


def _json_or_none(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


class Store:
    def __init__(self, path: str | Path, synchronous: str = "full") -> None:
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self._db: sqlite3.Connection | None = None
        self._in_tx = False
        self._pending_commit: asyncio.Future[None] | None = None
        self.commits = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are opened explicitly so group commit controls them.
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.execute("PRAGMA busy_timeout=5000")
            self._db = db
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._db is None:
            return
        if self._in_tx:
            self._commit_now()
        self._db.close()
        self._db = None

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

    def load(self) -> tuple[list[RoomRow], list[Task]]:
        from p2pdiff.queue import Task

        rooms = [
            RoomRow(
                id=r[0],
                generated=r[1],
                last_activity=r[2],
                helper_joined=bool(r[3]),
                helper_wire=r[4],
                helper_dispatch=None if r[5] is None else bool(r[5]),
            )
            for r in self.db.execute(
                "SELECT room_id, generated, last_activity, helper_joined, helper_wire, helper_dispatch "
                "FROM rooms"
            )
        ]
        tasks = [
            Task(
                room_id=r[0],
                id=r[1],
                seq=r[2],
                prompt=r[3],
                options=orjson.loads(r[4]),
                extra=orjson.loads(r[5]),
                status=r[6],
                created_at=r[7],
                queued_at=r[8],
                updated_at=r[9],
                claimed_by=r[10],
                claimed_at=r[11],
                finished_at=r[12],
                progress=r[13],
                result=None if r[14] is None else orjson.loads(r[14]),
                error=r[15],
                requeues=r[16],
            )
            for r in self.db.execute(f"SELECT {TASK_COLUMNS} FROM tasks ORDER BY seq")
        ]
        return rooms, tasks

    def load_counter(self, name: str) -> int:
        row = self.db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return 0 if row is None else int(row[0])

    # -- writes (inside the open transaction) ---------------------------------------------------

    def _write(self, sql: str, params: tuple[Any, ...] | list[tuple[Any, ...]], many: bool = False) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True
        if many:
            self.db.executemany(sql, params)  # type: ignore[arg-type]
        else:
            self.db.execute(sql, params)

    def save_task(self, task: Task) -> None:
        self._write(
            _UPSERT_TASK,
            (
                task.room_id,
                task.id,
                task.seq,
                task.prompt,
                orjson.dumps(task.options).decode(),
                orjson.dumps(task.extra).decode(),
                task.status,
                task.created_at,
                task.queued_at,
                task.updated_at,
                task.claimed_by,
                task.claimed_at,
                task.finished_at,
                task.progress,
                _json_or_none(task.result),
                task.error,
                task.requeues,
            ),
        )

    def save_room(self, room: Room) -> None:
        self._write(
            _UPSERT_ROOM,
            (
                room.id,
                room.generated,
                room.last_activity,
                int(room.helper_joined),
                room.helper_wire,
                None if room.helper_dispatch is None else int(room.helper_dispatch),
            ),
        )

    def save_counter(self, name: str, value: int) -> None:
        self._write(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value=excluded.value",
            (name, value),
        )

    def delete_tasks(self, room_id: str, task_ids: list[str]) -> None:
        self._write(
            "DELETE FROM tasks WHERE room_id = ? AND id = ?", [(room_id, t) for t in task_ids], many=True
        )

    def delete_room(self, room_id: str) -> None:
        self._write("DELETE FROM rooms WHERE room_id = ?", (room_id,))

    # -- durability -------------------------------------------------------------------------------

    def _commit_now(self) -> None:
        if not self._in_tx:
            return
        self._in_tx = False
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback after failed commit also failed")
            raise StoreError(f"commit to {self.path} failed: {exc}") from exc
        self.commits += 1

    def _run_pending_commit(self) -> None:
        future, self._pending_commit = self._pending_commit, None
        assert future is not None
        try:
            self._commit_now()
        except StoreError as exc:
            future.set_exception(exc)
        else:
            future.set_result(None)

    async def commit(self) -> None:
        """Commit everything written so far; concurrent callers share one COMMIT."""
        if self._pending_commit is None:
            if not self._in_tx:
                return
            loop = asyncio.get_running_loop()
            self._pending_commit = loop.create_future()
            # Deferred by one loop turn so handlers already runnable add their writes to this commit.
            loop.call_soon(self._run_pending_commit)
        # Shielded: a client that disconnects must not cancel the commit other callers wait on.
        await asyncio.shield(self._pending_commit)
