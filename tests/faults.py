"""Store faults as tests make them: a full disk, another program's write lock, a clock to move."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.sqlite_store import SqliteStore


class Clock:
    """A store's monotonic clock, moved by the test: back-offs pass without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fill_disk(store: SqliteStore) -> None:
    """A full disk as SQLite reports it (SQLITE_FULL): the file may not grow by another page."""
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages}")


def free_disk(store: SqliteStore) -> None:
    store.db.execute("PRAGMA max_page_count=4294967294")


# A prompt that needs pages of its own: adding a task with it grows the file.
BIG_PROMPT = "x" * 4000


def held_lock(path: str | Path) -> sqlite3.Connection:
    """Another program (the sqlite3 shell, a backup tool) holding the database's write lock."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


async def on_disk(path: str | Path) -> QueueManager:
    """The queue a restart would load, through a connection of its own."""
    store = SqliteStore(path)
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    await queue.load()
    await store.close()
    return queue
