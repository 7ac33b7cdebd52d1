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


@pytest.fixture(autouse=True)
async def relay_stays_clean(
    loop_errors: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> AsyncIterator[None]:
    """No test here may leave an unhandled loop error or an error logged by the relay."""
    with caplog.at_level(logging.ERROR, logger="p2pdiff.relay"):
        yield
    assert loop_errors == []
    assert [r for r in caplog.records if r.name.startswith("p2pdiff.relay")] == []
