"""Fixtures for pairing our signaling rooms with real Trystero peers on 127.0.0.1.

``mosquitto``: a fresh broker per test (tests kill and restart it). ``room_config(**overrides)``:
a RoomConfig for that broker with ICE restricted to loopback and no STUN, and an app id unique to
the test, so brokers, rooms and sessions never leak between tests. The default signaling session
is closed after every test that used ``room_config``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import signaling
from signaling import RoomConfig
from signaling.crypto import gen_id
from tests.services import Mosquitto

LOOPBACK_ICE = ["127.0.0.1"]

RoomConfigFactory = Callable[..., RoomConfig]
SessionFactory = Callable[..., signaling.Session]

#: selfIds that make us offer (the smaller id offers, spec §2.2) or answer against any JS peer.
OFFERER_PREFIX = "00"
ANSWERER_PREFIX = "zz"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """An anonymous mosquitto on 127.0.0.1 (``.ws_url`` for Trystero, ``.tcp_url`` for raw clients)."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.cleanup()


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
    def make(**overrides: Any) -> RoomConfig:
        settings: dict[str, Any] = {
            "app_id": app_id,
            "relay_urls": [mosquitto.ws_url],
            "ice_servers": [],
            "ice_host_addresses": LOOPBACK_ICE,
        }
        settings.update(overrides)
        return RoomConfig(**settings)

    return make


@pytest.fixture
async def session_factory(mosquitto: Mosquitto) -> AsyncIterator[SessionFactory]:
    """``session_factory(role)``: a fresh session whose selfId makes it the offerer (``"offer"``),
    the answerer (``"answer"``) or random (``None``). Closed before the broker stops."""
    made: list[signaling.Session] = []

    def make(role: str | None = None) -> signaling.Session:
        prefix = {"offer": OFFERER_PREFIX, "answer": ANSWERER_PREFIX, None: ""}[role]
        self_id = prefix + gen_id(20 - len(prefix)) if prefix else None
        made.append(signaling.Session(self_id))
        return made[-1]

    yield make
    for session in made:
        await session.close()
