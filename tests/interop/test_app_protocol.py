"""The helper in the browser app's room, against real Trystero peers sending the app's payloads.

Each JS peer plays a browser of P2P WebGPU Diffusion: it registers the app's six actions and
sends exactly what the app sends (tests/interop/jspeer.py drives it). The server is the whole
app (create_app with P2P) over a local mosquitto, or (wire 0.25) over Trystero's ws-relay protocol
through p2pdiff's own relay (``[p2p] strategy = "ws-relay"``); what the helper makes of the room is
read back over REST, as the dashboard and REST clients see it.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from p2pdiff.app import create_app
from p2pdiff.config import Config
from tests.interop.jspeer import JsPeer, pattern_bytes
from tests.interop.test_helper_app import helper_config, poll
from tests.services import P2pdiffRelay, running
from tests.support import service_or_fail

pytestmark = pytest.mark.interop

ACTIONS = ("capabilities", "queue", "task", "progress", "result", "chunk")
ROOM = "studio"
GPU = {
    "hasGPU": True,
    "gpuName": "NVIDIA GeForce RTX 4070",
    "memory": 8,
    "cores": 16,
    "gpuArchitecture": "ada",
}
NO_GPU = {"hasGPU": False, "gpuName": None, "memory": 4, "cores": 4}


# The app itself runs Trystero 0.22 (trystero@0.22.0); 0.25 is the current release. Every test
# runs on both wires over MQTT, the helper speaking the same wire as the peers ([p2p] wire), and
# on 0.25 over ws-relay too (Trystero's self-hosted relay, through p2pdiff's own; 0.23+ only).
ROUTES = {"0.25": ("0.25", "mqtt"), "0.22": ("0.22", "mqtt"), "0.25-ws-relay": ("0.25", "ws-relay")}


@pytest.fixture(params=list(ROUTES.values()), ids=list(ROUTES))
def route(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(wire, strategy) of the helper and the browsers."""
    wire, strategy = request.param
    return str(wire), str(strategy)


@pytest.fixture(scope="module")
def our_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[P2pdiffRelay]:
    """A p2pdiff server hosting the room relay, for the ws-relay route (started on first use)."""
    with running(service_or_fail(P2pdiffRelay, tmp_path_factory.mktemp("p2pdiff-relay"))) as service:
        yield service


@pytest.fixture
def relay_url(route: tuple[str, str], request: pytest.FixtureRequest) -> str:
    """Where the route's helper and browsers meet: the test's mosquitto, or our relay's ws-relay."""
    if route[1] == "ws-relay":
        return str(request.getfixturevalue("our_relay").ws_relay_url)
    return str(request.getfixturevalue("mosquitto").ws_url)


AppFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_app(
    aiohttp_client: Any, tmp_path: Path, route: tuple[str, str], relay_url: str, app_id: str
) -> AppFactory:
    async def make(**p2p: Any) -> TestClient:
        wire, strategy = route
        config: Config = helper_config(tmp_path, strategy, [relay_url], app_id)
        config.p2p.wire = wire
        lease = p2p.pop("lease_seconds", None)
        if lease is not None:
            config.queue.lease_seconds = lease
        for key, value in p2p.items():
            setattr(config.p2p, key, value)
        return await aiohttp_client(create_app(config))

    return make


Browsers = Callable[..., Awaitable[JsPeer]]


@pytest.fixture
async def browsers(route: tuple[str, str], relay_url: str, app_id: str) -> AsyncIterator[Browsers]:
    """``await browser(name)``: a JS peer in ROOM with the app's actions registered."""
    peers: list[JsPeer] = []

    async def browser(name: str) -> JsPeer:
        wire, strategy = route
        peer = await JsPeer.launch("node", wire, name=name)
        peers.append(peer)
        await peer.join(ROOM, app_id=app_id, relay_urls=[relay_url], strategy=strategy)
        for action in ACTIONS:  # as the app does at join (0.22 drops messages for unknown actions)
            await peer.make_action(ROOM, action)
        return peer

    yield browser
    for peer in peers:
        await peer.close()


async def meet_helper(client: TestClient, js: JsPeer, caps: dict[str, Any], **join: Any) -> str:
    """The helper joins ROOM and meets ``js``; ``js`` announces ``caps`` like the app does. Returns
    the helper's peer id once the helper has recorded the capabilities."""
    resp = await client.post(f"/api/join/{ROOM}", json=join or None)
    assert resp.status == 202
    health = await (await client.get("/api/health")).json()
    helper_id = next(r["selfId"] for r in health["p2p"]["rooms"] if r["roomId"] == ROOM)
    # The helper may have met this peer already (while meeting another): look from the start.
    await js.wait_peer_join(ROOM, helper_id, timeout=30)
    greeting = await js.wait_action(ROOM, "capabilities", peer=helper_id, timeout=15)
    assert greeting["value"]["hasGPU"] is False and greeting["value"]["isServer"] is True
    assert greeting["value"]["canQueue"] is True
    await js.send(ROOM, "capabilities", caps, target=helper_id)

    async def recorded() -> bool:
        queue = await (await client.get(f"/api/queue/{ROOM}")).json()
        return any(p["id"] == js.self_id and p.get("capabilities") == caps for p in queue["peers"])

    await poll(recorded)
    return helper_id


async def task_json(client: TestClient, task_id: str) -> dict[str, Any]:
    resp = await client.get(f"/api/queue/{ROOM}/{task_id}")
    return (await resp.json()).get("task") or {}


async def room_stats(client: TestClient) -> dict[str, Any]:
    return (await (await client.get("/api/stats")).json())["rooms"][ROOM]


def app_task(task_id: str, created_by: str, prompt: str = "a red fox in fresh snow") -> dict[str, Any]:
    """A task exactly as the app creates it."""
    return {
        "id": task_id,
        "type": "generate",
        "prompt": prompt,
        "negativePrompt": "blurry, low quality",
        "options": {"model": "prx-1024", "steps": 20, "width": 1024, "height": 1024},
        "createdAt": 1732550000000,
        "createdBy": created_by,
        "status": "pending",
    }


def progress_msg(task_id: str, chunk_id: str, value: float, worker_id: str) -> dict[str, Any]:
    """A ``progress`` payload exactly as the app sends it."""
    return {"taskId": task_id, "chunkId": chunk_id, "progress": value, "workerId": worker_id}


def result_msg(task_id: str, chunk_id: str, worker_id: str, data: str | None = None) -> dict[str, Any]:
    """A completed ``result`` payload exactly as the app sends it (``data``: a data URL, or None
    when the image follows as ``chunk`` bytes)."""
    return {"taskId": task_id, "chunkId": chunk_id, "workerId": worker_id, "data": data, "status": "complete"}


# -- 1. tracking: a browser's task, its progress and its result, seen over REST ---------------------


async def test_a_browser_task_progress_and_result_show_over_rest(
    make_app: AppFactory, browsers: Browsers
) -> None:
    client = await make_app()
    js = await browsers("browser")
    helper_id = await meet_helper(client, js, GPU)
    stats = await room_stats(client)
    assert stats["gpuPeers"] == 1
    health = await (await client.get("/api/health")).json()
    assert health["p2p"]["rooms"][0]["peers"][0]["capabilities"] == GPU

    task_id = "task_1732550000000_x7k2m9p4q"
    await js.send(ROOM, "queue", {"tasks": [app_task(task_id, js.self_id)]})

    async def listed() -> Any:
        queue = (await (await client.get(f"/api/queue/{ROOM}")).json())["queue"]
        return queue[0] if queue else None

    task = await poll(listed)
    assert task["id"] == task_id and task["status"] == "pending" and task["createdBy"] == js.self_id
    assert task["negativePrompt"] == "blurry, low quality" and task["options"]["model"] == "prx-1024"

    # The app broadcasts progress on each step; the first one claims the task for its worker.
    for step in (1, 5, 10):
        await js.send(ROOM, "progress", progress_msg(task_id, f"{task_id}_chunk_0", step / 20, js.self_id))
    await poll(lambda: _has(client, task_id, status="processing", progress=0.5, claimedBy=js.self_id))

    # A small result as a data URL (the app's canvas.toDataURL()).
    png = b"\x89PNG\r\n\x1a\n" + pattern_bytes(30_000, seed=7)
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    await js.send(
        ROOM, "result", result_msg(task_id, f"{task_id}_chunk_0", js.self_id, data_url), target=helper_id
    )
    task = await poll(lambda: _has(client, task_id, status="complete"))
    assert task["result"]["image"]["sha256"] == hashlib.sha256(png).hexdigest()
    resp = await client.get(task["result"]["image"]["url"])
    assert resp.status == 200 and resp.content_type == "image/png" and await resp.read() == png
    protocol = (await room_stats(client))["protocol"]
    assert protocol["dropped"] == {} and protocol["received"]["progress"] == 3


async def _has(client: TestClient, task_id: str, **want: Any) -> dict[str, Any] | None:
    task = await task_json(client, task_id)
    return task if all(task.get(k) == v for k, v in want.items()) else None


# -- 2. REST -> room ----------------------------------------------------------------------------------


async def test_a_rest_task_reaches_the_browsers_as_a_queue_message(
    make_app: AppFactory, browsers: Browsers
) -> None:
    client = await make_app()
    js = await browsers("browser")
    helper_id = await meet_helper(client, js, NO_GPU)
    mark = js.mark()
    body = {
        "id": "task_rest_1",
        "type": "generate",
        "prompt": "a lighthouse at dusk",
        "negativePrompt": "",
        "options": {"model": "prx-1024", "steps": 12, "width": 768, "height": 768},
    }
    resp = await client.post(f"/api/queue/{ROOM}", json=body)
    assert resp.status == 201
    event = await js.wait_action(
        ROOM,
        "queue",
        peer=helper_id,
        since=mark,
        predicate=lambda e: any(t["id"] == "task_rest_1" for t in e["value"]["tasks"]),
    )
    (task,) = [t for t in event["value"]["tasks"] if t["id"] == "task_rest_1"]
    assert task["prompt"] == "a lighthouse at dusk" and task["status"] == "pending"
    assert task["type"] == "generate" and task["options"] == body["options"]
    assert task["createdBy"] == helper_id and isinstance(task["createdAt"], int)
    # The browser echoing the queue back (as the app does on its next task) changes nothing.
    await js.send(ROOM, "queue", {"tasks": event["value"]["tasks"]}, target=helper_id)
    await poll(lambda: _received(client, "queue", 1))
    assert (await room_stats(client))["protocol"]["dropped"] == {}
    assert len((await (await client.get(f"/api/queue/{ROOM}")).json())["queue"]) == 1


async def _received(client: TestClient, action: str, count: int) -> bool:
    return (await room_stats(client))["protocol"]["received"].get(action, 0) >= count


# -- 3. dispatch: fair hand-out to GPU peers, a worker leaves mid-task ------------------------------


async def test_dispatch_hands_tasks_fairly_and_reoffers_when_a_worker_leaves(
    make_app: AppFactory, browsers: Browsers
) -> None:
    client = await make_app(dispatch=True)
    gpu_a = await browsers("gpu-a")
    gpu_b = await browsers("gpu-b")
    creator = await browsers("creator")
    helper_id = await meet_helper(client, gpu_a, GPU)
    await meet_helper(client, gpu_b, {**GPU, "gpuName": "Apple M3"})
    await meet_helper(client, creator, NO_GPU)
    assert (await room_stats(client))["gpuPeers"] == 2

    # The creator browser queues three tasks (the app broadcasts its whole queue each time).
    tasks = [app_task(f"task_{i}_fox", creator.self_id, f"fox number {i}") for i in range(3)]
    for n in range(1, 4):
        await creator.send(ROOM, "queue", {"tasks": tasks[:n]})

    def handed(e: dict[str, Any]) -> bool:
        return bool(e["value"].get("type") == "process_chunk")

    first_a = await gpu_a.wait_action(ROOM, "task", peer=helper_id, predicate=handed)
    first_b = await gpu_b.wait_action(ROOM, "task", peer=helper_id, predicate=handed)
    # One each, the oldest two; the third waits (one task at a time per peer).
    assert {first_a["value"]["id"], first_b["value"]["id"]} == {"task_0_fox", "task_1_fox"}
    chunk = first_a["value"]["chunk"]
    assert chunk["startStep"] == 0 and chunk["endStep"] == 20 and chunk["taskId"] == first_a["value"]["id"]
    assert first_a["value"]["prompt"] in ("fox number 0", "fox number 1")
    assert (await task_json(client, "task_2_fox"))["status"] == "pending"
    assert not [e for e in creator.events("action") if e["name"] == "task"]  # no GPU, no work

    # gpu-b starts, then leaves mid-task: its task goes back and gpu-a gets it when free.
    b_task = first_b["value"]["id"]
    await gpu_b.send(
        ROOM, "progress", progress_msg(b_task, first_b["value"]["chunk"]["id"], 0.3, gpu_b.self_id)
    )
    await poll(lambda: _has(client, b_task, progress=0.3, claimedBy=gpu_b.self_id))
    await gpu_b.leave(ROOM)
    requeued = await poll(lambda: _has(client, b_task, status="pending"))
    assert requeued["requeues"] == 1 and requeued["position"] == 1

    a_task = first_a["value"]["id"]
    mark = gpu_a.mark()
    await gpu_a.send(ROOM, "result", result_msg(a_task, chunk["id"], gpu_a.self_id))
    second = await gpu_a.wait_action(ROOM, "task", peer=helper_id, since=mark, predicate=handed)
    assert second["value"]["id"] == b_task  # the re-offered task first: it kept its place
    second_chunk = second["value"]["chunk"]["id"]
    await gpu_a.send(ROOM, "progress", progress_msg(b_task, second_chunk, 0.5, gpu_a.self_id))
    await gpu_a.send(ROOM, "result", result_msg(b_task, second_chunk, gpu_a.self_id))
    done = await poll(lambda: _has(client, b_task, status="complete"))
    assert done["claimedBy"] == gpu_a.self_id
    third = await gpu_a.wait_action(
        ROOM, "task", peer=helper_id, since=mark, predicate=lambda e: e["value"]["id"] == "task_2_fox"
    )
    assert third["value"]["chunk"]["workerIndex"] == 0
    stats = await room_stats(client)
    assert stats["protocol"]["dispatched"] == 4 and stats["protocol"]["reoffered"] == 1
    assert stats["protocol"]["dropped"] == {}


# -- 4. a 2 MiB image as `chunk` bytes, downloadable byte for byte -----------------------------------


async def test_a_2mib_result_image_is_stored_and_served_byte_identical(
    make_app: AppFactory, browsers: Browsers
) -> None:
    client = await make_app()
    js = await browsers("gpu")
    helper_id = await meet_helper(client, js, GPU)
    task_id = "task_1732550001234_big"
    await js.send(ROOM, "queue", {"tasks": [app_task(task_id, js.self_id)]})
    await poll(lambda: task_json(client, task_id))
    await js.send(ROOM, "progress", progress_msg(task_id, "c0", 0.95, js.self_id))
    await poll(lambda: _has(client, task_id, status="processing"))

    image = b"\x89PNG\r\n\x1a\n" + pattern_bytes(2 * 1024 * 1024 - 8, seed=42)
    sent = await js.send(ROOM, "chunk", image, meta={"taskId": task_id, "chunkId": "c0"}, target=helper_id)
    assert sent["bytes"] == len(image)
    await js.send(ROOM, "result", result_msg(task_id, "c0", js.self_id), target=helper_id)
    task = await poll(lambda: _has(client, task_id, status="complete"))
    ref = task["result"]["image"]
    assert ref["size"] == len(image) and ref["contentType"] == "image/png"
    assert ref["sha256"] == hashlib.sha256(image).hexdigest()
    resp = await client.get(f"/api/queue/{ROOM}/{task_id}/result")
    body = await resp.read()
    assert resp.status == 200 and resp.content_type == "image/png"
    assert len(body) == len(image) and body == image


# -- 5. garbage of every action: counted, and the room carries on ------------------------------------


async def test_malformed_payloads_are_counted_and_the_room_keeps_working(
    make_app: AppFactory, browsers: Browsers
) -> None:
    client = await make_app()
    js = await browsers("mallory")
    helper_id = await meet_helper(client, js, NO_GPU)
    garbage: list[tuple[str, dict[str, Any]]] = [
        ("capabilities", {"value": "I have a GPU"}),
        ("capabilities", {"value": {"hasGPU": "very"}}),
        ("queue", {"value": {"tasks": [{"id": "t-big", "prompt": "x" * 200_000}]}}),
        ("queue", {"value": {"tasks": [{"prompt": "no id"}, {"id": 5, "prompt": "p"}, "str"]}}),
        ("queue", {"value": [1, 2, 3]}),
        ("task", {"value": {"id": "t", "type": "process_chunk", "chunk": {}}}),
        ("progress", {"value": {"taskId": "nobody", "progress": 0.5}}),
        ("progress", {"value": {"taskId": "t", "progress": "half"}}),
        ("result", {"value": {"taskId": "never-handed-out", "status": "complete"}}),
        ("result", {"value": {"status": "complete"}}),
        ("chunk", {"size": 1000, "seed": 3}),  # binary without metadata
        ("chunk", {"value": b"\x89PNG\r\n\x1a\n", "meta": {"taskId": "nobody"}}),
    ]
    for action, fields in garbage:
        await js.send(ROOM, action, target=helper_id, **fields)
    await poll(lambda: _dropped_total(client, 14))
    dropped = (await room_stats(client))["protocol"]["dropped"]
    assert dropped == {
        "capabilities.not_object": 1,
        "capabilities.wrong_type": 1,
        "queue.too_large": 1,
        "queue.missing_field": 1,
        "queue.wrong_type": 1,
        "queue.not_object": 2,
        "task.not_a_worker": 1,
        "progress.unknown_task": 1,
        "progress.wrong_type": 1,
        "result.unknown_task": 1,
        "result.missing_field": 1,
        "chunk.missing_field": 1,
        "chunk.unknown_task": 1,
    }
    # Still connected and still listening.
    assert await js.ping(ROOM, helper_id) < 5000
    await js.send(ROOM, "queue", {"tasks": [app_task("task_after_garbage", js.self_id)]})
    await poll(lambda: task_json(client, "task_after_garbage"))
    assert [t["id"] for t in (await (await client.get(f"/api/queue/{ROOM}")).json())["queue"]] == [
        "task_after_garbage"
    ]
    # A result (and image bytes) for a task nobody was handed: ignored, the task stays pending.
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    await js.send(ROOM, "result", {"taskId": "task_after_garbage", "status": "complete"}, target=helper_id)
    await js.send(
        ROOM, "chunk", png, meta={"taskId": "task_after_garbage", "chunkId": "c0"}, target=helper_id
    )
    await poll(lambda: _dropped_total(client, 16))
    dropped = (await room_stats(client))["protocol"]["dropped"]
    assert dropped["result.not_handed_out"] == 1 and dropped["chunk.not_handed_out"] == 1
    assert (await task_json(client, "task_after_garbage"))["status"] == "pending"


async def _dropped_total(client: TestClient, count: int) -> bool:
    return (await room_stats(client))["protocol"]["droppedTotal"] >= count
