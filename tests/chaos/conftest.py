from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.server_process import ServerProcess

Serve = Callable[..., Awaitable[ServerProcess]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(workdir, env=..., ...)``: a started server process (ServerProcess arguments),
    killed after the test if it still runs (a test that failed half-way leaves none behind)."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(*args: Any, **kwargs: Any) -> ServerProcess:
            return await stack.enter_async_context(ServerProcess(*args, **kwargs))

        yield start
