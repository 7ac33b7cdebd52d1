"""The real server, SIGKILLed mid-life, comes back with every accepted task in order and state: on
SQLite, and on PostgreSQL with the database SIGKILLed too (as a crash of the machine would)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import pytest

from tests.server_process import ServerProcess
from tests.services import PostgresServer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_sigkill_loses_nothing(tmp_path: Path, backend: str) -> None:
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            env = {"P2PDIFF_STORE_PATH": str(tmp_path / "data" / "db.sqlite3")}
            database = None
        else:
            database = stack.enter_context(PostgresServer(tmp_path / "pg"))
            env = {
                "P2PDIFF_STORE_URL": await database.create_database("p2pdiff"),
                # As deployed (deploy/compose.yaml): a node restarted under its own id takes its
                # room leases back at once; under a new one it waits for them to lapse.
                "P2PDIFF_CLUSTER_NODE_ID": "node-a",
            }
        await sigkill_loses_nothing(tmp_path, env, database)


async def sigkill_loses_nothing(tmp_path: Path, env: dict[str, str], database: PostgresServer | None) -> None:
    server = ServerProcess(tmp_path, env=env)
    await server.start()
    try:
        async with aiohttp.ClientSession(server.url) as http:

            async def post(i: int) -> None:
                body = {
                    "id": f"t{i:03d}",
                    "prompt": f"prompt {i}",
                    "options": {"model": "prx-1024", "steps": i},
                }
                async with http.post(f"/api/queue/{'room-a' if i % 3 else 'room-b'}", json=body) as resp:
                    assert resp.status == 201, await resp.text()

            # Concurrent in batches, so group commit is exercised; order within a room follows acceptance.
            for start in range(0, 200, 20):
                await asyncio.gather(*(post(i) for i in range(start, start + 20)))
            for tid, action in [("t001", "claim"), ("t002", "claim"), ("t004", "claim")]:
                async with http.patch(
                    f"/api/queue/room-a/{tid}", json={"action": action, "worker": "w"}
                ) as resp:
                    assert resp.status == 200
            async with http.patch(
                "/api/queue/room-a/t002", json={"action": "complete", "worker": "w"}
            ) as resp:
                assert resp.status == 200
            async with http.delete("/api/queue/room-b/t003") as resp:
                assert resp.status == 200
            async with http.post("/api/join/room-a") as resp:
                assert resp.status == 202
            before = {
                room: await (await http.get(f"/api/queue/{room}")).json() for room in ("room-a", "room-b")
            }
        await server.kill()
        if database is not None:
            database.kill()
            database.start()

        await server.start()
        async with aiohttp.ClientSession(server.url) as http:
            after = {
                room: await (await http.get(f"/api/queue/{room}")).json() for room in ("room-a", "room-b")
            }
            health = await (await http.get("/api/health")).json()
        assert sum(len(v["queue"]) for v in after.values()) == 200
        assert after == before
        statuses = {t["id"]: t["status"] for v in after.values() for t in v["queue"]}
        assert (statuses["t001"], statuses["t002"], statuses["t003"]) == (
            "processing",
            "complete",
            "cancelled",
        )
        assert [r["roomId"] for r in health["p2p"]["rooms"]] == ["room-a"]
    finally:
        await server.stop()
