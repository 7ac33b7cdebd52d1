from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from p2pdiff.config import Config
from tests.conftest import ClientFactory


@pytest.fixture
def relay_config(config: Config) -> Config:
    config.relay.enabled = True
    return config


@pytest.fixture
async def relay_client(make_client: ClientFactory, relay_config: Config) -> TestClient:
    """The p2pdiff app with its relay on, served on a loopback port."""
    return await make_client(relay_config)


def metric(text: str, name: str, **labels: Any) -> float:
    """The value of one sample in a /metrics page (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
async def relay_stays_clean(loop_errors: list[dict[str, Any]]) -> AsyncIterator[None]:
    """No test here may leave an unhandled loop error or an error logged by the relay. (A handler
    of its own, not caplog's levels, which would change what other tests' caplog sees.)"""
    errors = _Errors()
    relay_log = logging.getLogger("p2pdiff.relay")
    relay_log.addHandler(errors)
    try:
        yield
    finally:
        relay_log.removeHandler(errors)
    assert loop_errors == []
    assert [record.getMessage() for record in errors.records] == []
