from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from p2pdiff.config import Config
from p2pdiff.rooms.helper import ApiOnlyHelper
from tests.conftest import ClientFactory, post_task

APP_TASK = {
    "id": "task_1732550000000_ab12cd",
    "type": "generate",
    "prompt": "a lighthouse at dusk",
    "negativePrompt": "blurry",
    "options": {"model": "prx-1024", "steps": 20, "width": 1024, "height": 1024},
    "createdAt": 1732550000000,
    "createdBy": "peer-abc",
    "status": "pending",
}


def assert_error(data: dict[str, Any], code: str) -> None:
    assert data["success"] is False
    assert data["error"]["code"] == code
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    assert set(data) == {"error", "success"}


async def test_health(client: TestClient) -> None:
    resp = await client.get("/api/health")
    assert resp.status == 200
    data = await resp.json()
    assert data["status"] == "ok"
    assert data["p2pEnabled"] is False
    assert isinstance(data["uptime"], float)
    assert data["memory"]["rss"] > 0
    assert data["version"]
    assert data["p2p"] == {"available": True, "mode": "api-only", "rooms": []}


async def test_post_keeps_the_app_task_and_answers_the_original_shape(client: TestClient) -> None:
    data = await post_task(client, "room1", APP_TASK)
    assert data["success"] is True
    assert data["taskId"] == APP_TASK["id"]
    assert data["position"] == 1
    task = data["task"]
    for key in ("type", "negativePrompt", "createdBy", "createdAt", "options", "prompt", "id"):
        assert task[key] == APP_TASK[key]
    assert task["status"] == "pending" and task["position"] == 1 and task["claimedBy"] is None
    assert task["progress"] == 0
    listed = await (await client.get("/api/queue/room1")).json()
    assert listed["roomId"] == "room1"
    assert listed["queue"] == [task]
    assert listed["stats"]["queueLength"] == 1
    assert listed["peers"] == []


async def test_post_without_room_uses_body_room_or_default(client: TestClient, config: Config) -> None:
    resp = await client.post("/api/queue", json={"prompt": "x"})
    assert resp.status == 201
    assert (await resp.json())["roomId"] == config.server.default_room
    resp = await client.post("/api/queue", json={"prompt": "y", "roomId": "lobby"})
    assert (await resp.json())["roomId"] == "lobby"
    assert len((await (await client.get("/api/queue/lobby")).json())["queue"]) == 1
    resp = await client.post("/api/queue", json={"prompt": "y", "roomId": "bad room"})
    assert_error(await resp.json(), "invalid_room_id")


async def test_server_makes_unique_ids(client: TestClient) -> None:
    ids = {(await post_task(client, "r", {"prompt": f"p{i}"}))["taskId"] for i in range(20)}
    assert len(ids) == 20


async def test_repeat_post_is_idempotent_and_change_conflicts(client: TestClient) -> None:
    await post_task(client, "r", APP_TASK)
    again = await post_task(client, "r", APP_TASK, status=200)
    assert again["duplicate"] is True and again["taskId"] == APP_TASK["id"]
    assert len((await (await client.get("/api/queue/r")).json())["queue"]) == 1
    resp = await client.post("/api/queue/r", json={**APP_TASK, "prompt": "different"})
    assert resp.status == 409
    assert_error(await resp.json(), "task_exists")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"prompt": ""}, 400, "invalid_prompt"),
        ({"prompt": "   "}, 400, "invalid_prompt"),
        ({"prompt": 5}, 400, "invalid_prompt"),
        ({}, 400, "invalid_prompt"),
        ({"prompt": "x" * 4001}, 400, "invalid_prompt"),
        ({"prompt": "ok", "id": ""}, 400, "invalid_task_id"),
        ({"prompt": "ok", "id": "has space"}, 400, "invalid_task_id"),
        ({"prompt": "ok", "id": "x" * 129}, 400, "invalid_task_id"),
        ({"prompt": "ok", "id": 7}, 400, "invalid_task_id"),
        ({"prompt": "ok", "options": [1]}, 400, "invalid_options"),
        ({"prompt": "ok", "options": "x"}, 400, "invalid_options"),
        ({"prompt": "ok", "options": {"big": "x" * 17000}}, 413, "payload_too_large"),
        ([1, 2], 400, "invalid_body"),
        ("text", 400, "invalid_body"),
    ],
)
async def test_post_validation(client: TestClient, body: Any, status: int, code: str) -> None:
    resp = await client.post("/api/queue/r", json=body)
    assert resp.status == status
    assert_error(await resp.json(), code)


async def test_prompt_at_the_limit_is_fine(client: TestClient) -> None:
    await post_task(client, "r", {"prompt": "x" * 4000, "id": "a" * 128})


async def test_bad_bodies(client: TestClient) -> None:
    resp = await client.post("/api/queue/r", data=b"{nope", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_json")
    resp = await client.post("/api/queue/r", data=b'{"prompt":"x"}', headers={"Content-Type": "text/plain"})
    assert resp.status == 415
    assert_error(await resp.json(), "unsupported_media_type")
    big = b'{"prompt":"' + b"x" * (70 * 1024) + b'"}'
    resp = await client.post("/api/queue/r", data=big, headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert_error(await resp.json(), "payload_too_large")
    resp = await client.post("/api/queue/bad%20room", json={"prompt": "x"})
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_room_id")
    # The server keeps serving after all of that.
    assert (await client.get("/api/health")).status == 200


async def test_chunked_oversized_body_is_413(client: TestClient) -> None:
    async def gen() -> Any:
        for _ in range(80):
            yield b"x" * 1024

    resp = await client.post("/api/queue/r", data=gen(), headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert_error(await resp.json(), "payload_too_large")


async def test_unknown_room_is_an_empty_queue(client: TestClient) -> None:
    resp = await client.get("/api/queue/never-used")
    assert resp.status == 200
    data = await resp.json()
    assert data["roomId"] == "never-used" and data["queue"] == []
    assert data["stats"]["queueLength"] == 0


async def test_filters(client: TestClient) -> None:
    for i in range(6):
        await post_task(client, "r", {"id": f"t{i}", "prompt": "p"})
    await client.patch("/api/queue/r/t0", json={"action": "claim", "worker": "w"})
    await client.delete("/api/queue/r/t1")
    data = await (await client.get("/api/queue/r?status=pending&limit=2")).json()
    assert [(t["id"], t["position"]) for t in data["queue"]] == [("t2", 1), ("t3", 2)]
    data = await (await client.get("/api/queue/r?status=processing,cancelled")).json()
    assert [t["id"] for t in data["queue"]] == ["t0", "t1"]
    assert all("position" not in t for t in data["queue"])
    for query, code in [
        ("status=done", "invalid_status"),
        ("limit=0", "invalid_limit"),
        ("limit=x", "invalid_limit"),
    ]:
        resp = await client.get(f"/api/queue/r?{query}")
        assert resp.status == 400
        assert_error(await resp.json(), code)


async def test_get_reflects_changes_immediately(client: TestClient) -> None:
    await post_task(client, "r", {"id": "a", "prompt": "p"})
    first = await (await client.get("/api/queue/r")).json()
    await post_task(client, "r", {"id": "b", "prompt": "p"})
    await client.patch("/api/queue/r/a", json={"action": "claim", "worker": "w"})
    second = await (await client.get("/api/queue/r")).json()
    assert len(first["queue"]) == 1
    assert [(t["id"], t["status"], t.get("position")) for t in second["queue"]] == [
        ("a", "processing", None),
        ("b", "pending", 1),
    ]


async def test_task_routes_drive_the_state_machine(client: TestClient) -> None:
    await post_task(client, "r", {"id": "t", "prompt": "p"})
    resp = await client.get("/api/queue/r/t")
    assert (await resp.json())["task"]["position"] == 1
    steps = [
        ({"action": "claim", "worker": "gpu1"}, "processing"),
        ({"action": "progress", "worker": "gpu1", "progress": 0.4}, "processing"),
        ({"action": "complete", "worker": "gpu1", "result": {"image": "ok"}}, "complete"),
    ]
    for body, status in steps:
        resp = await client.patch("/api/queue/r/t", json=body)
        data = await resp.json()
        assert resp.status == 200, data
        assert data["task"]["status"] == status
    assert data["task"]["result"] == {"image": "ok"} and data["task"]["progress"] == 1
    resp = await client.patch("/api/queue/r/t", json={"action": "claim", "worker": "gpu2"})
    assert resp.status == 409
    data = await resp.json()
    assert_error(data, "invalid_transition")
    assert "'complete'" in data["error"]["message"] and "'processing'" in data["error"]["message"]
    resp = await client.delete("/api/queue/r/t")
    assert resp.status == 409


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"action": "explode"}, "invalid_action"),
        ({"action": "claim"}, "invalid_worker"),
        ({"action": "claim", "worker": ""}, "invalid_worker"),
        ({"action": "progress", "worker": "w"}, "invalid_progress"),
        ({"action": "progress", "worker": "w", "progress": 2}, "invalid_progress"),
        ({"action": "progress", "worker": "w", "progress": True}, "invalid_progress"),
        ({"action": "fail", "worker": "w", "error": 5}, "invalid_error"),
        ([], "invalid_body"),
    ],
)
async def test_patch_validation(client: TestClient, body: Any, code: str) -> None:
    await post_task(client, "r", {"id": "t", "prompt": "p"})
    resp = await client.patch("/api/queue/r/t", json=body)
    assert resp.status == 400
    assert_error(await resp.json(), code)


async def test_cancel_and_missing_tasks(client: TestClient) -> None:
    await post_task(client, "r", {"id": "t", "prompt": "p"})
    resp = await client.delete("/api/queue/r/t")
    assert resp.status == 200 and (await resp.json())["task"]["status"] == "cancelled"
    for method in ("get", "delete"):
        resp = await getattr(client, method)("/api/queue/r/missing")
        assert resp.status == 404
        assert_error(await resp.json(), "task_not_found")
    resp = await client.patch("/api/queue/r/missing", json={"action": "claim", "worker": "w"})
    assert resp.status == 404


async def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    resp = await client.get("/api/nothing")
    assert resp.status == 404
    assert_error(await resp.json(), "not_found")
    resp = await client.put("/api/queue/r")
    assert resp.status == 405
    assert_error(await resp.json(), "method_not_allowed")
    assert "POST" in resp.headers["Allow"]


async def test_stats_shape(client: TestClient) -> None:
    await post_task(client, "r1", {"id": "a", "prompt": "p"})
    await post_task(client, "r1", {"id": "b", "prompt": "p"})
    await post_task(client, "r2", {"id": "c", "prompt": "p"})
    await client.patch("/api/queue/r1/a", json={"action": "claim", "worker": "w"})
    await client.patch("/api/queue/r1/a", json={"action": "complete", "worker": "w"})
    data = await (await client.get("/api/stats")).json()
    assert data["activeRooms"] == 2
    assert data["totalQueued"] == 2
    assert data["p2pEnabled"] is False
    assert set(data["rooms"]) == {"r1", "r2"}
    assert {"queueLength", "generated", "lastActivity"} <= set(data["rooms"]["r1"])
    assert data["rooms"]["r1"]["generated"] == 1 and data["rooms"]["r1"]["queueLength"] == 1
    assert data["rooms"]["r1"]["peers"] == []
    assert data["tasksByStatus"] == {
        "pending": 2,
        "processing": 0,
        "complete": 1,
        "failed": 0,
        "cancelled": 0,
    }
    assert data["peers"] == 0 and data["helperRooms"] == [] and data["requeues"] == 0
    assert data["waitSeconds"]["count"] == 1 and data["runSeconds"]["count"] == 1
    assert data["waitSeconds"]["p95"] is not None


async def test_join_is_remembered_across_restart(make_client: ClientFactory, config: Config) -> None:
    client = await make_client(config)
    resp = await client.post("/api/join/room1")
    assert resp.status == 202
    data = await resp.json()
    assert data == {
        "success": True,
        "message": data["message"],
        "roomId": "room1",
        "mode": "api-only",
        "wire": "0.25",
    }
    resp = await client.post("/api/join/room2", json={})
    assert resp.status == 202
    health = await (await client.get("/api/health")).json()
    assert [r["roomId"] for r in health["p2p"]["rooms"]] == ["room1", "room2"]
    assert (await client.delete("/api/join/room2")).status == 200
    await client.close()

    client = await make_client(config)
    health = await (await client.get("/api/health")).json()
    assert [r["roomId"] for r in health["p2p"]["rooms"]] == ["room1"]
    stats = await (await client.get("/api/stats")).json()
    assert stats["helperRooms"] == ["room1"]
    resp = await client.delete("/api/join/never")
    assert resp.status == 404
    assert_error(await resp.json(), "room_not_joined")
    resp = await client.post("/api/join/r", data=b"[1]", headers={"Content-Type": "application/json"})
    assert resp.status == 400


async def test_join_with_a_wire(make_client: ClientFactory, config: Config) -> None:
    """A per-room Trystero wire: validated, shown in /api/health, kept across restarts."""
    client = await make_client(config)
    resp = await client.post("/api/join/old", json={"wire": "0.22"})
    assert resp.status == 202 and (await resp.json())["wire"] == "0.22"
    assert (await client.post("/api/join/new")).status == 202
    assert (await client.post("/api/join/old", json={"wire": None})).status == 202  # stays 0.22
    for bad in ("0.23", 0.22, "", ["0.22"]):
        resp = await client.post("/api/join/x", json={"wire": bad})
        assert resp.status == 400
        assert_error(await resp.json(), "invalid_wire")
    resp = await client.post("/api/join/old", json={"wire": "0.25"})
    assert resp.status == 409
    assert_error(await resp.json(), "wire_mismatch")
    health = await (await client.get("/api/health")).json()
    assert {r["roomId"]: r["wire"] for r in health["p2p"]["rooms"]} == {"old": "0.22", "new": "0.25"}
    await client.close()

    # After a restart the explicit choice sticks; the room joined without one follows the config.
    config.p2p.wire = "0.22"
    client = await make_client(config)
    health = await (await client.get("/api/health")).json()
    assert {r["roomId"]: r["wire"] for r in health["p2p"]["rooms"]} == {"old": "0.22", "new": "0.22"}
    # leaving forgets the choice; joining again picks anew
    assert (await client.delete("/api/join/old")).status == 200
    resp = await client.post("/api/join/old", json={"wire": "0.25"})
    assert resp.status == 202 and (await resp.json())["wire"] == "0.25"
    await client.close()


class DispatchRecorder(ApiOnlyHelper):
    """An API-only helper that records what it is told about dispatch per room."""

    def __init__(self) -> None:
        super().__init__()
        self.dispatch: dict[str, bool] = {}

    def set_dispatch(self, room_id: str, enabled: bool) -> None:
        self.dispatch[room_id] = enabled


async def test_join_dispatch_is_kept_across_restart(make_client: ClientFactory, config: Config) -> None:
    """``{"dispatch": false}`` sticks to the room until the helper leaves it, restarts included."""
    helper = DispatchRecorder()
    client = await make_client(config, helper=helper)
    assert (await client.post("/api/join/off", json={"dispatch": False})).status == 202
    assert (await client.post("/api/join/on", json={"dispatch": True, "wire": "0.22"})).status == 202
    assert (await client.post("/api/join/plain")).status == 202
    assert (await client.post("/api/join/on", json={"wire": "0.22"})).status == 202  # keeps dispatch
    for bad in ("no", 0, [True]):
        resp = await client.post("/api/join/x", json={"dispatch": bad})
        assert resp.status == 400
        assert_error(await resp.json(), "invalid_dispatch")
    assert helper.dispatch == {"off": False, "on": True}
    await client.close()

    again = DispatchRecorder()
    client = await make_client(config, helper=again)
    assert again.dispatch == {"off": False, "on": True}  # "plain" follows [p2p] dispatch
    health = await (await client.get("/api/health")).json()
    assert {r["roomId"]: r["wire"] for r in health["p2p"]["rooms"]} == {
        "off": "0.25",
        "on": "0.22",
        "plain": "0.25",
    }
    assert (await client.delete("/api/join/off")).status == 200  # leaving forgets the choice
    assert (await client.post("/api/join/off")).status == 202
    await client.close()

    third = DispatchRecorder()
    await make_client(config, helper=third)
    assert third.dispatch == {"on": True}


async def test_rooms_from_config_are_joined_at_start(make_client: ClientFactory, config: Config) -> None:
    config.p2p.rooms = ["cfg-room"]
    client = await make_client(config)
    health = await (await client.get("/api/health")).json()
    assert [r["roomId"] for r in health["p2p"]["rooms"]] == ["cfg-room"]


async def test_silent_worker_loses_its_lease(make_client: ClientFactory, config: Config) -> None:
    config.queue.lease_seconds = 0.3
    client = await make_client(config)
    for tid in ("a", "b"):
        await post_task(client, "r", {"id": tid, "prompt": "p"})
    await client.patch("/api/queue/r/a", json={"action": "claim", "worker": "w"})
    for _ in range(50):
        await asyncio.sleep(0.1)
        task = (await (await client.get("/api/queue/r/a")).json())["task"]
        if task["status"] == "pending":
            break
    assert task["status"] == "pending" and task["position"] == 1 and task["requeues"] == 1
    assert (await (await client.get("/api/stats")).json())["requeues"] == 1


async def test_retention_sweep_runs_in_the_background(make_client: ClientFactory, config: Config) -> None:
    config.queue.retention_hours = 0.2 / 3600
    config.queue.sweep_interval_seconds = 0.1
    client = await make_client(config)
    await post_task(client, "r", {"id": "done", "prompt": "p"})
    await post_task(client, "r", {"id": "waiting", "prompt": "p"})
    await client.delete("/api/queue/r/done")
    for _ in range(50):
        await asyncio.sleep(0.1)
        ids = [t["id"] for t in (await (await client.get("/api/queue/r")).json())["queue"]]
        if ids == ["waiting"]:
            break
    assert ids == ["waiting"]


async def test_cors_any_origin(client: TestClient) -> None:
    resp = await client.options(
        "/api/queue/r",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert resp.headers["Access-Control-Allow-Headers"] == "content-type"
    resp = await client.get("/api/health", headers={"Origin": "https://app.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    resp = await client.post(
        "/api/queue/r", data=b"{", headers={"Origin": "https://x", "Content-Type": "application/json"}
    )
    assert resp.status == 400 and resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_cors_restricted_origins(make_client: ClientFactory, config: Config) -> None:
    config.server.cors_origins = ["https://app.example"]
    client = await make_client(config)
    preflight = {"Access-Control-Request-Method": "POST"}
    resp = await client.options("/api/queue/r", headers={"Origin": "https://app.example", **preflight})
    assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    resp = await client.options("/api/queue/r", headers={"Origin": "https://evil.example", **preflight})
    assert resp.status == 403
    resp = await client.get("/api/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert resp.headers["Vary"] == "Origin"
