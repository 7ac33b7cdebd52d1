"""GET /api/queue/{room} answers from a cache (rest/api.py ``ListingCache``) kept by the room's version:
whatever changes a room (REST, peers, lease expiry, retention dropping it, a failed commit put back,
a reload), the listing served is the one a fresh rendering gives."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from p2pdiff.config import Config
from p2pdiff.errors import Conflict, InvalidTransition, NotFound, Unavailable
from p2pdiff.rest.api import ListingCache, render_listing
from p2pdiff.rooms.helper import Helper, make_helper
from p2pdiff.tasks.journal import Journal
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.sqlite_store import SqliteStore
from p2pdiff.tasks.validate import NewTask
from tests.faults import fill_disk
from tests.test_queue import STEPS, Clock, change, deny_writes

# The listing without a query and with the filters a client may give.
QUERIES = [
    (None, None),
    (frozenset({"pending"}), None),
    (frozenset({"processing", "complete", "failed"}), None),
    (None, 2),
    (frozenset({"pending", "cancelled"}), 1),
]


def api_only() -> Helper:
    config = Config()
    config.p2p.enabled = False
    return make_helper(config.p2p)


def assert_current(cache: ListingCache, queue: QueueManager, helper: Helper) -> None:
    """Every listing the cache hands out for the rooms the queue holds is a fresh rendering."""
    for room_id, room in queue.rooms.items():
        for statuses, limit in QUERIES:
            fresh = render_listing(queue, helper, room_id, statuses, limit)
            # The same second throughout: only the room's changes may make a kept listing stale.
            assert cache.get((room_id, statuses, limit), room, 0, lambda fresh=fresh: fresh) == fresh


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(steps=st.lists(STEPS, max_size=40))
# Paths random lists seldom take: a room dropped by retention and made again, finished tasks
# pruned from a room that stays, a requeue, a failed commit after a lease expiry.
@example(
    steps=[
        ("add", "a", "t1", "x", False, "p1"),
        ("update", "a", "t1", "claim", "p1"),
        ("update", "a", "t1", "complete", "p1"),
        ("tick", 30 * 3600),
        ("sweep",),
        ("add", "a", "t2", "y", False, "p2"),
    ]
)
@example(
    steps=[
        ("add", "a", "t1", "x", False, "p1"),
        ("update", "a", "t1", "claim", "p1"),
        ("update", "a", "t1", "complete", "p1"),
        ("add", "a", "t2", "y", False, "p1"),
        ("tick", 30 * 3600),
        ("sweep",),
    ]
)
@example(
    steps=[
        ("add", "b", "t1", "x", True, "p1"),
        ("update", "b", "t1", "claim", "p1"),
        ("update", "b", "t1", "fail", "p1"),
        ("update", "b", "t1", "requeue", "p1"),
    ]
)
@example(
    steps=[
        ("add", "a", "t1", "x", True, "p1"),
        ("update", "a", "t1", "claim", "p1"),
        ("commit", False),
        ("tick", 20),
        ("expire",),
        ("commit", True),
    ]
)
async def test_a_kept_listing_is_never_stale(steps: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = SqliteStore(Path(directory) / "q.sqlite3", synchronous="off", clock=(store_clock := Clock()))
        await store.open()
        queue = QueueManager(store, lease_seconds=10, clock=Clock())
        helper, cache = api_only(), ListingCache()
        for op in steps:
            if op[0] == "tick":
                queue.clock.now += op[1]  # type: ignore[attr-defined]
            elif op[0] == "commit":
                if op[1]:  # a commit that fails: memory is put back as it was at the last one
                    store.db.set_authorizer(deny_writes)
                with contextlib.suppress(Unavailable):
                    await queue.flush()
                store.db.set_authorizer(None)
                store_clock.now += 10  # past the back-off
            else:
                with contextlib.suppress(Conflict, InvalidTransition, NotFound):
                    change(queue, op)
            assert_current(cache, queue, helper)
        await store.close()


async def test_a_reload_after_a_failed_rollback_is_never_served_from_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When putting memory back fails the queue reloads from the store: new room objects, whose
    versions start again at 0, as a kept listing's may have stood."""
    store = SqliteStore(tmp_path / "q.sqlite3", clock=Clock())
    await store.open()
    queue = QueueManager(store, lease_seconds=10)
    helper, cache = api_only(), ListingCache()
    queue.add("r", NewTask("first", "x", {}, {}, None))
    await queue.flush()
    await queue.load()  # the room as a start-up makes it: version 0
    assert_current(cache, queue, helper)  # kept: "first" at version 0
    queue.add("r", NewTask("second", "x", {}, {}, None))
    await queue.flush()

    def broken(self: Journal, rooms: Any) -> list[str]:
        raise KeyError("a change the journal missed")

    monkeypatch.setattr(Journal, "rollback", broken)
    queue.add("r", NewTask("lost", "x" * 4000, {}, {}, None))
    fill_disk(store)
    with pytest.raises(Unavailable):
        await queue.flush()
    room = queue.get_room("r")
    assert room is not None and room.version == 0 and list(room.tasks) == ["first", "second"]
    assert_current(cache, queue, helper)
    await store.close()
