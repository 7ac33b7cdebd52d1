"""Helpers shared by the room-level tests in tests/signaling and tests/interop.

Rooms of our signaling sessions meeting on 127.0.0.1 (ICE on loopback, no STUN): their configs,
pools of sessions, waiting for state without an event to wait on, and the checks that every such
test makes at the end (no unhandled loop exception, no RTCPeerConnection left open).
"""

# Timeouts are parameters on purpose (ASYNC109): on expiry the helpers raise an AssertionError
# naming what was awaited, which a bare asyncio.timeout would lose.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiortc import RTCPeerConnection

from signaling import RoomConfig, Session
from tests.services import Service, ServiceNotInstalled

#: ICE host addresses of every room in the tests: loopback only.
LOOPBACK_ICE = ["127.0.0.1"]
#: How long one step of a room test (a join, a message, a drop) may take.
STEP = 15.0

S = TypeVar("S", bound=Service)
SessionFactory = Callable[..., Session]


def service_or_fail(factory: Callable[..., S], *args: Any, **kwargs: Any) -> S:
    """``factory(*args, **kwargs)``, failing the test (never skipping) if the server is missing."""
    try:
        return factory(*args, **kwargs)
    except ServiceNotInstalled as exc:
        pytest.fail(f"{exc} (make test installs it)")


@contextlib.contextmanager
def service_pool(factory: Callable[..., S], directory: Path, name: str) -> Iterator[Callable[..., S]]:
    """``make(**kwargs)``: a started service in ``directory/name-N``; all cleaned up on exit."""
    services: list[S] = []

    def make(**kwargs: Any) -> S:
        service = service_or_fail(factory, directory / f"{name}-{len(services)}", **kwargs)
        services.append(service)
        service.start()
        return service

    try:
        yield make
    finally:
        for service in services:
            service.cleanup()


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = STEP) -> None:
    """Poll state that has no event to wait on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        await asyncio.sleep(0.02)


async def changed_until(changed: asyncio.Event, predicate: Callable[[], bool], timeout: float) -> None:
    """Wait until ``predicate()`` holds, checking it again whenever ``changed`` is set (by whatever
    records the state); TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            changed.clear()
            await changed.wait()


@contextlib.contextmanager
def loop_errors_caught() -> Iterator[list[dict[str, Any]]]:
    """Unhandled exceptions reported to the running loop inside the block (should stay empty)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


def open_peer_connections() -> list[RTCPeerConnection]:
    """RTCPeerConnections still alive and not closed (after a garbage collection)."""
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, RTCPeerConnection) and o.connectionState != "closed"]


def loopback_config(app_id: str, relay_urls: list[str], **settings: Any) -> RoomConfig:
    """A RoomConfig on ``relay_urls`` with ICE restricted to loopback and no STUN; ``settings``
    add to or override any of that."""
    base: dict[str, Any] = {
        "app_id": app_id,
        "relay_urls": relay_urls,
        "ice_servers": [],
        "ice_host_addresses": LOOPBACK_ICE,
    }
    return RoomConfig(**{**base, **settings})


def config_factory(app_id: str, relay_urls: list[str], **defaults: Any) -> Callable[..., RoomConfig]:
    """``make(**overrides)``: :func:`loopback_config` with ``defaults``, then ``overrides``."""

    def make(**overrides: Any) -> RoomConfig:
        return loopback_config(app_id, relay_urls, **{**defaults, **overrides})

    return make


def make_session(prefix: str = "") -> Session:
    """A session whose selfId starts with ``prefix`` (none: a random selfId)."""
    return Session(id_prefix=prefix)


@contextlib.asynccontextmanager
async def session_pool(roles: Mapping[str, str] | None = None) -> AsyncIterator[SessionFactory]:
    """``make(role=None)``: fresh sessions, all closed on exit. With ``roles``, a session's selfId
    starts with ``roles[role]`` (e.g. to make it the offerer); without, with ``role`` itself."""
    made: list[Session] = []

    def make(role: str | None = None) -> Session:
        prefix = (roles[role] if roles is not None else role) if role else ""
        made.append(make_session(prefix))
        return made[-1]

    try:
        yield make
    finally:
        for session in made:
            await session.close()
