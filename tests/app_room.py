"""The whole app with the helper in one room over a stand-in signaling room (tests/fake_signaling.py).

The whole app runs (REST, queue, store, event bus, P2PHelper, RoomAgent); only the network is
replaced: ``room.say(peer, action, payload)`` plays a peer's message and ``room.sent(action)``
lists what the helper sent. Used by tests/test_room_agent.py and tests/test_published_app.py
through the ``make_room`` fixture.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from p2pdiff.appkeys import QUEUE
from p2pdiff.config import Config
from p2pdiff.tasks.queue import QueueManager
from tests.conftest import ClientFactory, post_task
from tests.fake_signaling import FakeRoom, fake_p2p_helper

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
HELPER_ID = FakeRoom.self_id


async def until(check: Callable[[], Any], within: float = 3.0) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s: {value!r}")
        await asyncio.sleep(0.01)


class Room:
    """The app under test and its one room, with shortcuts."""

    def __init__(self, client: TestClient, fake: FakeRoom, name: str) -> None:
        self.client = client
        self.fake = fake
        self.name = name

    @property
    def queue(self) -> QueueManager:
        return self.client.server.app[QUEUE]

    def join(self, peer: str, *, gpu: bool | None = None) -> None:
        self.fake.add_peer(peer)
        if gpu is not None:
            self.say(
                peer,
                "capabilities",
                {"hasGPU": gpu, "gpuName": "gpu" if gpu else None, "memory": 8, "cores": 8},
            )

    def leave(self, peer: str) -> None:
        self.fake.drop_peer(peer)

    def say(self, peer: str, action: str, payload: Any, metadata: Any = None) -> None:
        self.fake.deliver(action, payload, peer, metadata)

    def sent(self, action: str, target: Any = ...) -> list[Any]:
        return [p for p, t, _ in self.fake.sent(action) if target is ... or t == target]

    def handed(self, peer: str) -> list[str]:
        """Task ids handed to ``peer`` with `task` messages, in order."""
        return [p["id"] for p in self.sent("task", peer)]

    def task(self, task_id: str) -> dict[str, Any]:
        task = self.queue.get_task(self.name, task_id)
        return task.to_json(self.queue.position(task))

    async def stats(self) -> dict[str, Any]:
        data = await (await self.client.get("/api/stats")).json()
        return data["rooms"][self.name]

    async def dropped(self) -> dict[str, int]:
        return (await self.stats())["protocol"]["dropped"]

    async def post(self, task_id: str, **body: Any) -> dict[str, Any]:
        return await post_task(self.client, self.name, {"id": task_id, "prompt": f"prompt {task_id}", **body})


RoomFactory = Callable[..., Awaitable[Room]]


def room_factory(make_client: ClientFactory, config: Config, monkeypatch: pytest.MonkeyPatch) -> RoomFactory:
    """The ``make_room`` fixture (tests/conftest.py): ``await make_room(dispatch=...)``."""

    async def make(
        *, dispatch: bool = False, lease: float | None = None, max_bytes: int | None = None
    ) -> Room:
        helper, rooms = fake_p2p_helper(monkeypatch)
        if lease is not None:
            config.queue.lease_seconds = lease
        if max_bytes is not None:
            config.p2p.max_result_bytes = max_bytes
        client = await make_client(config, helper=helper)
        resp = await client.post("/api/join/lobby", json={"dispatch": dispatch})
        assert resp.status == 202
        return Room(client, rooms["lobby"], "lobby")

    return make


def app_task(task_id: str, **kw: Any) -> dict[str, Any]:
    return {
        "id": task_id,
        "type": "generate",
        "prompt": f"prompt {task_id}",
        "negativePrompt": "",
        "options": {"model": "prx-1024", "steps": 8, "width": 512, "height": 512},
        "createdAt": 1732550000000,
        "createdBy": "browser-a",
        "status": "pending",
        **kw,
    }


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()
