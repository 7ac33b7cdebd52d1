"""The helper in the app's room, over a stand-in signaling room (tests/fake_signaling.py).

The whole app runs (REST, queue, store, event bus, P2PHelper, RoomAgent); only the network is
replaced: ``room.deliver(action, payload, peer)`` plays a peer's message and ``room.sent(action)``
lists what the helper sent. The same flows against real Trystero peers are in
tests/interop/test_app_protocol.py.
"""

from __future__ import annotations

import asyncio
import functools

import pytest

from p2pdiff.appkeys import EVENTS, QUEUE
from p2pdiff.rooms import agent as agent_module
from p2pdiff.tasks.results import RESULTS, ResultStore
from signaling.bounded import TokenBucket
from tests.app_room import HELPER_ID, PNG, RoomFactory, app_task, data_url, until

# -- tracking -------------------------------------------------------------------------------------


async def test_each_peer_is_greeted_with_capabilities_and_the_queue(make_room: RoomFactory) -> None:
    room = await make_room()
    await room.post("t1")
    room.join("browser-a")
    caps = await until(lambda: room.sent("capabilities", "browser-a"))
    assert caps[0]["hasGPU"] is False and caps[0]["isServer"] is True and caps[0]["canQueue"] is True
    (snapshot,) = await until(lambda: room.sent("queue", "browser-a"))
    assert [t["id"] for t in snapshot["tasks"]] == ["t1"]
    assert snapshot["tasks"][0]["status"] == "pending" and snapshot["tasks"][0]["createdBy"] == HELPER_ID


async def test_capabilities_show_in_health_stats_queue_and_events(make_room: RoomFactory) -> None:
    room = await make_room()
    bus = room.client.server.app[EVENTS]
    mark = bus.last_id
    room.join("gpu-1", gpu=True)
    room.join("cpu-1", gpu=False)
    health = await (await room.client.get("/api/health")).json()
    peers = {p["id"]: p for p in health["p2p"]["rooms"][0]["peers"]}
    assert peers["gpu-1"]["capabilities"]["hasGPU"] is True
    assert peers["cpu-1"]["capabilities"] == {"hasGPU": False, "gpuName": None, "memory": 8, "cores": 8}
    stats = await room.stats()
    assert stats["gpuPeers"] == 1 and stats["dispatch"] is False
    assert {p["id"]: p["capabilities"]["hasGPU"] for p in stats["peers"]} == {"gpu-1": True, "cpu-1": False}
    queue = await (await room.client.get("/api/queue/lobby")).json()
    assert {p["id"] for p in queue["peers"] if p["capabilities"]["hasGPU"]} == {"gpu-1"}
    published = [e for e in bus.since(mark) if e.type == "peer.capabilities"]
    assert [e.data["peer"]["id"] for e in published] == ["gpu-1", "cpu-1"]
    assert (
        published[0].data["peer"]["capabilities"]["gpuName"] == "gpu" and "rttMs" in published[0].data["peer"]
    )
    room.leave("gpu-1")
    assert (await room.stats())["gpuPeers"] == 0


async def test_a_browser_task_is_tracked_from_queue_to_result(make_room: RoomFactory) -> None:
    room = await make_room()
    room.join("browser-a", gpu=False)
    room.join("gpu-1", gpu=True)
    room.say("browser-a", "queue", {"tasks": [app_task("task_1_abc")]})
    got = await (await room.client.get("/api/queue/lobby")).json()
    (task,) = got["queue"]
    assert task["id"] == "task_1_abc" and task["status"] == "pending" and task["position"] == 1
    assert (
        task["createdBy"] == "browser-a" and task["type"] == "generate" and task["createdAt"] == 1732550000000
    )
    # a peer's task is not echoed back to the room (the browser already broadcast it)
    await asyncio.sleep(0.05)
    assert room.sent("queue", None) == []

    # the browser hands it to gpu-1 (the helper does not see that); gpu-1's progress claims it
    room.say(
        "gpu-1", "progress", {"taskId": "task_1_abc", "chunkId": "c0", "progress": 0.25, "workerId": "gpu-1"}
    )
    task = room.task("task_1_abc")
    assert (task["status"], task["claimedBy"], task["progress"]) == ("processing", "gpu-1", 0.25)
    room.say(
        "gpu-1",
        "result",
        {
            "taskId": "task_1_abc",
            "chunkId": "c0",
            "workerId": "gpu-1",
            "data": data_url(PNG),
            "status": "complete",
        },
    )
    task = room.task("task_1_abc")
    assert task["status"] == "complete" and task["progress"] == 1.0
    image = task["result"]["image"]
    assert image["contentType"] == "image/png" and image["size"] == len(PNG)
    assert image["url"] == "/api/queue/lobby/task_1_abc/result"
    assert task["result"]["workerId"] == "gpu-1" and "data" not in task["result"]  # the URL became a file
    resp = await room.client.get(image["url"])
    assert resp.status == 200 and resp.content_type == "image/png" and await resp.read() == PNG
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    # and it is on disk: a restart would still find it (the queue commits in the background)
    await until(lambda: room.client.server.app[QUEUE].store.commits > 0)


async def test_known_tasks_are_not_moved_by_snapshots(make_room: RoomFactory) -> None:
    room = await make_room()
    room.join("a")
    room.say("a", "queue", {"tasks": [app_task("t1")]})
    room.say("a", "progress", {"taskId": "t1", "progress": 0.5})
    room.say("a", "queue", {"tasks": [app_task("t1", status="pending"), app_task("t2", status="complete")]})
    assert room.task("t1")["status"] == "processing"  # an older snapshot never moves it back
    assert room.task("t2")["status"] == "complete"  # a new one arrives in the state the peer saw
    room.say("a", "queue", {"tasks": [app_task("t1", prompt="something else")]})
    assert (await room.dropped()) == {"queue.conflict": 1}


async def test_a_rest_task_is_announced_to_the_room(make_room: RoomFactory) -> None:
    room = await make_room()
    room.join("browser-a")
    await room.post("r1", negativePrompt="fog", options={"steps": 4})
    await room.post("r2")
    messages = await until(lambda: room.sent("queue", None))
    announced = [t for m in messages for t in m["tasks"]]
    assert {t["id"] for t in announced} == {"r1", "r2"}
    first = next(t for t in announced if t["id"] == "r1")
    assert first == {
        "type": "generate",
        "negativePrompt": "fog",
        "id": "r1",
        "prompt": "prompt r1",
        "options": {"steps": 4},
        "createdAt": first["createdAt"],
        "createdBy": HELPER_ID,
        "status": "pending",
    }
    # the browser echoing it back changes nothing
    room.say("browser-a", "queue", {"tasks": announced})
    assert (await room.dropped()) == {}
    assert len((await (await room.client.get("/api/queue/lobby")).json())["queue"]) == 2


# -- dispatch ---------------------------------------------------------------------------------------


async def test_dispatch_is_fair_and_one_task_at_a_time(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True)
    room.join("cpu", gpu=False)
    room.join("g1", gpu=True)
    room.join("g2", gpu=True)
    for i in range(5):
        await room.post(f"t{i}", options={"steps": 4})
    await until(lambda: room.handed("g1") and room.handed("g2"))
    await asyncio.sleep(0.05)
    assert (room.handed("g1"), room.handed("g2"), room.handed("cpu")) == (["t0"], ["t1"], [])
    message = room.sent("task", "g1")[0]
    assert message["type"] == "process_chunk" and message["prompt"] == "prompt t0"
    assert message["chunk"] == {
        "id": "t0_chunk_0",
        "taskId": "t0",
        "startStep": 0,
        "endStep": 4,
        "workerIndex": 0,
        "status": "processing",
    }
    assert room.task("t0")["claimedBy"] == "g1" and room.task("t1")["claimedBy"] == "g2"
    assert room.task("t2")["status"] == "pending"

    room.say("g2", "progress", {"taskId": "t1", "chunkId": "t1_chunk_0", "progress": 0.5, "workerId": "g2"})
    assert room.task("t1")["progress"] == 0.5
    room.say("g2", "result", {"taskId": "t1", "chunkId": "t1_chunk_0", "workerId": "g2", "data": None})
    await until(lambda: room.handed("g2") == ["t1", "t2"])
    room.say("g1", "result", {"taskId": "t0", "chunkId": "t0_chunk_0", "workerId": "g1", "data": {"seed": 1}})
    await until(lambda: room.handed("g1") == ["t0", "t3"])
    assert room.task("t0")["result"]["data"] == {"seed": 1}
    # both idle at once: the one served longest ago goes first
    room.say("g1", "result", {"taskId": "t3"})
    room.say("g2", "result", {"taskId": "t2"})
    await until(lambda: len(room.handed("g1")) + len(room.handed("g2")) == 5)
    assert room.handed("g2") == ["t1", "t2", "t4"]
    stats = await room.stats()
    assert stats["protocol"]["dispatched"] == 5 and stats["protocol"]["dropped"] == {}
    assert stats["protocol"]["assignments"] == [{"peer": "g2", "taskId": "t4", "chunkId": "t4_chunk_0"}]


async def test_dispatch_switched_on_per_room_over_rest(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=False)
    room.join("g1", gpu=True)
    await room.post("t0")
    await asyncio.sleep(0.05)
    assert room.handed("g1") == []
    assert (await room.client.post("/api/join/lobby", json={"dispatch": "yes"})).status == 400
    assert (await room.client.post("/api/join/lobby", json={"dispatch": True})).status == 202
    await until(lambda: room.handed("g1") == ["t0"])


async def test_a_worker_that_leaves_has_its_task_reoffered(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True)
    room.join("g1", gpu=True)
    await room.post("t0")
    await until(lambda: room.handed("g1") == ["t0"])
    room.say("g1", "progress", {"taskId": "t0", "progress": 0.4})
    bus = room.client.server.app[EVENTS]
    mark = bus.last_id
    room.leave("g1")
    task = room.task("t0")
    assert task["status"] == "pending" and task["requeues"] == 1 and task["position"] == 1
    assert [e.data["reason"] for e in bus.since(mark) if e.type == "task.requeued"] == ["worker_left"]
    room.join("g2", gpu=True)
    await until(lambda: room.handed("g2") == ["t0"])
    room.say("g2", "result", {"taskId": "t0", "chunkId": "t0_chunk_0", "data": data_url(PNG)})
    assert room.task("t0")["status"] == "complete" and room.task("t0")["claimedBy"] == "g2"
    # g1 comes back and reports the result it finished meanwhile: late, ignored
    room.join("g1", gpu=True)
    room.say("g1", "result", {"taskId": "t0", "chunkId": "t0_chunk_0", "data": data_url(PNG)})
    room.say("g2", "result", {"taskId": "t0", "chunkId": "t0_chunk_0", "data": data_url(PNG)})
    assert await room.dropped() == {"result.late": 1, "result.duplicate": 1}
    assert (await room.stats())["protocol"]["reoffered"] == 1


async def test_a_silent_worker_loses_its_task_to_the_lease(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True, lease=0.3)
    room.join("g1", gpu=True)
    await room.post("t0")
    await until(lambda: room.handed("g1") == ["t0"])
    room.join("g2", gpu=True)
    await room.post("t1")
    await until(lambda: room.handed("g2") == ["t1"])
    # g2 keeps reporting, g1 says nothing: after lease_seconds t0 goes to g2 once it is free
    for _ in range(8):
        room.say("g2", "progress", {"taskId": "t1", "progress": 0.5})
        await asyncio.sleep(0.06)
    assert room.task("t0")["status"] == "pending" and room.task("t1")["status"] == "processing"
    room.say("g2", "result", {"taskId": "t1"})
    await until(lambda: room.handed("g2") == ["t1", "t0"])
    await room.post("t2")
    await asyncio.sleep(0.05)
    assert room.handed("g1") == ["t0"]  # stalled: no new work until it speaks again
    room.say("g1", "progress", {"taskId": "t0", "progress": 0.9})  # late, but it is alive
    await until(lambda: room.handed("g1") == ["t0", "t2"])
    assert (await room.dropped()) == {"progress.late": 1}


async def test_a_task_cancelled_over_rest_frees_its_worker(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True)
    room.join("g1", gpu=True)
    await room.post("t0")
    await room.post("t1")
    await until(lambda: room.handed("g1") == ["t0"])
    assert (await room.client.delete("/api/queue/lobby/t0")).status == 200
    await until(lambda: room.handed("g1") == ["t0", "t1"])
    room.say("g1", "result", {"taskId": "t0"})
    assert await room.dropped() == {"result.late": 1}


async def test_a_task_split_into_chunks(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True)
    room.join("g1", gpu=True)
    room.join("g2", gpu=True)
    await room.post("t0", options={"steps": 10, "chunks": 2})
    await until(lambda: room.handed("g1") and room.handed("g2"))
    chunks = {room.sent("task", p)[0]["chunk"]["id"]: p for p in ("g1", "g2")}
    assert chunks == {"t0_chunk_0": "g1", "t0_chunk_1": "g2"}
    assert room.sent("task", "g2")[0]["chunk"]["startStep"] == 5
    assert room.task("t0")["claimedBy"] == HELPER_ID  # the helper holds a split task
    room.say("g1", "progress", {"taskId": "t0", "chunkId": "t0_chunk_0", "progress": 0.5})
    assert room.task("t0")["progress"] == 0.25
    room.say("g2", "chunk", PNG, {"taskId": "t0", "chunkId": "t0_chunk_1"})
    room.say("g2", "result", {"taskId": "t0", "chunkId": "t0_chunk_1"})
    assert room.task("t0")["status"] == "processing" and room.task("t0")["progress"] == 0.75
    room.say("g1", "result", {"taskId": "t0", "chunkId": "t0_chunk_0"})
    task = room.task("t0")
    assert task["status"] == "complete"
    assert [c["chunkId"] for c in task["result"]["chunks"]] == ["t0_chunk_0", "t0_chunk_1"]
    assert task["result"]["image"]["size"] == len(PNG)  # the last chunk's image is the task's


# -- results ---------------------------------------------------------------------------------------


async def test_image_bytes_before_or_after_the_result_message(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True)
    room.join("g1", gpu=True)
    await room.post("t0")
    await room.post("t1")
    await until(lambda: room.handed("g1") == ["t0"])
    # bytes first, then the result message
    room.say("g1", "chunk", PNG, {"taskId": "t0", "chunkId": "t0_chunk_0"})
    assert room.task("t0")["status"] == "processing"
    room.say("g1", "result", {"taskId": "t0", "chunkId": "t0_chunk_0", "status": "complete"})
    assert room.task("t0")["result"]["image"]["sha256"]
    # result first, then the bytes (published as task.result)
    await until(lambda: room.handed("g1") == ["t0", "t1"])
    room.say("g1", "result", {"taskId": "t1", "chunkId": "t1_chunk_0"})
    assert "image" not in room.task("t1")["result"]
    resp = await room.client.get("/api/queue/lobby/t1/result")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "result_not_found"
    bus = room.client.server.app[EVENTS]
    mark = bus.last_id
    jpeg = b"\xff\xd8\xff\xe0" + b"jpeg" * 100
    room.say("g1", "chunk", jpeg, {"taskId": "t1", "chunkId": "t1_chunk_0"})
    assert [e.type for e in bus.since(mark)] == ["task.result"]
    resp = await room.client.get("/api/queue/lobby/t1/result")
    assert resp.content_type == "image/jpeg" and await resp.read() == jpeg
    room.say("g1", "chunk", jpeg, {"taskId": "t1", "chunkId": "t1_chunk_0"})
    assert await room.dropped() == {"chunk.duplicate": 1}
    stats = (await room.stats())["protocol"]
    assert stats["resultsStored"] == 2 and stats["resultBytes"] == len(PNG) + len(jpeg)


async def test_a_result_over_the_cap_fails_the_task(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True, max_bytes=1000)
    room.join("g1", gpu=True)
    await room.post("t0")
    await room.post("t1")
    await until(lambda: room.handed("g1") == ["t0"])
    room.say("g1", "chunk", PNG[:8] + bytes(2000), {"taskId": "t0", "chunkId": "t0_chunk_0"})
    task = room.task("t0")
    assert task["status"] == "failed" and "max_result_bytes" in task["error"]
    await until(lambda: room.handed("g1") == ["t0", "t1"])  # the worker is free again
    room.say("g1", "result", {"taskId": "t1", "data": data_url(PNG[:8] + bytes(2000))})
    assert room.task("t1")["status"] == "failed"
    assert await room.dropped() == {"chunk.too_large": 1, "result.too_large": 1}
    assert list(room.client.server.app[RESULTS].root.glob("*")) == []  # nothing stored


async def test_result_route_errors(make_room: RoomFactory) -> None:
    room = await make_room()
    resp = await room.client.get("/api/queue/lobby/nope/result")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "task_not_found"
    await room.post("t0")
    resp = await room.client.get("/api/queue/lobby/t0/result")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "result_not_found"
    # a stored reference whose file is gone (deleted by hand)
    room.join("w")
    room.say("w", "progress", {"taskId": "t0", "progress": 0.1})
    room.say("w", "result", {"taskId": "t0", "data": data_url(PNG)})
    store: ResultStore = room.client.server.app[RESULTS]
    for path in store.root.glob("*.png"):
        path.unlink()
    resp = await room.client.get("/api/queue/lobby/t0/result")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "result_missing"


# -- malformed and out-of-turn messages ----------------------------------------------------------


async def test_garbage_of_every_kind_is_counted_and_the_room_carries_on(make_room: RoomFactory) -> None:
    room = await make_room(dispatch=True)
    room.join("evil")
    room.join("g1", gpu=True)
    await room.post("t0")
    await until(lambda: room.handed("g1") == ["t0"])
    garbage = [
        ("capabilities", "gpu please", None),
        ("capabilities", {"hasGPU": "yes"}, None),
        ("capabilities", {"hasGPU": True, "gpuName": "x" * 100_000}, None),
        ("queue", [1, 2, 3], None),
        ("queue", {"tasks": "all of them"}, None),
        ("queue", {"tasks": [{"id": "x", "prompt": "y" * 100_000}, {"prompt": "no id"}, 7]}, None),
        ("queue", {"tasks": [{"id": "t0", "prompt": "hijack"}]}, None),
        ("task", {"id": "t0", "type": "process_chunk"}, None),
        ("progress", {"taskId": "t0"}, None),
        ("progress", {"taskId": "t0", "progress": "lots"}, None),
        ("progress", {"taskId": "ghost", "progress": 0.1}, None),
        ("progress", {"taskId": "t0", "progress": 0.5}, None),  # g1's task, not evil's
        ("result", {"taskId": "ghost"}, None),
        ("result", {"taskId": "t0", "data": data_url(PNG)}, None),
        ("result", b"\x00\x01", None),
        ("chunk", {"not": "bytes"}, {"taskId": "t0"}),
        ("chunk", PNG, None),
        ("chunk", PNG, {"taskId": "ghost"}),
        ("chunk", PNG, {"taskId": "t0"}),
    ]
    for action, payload, meta in garbage:
        room.say("evil", action, payload, meta)
    await room.post("t1")
    room.say("g1", "chunk", b"GIF89a" + bytes(100), {"taskId": "t0"})  # right worker, not an image
    room.say("g1", "result", {"taskId": "t0", "data": "data:image/png;base64,@@@@"})  # broken URL
    room.say("g1", "result", {"taskId": "t0", "data": data_url(b"<html>")})  # not an image
    assert await room.dropped() == {
        "capabilities.not_object": 1,
        "capabilities.wrong_type": 1,
        "capabilities.too_large": 1,
        "queue.not_object": 2,  # the message, and the 7 in a task list
        "queue.wrong_type": 1,
        "queue.too_large": 1,
        "queue.missing_field": 1,
        "queue.conflict": 1,
        "task.not_a_worker": 1,
        "progress.missing_field": 1,
        "progress.wrong_type": 1,
        "progress.unknown_task": 1,
        "progress.worker_mismatch": 1,
        "result.unknown_task": 1,
        "result.worker_mismatch": 1,
        "result.not_object": 1,
        "chunk.wrong_type": 1,
        "chunk.missing_field": 1,
        "chunk.unknown_task": 1,
        "chunk.worker_mismatch": 1,
        "chunk.not_an_image": 1,
        "result.bad_data_url": 1,
        "result.not_an_image": 1,
    }
    # nothing changed hands and the room still works
    assert room.task("t0")["status"] == "processing" and room.task("t0")["prompt"] == "prompt t0"
    room.say("g1", "result", {"taskId": "t0", "data": data_url(PNG)})
    assert room.task("t0")["status"] == "complete"
    await until(lambda: room.handed("g1") == ["t0", "t1"])
    received = (await room.stats())["protocol"]["received"]
    assert received["queue"] == 4 and received["chunk"] == 5


async def test_results_for_tasks_never_handed_out(make_room: RoomFactory) -> None:
    room = await make_room()
    room.join("w")
    await room.post("t0")
    room.say("w", "result", {"taskId": "t0", "data": data_url(PNG)})
    room.say("w", "chunk", PNG, {"taskId": "t0"})
    assert room.task("t0")["status"] == "pending"
    assert await room.dropped() == {"result.not_handed_out": 1, "chunk.not_handed_out": 1}
    assert list(room.client.server.app[RESULTS].root.glob("*")) == []


async def test_the_helper_leaving_the_room_leaves_the_workers_alone(make_room: RoomFactory) -> None:
    room = await make_room()
    room.join("w")
    await room.post("t0")
    room.say("w", "progress", {"taskId": "t0", "progress": 0.3})
    assert (await room.client.delete("/api/join/lobby")).status == 200
    # the peers were dropped as the room was left: the task is still w's, not requeued
    assert room.task("t0")["status"] == "processing" and room.task("t0")["claimedBy"] == "w"


async def test_a_flooding_peer_is_rate_limited(
    make_room: RoomFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The peers' buckets see a clock that stands still: what is refused must not depend on how fast
    # this machine gets through the flood (a loaded one refills a real-time bucket meanwhile).
    monkeypatch.setattr(agent_module, "TokenBucket", functools.partial(TokenBucket, clock=lambda: 0.0))
    room = await make_room()
    room.join("flood")
    # a joining browser may announce a long queue at once ...
    room.say("flood", "queue", {"tasks": [app_task(f"t{i}") for i in range(500)]})
    assert (await room.stats())["queueLength"] == 500
    # ... but not keep adding hundreds per second (known tasks cost nothing)
    room.say("flood", "queue", {"tasks": [app_task(f"t{i}") for i in range(480, 520)]})
    assert (await room.stats())["queueLength"] < 505
    for _ in range(600):
        room.say("flood", "capabilities", {"hasGPU": False})
    dropped = await room.dropped()
    assert dropped["queue.rate_limited"] >= 15 and dropped["capabilities.rate_limited"] >= 90
    # another peer is not affected
    room.join("calm")
    room.say("calm", "queue", {"tasks": [app_task("calm-1")]})
    assert room.task("calm-1")["status"] == "pending"


async def test_queue_messages_sent_stay_bounded(make_room: RoomFactory) -> None:
    room = await make_room()
    room.join("creator")
    big = [app_task(f"t{i}", options={"steps": 4, "pad": "x" * 4000}) for i in range(300)]
    room.say("creator", "queue", {"tasks": big})
    room.join("late")
    (snapshot,) = await until(lambda: room.sent("queue", "late"))
    assert 100 < len(snapshot["tasks"]) < 300  # about 1 MiB of tasks, in queue order
    ids = [t["id"] for t in snapshot["tasks"]]
    assert ids == [f"t{i}" for i in range(len(ids))]
