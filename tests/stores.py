"""Both task-store backends behind one fixture, so the queue's tests run on each: ``stores``
opens stores on one location (a SQLite file, or one PostgreSQL database), each ``open()`` a new
process's store (a restart), or a new node's on PostgreSQL."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from p2pdiff.tasks.events import EventBus
from p2pdiff.tasks.pg_store import PgStore
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.sqlite_store import SqliteStore
from p2pdiff.tasks.store import TaskStore
from tests.services import PostgresServer

BACKENDS = ["sqlite", "postgresql"]


class Stores:
    def __init__(self, backend: str, make: Callable[[str], TaskStore]) -> None:
        self.backend = backend
        self._make = make
        self._nodes = itertools.count(1)
        self.opened: list[TaskStore] = []

    async def open(self) -> TaskStore:
        store = self._make(f"node-{next(self._nodes)}")
        await store.open()
        self.opened.append(store)
        return store

    async def queue(self, **kwargs: object) -> QueueManager:
        """A loaded queue on a newly opened store (``publish`` goes through the store on
        PostgreSQL, where the database numbers events)."""
        store = await self.open()
        if isinstance(store, PgStore) and "publish" in kwargs:
            raise ValueError("on PostgreSQL events come from store.bus")
        queue = QueueManager(store, lease_seconds=10, **kwargs)  # type: ignore[arg-type]
        if isinstance(store, PgStore):
            queue.publish = store.publish
        await queue.load()
        return queue

    async def close(self) -> None:
        for store in self.opened:
            await store.close()


@pytest.fixture(params=BACKENDS)
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    if request.param == "sqlite":
        path = tmp_path / "q.sqlite3"
        found = Stores("sqlite", lambda node: SqliteStore(path))
        yield found
        await found.close()
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = await server.create_database()
    found = Stores("postgresql", lambda node: PgStore(url, display=url, node=node, bus=EventBus()))
    yield found
    await found.close()
    await server.drop_database(url.rpartition("/")[2])
