"""A small NIP-01 client for the relay tests: a WebSocket of the aiohttp test client, frames as lists."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient

from signaling.crypto import nostr_kind
from signaling.relays.nostr import NostrKeys, make_event

WAIT = 5.0


class NostrClient:
    def __init__(self, ws: ClientWebSocketResponse) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, client: TestClient, path: str = "/nostr", **kwargs: Any) -> NostrClient:
        return cls(await client.ws_connect(path, **kwargs))

    async def send(self, *message: Any) -> None:
        await self.ws.send_str(orjson.dumps(list(message)).decode())

    async def recv(self, wait: float = WAIT) -> list[Any]:
        """The next frame from the relay; AssertionError if the socket closed instead."""
        message = await self.ws.receive(timeout=wait)
        assert message.type is WSMsgType.TEXT, (message.type, message.data, message.extra)
        frame: list[Any] = orjson.loads(message.data)
        return frame

    async def silent(self, seconds: float = 0.2) -> None:
        """Assert that nothing arrives for ``seconds``."""
        try:
            message = await self.ws.receive(timeout=seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {message.type} {message.data!r}")

    async def req(self, sub_id: str, *filters: dict[str, Any]) -> list[Any]:
        """Subscribe; returns the relay's answer (EOSE or CLOSED)."""
        await self.send("REQ", sub_id, *filters)
        return await self.recv()

    async def publish(self, event: dict[str, Any]) -> list[Any]:
        """Send an event; returns the relay's OK."""
        await self.send("EVENT", event)
        answer = await self.recv()
        assert answer[0] == "OK" and answer[1] == event["id"], answer
        return answer

    async def close(self) -> None:
        await self.ws.close()


def topic_filter(*topics: str, since: int | None = None) -> dict[str, Any]:
    """A filter as Trystero 0.25 sends it."""
    found: dict[str, Any] = {"kinds": sorted({nostr_kind(t) for t in topics})}
    found["since"] = int(time.time()) - 5 if since is None else since
    found["#x"] = list(topics)
    return found


def signed(keys: NostrKeys, topic: str, content: str = "hi", created_at: int | None = None) -> dict[str, Any]:
    return make_event(keys, topic, content, int(time.time()) if created_at is None else created_at)


async def eventually(predicate: Any, wait: float = WAIT) -> None:
    deadline = time.monotonic() + wait
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
