"""Every secret of the config, set to a marker, appears on no surface of the running server: its log
at debug level, /api/health, /api/stats, /metrics, the event stream and its replay, the API
document and pages, error answers (a wrong token included) and ``--check-config``.

The helper is in two rooms over a real broker with a password in its URL, next to a relay that
refuses connections, and the broker dies and comes back meanwhile: relay URLs pass through every
path they can take (state events, metrics labels, reconnect log lines). The store is a PostgreSQL
that checks its password, given in ``P2PDIFF_STORE_PASSWORD``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.chaos.conftest import Serve
from tests.interop.test_helper_app import poll
from tests.server_process import free_port
from tests.services import Mosquitto, PostgresServer, running
from tests.sse_client import SSEStream
from tests.support import service_or_fail

pytestmark = pytest.mark.slow

MARKER = "Qv7MarkerOfASecret"
# One of each secret the server has.
ADMIN_TOKEN = f"admin-{MARKER}-token"
ROOM_PASSWORD = f"room-{MARKER}"
# Percent-encoded in the URL, so the decoded form (what goes to the broker) must not show either.
BROKER_PASSWORD = f"broker%2F{MARKER}"
DEAD_RELAY_PASSWORD = f"dead-{MARKER}"
STORE_PASSWORD = f"store-{MARKER}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with running(service_or_fail(Mosquitto, tmp_path / "mosquitto")) as service:
        yield service


@pytest.fixture
def database(tmp_path: Path) -> Iterator[PostgresServer]:
    with running(service_or_fail(PostgresServer, tmp_path / "postgres", password=STORE_PASSWORD)) as service:
        yield service


def secret_env(tmp_path: Path, broker: Mosquitto, database: PostgresServer) -> dict[str, str]:
    broker_url = f"ws://user:{BROKER_PASSWORD}@127.0.0.1:{broker.ports['ws']}"
    dead_url = f"ws://user:{DEAD_RELAY_PASSWORD}@127.0.0.1:{free_port()}"  # nothing listens there
    return {
        "P2PDIFF_STORE_PATH": str(tmp_path / "db.sqlite3"),
        "P2PDIFF_STORE_URL": f"postgresql://{database.superuser}@{database.host}:{database.port}/postgres",
        "P2PDIFF_STORE_PASSWORD": STORE_PASSWORD,
        "P2PDIFF_SERVER_LOG_LEVEL": "debug",
        "P2PDIFF_SERVER_ADMIN_TOKEN": ADMIN_TOKEN,
        "P2PDIFF_P2P_PASSWORD": ROOM_PASSWORD,
        "P2PDIFF_P2P_ENABLED": "true",
        "P2PDIFF_P2P_STRATEGY": "mqtt",
        "P2PDIFF_P2P_RELAY_URLS": f"{broker_url},{dead_url}",
        "P2PDIFF_P2P_APP_ID": f"p2pdiff-secrets-{uuid.uuid4().hex[:8]}",
        "P2PDIFF_P2P_ICE_SERVERS": "",
        "P2PDIFF_P2P_ICE_HOST_ADDRESSES": "127.0.0.1",
        "P2PDIFF_P2P_ROOMS": "lobby",
    }


async def relay_states(http: aiohttp.ClientSession) -> dict[str, str]:
    async with http.get("/api/health") as resp:
        health = await resp.json()
    return next(r["relays"] for r in health["p2p"]["rooms"] if r["roomId"] == "lobby")  # type: ignore[no-any-return]


async def test_no_secret_on_any_surface(
    tmp_path: Path, broker: Mosquitto, database: PostgresServer, serve: Serve
) -> None:
    env = secret_env(tmp_path, broker, database)
    server = await serve(tmp_path, env=env)
    assert server.proc is not None
    shown = f"ws://user:***@127.0.0.1:{broker.ports['ws']}"
    seen: list[str] = []  # every surface's text
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(server.url) as http:
        live = SSEStream(await http.get("/api/events"))
        first = await live.event()
        async with http.post("/api/join/art", headers=bearer, json={"dispatch": True}) as resp:
            assert resp.status == 202, await resp.text()
        await poll(lambda: _state_is(http, shown, "connected"), within=30)
        # The broker dies and comes back: lost-connection and reconnect lines, state events.
        broker.kill()
        await poll(lambda: _state_is(http, shown, "reconnecting"), within=30)
        broker.restart()
        await poll(lambda: _state_is(http, shown, "connected"), within=60)

        for path in ("/api/health", "/api/stats", "/metrics", "/api/openapi.json", "/api/docs", "/"):
            async with http.get(path) as resp:
                assert resp.status == 200, path
                seen.append(await resp.text())
        refusals = [
            ("POST", "/api/join/x", {}, None, 401),
            ("POST", "/api/join/x", {"Authorization": f"Bearer {ADMIN_TOKEN}x"}, None, 403),
            ("POST", "/api/join/x", {"Authorization": ADMIN_TOKEN}, None, 401),
            ("POST", "/api/join/x", {**bearer, "Content-Type": "application/json"}, b"{", 400),
            ("DELETE", "/api/queue/r/nope", bearer, None, 404),
            ("PUT", "/api/health", bearer, None, 405),
        ]
        for method, path, headers, body, status in refusals:
            async with http.request(method, path, headers=headers, data=body) as resp:
                assert resp.status == status, (method, path, await resp.text())
                seen.append(f"{dict(resp.headers)} {await resp.text()}")
        # The live stream up to now, then the same events replayed from the first one.
        events = []
        while not any(e["type"] == "relay.state" and e["data"]["state"] == "connected" for e in events[1:]):
            events.append(await live.event(within=30))
        replay = SSEStream(await http.get(f"/api/events?lastEventId={first['id']}"))
        replayed = [await replay.event() for _ in events]
        assert [e["id"] for e in replayed] == [e["id"] for e in events]
        seen += [str(e) for e in events + replayed]
        assert any(e["type"] == "relay.state" and e["data"]["url"] == shown for e in events)
        live.resp.close()
        replay.resp.close()
    server.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(server.proc.wait(), 30) == 0
    log = (tmp_path / "server.log").read_text()
    check = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "p2pdiff",
        "--check-config",
        env=server.env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = (b.decode() for b in await asyncio.wait_for(check.communicate(), 60))
    assert check.returncode == 0, err

    # Every surface was really exercised: the relay URL shows, its password masked.
    assert f"{shown}: connection lost" in log and shown in seen[2]  # the log, /metrics
    assert '"level":"debug"' in log and shown in out
    assert f"store postgresql://p2pdiff:***@127.0.0.1:{database.port}/postgres" in log
    assert json.loads(out)["store"]["password"] == "***"
    for name, text in [("log", log), ("--check-config", out + err)] + [
        (f"surface {i}", text) for i, text in enumerate(seen)
    ]:
        for secret in (MARKER, urllib.parse.unquote(BROKER_PASSWORD)):
            assert secret not in text, f"{secret!r} in {name}: ...{text[text.find(secret) - 200 :][:400]}"


async def _state_is(http: aiohttp.ClientSession, relay: str, state: str) -> bool:
    return (await relay_states(http)).get(relay) == state
