"""Copy a SQLite store into an empty PostgreSQL store: the move from one node to several
(``p2pdiff --copy-store sqlite:///PATH``, README "Running several nodes").

Everything the SQLite store holds (rooms, tasks in queue order, counters) goes through the two
stores' own ``load()`` and ``save_*()``, so the rows are written as the PostgreSQL store writes
them, in one write turn; the result images the tasks reference go into the database in the same
commit, read from the SQLite store's results directory. The target must be empty: a store already
in use is never merged into. No node may run on either store meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from p2pdiff.tasks.pg_store import PgStore
from p2pdiff.tasks.results import task_image
from p2pdiff.tasks.sqlite_store import SqliteStore
from p2pdiff.tasks.store import StoreError


@dataclass(frozen=True, slots=True)
class Copied:
    rooms: int
    tasks: int
    counters: int
    images: int
    # Referenced by a task, but not in the results directory (deleted by hand, or never arrived):
    # the task keeps its reference and its result URL answers 404, as it would have on SQLite.
    missing_images: int


async def copy_store(source: SqliteStore, source_results: Path, target: PgStore) -> Copied:
    """Copy ``source`` (closed) into ``target`` (closed, empty); both are closed again after."""
    await source.open()
    try:
        stored = await source.load()
    finally:
        await source.close()
    await target.open()
    try:
        already = await target.load()
        if already.rooms or already.tasks:
            raise StoreError(
                f"{target.location} already holds {len(already.rooms)} rooms and {len(already.tasks)} "
                "tasks: copy into an empty database"
            )
        images = missing = 0
        await target.begin()
        # Staged without an await in between: all of it is in this one turn's commit.
        for room in stored.rooms:
            target.save_room(room)
        for task in stored.tasks:
            image = task_image(task.result)
            if image is not None:
                path = source_results / image.path
                if path.is_file():
                    target.stage_image(image.path, image.content_type, path)
                    images += 1
                else:
                    missing += 1
            target.save_task(task)
        for name, value in stored.counters.items():
            target.save_counter(name, value)
        await target.commit()
    finally:
        await target.close()
    return Copied(len(stored.rooms), len(stored.tasks), len(stored.counters), images, missing)
