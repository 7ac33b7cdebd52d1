"""A small Server-Sent Events reader for tests (parses the wire format line by line)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass
class Block:
    """One SSE message block: the fields up to a blank line."""

    id: int | None = None
    data: Any = None
    comments: list[str] = field(default_factory=list)
    retry: int | None = None


class SSEStream:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.last_id: int | None = None

    async def block(self, within: float = 5.0) -> Block:
        out = Block()
        data_lines: list[str] = []
        async with asyncio.timeout(within):
            while True:
                raw = await self.resp.content.readline()
                if not raw:
                    raise EOFError("stream ended")
                line = raw.decode().rstrip("\n")
                if line == "":
                    if data_lines:
                        out.data = orjson.loads("\n".join(data_lines))
                    if out.id is not None:
                        self.last_id = out.id
                    return out
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    out.comments.append(value)
                elif name == "id":
                    out.id = int(value)
                elif name == "data":
                    data_lines.append(value)
                elif name == "retry":
                    out.retry = int(value)

    async def event(self, within: float = 5.0) -> dict[str, Any]:
        """The next block that carries data (skips heartbeats and cursor-only blocks)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            block = await self.block(max(0.01, deadline - loop.time()))
            if block.data is not None:
                assert block.id == block.data["id"]
                return block.data

    async def events(self, n: int, within: float = 5.0) -> list[dict[str, Any]]:
        return [await self.event(within) for _ in range(n)]

    async def until(self, type: str, within: float = 5.0) -> list[dict[str, Any]]:
        """Events up to and including the first of ``type``."""
        seen: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            ev = await self.event(max(0.01, deadline - loop.time()))
            seen.append(ev)
            if ev["type"] == type:
                return seen

    async def nothing_for(self, seconds: float) -> None:
        """Assert no data event arrives within ``seconds``."""
        try:
            ev = await self.event(seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected event {ev}")


class History:
    """Every event read from a stream so far, so that events arriving in either order can each be
    waited for."""

    def __init__(self, stream: SSEStream) -> None:
        self.stream = stream
        self.events: list[dict[str, Any]] = []
        self.used = 0  # events before this index were matched by ``wait`` (later waits look past them)

    def mark(self) -> int:
        """A cursor for ``find(since=...)``: only events read after this call."""
        return len(self.events)

    async def wait(self, type: str, within: float = 30.0, **match: Any) -> dict[str, Any]:
        """The first event after the last one ``wait`` matched, of ``type``, whose data has the
        ``match`` items."""

        def matches(ev: dict[str, Any]) -> bool:
            return ev["type"] == type and all(ev["data"].get(k) == v for k, v in match.items())

        index = await self._first(matches, self.used, within, f"{type} event with {match}")
        self.used = index + 1
        return self.events[index]

    async def find(
        self, what: str, predicate: Callable[[dict[str, Any]], bool], within: float = 30.0, since: int = 0
    ) -> dict[str, Any]:
        """The first event from index ``since`` on that ``predicate`` accepts, whether or not a
        ``wait`` matched it; an AssertionError naming ``what`` after ``within`` seconds."""
        return self.events[await self._first(predicate, since, within, what)]

    async def _first(
        self, predicate: Callable[[dict[str, Any]], bool], start: int, within: float, what: str
    ) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        index = start
        while True:
            while index < len(self.events):
                if predicate(self.events[index]):
                    return index
                index += 1
            try:
                self.events.append(await self.stream.event(max(0.01, deadline - loop.time())))
            except TimeoutError:
                seen = [(ev["type"], ev.get("room")) for ev in self.events[start:]]
                raise AssertionError(f"no {what} within {within}s; events since: {seen}") from None
