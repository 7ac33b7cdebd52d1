from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from p2pdiff.app import create_app
from p2pdiff.config import Config
from tests.services import PostgresServer, running
from tests.stores import stores  # noqa: F401 (a fixture: both store backends)
from tests.support import loop_errors_caught, service_or_fail

ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """Defaults with the store in a temp dir, API-only (P2P tests configure local relays themselves)."""
    cfg = Config()
    cfg.store.path = str(tmp_path / "db.sqlite3")
    cfg.p2p.enabled = False
    return cfg


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the whole session (initdb + start take ~1 s); tests
    get their own database from ``pg_url``. A test that kills or restarts a server makes its own."""
    with running(service_or_fail(PostgresServer)) as server:
        yield server


@pytest.fixture
async def pg_url(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """``postgresql://p2pdiff@127.0.0.1:PORT/test_N``: a fresh empty database, dropped afterwards."""
    url = await postgres_server.create_database()
    yield url
    await postgres_server.drop_database(url.rpartition("/")[2])


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Unhandled exceptions reported to the event loop during the test (must stay empty)."""
    with loop_errors_caught() as errors:
        yield errors


@pytest.fixture
async def client(aiohttp_client: Any, config: Config) -> TestClient:
    return await aiohttp_client(create_app(config))


@pytest.fixture
def make_client(aiohttp_client: Any) -> ClientFactory:
    async def make(cfg: Config, **kwargs: Any) -> TestClient:
        app: web.Application = create_app(cfg, **kwargs)
        return await aiohttp_client(app)

    return make


@pytest.fixture
def make_room(make_client: ClientFactory, config: Config, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The app with the helper in room ``lobby`` over a fake signaling room (tests/app_room.py)."""
    from tests.app_room import room_factory  # it imports this module

    return room_factory(make_client, config, monkeypatch)


async def post_task(client: TestClient, room: str, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    resp = await client.post(f"/api/queue/{room}", json=body)
    data = await resp.json()
    assert resp.status == status, data
    return data
