"""Helpers shared by the relay tests (test_relay_mqtt.py, test_relay_nostr.py, test_relay_torrent.py).

Recording callbacks, waits that name what they waited for, a probe of the event loop's
responsiveness, a factory that closes every relay it made, and the skeleton of the scripted
WebSocket servers (a fake nostr relay, a fake tracker) that stand in for what a real server will
not do on demand.
"""

# Timeouts are parameters on purpose (ASYNC109): helpers raise with context on expiry.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, Self, TypeVar

import aiohttp
from aiohttp import web

from signaling.relays import Backoff, Relay, RelayState
from tests.support import changed_until

# Quick retries keep restart tests short; the production default is 1 s doubling to 30 s.
FAST = Backoff(initial=0.05, factor=2.0, cap=0.4, jitter=0.5)

R = TypeVar("R", bound=Relay)


class Inbox:
    """An on_message callback that records (topic, text) and can be awaited."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, topic: str, text: str) -> None:
        self.items.append((topic, text))
        self._changed.set()

    @property
    def texts(self) -> list[str]:
        return [text for _, text in self.items]

    async def wait_for(self, count: int, limit: float = 5.0) -> list[str]:
        await changed_until(self._changed, lambda: len(self.items) >= count, limit)
        return self.texts


async def wait_state(relay: Relay, state: RelayState, timeout: float = 5.0) -> None:
    """Wait for ``state`` via on_state (chained to the callback the test may have set)."""
    reached = asyncio.Event()
    previous = relay.on_state

    def watch(new_state: RelayState) -> None:
        if previous is not None:
            previous(new_state)
        if new_state == state:
            reached.set()

    relay.on_state = watch
    try:
        if relay.state != state:
            async with asyncio.timeout(timeout):
                await reached.wait()
    finally:
        relay.on_state = previous


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll state that has no event to wait on (counters, timers, a server's log)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.01)


class Ticker:
    """Measures how long the event loop goes without running a 10 ms periodic callback."""

    def __init__(self) -> None:
        self.ticks = 0
        self.max_gap = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@contextlib.asynccontextmanager
async def relays_closed_after(
    cls: Callable[..., R], **defaults: Callable[[], Any]
) -> AsyncIterator[Callable[..., R]]:
    """``make(url, **kwargs)``: a ``cls`` relay with backoff FAST and, for each missing keyword of
    ``defaults``, the value its function returns; every relay made is closed on exit."""
    relays: list[R] = []

    def make(url: str, **kwargs: Any) -> R:
        kwargs.setdefault("backoff", FAST)
        for key, value in defaults.items():
            if key not in kwargs:
                kwargs[key] = value()
        relay = cls(url, **kwargs)
        relays.append(relay)
        return relay

    try:
        yield make
    finally:
        for relay in relays:
            await relay.close()


async def sender_and_receiver(
    make_relay: Callable[..., R], sender_url: str, receiver_url: str, topic: str, **kwargs: Any
) -> tuple[R, R, Inbox]:
    """Relays ``a`` and ``b`` (``b`` subscribed to ``topic``), both started and connected, and
    ``b``'s inbox."""
    a, b = make_relay(sender_url, **kwargs), make_relay(receiver_url, **kwargs)
    inbox = Inbox()
    b.on_message = inbox
    b.subscribe(topic)
    await a.start()
    await b.start()
    await asyncio.gather(a.wait_connected(), b.wait_connected())
    return a, b, inbox


async def heartbeat_finds_dead_server(make_relay: Callable[..., Relay], url: str) -> None:
    """A relay with nothing to wait an answer for, on a server that never answers: the heartbeat
    alone must find the server dead, within a few heartbeats."""
    quiet = make_relay(url, heartbeat=0.4)
    await quiet.start()
    await quiet.wait_connected()
    started = time.monotonic()
    await wait_state(quiet, "reconnecting", timeout=3)
    assert time.monotonic() - started < 1.5


async def close_before_start_and_while_retrying(
    make_relay: Callable[..., R], url: str, queue: Callable[[R], object], limit: float
) -> R:
    """close() of a relay never started, and of one retrying ``url`` (where nothing listens) with
    work ``queue``d: closed at once (within ``limit`` s), nothing left running. Returns the latter
    for checks on what it did not send."""
    never_started = make_relay(url)
    await never_started.close()
    assert never_started.state == "closed"
    relay = make_relay(url)
    queue(relay)
    await relay.start()
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await relay.close()
    assert time.monotonic() - started < limit
    assert relay.state == "closed"
    assert asyncio.all_tasks() == {asyncio.current_task()}
    return relay


# ---------------------------------------------------------------------- scripted WebSocket servers


class FakeConn:
    """One connection to a :class:`FakeServer`: every text frame it sent us, raw and parsed."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, index: int) -> None:
        self.ws = ws
        self.request = request
        self.index = index
        self.at = time.monotonic()
        self.raw: list[str] = []
        self.frames: list[Any] = []
        self.times: list[float] = []

    async def send(self, message: Any) -> None:
        await self.ws.send_str(message if isinstance(message, str) else json.dumps(message))

    def abort(self) -> None:
        """Drop the TCP connection without a WebSocket close."""
        transport = self.request.transport
        assert transport is not None
        transport.abort()


C = TypeVar("C", bound=FakeConn)
S = TypeVar("S", bound="FakeServer[Any]")


class FakeServer(Generic[C]):
    """A WebSocket server on 127.0.0.1 that records every frame; subclasses script the answers
    in ``on_frame``. ``read=False``: accept, then never read nor answer (not even pings)."""

    conn_class: type[C]

    def __init__(self, *, read: bool = True) -> None:
        self.read = read
        self.connections: list[C] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()

    async def on_frame(self, conn: C, frame: Any) -> None:
        """Answer one parsed text frame."""

    async def start(self) -> Self:
        app = web.Application()
        app.router.add_get("/", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"ws://127.0.0.1:{self._runner.addresses[0][1]}/"
        return self

    async def stop(self) -> None:
        for task in list(self._handlers):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def frames(self) -> list[Any]:
        return [f for conn in self.connections for f in conn.frames]

    async def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        try:
            await changed_until(self._changed, predicate, timeout)
        except TimeoutError:
            raise AssertionError(f"server condition not reached; frames: {self.frames}") from None

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        ws = web.WebSocketResponse(autoping=self.read)
        await ws.prepare(request)
        conn = self.conn_class(ws, request, len(self.connections))
        self.connections.append(conn)
        self._changed.set()
        try:
            if not self.read:
                await asyncio.sleep(3600)  # accept, then never read nor answer (not even pings)
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                conn.raw.append(msg.data)
                conn.frames.append(json.loads(msg.data))
                conn.times.append(time.monotonic())
                self._changed.set()
                await self.on_frame(conn, conn.frames[-1])
        finally:
            self._handlers.discard(task)
            self._changed.set()
        return ws


@contextlib.asynccontextmanager
async def servers_stopped_after(cls: Callable[..., S]) -> AsyncIterator[Callable[..., Any]]:
    """``await make(**kwargs)``: a started ``cls`` server; every server made is stopped on exit."""
    servers: list[S] = []

    async def make(**kwargs: Any) -> S:
        server = cls(**kwargs)
        servers.append(server)
        return await server.start()

    try:
        yield make
    finally:
        for server in servers:
            await server.stop()
