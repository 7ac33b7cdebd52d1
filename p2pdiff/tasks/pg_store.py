"""The PostgreSQL task store (asyncpg): ``PgStore`` implements store.TaskStore for any number of
p2pdiff nodes on one database (store.py, "Shared stores").

How several nodes stay one server:

- **One writer at a time.** A node changes the queue only inside its *write turn*: a transaction
  holding one transaction-scoped advisory lock (``WRITE_LOCK``), opened by ``begin()`` (the
  queue's ``writing()``). Opening it catches memory up on what other nodes committed (the
  ``changes`` log names the rows each commit touched; they are read back as they are now), so
  every decision (is this task still pending? does this id exist?) is made on the shared truth,
  and no other node can decide on the same rows until the turn commits. The changes made in the
  turn (by every caller that joined it: group commit) are written, a ``changes`` row names them,
  and the transaction commits. No conflict can happen, so nothing needs resolving afterwards.
- **Changes outside a turn** (tests and scripts that call the queue directly) are committed
  optimistically: if another node committed since memory last caught up, they are refused
  (``STORE_CONFLICT``), memory goes back and catches up, and the caller may try again.
- **Events in one order.** The events a turn publishes are rows of ``events`` written in its
  transaction; their ids come from a sequence drawn under the lock, so they are in commit order on
  every node. After each commit a NOTIFY (no payload: no size limit to meet) wakes every node's
  listener, which catches memory up and then hands the new events, in id order, to its bus.
  A client can resume its stream on any node with the ids it got from another.
- **Read barrier.** ``sync()`` asks for the newest ``changes`` id (one indexed query) and, when
  memory is behind it, reads the changed rows in one snapshot.
- **Faults.** Any failure of the database (down, restarting, a lock not granted in time) fails
  the turn's commit: memory goes back (the queue's journal), waiters get a StoreFault, and the store
  refuses changes for a back-off (``store.CommitBackoff``) instead of hammering the database.

The schema carries a version (table ``p2pdiff_schema``), brought forward by ``MIGRATIONS`` under a
lock of its own, so nodes starting together migrate once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

import asyncpg
import orjson

from p2pdiff.tasks import events
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
    STORE_BUSY,
    STORE_CONFLICT,
    STORE_UNAVAILABLE,
    CommitBackoff,
    Damage,
    Remote,
    StoreCorrupt,
    Stored,
    StoreError,
    StoreFault,
    StoreStats,
)
from signaling.background import BackgroundTasks, every

log = logging.getLogger(__name__)

# Each entry moves the schema from version N-1 to N. Append; never edit a released entry.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            # The same columns and types as the SQLite store (tasks/rows.py): JSON as text,
            # booleans as 0/1, times as milliseconds since the epoch.
            """CREATE TABLE rooms (
                room_id TEXT PRIMARY KEY,
                generated BIGINT NOT NULL DEFAULT 0,
                last_activity BIGINT NOT NULL DEFAULT 0,
                helper_joined INTEGER NOT NULL DEFAULT 0,
                helper_wire TEXT,
                helper_dispatch INTEGER
            )""",
            """CREATE TABLE tasks (
                room_id TEXT NOT NULL,
                id TEXT NOT NULL,
                seq BIGINT NOT NULL,
                prompt TEXT NOT NULL,
                options TEXT NOT NULL,
                extra TEXT NOT NULL,
                status TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                queued_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                claimed_by TEXT,
                claimed_at BIGINT,
                finished_at BIGINT,
                progress DOUBLE PRECISION NOT NULL DEFAULT 0,
                result TEXT,
                error TEXT,
                requeues BIGINT NOT NULL DEFAULT 0,
                PRIMARY KEY (room_id, id)
            )""",
            "CREATE INDEX tasks_by_seq ON tasks (seq)",
            "CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
            # One row per commit: which rows it touched, for the other nodes to read back.
            """CREATE TABLE changes (
                id BIGSERIAL PRIMARY KEY,
                node TEXT NOT NULL,
                at TIMESTAMPTZ NOT NULL DEFAULT now(),
                rooms TEXT[] NOT NULL,
                task_rooms TEXT[] NOT NULL,
                task_ids TEXT[] NOT NULL,
                counters TEXT[] NOT NULL
            )""",
            """CREATE TABLE events (
                id BIGSERIAL PRIMARY KEY,
                ts BIGINT NOT NULL,
                type TEXT NOT NULL,
                room TEXT,
                data TEXT NOT NULL,
                origin TEXT NOT NULL,
                node TEXT NOT NULL
            )""",
            # Periodic jobs that run once per period in the cluster (retention, lease expiry).
            "CREATE TABLE jobs (name TEXT PRIMARY KEY, last_run TIMESTAMPTZ NOT NULL)",
            # The newest change pruned from the log: a node behind it reloads everything.
            "CREATE TABLE log_pruned (id INTEGER PRIMARY KEY CHECK (id = 1), through BIGINT NOT NULL)",
            "INSERT INTO log_pruned VALUES (1, 0)",
            # Result images (tasks/results.py), written in the transaction of the change that
            # first references them: every node serves them, pg_dump backs them up with the tasks.
            # Named by their SHA-256, so a row never changes; created_at is renewed when an image
            # is stored again, for the gc's grace period.
            """CREATE TABLE result_images (
                name TEXT PRIMARY KEY,
                content_type TEXT NOT NULL,
                bytes BYTEA NOT NULL,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )""",
            # PNG, JPEG and WebP are compressed already: out of line as they are, no second try.
            "ALTER TABLE result_images ALTER COLUMN bytes SET STORAGE EXTERNAL",
            # The helper's rooms shared out among nodes (p2pdiff/ops/cluster.py): live nodes, and
            # which node's helper is in which room until when (the database's clock).
            """CREATE TABLE nodes (
                id TEXT PRIMARY KEY,
                started_at TIMESTAMPTZ NOT NULL,
                seen_at TIMESTAMPTZ NOT NULL,
                instance TEXT NOT NULL
            )""",
            """CREATE TABLE room_leases (
                room_id TEXT PRIMARY KEY,
                node TEXT NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL
            )""",
            # The room relay's texts too long for a NOTIFY (p2pdiff/relay/pg_bus.py): the other
            # nodes read them once, within seconds; unlogged (a crash may lose them: they are
            # signaling, stale within a minute) and pruned by age.
            """CREATE UNLOGGED TABLE relay_texts (
                key TEXT PRIMARY KEY,
                at TIMESTAMPTZ NOT NULL DEFAULT now(),
                text TEXT NOT NULL
            )""",
            "CREATE INDEX relay_texts_by_age ON relay_texts (at)",
        ],
    ),
]

# pg_advisory_xact_lock keys (any two fixed numbers no other program on the database uses).
WRITE_LOCK: Final = 0x70327064_0001  # "p2pd" 1: the write turn
MIGRATE_LOCK: Final = 0x70327064_0002
CHANNEL: Final = "p2pdiff_changes"
# A write turn waits this long for the lock (another node's turn) before it fails as busy.
LOCK_TIMEOUT_MS = 5000
# Any one statement; the database is on the network, and a request must not hang on it.
COMMAND_TIMEOUT_SECONDS = 10.0
# The change log and the events are kept this long: a node behind the change log reloads.
LOG_KEEP_SECONDS = 3600
EVENTS_KEEP = 100_000
PUMP_BATCH = 500
# Events waiting for a commit while the database is away; past it new ones are dropped (counted).
MAX_PENDING_EVENTS = 10_000
# How stale memory and events may get when notifications are lost (the listener reconnecting).
WATCH_SECONDS = 2.0

_UPSERT_TASK = (
    f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES ({', '.join(f'${i}' for i in range(1, 18))}) "
    "ON CONFLICT (room_id, id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in TASK_COLUMNS.split(", ")[2:])
)
_UPSERT_ROOM = (
    f"INSERT INTO rooms ({ROOM_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (room_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in ROOM_COLUMNS.split(", ")[1:])
)
_UPSERT_COUNTER = (
    "INSERT INTO counters (name, value) VALUES ($1, $2) "
    "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value"
)
# Where the log and the events stand, in one statement (one snapshot, one round trip).
_NEWEST = (
    "SELECT (SELECT through FROM log_pruned WHERE id = 1), (SELECT coalesce(max(id), 0) FROM changes), "
    "(SELECT coalesce(max(id), 0) FROM events)"
)
_TASKS_BY_KEY = (
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE (room_id, id) IN "
    "(SELECT * FROM unnest($1::text[], $2::text[]))"
)

# Where the write turn is: none; taking the lock and catching up; open for changes; committing them.
IDLE, OPENING, OPEN, COMMITTING = "idle", "opening", "open", "committing"


def _origin_text(origin: events.Origin) -> str:
    return orjson.dumps([origin.kind, origin.room, origin.peer]).decode()


def _origin(text: str) -> events.Origin:
    kind, room, peer = orjson.loads(text)
    return events.Origin(kind, room, peer) if kind == "peer" else events.SERVER


def _event(row: asyncpg.Record) -> events.Event:
    return events.Event(
        row["id"], row["type"], row["room"], orjson.loads(row["data"]), row["ts"], _origin(row["origin"])
    )


class _Staged:
    """A turn's changes: the newest row per key, or its deletion; the events it published; and the
    result images to write before them (name -> content type and the file holding the bytes)."""

    def __init__(self) -> None:
        self.tasks: dict[tuple[str, str], tuple[Any, ...] | None] = {}
        self.rooms: dict[str, tuple[Any, ...] | None] = {}
        self.counters: dict[str, int] = {}
        self.events: list[tuple[Any, ...]] = []
        self.images: dict[str, tuple[str, Path]] = {}

    @property
    def rows(self) -> bool:
        return bool(self.tasks or self.rooms or self.counters)

    def __bool__(self) -> bool:
        return self.rows or bool(self.events or self.images)

    def keep_images(self, failed: _Staged) -> None:
        """A failed commit's images go with the next one: a reference made to one since (the
        helper holds an image until its result message comes) must not commit without it."""
        self.images = {**failed.images, **self.images}


class PgStore:
    """store.TaskStore on PostgreSQL, shared by every node of a cluster (see the module docstring)."""

    def __init__(
        self,
        dsn: str,
        *,
        display: str,
        node: str,
        bus: events.EventBus | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dsn = dsn  # with the password: for the driver only, never shown
        self._display = display
        self.node = node
        self.bus = bus
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        # Other channels heard on the listening connection (listen()): channel -> asyncpg callback.
        self._channels: dict[str, Callable[..., None]] = {}
        self.on_commit: Callable[[], None] | None = None
        self.on_rollback: Callable[[StoreFault], None] | None = None
        self.on_remote: Callable[[Remote], None] | None = None
        self._staged = _Staged()
        self._state = IDLE
        # Every task this store starts and nobody awaits: held until done, failures logged.
        self._tasks = BackgroundTasks(log)
        self._opened: asyncio.Future[None] | None = None  # the current turn holds the lock
        self._done: asyncio.Future[None] | None = None  # the current turn ended (its fault)
        self._conn: asyncpg.Connection | None = None
        self._tx: Any = None  # asyncpg's Transaction of the open turn
        # The newest change in memory, and the newest event memory is caught up for.
        self.applied = 0
        self._events_known = 0
        self._delivered = 0
        self._catching_up = asyncio.Lock()
        self._following: asyncio.Future[None] | None = None
        self._next_sync: asyncio.Future[None] | None = None  # the catch-up new callers share
        self._syncing: asyncio.Future[None] | None = None
        self._sync_failing = False
        self._loaded = False  # load() ran: memory and the bus have a starting point
        self._follow_again = False
        self.backoff = CommitBackoff(self._display, clock)
        self.commits = 0
        self.conflicts = 0
        self.caught_up = 0  # rows read back from other nodes' commits
        self.events_dropped = 0

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def location(self) -> str:
        return self._display

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("store is not open")
        return self._pool

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=8,
                command_timeout=COMMAND_TIMEOUT_SECONDS,
                # A write turn waits this long for another node's; our other statements take no
                # lock anyone holds long.
                server_settings={"lock_timeout": str(LOCK_TIMEOUT_MS)},
            )
            async with self.pool.acquire() as conn:
                await self._migrate(conn)
            await self._listen()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            await self._disconnect()
            raise StoreError(f"cannot open store {self._display}: {exc}") from None
        # Notifications are lost while the listening connection is down (the database restarts,
        # the network drops): it is made again, and memory and events catch up every
        # WATCH_SECONDS anyway, so a lost notification costs at most that long.
        watch = every(WATCH_SECONDS, self._watch, "store %s: watching other nodes", self._display, logger=log)
        self._tasks.spawn(watch, "store %s: watch", self._display)

    async def _listen(self) -> None:
        listener = await asyncpg.connect(self._dsn, command_timeout=COMMAND_TIMEOUT_SECONDS)
        await listener.add_listener(CHANNEL, self._notified)
        for channel, callback in self._channels.items():
            await listener.add_listener(channel, callback)
        self._listener = listener

    async def listen(self, channel: str, on_payload: Callable[[str], None]) -> None:
        """Hear NOTIFYs on ``channel`` (``on_payload(payload)``) on the store's listening
        connection, also after the watch made it again; what is notified while it is down is
        lost (once the store is open, no exception: the watch connects it again)."""

        def callback(conn: object, pid: int, channel: str, payload: str) -> None:
            on_payload(payload)

        self._channels[channel] = callback
        listener = self._listener
        if listener is not None and not listener.is_closed():
            try:
                await listener.add_listener(channel, callback)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("store %s: cannot listen on %s yet: %s", self._display, channel, exc)
                listener.terminate()  # the watch makes it again, listening to every channel

    async def unlisten(self, channel: str) -> None:
        """Stop hearing ``channel`` (see ``listen``)."""
        callback = self._channels.pop(channel, None)
        listener = self._listener
        if callback is not None and listener is not None and not listener.is_closed():
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                await listener.remove_listener(channel, callback)

    async def _watch(self) -> None:
        """One round of the watch (see open())."""
        if self._listener is None or self._listener.is_closed():
            try:
                await self._listen()
                log.info("store %s: listening for other nodes' changes again", self._display)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                self._listener = None
                return  # still away; the back-off of commits says so in the log
        self._follow()

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS p2pdiff_schema (version INTEGER NOT NULL)")
            current = await conn.fetchval("SELECT max(version) FROM p2pdiff_schema") or 0
            latest = MIGRATIONS[-1][0]
            if current > latest:
                raise StoreError(
                    f"store {self._display} has schema version {current}, "
                    f"newer than this p2pdiff knows ({latest})"
                )
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for sql in statements:
                    await conn.execute(sql)
                await conn.execute("INSERT INTO p2pdiff_schema VALUES ($1)", version)
                log.info("store %s migrated to schema version %d", self._display, version)

    async def close(self) -> None:
        if self._pool is None:
            return
        if self._staged or self._state != IDLE:
            # The last commit, at shutdown: what this node changed reaches the database.
            self.backoff.clear()
            try:
                await self.commit()
            except StoreFault as fault:
                log.error("store %s: the last changes were not saved: %s", self._display, fault)
        await self._tasks.close()
        if self._next_sync is not None and not self._next_sync.done():
            self._next_sync.set_result(None)  # nobody may wait for a catch-up that will not come
        await self._disconnect()

    async def _disconnect(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            try:
                await listener.close(timeout=2)
            except Exception:  # closing a broken connection: nothing left to save
                listener.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:
                pool.terminate()

    # -- reads ----------------------------------------------------------------------------------

    async def load(self) -> Stored:
        """Everything stored, checked, in one snapshot; memory is caught up with it."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            stored = await self._load(conn)
            if self.bus is not None and not self._loaded:
                await self._preload_events(conn)
        self._loaded = True
        self._follow()  # what was committed since the snapshot
        return stored

    async def _load(self, conn: asyncpg.Connection) -> Stored:
        self.applied = await conn.fetchval("SELECT coalesce(max(id), 0) FROM changes")
        self._events_known = await conn.fetchval("SELECT coalesce(max(id), 0) FROM events")
        rooms = [
            self._decode("rooms", room_from_row, r)
            for r in await conn.fetch(f"SELECT {ROOM_COLUMNS} FROM rooms")
        ]
        tasks = [
            self._decode("tasks", task_from_row, r)
            for r in await conn.fetch(f"SELECT {TASK_COLUMNS} FROM tasks ORDER BY seq")
        ]
        counters = dict(
            self._decode("counters", counter_from_row, r)
            for r in await conn.fetch("SELECT name, value FROM counters")
        )
        return Stored(rooms, tasks, counters)

    async def _preload_events(self, conn: asyncpg.Connection) -> None:
        """The newest events into the bus's resume window (not to its listeners: they are past)."""
        assert self.bus is not None
        rows = await conn.fetch(
            "SELECT * FROM (SELECT id, ts, type, room, data, origin FROM events ORDER BY id DESC LIMIT $1) "
            "AS newest ORDER BY id",
            self.bus.backlog_size,
        )
        first = rows[0]["id"] - 1 if rows else self._events_known
        self.bus.start_after(first)
        self.bus.preload([_event(row) for row in rows])
        self._delivered = self._events_known

    def _decode(self, table: str, decode: Callable[[tuple[Any, ...]], Any], row: asyncpg.Record) -> Any:
        try:
            return decode(tuple(row))
        except BadRow as exc:
            named = " ".join(f"{k}={show(v)}" for k, v in list(row.items())[:2])
            damage = Damage(f"table {table}, row {named}", str(exc), table)
            raise StoreCorrupt(damage, f"correct or delete that row with psql ({self._display})") from None

    # -- staging --------------------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self._staged)

    def _stage(self) -> _Staged:
        if self._state in (OPENING, COMMITTING):
            # Memory is being caught up, or the turn's rows are on their way: a change now would be
            # decided on rows that may be stale, or miss its commit. Callers wait for a turn.
            raise StoreError("a change outside the write turn (use queue.writing() or write_soon())")
        return self._staged

    def save_task(self, task: Task) -> None:
        self._stage().tasks[(task.room_id, task.id)] = task_row(task)

    def save_room(self, room: Room) -> None:
        self._stage().rooms[room.id] = room_row(room)

    def save_counter(self, name: str, value: int) -> None:
        self._stage().counters[name] = value

    def delete_tasks(self, room_id: str, task_ids: list[str]) -> None:
        staged = self._stage()
        for task_id in task_ids:
            staged.tasks[(room_id, task_id)] = None

    def delete_room(self, room_id: str) -> None:
        self._stage().rooms[room_id] = None

    def publish(
        self, type: str, room: str | None, data: dict[str, Any], *, origin: events.Origin = events.SERVER
    ) -> None:
        """events.Publish for every publisher of this node: the event is written with the next
        commit (the turn it was made in, or one of its own) and reaches every node's bus from the
        database, numbered there."""
        if self._pool is None:
            return  # closed: nothing more goes out
        row = (int(time.time() * 1000), type, room, orjson.dumps(data).decode(), _origin_text(origin))
        if len(self._staged.events) >= MAX_PENDING_EVENTS:
            # The database has been away for long: live views lose these, memory stays bounded.
            self.events_dropped += 1
            if self.events_dropped % MAX_PENDING_EVENTS == 1:
                log.warning(
                    "store %s: %d events wait for the database; dropping new ones",
                    self._display,
                    len(self._staged.events),
                )
            return
        self._staged.events.append(row)  # events never need the turn: they decide nothing
        self._commit_unless_pending()

    def stage_image(self, name: str, content_type: str, source: Path) -> None:
        """results.SharedImages: the image in file ``source`` is written with the current turn's
        commit (or, outside a turn, with one of its own, started now), before the change rows, so
        no committed task names an image the database lacks. Like events it decides nothing, so
        it needs no turn. Only the file's name waits here: the bytes are read at the commit, one
        image at a time, and a node holds no image in memory while the database is away."""
        if self._pool is None:
            raise StoreError("store is not open")
        self._staged.images[name] = (content_type, source)
        self._commit_unless_pending()

    def _commit_unless_pending(self) -> None:
        """A commit of what is staged, unless a turn is on its way or changes outside a turn
        (whose commit takes this along) are pending."""
        if self._state == IDLE and not self._staged.rows:
            self._commit_soon(0.0)

    async def _commit_quietly(self) -> None:
        with contextlib.suppress(StoreFault):  # logged by the back-off; the events wait for the next
            await self.commit()

    # -- the write turn -------------------------------------------------------------------------

    @property
    def accepts_changes(self) -> bool:
        return self._state == OPEN

    async def begin(self) -> None:
        while self._state != OPEN:
            if self._state == IDLE:
                self._start_turn()
            waiter = self._opened if self._state == OPENING else self._done
            assert waiter is not None
            try:
                await asyncio.shield(waiter)
            except StoreFault as fault:
                if fault.code != STORE_CONFLICT:
                    raise
                # Somebody's changes outside a turn were refused; this caller made none: go on.

    async def commit(self) -> None:
        """The current turn's commit (one is started for changes made outside a turn)."""
        if self._state == IDLE:
            if not self._staged:
                return
            self._start_turn()
        assert self._done is not None
        await asyncio.shield(self._done)

    def _start_turn(self) -> None:
        loop = asyncio.get_running_loop()
        self._state = OPENING
        self._opened = loop.create_future()
        self._done = loop.create_future()
        self._tasks.spawn(self._run_turn(self._opened, self._done), "store %s: write turn", self._display)

    async def _run_turn(self, opened: asyncio.Future[None], done: asyncio.Future[None]) -> None:
        fault: StoreFault | None = None
        outside = self._staged if self._staged.rows else None  # changes made outside a turn
        try:
            fault = self.backoff.fault()
            if fault is None:
                fault = await self._open_turn(outside)
            if fault is None:
                self._state = OPEN
                opened.set_result(None)
                # Callers waiting in begin() resume now and make their changes; two loop rounds
                # later the turn commits with everything they staged.
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                self._state = COMMITTING
                fault = await self._commit_turn()
        finally:
            await self._end_turn()
            self._state = IDLE
            for future in (opened, done):
                if future.done():
                    continue
                if fault is None:
                    future.set_result(None)
                else:
                    future.set_exception(fault)
                    future.exception()  # nobody may be waiting to read it
            if fault is None:
                self._follow()  # hand this turn's events (and any before) to the bus
            elif self._staged:
                self._commit_soon(self.backoff.wait())  # events published during the failed turn

    async def _open_turn(self, outside: _Staged | None) -> StoreFault | None:
        """Take the lock and catch memory up; changes made outside a turn meet the catch-up."""
        try:
            conn = await self.pool.acquire()
            self._conn = conn
            self._tx = conn.transaction()
            await self._tx.start()
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
            async with self._catching_up:
                remote, newest = await self._read_changes(conn)
                if remote and outside is not None:
                    # Decided on rows another node has changed since: refused, as a whole.
                    self.conflicts += 1
                    fault = StoreFault(
                        "another node changed the queue meanwhile; nothing was changed",
                        STORE_CONFLICT,
                        0.0,
                    )
                    self._rollback_memory(fault)
                    self._catch_up(remote, newest)
                    return fault
                self._catch_up(remote, newest)
        except Exception as exc:  # whatever it is, the turn ends and its waiters hear
            return self._failed(exc)
        return None

    async def _commit_turn(self) -> StoreFault | None:
        staged, self._staged = self._staged, _Staged()
        conn = self._conn
        assert conn is not None
        try:
            change_id = newest_event = None
            for name, (content_type, source) in staged.images.items():
                await self._write_image(conn, name, content_type, source)
            if staged.rows:
                change_id = await self._write(conn, staged)
            if staged.events:
                columns = list(zip(*staged.events, strict=True))
                # Known (to the pump) only once committed: other connections cannot see them before.
                newest_event = await conn.fetchval(
                    "WITH added AS (INSERT INTO events (ts, type, room, data, origin, node) "
                    "SELECT *, $6 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[]) "
                    "RETURNING id) SELECT max(id) FROM added",
                    *columns,
                    self.node,
                )
            await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            await self._tx.commit()
            self._tx = None
        except Exception as exc:
            fault = self._failed(exc)
            self._staged.keep_images(staged)
            self._rollback_memory(fault, staged)
            return fault
        if change_id is not None:
            self.applied = change_id
        if newest_event is not None:
            self._events_known = max(self._events_known, newest_event)
        self.commits += 1
        self.backoff.succeeded()
        if staged.rows and self.on_commit is not None:
            self.on_commit()
        return None

    async def _write_image(
        self, conn: asyncpg.Connection, name: str, content_type: str, source: Path
    ) -> None:
        # Stored already (the same bytes: the name is their hash): younger again, nothing sent.
        renewed = await conn.execute("UPDATE result_images SET created_at = now() WHERE name = $1", name)
        if renewed != "UPDATE 0":
            return
        try:
            # Written (and fsynced) by ResultStore.save just before; read off the event loop.
            data = await asyncio.to_thread(source.read_bytes)
        except OSError as exc:
            # Deleted by hand meanwhile: this node cannot serve it either. Failing the turn would
            # fail every one after it (the image goes with the next), so it is left out.
            log.error("store %s: result image %s not stored, its file is gone: %s", self._display, name, exc)
            return
        await conn.execute(
            "INSERT INTO result_images (name, content_type, bytes) VALUES ($1, $2, $3) "
            "ON CONFLICT (name) DO UPDATE SET created_at = now()",
            name,
            content_type,
            data,
        )

    async def _write(self, conn: asyncpg.Connection, staged: _Staged) -> int:
        deleted = [key for key, row in staged.tasks.items() if row is None]
        if deleted:
            await conn.executemany("DELETE FROM tasks WHERE room_id = $1 AND id = $2", deleted)
        upserts = [row for row in staged.tasks.values() if row is not None]
        if upserts:
            await conn.executemany(_UPSERT_TASK, upserts)
        gone = [(room_id,) for room_id, row in staged.rooms.items() if row is None]
        if gone:
            await conn.executemany("DELETE FROM rooms WHERE room_id = $1", gone)
        rooms = [row for row in staged.rooms.values() if row is not None]
        if rooms:
            await conn.executemany(_UPSERT_ROOM, rooms)
        if staged.counters:
            await conn.executemany(_UPSERT_COUNTER, list(staged.counters.items()))
        change_id: int = await conn.fetchval(
            "INSERT INTO changes (node, rooms, task_rooms, task_ids, counters) VALUES ($1, $2, $3, $4, $5) "
            "RETURNING id",
            self.node,
            list(staged.rooms),
            [room_id for room_id, _ in staged.tasks],
            [task_id for _, task_id in staged.tasks],
            list(staged.counters),
        )
        return change_id

    async def _end_turn(self) -> None:
        conn, tx = self._conn, self._tx
        self._conn = self._tx = None
        if conn is None:
            return
        try:
            if tx is not None:
                await tx.rollback()
        except Exception:  # the connection is broken: the database rolls back on its own
            log.debug("store %s: rollback of a failed turn failed", self._display, exc_info=True)
        finally:
            await self.pool.release(conn)

    def _rollback_memory(self, fault: StoreFault, staged: _Staged | None = None) -> None:
        """Nothing of the turn is durable: memory goes back to the last commit."""
        rows = staged if staged is not None else self._staged
        if staged is None:
            self._staged = _Staged()
            self._staged.events = rows.events  # events are not the refused changes
            self._staged.keep_images(rows)
        if rows.rows and self.on_rollback is not None:
            self.on_rollback(fault)

    def _failed(self, exc: Exception) -> StoreFault:
        if isinstance(exc, StoreFault):
            return exc
        if isinstance(exc, asyncpg.exceptions.LockNotAvailableError):
            message = f"another node held the write turn of {self._display} too long"
            return self.backoff.fail(message, STORE_BUSY)
        return self.backoff.fail(f"commit to {self._display} failed: {exc}", STORE_UNAVAILABLE)

    def _commit_soon(self, delay: float) -> None:
        """A commit of what is staged (events alone, say) ``delay`` seconds from now."""
        asyncio.get_running_loop().call_later(
            delay, lambda: self._tasks.spawn(self._commit_quietly(), "store %s: commit", self._display)
        )

    def check_writable(self) -> None:
        self.backoff.check()

    # -- catching up ----------------------------------------------------------------------------

    async def _read_changes(self, conn: asyncpg.Connection) -> tuple[Remote, int]:
        """Rows other nodes changed since ``applied``, read as they are now (``conn`` is in a
        snapshot or holds the write lock), and the newest change they include: ``_catch_up``
        applies them and moves ``applied`` there, with no await between."""
        pruned, newest, newest_event = await conn.fetchrow(_NEWEST)
        # The log may be pruned empty: the newest change is then the last one pruned.
        newest = max(pruned, newest)
        self._events_known = max(self._events_known, newest_event)
        if newest <= self.applied:
            return Remote(), self.applied
        if pruned > self.applied:  # this node slept through changes no longer in the log
            log.warning("store %s: behind the change log; reloading everything", self._display)
            return Remote(full=await self._load(conn)), newest
        rooms: set[str] = set()
        tasks: set[tuple[str, str]] = set()
        counters: set[str] = set()
        for change in await conn.fetch(
            "SELECT rooms, task_rooms, task_ids, counters FROM changes WHERE id > $1 AND id <= $2",
            self.applied,
            newest,
        ):
            rooms.update(change["rooms"])
            tasks.update(zip(change["task_rooms"], change["task_ids"], strict=True))
            counters.update(change["counters"])
        remote = Remote(
            rooms=dict.fromkeys(rooms),
            tasks=dict.fromkeys(tasks),
            counters={},
        )
        if tasks:
            keys = list(tasks)
            for row in await conn.fetch(_TASKS_BY_KEY, [k[0] for k in keys], [k[1] for k in keys]):
                task = self._decode("tasks", task_from_row, row)
                remote.tasks[(task.room_id, task.id)] = task
        if rooms:
            sql = f"SELECT {ROOM_COLUMNS} FROM rooms WHERE room_id = ANY($1::text[])"
            for row in await conn.fetch(sql, list(rooms)):
                room = self._decode("rooms", room_from_row, row)
                remote.rooms[room.id] = room
        if counters:
            sql = "SELECT name, value FROM counters WHERE name = ANY($1::text[])"
            for row in await conn.fetch(sql, list(counters)):
                remote.counters[row["name"]] = row["value"]
        self.caught_up += len(tasks) + len(rooms)
        return remote, newest

    def _catch_up(self, remote: Remote, newest: int) -> None:
        self.applied = max(self.applied, newest)
        if remote and self.on_remote is not None:
            self.on_remote(remote)

    async def sync(self) -> None:
        if self._state == OPENING:
            assert self._opened is not None
            await asyncio.wait([self._opened])  # the turn catches up; its fault is not ours
            return
        if self._state != IDLE or self._staged.rows:
            # Holding the lock (nobody else commits), or changes made outside a turn are pending:
            # catching up under them would undo them; their commit meets what changed instead.
            return
        # Callers arriving while a catch-up runs share the next one, which starts after they
        # arrived and so sees what they must see: one query per round trip, however many ask.
        loop = asyncio.get_running_loop()
        if self._next_sync is None:
            self._next_sync = loop.create_future()
            if self._syncing is None or self._syncing.done():
                self._syncing = self._tasks.spawn(self._run_syncs(), "store %s: catch-up", self._display)
        await asyncio.shield(self._next_sync)

    async def _run_syncs(self) -> None:
        while self._next_sync is not None:
            waiting, self._next_sync = self._next_sync, None
            try:
                await self._sync_once()
            except Exception as exc:  # the database is away: reads answer from memory meanwhile
                if not self._sync_failing:
                    log.warning(
                        "store %s: cannot catch up with other nodes (%s); answering from memory",
                        self._display,
                        exc,
                    )
                self._sync_failing = True
            else:
                self._sync_failing = False
            waiting.set_result(None)

    async def _sync_once(self) -> None:
        async with self.pool.acquire() as conn:
            # One statement, one snapshot: both numbers are of the same moment.
            pruned, newest, newest_event = await conn.fetchrow(_NEWEST)
            newest = max(pruned, newest)
            if newest <= self.applied:
                # Events of commits that changed no rows (or rows memory has): nothing to catch up.
                self._events_known = max(self._events_known, newest_event)
                return
            async with self._catching_up:
                if self._state in (OPEN, COMMITTING) or self._staged.rows:
                    return  # this node's turn caught up already (and holds the lock)
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    remote, newest = await self._read_changes(conn)
                # A turn may be opening meanwhile: it waits for this lock, and memory has no
                # change of its yet. Changes made outside a turn meanwhile are the exception.
                if not self._staged.rows:
                    self._catch_up(remote, newest)

    def _notified(self, *_: object) -> None:
        """Another node (or this one) committed: catch up, then hand its events to the bus."""
        self._follow()

    def _follow(self) -> None:
        if not self._loaded:
            return  # memory and the bus start from load()'s snapshot; nothing to follow before it
        if self._following is not None and not self._following.done():
            self._follow_again = True
            return
        self._following = self._tasks.spawn(self._follow_changes(), "store %s: follow", self._display)

    async def _follow_changes(self) -> None:
        self._follow_again = True
        while self._follow_again and self._pool is not None:
            self._follow_again = False
            try:
                await self.sync()
                await self._pump_events()
            except Exception as exc:  # the database is away: the watch tries again in WATCH_SECONDS
                if not self._sync_failing:
                    log.warning("store %s: following other nodes' changes failed: %s", self._display, exc)
                self._sync_failing = True
                return

    async def _pump_events(self) -> None:
        """Events up to what memory is caught up with, in id order, to the bus."""
        if self.bus is None:
            self._delivered = self._events_known
            return
        while self._delivered < self._events_known:
            rows = await self.pool.fetch(
                "SELECT id, ts, type, room, data, origin, node FROM events "
                "WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3",
                self._delivered,
                self._events_known,
                PUMP_BATCH,
            )
            if not rows:
                self._delivered = self._events_known
                break
            for row in rows:
                # A rollback's queue.reloaded is about that node's memory: nobody else's changed.
                if row["type"] != events.QUEUE_RELOADED or row["node"] == self.node:
                    self.bus.deliver(_event(row))
            self._delivered = rows[-1]["id"]

    # -- cluster-wide chores --------------------------------------------------------------------

    async def claim_job(self, name: str, every_seconds: float) -> bool:
        """Whether this node runs job ``name`` now: the first node to ask in a period does."""
        claimed = await self.pool.fetchval(
            "INSERT INTO jobs (name, last_run) VALUES ($1, now()) ON CONFLICT (name) DO UPDATE "
            "SET last_run = now() WHERE jobs.last_run <= now() - make_interval(secs => $2) RETURNING true",
            name,
            max(0.0, every_seconds * 0.9),  # a little early: the nodes' timers drift
        )
        return bool(claimed)

    async def prune_log(self) -> int:
        """Drop changes older than LOG_KEEP_SECONDS and events past EVENTS_KEEP; returns rows dropped."""
        async with self.pool.acquire() as conn, conn.transaction():
            through = await conn.fetchval(
                "SELECT max(id) FROM changes WHERE at < now() - make_interval(secs => $1)", LOG_KEEP_SECONDS
            )
            dropped = 0
            if through is not None:
                status = await conn.execute("DELETE FROM changes WHERE id <= $1", through)
                await conn.execute(
                    "UPDATE log_pruned SET through = greatest(through, $1) WHERE id = 1", through
                )
                dropped += int(status.split()[-1])
            status = await conn.execute(
                "DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - $1", EVENTS_KEEP
            )
            return dropped + int(status.split()[-1])

    # -- result images (results.SharedImages) ----------------------------------------------------

    async def read_image(self, name: str, max_bytes: int) -> bytes | None:
        """A result image's bytes, if stored and at most ``max_bytes`` (the size is checked by the
        database first: a row larger than this node accepts is never read into memory)."""
        data: bytes | None = await self.pool.fetchval(
            "SELECT bytes FROM result_images WHERE name = $1 AND octet_length(bytes) <= $2", name, max_bytes
        )
        return data

    async def prune_images(self, referenced: Callable[[], Iterable[str]], min_age: float) -> int:
        """Delete result images older than ``min_age`` seconds that no task references. Memory is
        caught up first, so what ``referenced()`` names includes every node's committed tasks;
        an image younger than ``min_age`` may be about to be referenced by a turn of another node
        (or by a result its helper holds), and is kept."""
        await self.sync()
        keep = list(referenced())
        status = await self.pool.execute(
            "DELETE FROM result_images WHERE created_at < now() - make_interval(secs => $1) "
            "AND NOT (name = ANY($2::text[]))",
            min_age,
            keep,
        )
        return int(status.split()[-1])

    def stats(self) -> StoreStats:
        return self.backoff.stats(self.commits)

    def cluster_stats(self) -> dict[str, Any]:
        return {
            "appliedChange": self.applied,
            "deliveredEvent": self._delivered,
            "conflicts": self.conflicts,
            "rowsCaughtUp": self.caught_up,
            "eventsDropped": self.events_dropped,
        }
