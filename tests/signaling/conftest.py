from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.services import Mosquitto, TlsFiles

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
