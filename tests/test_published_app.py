"""What the published app really does, over the stand-in signaling room (tests/fake_signaling.py).

The app (trystero@0.22) differs from its own protocol table: its GPU worker reports ``progress``
up to 1.0 and never sends ``result`` or ``chunk``; its ``queue`` message carries only ``id,
prompt, status, createdBy, createdAt`` and it POSTs the full task to ``POST /api/queue`` without a
room right after. These tests hold the helper to that behaviour; the same flows against real
trystero@0.22 peers are in tests/interop/test_published_app_peers.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from p2pdiff.appkeys import EVENTS, HELPER
from p2pdiff.rooms import dispatch
from tests.app_room import HELPER_ID, PNG, RoomFactory, data_url, until

OPTIONS = {"model": "prx-1024", "steps": 4, "width": 512, "height": 512}


def progress(task_id: str, chunk_id: str | None, value: float, worker: str) -> dict[str, Any]:
    return {"taskId": task_id, "chunkId": chunk_id, "progress": value, "workerId": worker}


def work_like_the_app(room: Any, peer: str, task_message: dict[str, Any]) -> None:
    """What the app's GPU worker does with a `task`: one progress per step up to 1.0, nothing else."""
    chunk = task_message["chunk"]
    steps = chunk["endStep"] - chunk["startStep"]
    for step in range(1, steps + 1):
        room.say(peer, "progress", progress(task_message["id"], chunk["id"], step / steps, peer))


def queue_message(task_id: str, prompt: str, created_by: str = "page-a") -> dict[str, Any]:
    """The app's `queue` broadcast: no options, no negativePrompt, no type."""
    return {
        "tasks": [
            {
                "id": task_id,
                "prompt": prompt,
                "status": "pending",
                "createdBy": created_by,
                "createdAt": 1765100000000,
            }
        ]
    }


def full_task(task_id: str, prompt: str, created_by: str = "page-a") -> dict[str, Any]:
    """The body the app POSTs to /api/queue (no room)."""
    return {
        "id": task_id,
        "type": "generate",
        "prompt": prompt,
        "negativePrompt": "blurry",
        "options": OPTIONS,
        "createdAt": 1765100000000,
        "createdBy": created_by,
        "status": "pending",
    }


# -- progress 1.0 is done --------------------------------------------------------------------------


async def test_two_tasks_from_one_page_complete_through_one_gpu_page_in_order(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True)
    room.join("page-a", gpu=False)
    room.join("gpu-page", gpu=True)
    for task_id, prompt in (("task_1", "a red fox"), ("task_2", "a blue owl")):
        room.say("page-a", "queue", queue_message(task_id, prompt))
        assert (await room.client.post("/api/queue", json=full_task(task_id, prompt))).status == 200
    (first,) = await until(lambda: room.sent("task", "gpu-page"))
    assert first["id"] == "task_1" and first["options"] == OPTIONS
    assert room.task("task_2")["status"] == "pending"  # one task at a time per peer
    work_like_the_app(room, "gpu-page", first)
    task = room.task("task_1")
    assert (task["status"], task["claimedBy"], task["progress"]) == ("complete", "gpu-page", 1.0)
    assert task["result"] == {"chunkId": "task_1_chunk_0", "workerId": "gpu-page", "status": "complete"}
    second = (await until(lambda: room.sent("task", "gpu-page")[1:]))[0]
    assert second["id"] == "task_2"
    work_like_the_app(room, "gpu-page", second)
    assert room.task("task_2")["status"] == "complete"
    assert room.task("task_1")["finishedAt"] <= room.task("task_2")["finishedAt"]
    stats = (await room.stats())["protocol"]
    assert stats["completed"] == 2 and stats["assignments"] == [] and stats["dropped"] == {}


async def test_a_result_or_image_after_progress_one_still_attaches(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True)
    room.join("g1", gpu=True)
    await room.post("t0")
    await room.post("t1")
    await until(lambda: room.handed("g1") == ["t0"])
    room.say("g1", "progress", progress("t0", "t0_chunk_0", 1.0, "g1"))
    assert room.task("t0")["status"] == "complete"
    bus = room.client.server.app[EVENTS]
    mark = bus.last_id
    room.say("g1", "result", {"taskId": "t0", "chunkId": "t0_chunk_0", "data": {"seed": 7}})
    assert room.task("t0")["result"]["data"] == {"seed": 7}
    room.say("g1", "chunk", PNG, {"taskId": "t0", "chunkId": "t0_chunk_0"})
    result = room.task("t0")["result"]
    assert result["data"] == {"seed": 7} and result["image"]["size"] == len(PNG)
    assert [e.type for e in bus.since(mark)] == ["task.result", "task.result"]
    resp = await room.client.get("/api/queue/lobby/t0/result")
    assert resp.status == 200 and await resp.read() == PNG
    # once is enough
    room.say("g1", "result", {"taskId": "t0", "chunkId": "t0_chunk_0", "data": {"seed": 8}})
    room.say("g1", "chunk", PNG, {"taskId": "t0", "chunkId": "t0_chunk_0"})
    room.say("g1", "progress", progress("t0", "t0_chunk_0", 1.0, "g1"))
    assert (await room.dropped()) == {"result.duplicate": 1, "chunk.duplicate": 1, "progress.late": 1}
    # meanwhile g1 was free for t1 at once
    await until(lambda: room.handed("g1") == ["t0", "t1"])


async def test_a_result_data_url_after_progress_one_becomes_the_image(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True)
    room.join("g1", gpu=True)
    await room.post("t0")
    await until(lambda: room.handed("g1") == ["t0"])
    room.say("g1", "progress", progress("t0", None, 1.0, "g1"))
    room.say("g1", "result", {"taskId": "t0", "data": data_url(PNG), "status": "complete"})
    result = room.task("t0")["result"]
    assert result["image"]["size"] == len(PNG) and "data" not in result
    assert result["chunkId"] == "t0_chunk_0"


async def test_a_split_task_finished_by_progress_takes_a_late_image(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True)
    room.join("g1", gpu=True)
    room.join("g2", gpu=True)
    await room.post("t0", options={"steps": 10, "chunks": 2})
    await until(lambda: room.handed("g1") and room.handed("g2"))
    room.say("g2", "progress", progress("t0", "t0_chunk_1", 1.0, "g2"))
    task = room.task("t0")
    assert (task["status"], task["progress"]) == ("processing", 0.5)
    # a result for the finished chunk while the other one runs: kept for the task's result
    room.say("g2", "result", {"taskId": "t0", "chunkId": "t0_chunk_1", "data": {"seed": 2}})
    assert room.task("t0")["status"] == "processing"
    room.say("g1", "progress", progress("t0", "t0_chunk_0", 1.0, "g1"))
    task = room.task("t0")
    assert task["status"] == "complete" and task["claimedBy"] == HELPER_ID
    assert [c.get("data") for c in task["result"]["chunks"]] == [None, {"seed": 2}]
    assert "image" not in task["result"]
    room.say("g2", "chunk", PNG, {"taskId": "t0", "chunkId": "t0_chunk_1"})
    task = room.task("t0")
    assert task["result"]["image"]["size"] == len(PNG)  # the last chunk's image is the task's
    assert task["result"]["chunks"][1]["image"]["size"] == len(PNG)
    assert (await room.dropped()) == {}


async def test_a_tracked_task_is_done_at_progress_one(make_room: RoomFactory) -> None:
    """Without dispatch the browsers hand work out themselves; progress 1.0 still finishes it."""
    room = await make_room(dispatch=False)
    room.join("page-a", gpu=False)
    room.join("gpu-page", gpu=True)
    room.say("page-a", "queue", queue_message("task_9", "a green frog"))
    for step in range(1, 21):
        room.say("gpu-page", "progress", progress("task_9", "task_9_chunk_0", step / 20, "gpu-page"))
    task = room.task("task_9")
    assert (task["status"], task["claimedBy"], task["progress"]) == ("complete", "gpu-page", 1.0)
    room.say("gpu-page", "result", {"taskId": "task_9", "data": data_url(PNG)})
    assert room.task("task_9")["result"]["image"]["size"] == len(PNG)
    room.say("gpu-page", "result", {"taskId": "task_9", "data": None})
    room.say("gpu-page", "progress", progress("task_9", None, 1.0, "gpu-page"))
    assert (await room.dropped()) == {"result.duplicate": 1, "progress.late": 1}


async def test_a_task_announced_without_options_waits_for_the_apps_post(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True)
    room.join("page-a", gpu=False)
    room.join("gpu-page", gpu=True)
    room.say("page-a", "queue", queue_message("task_3", "a red fox"))
    await asyncio.sleep(0.3)
    assert room.handed("gpu-page") == []  # its options are on their way in the app's POST
    assert (await room.client.post("/api/queue", json=full_task("task_3", "a red fox"))).status == 200
    (msg,) = await until(lambda: room.sent("task", "gpu-page"))
    assert msg["options"] == OPTIONS and msg["negativePrompt"] == "blurry"
    assert msg["chunk"]["endStep"] == OPTIONS["steps"]


async def test_a_task_nobody_posts_goes_out_after_the_grace(
    make_room: RoomFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page whose backend is off never POSTs: the task goes out with what the room knows."""
    monkeypatch.setattr(dispatch, "FILL_GRACE_SECONDS", 0.2)
    room = await make_room(dispatch=True)
    room.join("page-a", gpu=False)
    room.join("gpu-page", gpu=True)
    room.say("page-a", "queue", queue_message("task_4", "a red fox"))
    room.say("page-a", "queue", {"tasks": [{**full_task("task_5", "with options"), "createdAt": 1}]})
    (msg,) = await until(lambda: room.sent("task", "gpu-page"))
    assert msg["id"] == "task_4" and msg["options"] == {}  # nothing overtook it meanwhile
    assert room.handed("gpu-page") == ["task_4"]


# -- a silent worker rests, it is not banned -------------------------------------------------------


async def test_a_silent_worker_is_tried_again_after_a_backoff(
    make_room: RoomFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "REST_FIRST_SECONDS", 0.2)
    room = await make_room(dispatch=True, lease=0.2)
    room.join("g1", gpu=True)
    await room.post("t0")
    await until(lambda: room.handed("g1") == ["t0"])
    g1 = room.client.server.app[HELPER].room("lobby").agent.dispatcher.workers["g1"]
    # it says nothing: the lease takes t0 back, g1 rests, then gets t0 again without speaking
    await until(lambda: room.handed("g1") == ["t0", "t0"], within=5)
    assert g1.silences >= 1
    # silent again: a second, longer rest
    await until(lambda: g1.silences >= 2, within=5)
    assert g1.resting_until > 0
    room.queue.lease_seconds = 60  # from here on g1 keeps what it gets
    await room.post("t1")
    # anything it says ends the rest at once
    room.say("g1", "capabilities", {"hasGPU": True, "gpuName": "gpu", "memory": 8, "cores": 8})
    assert (g1.silences, g1.resting_until) == (0, 0.0)
    await until(lambda: len(room.handed("g1")) == 3)
    work_like_the_app(room, "g1", room.sent("task", "g1")[-1])
    await until(lambda: len(room.handed("g1")) == 4)
    work_like_the_app(room, "g1", room.sent("task", "g1")[-1])
    assert (room.task("t0")["status"], room.task("t1")["status"]) == ("complete", "complete")
    assert room.handed("g1")[2:] == ["t0", "t1"]


# -- one id, one task --------------------------------------------------------------------------------


async def test_the_apps_post_without_room_completes_the_rooms_task(make_room: RoomFactory) -> None:
    room = await make_room()
    room.join("page-a", gpu=False)
    room.say("page-a", "queue", queue_message("task_5", "a red fox"))
    assert room.task("task_5")["options"] == {}
    bus = room.client.server.app[EVENTS]
    mark = bus.last_id
    resp = await room.client.post("/api/queue", json=full_task("task_5", "a red fox"))
    assert resp.status == 200
    body = await resp.json()
    assert body["roomId"] == "lobby" and body["duplicate"] is True and body["taskId"] == "task_5"
    task = room.task("task_5")
    assert task["options"] == OPTIONS and task["negativePrompt"] == "blurry" and task["type"] == "generate"
    assert task["createdBy"] == "page-a"  # what the room's copy had stays
    assert [e.type for e in bus.since(mark)] == ["task.updated"]
    default = await (await room.client.get("/api/queue/default")).json()
    assert default["queue"] == []
    # the app's later snapshots of the same task (options {} again) are no conflict
    room.say("page-a", "queue", queue_message("task_5", "a red fox"))
    assert (await room.dropped()) == {} and room.task("task_5")["options"] == OPTIONS
    # the same again is an idempotent duplicate without an event
    mark = bus.last_id
    assert (await room.client.post("/api/queue", json=full_task("task_5", "a red fox"))).status == 200
    assert bus.since(mark) == []


async def test_a_queue_message_moves_the_posted_task_to_its_room(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True)
    room.join("page-a", gpu=False)
    bus = room.client.server.app[EVENTS]
    resp = await room.client.post("/api/queue", json=full_task("task_6", "a blue owl"))
    assert resp.status == 201 and (await resp.json())["roomId"] == "default"
    mark = bus.last_id
    room.say("page-a", "queue", queue_message("task_6", "a blue owl"))
    task = room.task("task_6")
    assert task["roomId"] == "lobby" and task["options"] == OPTIONS and task["status"] == "pending"
    assert task["negativePrompt"] == "blurry"
    (moved,) = [e for e in bus.since(mark) if e.type == "task.moved"]
    assert moved.room == "lobby" and moved.data["fromRoom"] == "default"
    assert bus.since(mark, "default") == [moved]  # a stream of the default room hears of it too
    default = await (await room.client.get("/api/queue/default")).json()
    assert default["queue"] == []
    resp = await room.client.get("/api/queue/default/task_6")
    assert resp.status == 404
    # the room's dispatch takes it like any other pending task
    room.join("gpu-page", gpu=True)
    (msg,) = await until(lambda: room.sent("task", "gpu-page"))
    assert msg["id"] == "task_6" and msg["options"] == OPTIONS
    work_like_the_app(room, "gpu-page", msg)
    assert room.task("task_6")["status"] == "complete"


async def test_a_moved_task_survives_a_restart_in_its_new_room(make_room: RoomFactory) -> None:
    room = await make_room()
    room.join("page-a", gpu=False)
    await room.client.post("/api/queue", json=full_task("task_7", "a grey cat"))
    room.say("page-a", "queue", queue_message("task_7", "a grey cat"))
    queue = room.queue
    await queue.flush()
    await queue.load()  # what a restart reads back
    assert queue.get_task("lobby", "task_7").options == OPTIONS
    assert "task_7" not in queue.rooms["default"].tasks


async def test_other_tasks_with_the_same_id_stay_apart(make_room: RoomFactory) -> None:
    room = await make_room()
    room.join("page-a", gpu=False)
    room.say("page-a", "queue", queue_message("task_8", "a red fox"))
    # another prompt under that id is another task: it goes to the default room as before
    resp = await room.client.post("/api/queue", json=full_task("task_8", "something else"))
    assert resp.status == 201 and (await resp.json())["roomId"] == "default"
    # a body naming its room is taken at its word
    resp = await room.client.post("/api/queue", json={**full_task("task_8", "a red fox"), "roomId": "other"})
    assert resp.status == 201 and (await resp.json())["roomId"] == "other"
    assert room.task("task_8")["options"] == {}
    # a queue message with another prompt than the default room's copy does not move it
    room.say("page-a", "queue", queue_message("task_10", "first"))
    await room.client.post("/api/queue", json=full_task("task_11", "posted"))
    room.say("page-a", "queue", queue_message("task_11", "announced differently"))
    assert room.task("task_11")["prompt"] == "announced differently"
    # only its author moves a task: another peer naming it gets a task of its own in the room
    room.join("page-b", gpu=False)
    await room.client.post("/api/queue", json=full_task("task_12", "mine"))
    room.say("page-b", "queue", queue_message("task_12", "mine", created_by="page-b"))
    assert room.task("task_12")["options"] == {}
    # and a POST by another author does not fill in the room's task
    room.say("page-a", "queue", queue_message("task_13", "a cat"))
    resp = await room.client.post("/api/queue", json=full_task("task_13", "a cat", created_by="page-b"))
    assert resp.status == 201 and (await resp.json())["roomId"] == "default"
    assert room.task("task_13")["options"] == {}
    default = await (await room.client.get("/api/queue/default")).json()
    assert sorted(t["id"] for t in default["queue"]) == ["task_11", "task_12", "task_13", "task_8"]


async def test_rest_options_conflict_only_when_both_sides_have_some(make_room: RoomFactory) -> None:
    room = await make_room()
    await room.post("r1")  # no options
    again = await room.client.post(
        "/api/queue/lobby", json={"id": "r1", "prompt": "prompt r1", "options": OPTIONS}
    )
    assert again.status == 200 and room.task("r1")["options"] == OPTIONS
    clash = await room.client.post(
        "/api/queue/lobby", json={"id": "r1", "prompt": "prompt r1", "options": {"steps": 9}}
    )
    assert clash.status == 409


async def test_nothing_is_lost_when_the_post_races_the_queue_message(make_room: RoomFactory) -> None:
    """Both orders, many tasks interleaved: every id ends as one task in the room, with options."""
    room = await make_room()
    room.join("page-a", gpu=False)
    posts = []
    for i in range(20):
        tid = f"task_r{i}"
        if i % 2:
            room.say("page-a", "queue", queue_message(tid, f"p{i}"))
            posts.append(room.client.post("/api/queue", json=full_task(tid, f"p{i}")))
        else:
            await room.client.post("/api/queue", json=full_task(tid, f"p{i}"))
            room.say("page-a", "queue", queue_message(tid, f"p{i}"))
    await asyncio.gather(*posts)
    listing = await (await room.client.get("/api/queue/lobby")).json()
    assert sorted(t["id"] for t in listing["queue"]) == sorted(f"task_r{i}" for i in range(20))
    assert all(t["options"] == OPTIONS for t in listing["queue"])
    assert (await (await room.client.get("/api/queue/default")).json())["queue"] == []
