from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from signaling.relays import Backoff, MqttRelay
from tests.services import Mosquitto, TlsFiles
from tests.support import STEP, SessionFactory, session_pool

MosquittoFactory = Callable[..., Mosquitto]


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[MosquittoFactory]:
    """Make brokers on demand: ``mosquitto_factory(start=False)`` only reserves the ports (for
    clients that must cope with an absent broker), ``tls=TlsFiles`` adds mqtts/wss listeners.
    Function scope: tests kill and restart brokers, and a start costs ~50 ms."""
    brokers: list[Mosquitto] = []

    def make(*, start: bool = True, tls: TlsFiles | None = None) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto-{len(brokers)}", tls=tls)
        brokers.append(broker)
        if start:
            broker.start()
        else:
            broker.allocate_ports()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: MosquittoFactory) -> Mosquitto:
    """A running anonymous broker with ``.tcp_url`` and ``.ws_url`` on 127.0.0.1."""
    return mosquitto_factory()


@pytest.fixture
async def sessions(mosquitto: Mosquitto) -> AsyncIterator[SessionFactory]:
    """``sessions(prefix="")``: fresh sessions whose selfIds start with ``prefix`` (none: random
    selfIds), closed before the broker stops."""
    async with session_pool() as make:
        yield make


@pytest.fixture
async def raw_relay(mosquitto: Mosquitto) -> AsyncIterator[MqttRelay]:
    """A plain MQTT client on the same broker, for publishing whatever we like."""
    relay = MqttRelay(mosquitto.tcp_url, backoff=Backoff(initial=0.05, cap=0.2))
    await relay.start()
    async with asyncio.timeout(STEP):
        await relay.wait_connected()
    yield relay
    await relay.close()
