from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from p2pdiff.app import create_app
from p2pdiff.config import Config
from tests.services import NostrRelay, P2pdiffRelay, PostgresServer, running
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


#: The Nostr relays the project's nostr cases run against, by test id: PyPI ``nostr-relay`` and
#: p2pdiff's own (issue 15: the same cases must pass on both). Both have ``.url``, ``kill()`` and
#: ``start()``; tests that start one of their own take the class by ``nostr_relay_name``.
NOSTR_RELAYS: dict[str, type[NostrRelay] | type[P2pdiffRelay]] = {
    "pypi-relay": NostrRelay,
    "p2pdiff-relay": P2pdiffRelay,
}
NostrRelayService = NostrRelay | P2pdiffRelay


def event_rate_limit(name: str, events: int, seconds: int) -> dict[str, Any]:
    """Keywords for the NOSTR_RELAYS class ``name`` that make it refuse a client's EVENTs beyond
    ``events`` in ``seconds`` (1, 60 or 3600) with NIP-01's ``rate-limited:``. PyPI's relay counts
    per address in its own syntax; ours is a token bucket per connection that starts full."""
    if name == "pypi-relay":
        unit = {1: "s", 60: "m", 3600: "h"}[seconds]
        return {"rate_limits": {"ip": {"EVENT": f"{events}/{unit}"}}}
    return {
        "env": {
            "P2PDIFF_RELAY_EVENTS_PER_SECOND": str(events / seconds),
            "P2PDIFF_RELAY_EVENTS_BURST": str(events),
        }
    }


@pytest.fixture(scope="module")
def nostr_relays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], NostrRelayService]]:
    """``nostr_relays(name)``: the module's shared relay of that kind, started on first use (a
    start costs 1-2 s); tests keep apart by unique app ids and rooms."""
    made: list[NostrRelayService] = []
    started: dict[str, NostrRelayService] = {}

    def get(name: str) -> NostrRelayService:
        if name not in started:
            service = service_or_fail(NOSTR_RELAYS[name], tmp_path_factory.mktemp(name))
            made.append(service)  # cleaned up even if it fails to start
            service.start()
            started[name] = service
        return started[name]

    try:
        yield get
    finally:
        for service in made:
            service.cleanup()


@pytest.fixture(scope="module", params=list(NOSTR_RELAYS))
def nostr_relay_name(request: pytest.FixtureRequest) -> str:
    """Runs the test once per relay in NOSTR_RELAYS (ids ``pypi-relay``, ``p2pdiff-relay``)."""
    return str(request.param)


@pytest.fixture(scope="module")
def nostr_relay(nostr_relays: Callable[[str], NostrRelayService], nostr_relay_name: str) -> NostrRelayService:
    """The module's shared relay of the test's kind."""
    return nostr_relays(nostr_relay_name)


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
