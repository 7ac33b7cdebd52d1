"""``GET /api/events``: the event bus as Server-Sent Events.

Each event is one ``id: N`` + ``data: {json}`` message (no ``event:`` field, so ``EventSource.onmessage``
sees every type; the type is in the JSON). ``?room=ID`` keeps only that room's events. A client that
reconnects with ``Last-Event-ID`` (browsers do it by themselves) gets what it missed from the backlog,
or one ``reset`` event when that is no longer possible, after which it should refetch its state.
A fresh stream (no Last-Event-ID) starts with a ``hello`` event whose id is the newest event's.

Memory per client is bounded: events wait in a buffer of ``sse_client_buffer`` references (the bytes
are shared), and the socket's own write buffer is bounded by aiohttp's flow control. A client that
falls further behind than the buffer is disconnected and counted (``/api/stats`` → ``events``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from aiohttp import web

from p2pdiff.appkeys import CONFIG, EVENTS
from p2pdiff.errors import Unavailable
from p2pdiff.ops.logs import CountedStreamResponse
from p2pdiff.rest import security
from p2pdiff.rest.api import CORS, error_response
from p2pdiff.tasks import events, validate

log = logging.getLogger(__name__)

# How long a browser waits before reconnecting after the stream drops (SSE ``retry:``).
RETRY_MS = 2000
# Events are written in pieces of about this size: the copy a write makes (and the socket buffer
# it fills before flow control waits) stays this small per client, whatever the backlog.
WRITE_CHUNK = 64 * 1024
# Retry-After (seconds) for a client over its share of streams: a guess at how soon it closes one.
STREAM_RETRY_AFTER = 10


# Event ids are microsecond timestamps plus a counter (events.py): 16 digits for ages to come, and
# 18 digits still fit the 64 bits JSON answers carry. Any other id cannot be ours: the stream resets.
MAX_EVENT_ID_DIGITS = 18


def _last_event_id(request: web.Request) -> str | None:
    # The header is what EventSource sends on reconnect; the query parameter is for clients that
    # cannot set headers on a first connect (e.g. a page restoring its own saved cursor).
    raw = request.headers.get("Last-Event-ID") or request.query.get("lastEventId")
    if raw is None or raw.strip() == "":
        return None
    return raw.strip()


def _frame(cursor: int, type: str, room: str | None, data: dict[str, Any]) -> bytes:
    """A stream-only event (not in the backlog) carrying the id the client stands at."""
    payload = {"id": cursor, "type": type, "room": room, "ts": int(time.time() * 1000), "data": data}
    return events.encode_sse(cursor, orjson.dumps(payload))


def _pieces(replay: Iterable[events.Event]) -> Iterator[bytes]:
    piece: list[bytes] = []
    size = 0
    for event in replay:
        piece.append(event.frame)
        size += len(event.frame)
        if size >= WRITE_CHUNK:
            yield b"".join(piece)
            piece, size = [], 0
    if piece:
        yield b"".join(piece)


async def stream_events(request: web.Request) -> web.StreamResponse:
    server = request.app[CONFIG].server
    bus = request.app[EVENTS]
    room = request.query.get("room")
    room = None if room in (None, "") else validate.room_id(room)
    resume_from = _last_event_id(request)
    last_id = None if resume_from is None else validate.ascii_int(resume_from, MAX_EVENT_ID_DIGITS)
    transport = request.transport

    def disconnect() -> None:
        # abort(), not close(): close() would wait to flush a buffer the client is not reading.
        if transport is not None:
            transport.abort()

    # Each client address gets a share of the streams, so one client cannot hold them all.
    owner = security.client_key(request, server.trusted_proxy_header)
    try:
        sub = bus.subscribe(room, limit=server.sse_client_buffer, on_overflow=disconnect, owner=owner)
    except events.OwnerLimitReached as exc:
        refusal = error_response(429, "too_many_streams", f"{exc}; close one first")
        refusal.headers["Retry-After"] = str(STREAM_RETRY_AFTER)
        return refusal
    except events.TooManySubscribers as exc:
        raise Unavailable(str(exc), code="too_many_streams") from None
    # Taken together with the subscription, with no await in between: everything up to ``cursor``
    # comes from the backlog (or the client already has it), everything after arrives in ``sub``.
    cursor = bus.last_id
    replay = None if last_id is None else bus.since(last_id, room)

    resp = CountedStreamResponse(  # the access log's bytes: a stream has no Content-Length
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
        }
    )
    # The middleware adds CORS headers after the handler returns, which for a stream is after the
    # headers went out; so the stream sets them itself, by the same rule.
    request.app[CORS].decorate(request, resp.headers)
    try:
        await resp.prepare(request)
        head = b"retry: %d\n\n" % RETRY_MS
        if resume_from is None:
            # Tells the client where it stands (and sets its Last-Event-ID), so a reconnect before
            # the first real event still resumes from here.
            hello = {"heartbeatSeconds": server.sse_heartbeat_seconds, "backlog": server.sse_backlog}
            head += _frame(cursor, events.HELLO, room, hello)
        elif replay is None:
            # lastEventId null: the client's id was not a number at all.
            reason = "events_lost" if last_id is not None else "invalid_id"
            head += _frame(cursor, events.RESET, room, {"reason": reason, "lastEventId": last_id})
        await resp.write(head)
        for piece in _pieces(replay or ()):  # at most the backlog, in pieces like live events
            await resp.write(piece)
        while not sub.closed and request.transport is not None:
            try:
                async with asyncio.timeout(server.sse_heartbeat_seconds):
                    await sub.wait()
            except TimeoutError:
                # Idle: a comment keeps proxies from timing the stream out; with nothing buffered
                # every event so far was sent or filtered out, so the client's cursor may move on.
                beat = b": heartbeat\n\n" if len(sub) else b": heartbeat\nid: %d\n\n" % bus.last_id
                await resp.write(beat)
                continue
            batch = sub.take(WRITE_CHUNK)
            if batch:
                await resp.write(b"".join(e.frame for e in batch))
    except ConnectionError:
        pass  # the client went away, or was disconnected for being too slow
    finally:
        bus.unsubscribe(sub)
    if sub.overflowed:
        log.info("event stream of %s closed: client too slow", request.remote)
    return resp


async def _close_streams(app: web.Application) -> None:
    # on_shutdown runs before aiohttp waits for open handlers: ending the streams here lets
    # ``web.run_app`` stop at once instead of waiting out its shutdown timeout.
    app[EVENTS].close()


def setup(app: web.Application) -> None:
    app.router.add_get("/api/events", stream_events)
    app.on_shutdown.append(_close_streams)
