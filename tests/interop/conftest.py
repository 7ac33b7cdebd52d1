"""Fixtures for pairing our signaling rooms with real Trystero peers on 127.0.0.1.

``mosquitto``: a fresh broker per test (tests kill and restart it). ``room_config(**overrides)``:
a RoomConfig for that broker with ICE restricted to loopback and no STUN, and an app id unique to
the test, so brokers, rooms and sessions never leak between tests. The default signaling session
is closed after every test that used ``room_config``. ``sessions(role)``: fresh sessions that
offer or answer (``session_factory``: the same, closed before the broker stops).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

import signaling
from signaling import RoomConfig
from tests.interop.jspeer import loopback_only_problem
from tests.services import Mosquitto, running
from tests.support import LOOPBACK_ICE, SessionFactory, config_factory, session_pool

__all__ = [
    "ANSWERER_PREFIX",
    "LOOPBACK_ICE",
    "OFFERER_PREFIX",
    "RoomConfigFactory",
    "SessionFactory",
    "require_loopback_netns",
]

RoomConfigFactory = Callable[..., RoomConfig]

#: selfIds that make us offer (the smaller id offers, spec §2.2) or answer against any JS peer.
OFFERER_PREFIX = "00"
ANSWERER_PREFIX = "zz"


def require_loopback_netns() -> None:
    """Fail (never skip) unless this runs in a loopback-only network namespace (for Chromium)."""
    if problem := loopback_only_problem():
        pytest.fail(problem, pytrace=False)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """An anonymous mosquitto on 127.0.0.1 (``.ws_url`` for Trystero, ``.tcp_url`` for raw clients)."""
    with running(Mosquitto(tmp_path / "mosquitto")) as broker:
        yield broker


@pytest.fixture
def app_id() -> str:
    return f"p2pdiff-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def signaling_cleanup() -> AsyncIterator[None]:
    """Closes the loop's default session (rooms, connections, relays) after the test."""
    yield
    await signaling.close_default_session()


@pytest.fixture
def room_config(mosquitto: Mosquitto, app_id: str, signaling_cleanup: None) -> RoomConfigFactory:
    return config_factory(app_id, [mosquitto.ws_url])


@pytest.fixture
async def sessions() -> AsyncIterator[SessionFactory]:
    """``sessions(role)``: a fresh session whose selfId makes it the offerer (``"offer"``), the
    answerer (``"answer"``) or random (``None``) on wire 0.25. Closed after the test."""
    async with session_pool({"offer": OFFERER_PREFIX, "answer": ANSWERER_PREFIX}) as make:
        yield make


@pytest.fixture
def session_factory(mosquitto: Mosquitto, sessions: SessionFactory) -> SessionFactory:
    """``sessions``, closed before the broker stops."""
    return sessions
