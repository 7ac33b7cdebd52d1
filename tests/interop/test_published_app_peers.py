"""The helper with real trystero@0.22 peers that behave like the published app (app_peer.mjs).

As the app ships: trystero@0.22, the Nostr strategy, the helper on ``{"wire": "0.22", "dispatch":
true}``; every case runs through each relay of tests.conftest.NOSTR_RELAYS (``[pypi-relay]``: PyPI
``nostr-relay``, ``[p2pdiff-relay]``: p2pdiff's own, in another p2pdiff process). Each page
announces a task with a ``queue`` message that lacks options and POSTs the full task to ``POST
/api/queue`` without a room; a GPU page reports ``progress`` up to 1.0 for each ``task`` it gets
and never sends ``result`` or ``chunk``. What the helper makes of it is read back over REST. The
same flows at unit level are in tests/test_published_app.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from p2pdiff.app import create_app
from tests.conftest import NostrRelayService
from tests.interop.jspeer import JsPeer
from tests.interop.test_helper_app import helper_config, poll

pytestmark = pytest.mark.interop

ROOM = "studio"
GPU = {"hasGPU": True, "gpuName": "Apple M2", "memory": 16, "cores": 8}
NO_GPU = {"hasGPU": False, "gpuName": None, "memory": 8, "cores": 4}
OPTIONS = {"model": "prx-1024", "steps": 4, "width": 512, "height": 512}


@pytest.fixture
async def server(
    aiohttp_client: Any, tmp_path: Path, nostr_relay: NostrRelayService, app_id: str
) -> TestClient:
    """The whole server, its helper in ROOM as the app needs it: wire 0.22, dispatch on."""
    config = helper_config(tmp_path, "nostr", [nostr_relay.url], app_id)
    config.p2p.wire = "0.22"
    client = await aiohttp_client(create_app(config))
    resp = await client.post(f"/api/join/{ROOM}", json={"wire": "0.22", "dispatch": True})
    assert resp.status == 202
    return client


Pages = Callable[..., Awaitable[JsPeer]]


@pytest.fixture
async def pages(nostr_relay: NostrRelayService, app_id: str) -> AsyncIterator[Pages]:
    """``await page(name, caps, kind=...)``: a trystero@0.22 peer in ROOM acting as the app."""
    opened: list[JsPeer] = []

    async def page(name: str, caps: dict[str, Any], kind: str = "node") -> JsPeer:
        peer = await JsPeer.launch(kind, "0.22", name=name)
        opened.append(peer)
        await peer.join(ROOM, app_id=app_id, relay_urls=[nostr_relay.url], strategy="nostr")
        await peer.behave_like_app(ROOM, caps, step_ms=20)
        return peer

    yield page
    for peer in opened:
        await peer.close()


async def helper_id(client: TestClient) -> str:
    health = await (await client.get("/api/health")).json()
    return next(r["selfId"] for r in health["p2p"]["rooms"] if r["roomId"] == ROOM)


async def task_in(client: TestClient, room: str, task_id: str) -> dict[str, Any] | None:
    resp = await client.get(f"/api/queue/{room}/{task_id}")
    return (await resp.json())["task"] if resp.status == 200 else None


async def gpu_peers_known(client: TestClient, count: int) -> bool:
    stats = await (await client.get("/api/stats")).json()
    return stats["rooms"].get(ROOM, {}).get("gpuPeers") == count


async def complete(client: TestClient, task_id: str) -> dict[str, Any] | None:
    task = await task_in(client, ROOM, task_id)
    return task if task is not None and task["status"] == "complete" else None


async def assert_one_task_with_options(client: TestClient, task_id: str) -> dict[str, Any]:
    """The id is one task, in ROOM, with what the app's POST carried; nothing in the default room."""
    task = await task_in(client, ROOM, task_id)
    assert task is not None and task["options"] == OPTIONS and task["negativePrompt"] == "fog", task
    assert task["type"] == "generate"
    default = await (await client.get("/api/queue/default")).json()
    assert default["queue"] == []
    return task


def api_of(server: TestClient) -> str:
    return str(server.make_url("")).rstrip("/")


async def submit(page: JsPeer, server: TestClient, prompts: list[str]) -> list[str]:
    """Tasks made on ``page`` as the app makes them (queue message, then the POST); their ids."""
    ids = []
    for prompt in prompts:
        sent = await page.submit_task(
            ROOM, prompt, api=api_of(server), options=OPTIONS, negative_prompt="fog"
        )
        # 200: the POST completed the room's copy; 201: it came first and waits in the default
        # room for the queue message. Either way the end is one task in ROOM (checked by callers).
        assert sent["postStatus"] in (200, 201), sent
        ids.append(sent["taskId"])
    return ids


async def all_complete(server: TestClient, ids: list[str]) -> list[dict[str, Any]]:
    tasks = []
    for task_id in ids:
        await poll(lambda task_id=task_id: complete(server, task_id), within=60)
        tasks.append(await assert_one_task_with_options(server, task_id))
    return tasks


async def test_two_tasks_from_one_page_complete_through_one_gpu_page(
    server: TestClient, pages: Pages
) -> None:
    author = await pages("page-a", NO_GPU)
    worker = await pages("gpu-page", GPU)
    helper = await helper_id(server)
    for page in (author, worker):
        await page.wait_peer_join(ROOM, helper, timeout=30)
    await poll(lambda: gpu_peers_known(server, 1), within=30)

    ids = await submit(author, server, ["a red fox in fresh snow", "a lighthouse at dusk"])
    for task in await all_complete(server, ids):
        assert task["claimedBy"] == worker.self_id and task["progress"] == 1.0
        assert task["result"]["workerId"] == worker.self_id
    # in order, one at a time, every step reported and nothing else sent
    done = [e["taskId"] for e in worker.events("app-done")]
    assert done == ids
    assert all(e["steps"] == OPTIONS["steps"] for e in worker.events("app-done"))
    stats = (await (await server.get("/api/stats")).json())["rooms"][ROOM]
    assert stats["protocol"]["assignments"] == [] and stats["protocol"]["completed"] == 2
    assert stats["protocol"]["received"].get("result", 0) == 0
    assert stats["protocol"]["dropped"] == {}
    # the GPU page is idle and still gets work: a third task goes to it at once
    await all_complete(server, await submit(author, server, ["a third one"]))


async def test_the_post_may_come_first(server: TestClient, pages: Pages) -> None:
    """The POST reaches the server before the helper hears the queue message: the task waits in
    the default room, then moves to the room that names it, and is dispatched there."""
    author = await pages("page-a", NO_GPU)
    helper = await helper_id(server)
    await author.wait_peer_join(ROOM, helper, timeout=30)
    sent = await author.submit_task(
        ROOM, "a blue owl", api=api_of(server), options=OPTIONS, negative_prompt="fog", post_first=True
    )
    assert sent["postStatus"] == 201 and sent["postBody"]["roomId"] == "default", sent
    task_id = sent["taskId"]
    moved = await poll(lambda: task_in(server, ROOM, task_id), within=30)
    assert moved["status"] == "pending"
    await assert_one_task_with_options(server, task_id)
    worker = await pages("gpu-page", GPU)
    await worker.wait_peer_join(ROOM, helper, timeout=30)
    await poll(lambda: complete(server, task_id), within=60)
    assert [e["taskId"] for e in worker.events("app-done")] == [task_id]


async def test_a_chromium_page_like_the_app(server: TestClient, pages: Pages) -> None:
    """One Chromium page that both makes tasks (its POST crosses origins, as from a static host)
    and works them on its GPU."""
    page = await pages("chromium-page", GPU, kind="browser")
    helper = await helper_id(server)
    await page.wait_peer_join(ROOM, helper, timeout=45)
    await poll(lambda: gpu_peers_known(server, 1), within=30)
    ids = await submit(page, server, ["a castle in the clouds", "a tiny robot"])
    await all_complete(server, ids)
    assert [e["taskId"] for e in page.events("app-done")] == ids
