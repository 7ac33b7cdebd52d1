"""QueueManager's writes on behalf of peers (the helper's), and the result file store."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from p2pdiff.config import Config, ConfigError, load_config
from p2pdiff.errors import Conflict, InvalidTransition, NotFound
from p2pdiff.rooms import protocol as rp
from p2pdiff.tasks.events import SERVER, Event, EventBus, Origin
from p2pdiff.tasks.images import ImageRejected
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.results import ResultStore, StoredImage, results_dir, task_image
from p2pdiff.tasks.sqlite_store import SqliteStore
from p2pdiff.tasks.validate import NewTask, TaskUpdate

PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 10


@pytest.fixture
def published() -> list[tuple[str, Any]]:
    return []


@pytest.fixture
async def queue(tmp_path: Path, published: list[tuple[str, Any]]) -> QueueManager:
    store = SqliteStore(tmp_path / "q.sqlite3")
    await store.open()
    q = QueueManager(store, lease_seconds=10, publish=lambda t, r, data, origin: published.append((t, data)))
    await q.load()
    return q


def new(tid: str, prompt: str = "a cat") -> NewTask:
    return NewTask(id=tid, prompt=prompt, options={}, extra={"createdBy": "b"}, created_at=None)


def test_upsert_adds_new_tasks_in_the_state_the_peer_saw(queue: QueueManager, published: list[Any]) -> None:
    assert queue.upsert_from_peer("r", new("a")).created
    assert queue.upsert_from_peer("r", new("b"), "processing", "w1").task.claimed_by == "w1"
    done = queue.upsert_from_peer("r", new("c"), "complete", "w2").task
    assert (done.status, done.claimed_by, done.progress) == ("complete", "w2", 1.0)
    assert queue.upsert_from_peer("r", new("d"), "failed").task.error == "failed on a peer"
    assert queue.upsert_from_peer("r", new("e"), "cancelled").task.status == "cancelled"
    # through the state machine: every step published like a REST change
    assert [t for t, _ in published if t.startswith("task.")][:6] == [
        "task.created",
        "task.created",
        "task.claimed",
        "task.created",
        "task.claimed",
        "task.complete",
    ]


async def test_events_carry_the_origin_their_caller_named(tmp_path: Path) -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.add_listener(seen.append)
    store = SqliteStore(tmp_path / "o.sqlite3")
    await store.open()
    queue = QueueManager(store, lease_seconds=10, publish=bus.publish)
    await queue.load()
    peer = Origin.peer_message("r", "p1")
    queue.add("r", new("over-rest"))
    queue.upsert_from_peer("r", new("a"), "processing", "w1", sender="p1", origin=peer)
    queue.worker_complete("r", "a", "w1", {"status": "complete"}, origin=peer)
    queue.cancel("r", "over-rest")
    assert [(e.type, e.origin) for e in seen] == [
        ("task.created", SERVER),
        ("task.created", peer),
        ("task.claimed", peer),
        ("task.complete", peer),
        ("task.cancelled", SERVER),
    ]
    # what clients see is unchanged: the origin stays in the process
    assert "origin" not in seen[1].to_json() and b"origin" not in seen[1].frame


def test_upsert_leaves_known_tasks_alone(queue: QueueManager) -> None:
    queue.upsert_from_peer("r", new("a"))
    queue.worker_progress("r", "a", "w1", 0.5)
    again = queue.upsert_from_peer("r", new("a"), "pending")
    assert not again.created and again.task.status == "processing"
    with pytest.raises(Conflict):
        queue.upsert_from_peer("r", new("a", prompt="a dog"))


def test_worker_progress_claims_adopts_and_guards(queue: QueueManager) -> None:
    queue.add("r", new("a"))
    task = queue.worker_progress("r", "a", "w1", 0.2)
    assert (task.status, task.claimed_by, task.progress) == ("processing", "w1", 0.2)
    with pytest.raises(Conflict) as info:
        queue.worker_progress("r", "a", "w2", 0.3)
    assert info.value.code == "worker_mismatch"
    # a processing task nobody is named for belongs to the first worker reporting on it
    queue.upsert_from_peer("r", new("b"), "processing")
    assert queue.worker_progress("r", "b", "w3", 0.1).claimed_by == "w3"
    with pytest.raises(NotFound):
        queue.worker_progress("r", "ghost", "w1", 0.1)


def test_worker_complete_and_attach(queue: QueueManager, published: list[Any]) -> None:
    queue.add("r", new("a"))
    with pytest.raises(InvalidTransition):
        queue.worker_complete("r", "a", "w1", {"x": 1})  # never handed out
    queue.worker_progress("r", "a", "w1", 0.5)
    task = queue.worker_complete("r", "a", "w1", {"chunkId": "c0"})
    assert task.status == "complete" and task.result == {"chunkId": "c0"}
    with pytest.raises(Conflict):
        queue.attach_result("r", "a", "w2", {"image": {}})
    published.clear()
    queue.attach_result("r", "a", "w1", {"image": {"path": "x"}})
    assert task.result == {"chunkId": "c0", "image": {"path": "x"}}
    assert [t for t, _ in published if t.startswith("task.")] == ["task.result"]
    queue.add("r", new("b"))
    with pytest.raises(InvalidTransition):
        queue.attach_result("r", "b", "w1", {})


def test_requeue_carries_its_reason(queue: QueueManager, published: list[Any]) -> None:
    queue.add("r", new("a"))
    queue.update("r", "a", TaskUpdate("claim", "w1", None, None, None))
    queue.update("r", "a", TaskUpdate("requeue", "w1", None, None, None), reason="worker_left")
    assert published[-1][0] == "task.requeued" and published[-1][1]["reason"] == "worker_left"
    assert [t.id for t in queue.pending_tasks("r")] == ["a"]
    assert list(queue.pending_tasks("nowhere")) == []


# -- result files ------------------------------------------------------------------------------------


def test_result_store_names_files_by_content(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results", max_bytes=1000)
    image = store.save(PNG)
    assert image.content_type == "image/png" and image.size == len(PNG)
    assert image.path == f"{image.sha256}.png"
    assert (tmp_path / "results" / image.path).read_bytes() == PNG
    assert store.save(PNG) == image and store.saved == 1  # the same bytes are stored once
    assert store.resolve(image.path) == tmp_path / "results" / image.path
    assert store.resolve("../db.sqlite3") is None and store.resolve("x.png") is None
    with pytest.raises(ImageRejected) as info:
        store.save(b"<svg/>")
    assert info.value.reason == rp.NOT_AN_IMAGE
    with pytest.raises(ImageRejected) as info:
        store.save(PNG * 100)
    assert info.value.reason == rp.TOO_LARGE
    assert [p.name for p in (tmp_path / "results").iterdir()] == [image.path]  # no stray temp files


def test_result_store_gc_keeps_referenced_and_young_files(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results", max_bytes=10_000, fsync=False)
    keep = store.save(PNG)
    old = store.save(PNG + b"old")
    young = store.save(PNG + b"young")
    stale_tmp = tmp_path / "results" / ".x.png.1.tmp"
    stale_tmp.write_bytes(b"half")
    unrelated = tmp_path / "results" / "notes.txt"
    unrelated.write_text("mine")
    past = time.time() - 7200
    for name in (keep.path, old.path, stale_tmp.name):
        os.utime(tmp_path / "results" / name, (past, past))
    assert store.gc({keep.path}) == 2
    left = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert left == sorted([keep.path, young.path, "notes.txt"])
    assert ResultStore(tmp_path / "nothing-here", max_bytes=1).gc(set()) == 0


def test_task_image_reads_only_our_references() -> None:
    image = StoredImage("a" * 64 + ".png", "a" * 64, 10, "image/png")
    assert task_image({"image": image.to_json("r", "t")}) == image
    assert image.to_json("r", "t")["url"] == "/api/queue/r/t/result"
    assert task_image({"image": {**image.to_json("r", "t"), "path": "../../etc/passwd"}}) is None
    assert task_image({"image": {**image.to_json("r", "t"), "contentType": "text/html"}}) is None
    assert task_image("data") is None and task_image(None) is None


def test_results_dir_and_p2p_keys(tmp_path: Path) -> None:
    config = Config()
    config.store.path = str(tmp_path / "db" / "p2pdiff.sqlite3")
    assert results_dir(config) == tmp_path / "db" / "results"
    config.store.results_dir = str(tmp_path / "elsewhere")
    assert results_dir(config) == tmp_path / "elsewhere"
    loaded = load_config(
        None,
        environ={
            "P2PDIFF_P2P_DISPATCH": "true",
            "P2PDIFF_P2P_MAX_RESULT_BYTES": "1048576",
            "P2PDIFF_P2P_WIRE": "0.22",
            "P2PDIFF_STORE_RESULTS_DIR": "/srv/results",
            "P2PDIFF_CONFIG": str(_toml(tmp_path, "")),
        },
    )
    assert (
        loaded.p2p.dispatch is True and loaded.p2p.max_result_bytes == 1 << 20 and loaded.p2p.wire == "0.22"
    )
    assert loaded.store.results_dir == "/srv/results"
    for bad, message in [
        ("[p2p]\nwire = '0.24'\n", "[p2p] wire"),
        ("[p2p]\nmax_result_bytes = 0\n", "[p2p] max_result_bytes"),
        ("[p2p]\nmax_result_bytes = 1073741824\n", "[p2p] max_result_bytes"),
        ("[p2p]\ndispatch = 'yes'\n", "dispatch"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(_toml(tmp_path, bad), environ={})


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"c{abs(hash(text))}.toml"
    path.write_text(text)
    return path
