"""REST handlers (thin: validate, call one QueueManager/Helper method, answer) and the JSON error shape."""

from __future__ import annotations

import functools
import logging
import math
import os
import resource
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from aiohttp import web

from p2pdiff.appkeys import CONFIG, EVENTS, HELPER, QUEUE, STARTED_AT
from p2pdiff.errors import AppError, BadRequest, NotFound, PayloadTooLarge, Unavailable, UnsupportedMediaType
from p2pdiff.ops.cluster import LEASES, RoomLeases
from p2pdiff.rooms.helper import WIRES, Helper, HelperRoom, check_wire
from p2pdiff.tasks import validate
from p2pdiff.tasks.model import Room, Task
from p2pdiff.tasks.pg_store import PgStore
from p2pdiff.tasks.queue import QueueManager
from signaling.bounded import LruDict

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

try:
    VERSION = version("p2pdiff")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0+unknown"

# The REST limit on request bodies; aiohttp itself answers 413 past it.
MAX_BODY_BYTES = 64 * 1024

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


# POST /api/join on several nodes waits this long for a node to take the room (it answers 202 anyway).
SETTLE_SECONDS = 5.0
# This node's id among the others ([cluster] node_id), read once.
NODE = web.AppKey("node", str)

# Response headers cross-origin pages may read: the request id (for bug reports), the 429 back-off.
EXPOSED_HEADERS = "X-Request-Id, Retry-After"


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}, "success": False}, status)


async def read_json(request: web.Request, *, optional: bool = False) -> Any:
    """The request body as JSON; ``optional`` allows an empty body (returns None)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"request body must be at most {MAX_BODY_BYTES} bytes")
    try:
        body = await request.read()
    except ConnectionResetError:
        # The client went away mid-body, or a shutdown cut its stalled upload: no one will read the
        # answer, and it is no server error either.
        raise BadRequest("the request body did not arrive whole", code="incomplete_body") from None
    if optional and not body:
        return None
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type must be application/json, got '{ctype}'")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="invalid_json") from None


# -- the JSON error shape (the request middleware turns what a handler raises into it) ---------------


def app_error_response(exc: AppError) -> web.Response:
    response = error_response(exc.status, exc.code, exc.message)
    if isinstance(exc, Unavailable) and exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return response


def http_error_response(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (status 400 and up) in our shape."""
    code = _HTTP_CODES.get(exc.status, "http_error")
    message = exc.reason
    if exc.status == 413:
        message = f"request body must be at most {MAX_BODY_BYTES} bytes"
    elif exc.status == 404:
        message = f"no route for {request.method} {request.path}"
    response = error_response(exc.status, code, message)
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


class Cors:
    """CORS for the configured origins: preflight answers and headers on every other response."""

    def __init__(self, origins: list[str]) -> None:
        self.any_origin = "*" in origins
        self.allowed = frozenset(origins)

    def _granted(self, origin: str | None) -> str | None:
        if self.any_origin:
            return "*"
        return origin if origin in self.allowed else None

    def preflight(self, request: web.Request) -> web.Response | None:
        """The answer to a CORS preflight, or None when ``request`` is not one."""
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        origin = request.headers.get("Origin")
        granted = self._granted(origin)
        if granted is None:
            return error_response(403, "origin_not_allowed", f"origin '{origin}' is not allowed")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": granted,
                "Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", "Content-Type, Authorization"
                ),
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            },
        )

    def decorate(self, request: web.Request, headers: MutableMapping[str, str]) -> None:
        origin = request.headers.get("Origin")
        if origin is None:
            return
        granted = self._granted(origin)
        if granted is not None:
            headers["Access-Control-Allow-Origin"] = granted
            # Not CORS-safelisted: without this, a page on another origin cannot read them.
            headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if not self.any_origin:
            headers["Vary"] = "Origin"


CORS = web.AppKey("cors", Cors)


# -- handlers -----------------------------------------------------------------------------------


# Bytes per page of /proc/self/statm's counts.
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _statm() -> int | None:
    """/proc/self/statm, opened once (None: not Linux). Opening it per request cost /api/health
    more than all the rest of its answer; a pread at offset 0 reads it afresh."""
    try:
        return os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _memory(second: int) -> dict[str, int]:
    """Memory use, read at most once a ``second`` (of the monotonic clock): its two system calls cost
    a health check more than the rest of its answer, and an RSS a second old means the same there."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss = usage.ru_maxrss * 1024
    statm = _statm()
    if statm is not None:
        rss = int(os.pread(statm, 128, 0).split()[1]) * _PAGE_SIZE
    return {"rss": rss, "maxRss": usage.ru_maxrss * 1024}


async def health(request: web.Request) -> web.Response:
    app = request.app
    helper = app[HELPER]
    p2p_on = helper.mode == "p2p"
    return json_response(
        {
            "status": "ok",
            "p2pEnabled": p2p_on,
            "uptime": round(time.time() - app[STARTED_AT], 3),
            "memory": _memory(int(time.monotonic())),
            "version": VERSION,
            "p2p": {
                # The WebRTC stack is a dependency (see make_helper), so always true; kept because
                # clients of earlier versions read it.
                "available": True,
                "mode": helper.mode,
                "rooms": [room.to_json() for room in helper.rooms()],
            },
            "node": app[NODE],
            **({"cluster": app[LEASES].to_json()} if LEASES in app else {}),
        }
    )


def _room_stats(room: Room, helper: Helper) -> dict[str, Any]:
    data = room.stats()
    helper_room = helper.room(room.id)
    data["peers"] = helper_room.peers() if helper_room else []
    if helper_room:
        data.update(helper_room.extra_stats())  # P2P: gpuPeers, dispatch, protocol counters
    return data


def _shared_store_stats(queue: QueueManager) -> dict[str, Any]:
    """Several nodes: how this node keeps up with the others (PgStore.cluster_stats)."""
    store = queue.store
    return store.cluster_stats() if isinstance(store, PgStore) else {}


async def stats(request: web.Request) -> web.Response:
    queue, helper = request.app[QUEUE], request.app[HELPER]
    await queue.sync()
    totals = queue.stats()
    return json_response(
        {
            "activeRooms": len(queue.rooms),
            "totalQueued": totals["totalQueued"],
            "p2pEnabled": helper.mode == "p2p",
            "rooms": {room_id: _room_stats(room, helper) for room_id, room in queue.rooms.items()},
            "tasksByStatus": totals["byStatus"],
            "peers": helper.peer_count(),
            "helperRooms": [room.room_id for room in helper.rooms()],
            "requeues": totals["requeues"],
            "waitSeconds": totals["waitSeconds"],
            "runSeconds": totals["runSeconds"],
            "events": request.app[EVENTS].stats(),
            "store": {**queue.store.stats(), "rollbacks": queue.rollbacks, **_shared_store_stats(queue)},
        }
    )


def render_listing(
    queue: QueueManager, helper: Helper, room_id: str, statuses: frozenset[str] | None, limit: int | None
) -> bytes:
    """The body of ``GET /api/queue/{room_id}``."""
    room = queue.get_room(room_id) or Room(id=room_id)
    helper_room = helper.room(room_id)
    return orjson.dumps(
        {
            "roomId": room_id,
            "queue": queue.list_tasks(room_id, statuses, limit),
            "stats": room.stats(),
            "peers": helper_room.peers() if helper_room else [],
        }
    )


# Listings kept, most recently stored last out; one past MAX_CACHED_LISTING_BYTES (thousands of
# tasks: as rare as it is slow to send) is rendered each time instead.
CACHED_LISTINGS = 64
MAX_CACHED_LISTING_BYTES = 1 << 20
ListingKey = tuple[str, frozenset[str] | None, int | None]  # room id, status filter, limit


@dataclass(slots=True, frozen=True)
class _Listing:
    room: Room  # the object rendered: a room reloaded, or dropped and made again, is another one
    version: int
    second: int
    body: bytes


class ListingCache:
    """Rendered listings (GET is the hot path), current while their room object stands at the same
    version (see ``Room.version``) and within the same second: the peers in a listing (rtt,
    lastSeen) change on their own, so they are up to 1 s old here (``/api/events`` has them live)."""

    def __init__(self) -> None:
        self._listings: LruDict[ListingKey, _Listing] = LruDict(CACHED_LISTINGS)

    def get(self, key: ListingKey, room: Room, second: int, render: Callable[[], bytes]) -> bytes:
        """The listing of ``room`` under ``key``, rendered only when the kept one is not current."""
        kept = self._listings.get(key)
        if kept is not None and kept.room is room and kept.version == room.version and kept.second == second:
            return kept.body
        listing = _Listing(room, room.version, second, render())
        self._listings.pop(key)
        if len(listing.body) <= MAX_CACHED_LISTING_BYTES:
            self._listings.setdefault(key, lambda: listing)
        return listing.body


LISTINGS = web.AppKey("listings", ListingCache)


async def get_queue(request: web.Request) -> web.Response:
    room_id = validate.room_id(request.match_info["room_id"])
    statuses: frozenset[str] | None = None
    limit: int | None = None
    if request.query_string:  # parsing an empty query still costs a few µs on the hot path
        statuses = validate.status_filter(request.query.get("status"))
        limit = validate.limit(request.query.get("limit"))
    app = request.app
    queue = app[QUEUE]
    await queue.sync()  # several nodes: what any of them committed before this request is here
    render = functools.partial(render_listing, queue, app[HELPER], room_id, statuses, limit)
    room = queue.get_room(room_id)
    if room is None:  # not kept: cheap to answer, and kept it would let clients fill the cache
        body = render()
    else:
        body = app[LISTINGS].get((room_id, statuses, limit), room, int(time.monotonic()), render)
    return web.Response(body=body, content_type="application/json")


async def _add_task(request: web.Request, room_id: str | None) -> web.Response:
    body = await read_json(request)
    new = validate.new_task(body)
    if room_id is None and isinstance(body, dict) and body.get("roomId") is not None:
        room_id = validate.room_id(body["roomId"])
    queue = request.app[QUEUE]
    queue.check_writable()
    async with queue.writing():
        # No room at all: the task the browser app announced to its room, or one for the default
        # room. The helper's rooms: this node's, and (several nodes) those other nodes hold.
        if room_id is None:
            mine = [room.room_id for room in request.app[HELPER].rooms()]
            added = queue.add_unplaced(new, dict.fromkeys([*mine, *queue.helper_rooms()]))
        else:
            added = queue.add(room_id, new)
    room_id = added.task.room_id
    await queue.flush()  # a duplicate may have filled in fields of the task: durable before 200 too
    if added.created:
        log.info("task %s added to room %s at position %s", added.task.id, room_id, added.position)
    payload = {
        "success": True,
        "taskId": added.task.id,
        "roomId": room_id,
        "position": added.position,
        "task": added.task.to_json(added.position),
    }
    if not added.created:
        payload["duplicate"] = True
    return json_response(payload, 201 if added.created else 200)


async def post_queue(request: web.Request) -> web.Response:
    return await _add_task(request, validate.room_id(request.match_info["room_id"]))


async def post_queue_default(request: web.Request) -> web.Response:
    return await _add_task(request, None)


def _task_payload(queue: QueueManager, task: Task) -> dict[str, Any]:
    return {"success": True, "task": task.to_json(queue.position(task))}


async def get_task(request: web.Request) -> web.Response:
    room_id = validate.room_id(request.match_info["room_id"])
    queue = request.app[QUEUE]
    await queue.sync()
    task = queue.get_task(room_id, request.match_info["task_id"])
    return json_response(_task_payload(queue, task))


async def patch_task(request: web.Request) -> web.Response:
    room_id = validate.room_id(request.match_info["room_id"])
    update = validate.task_update(await read_json(request))
    queue = request.app[QUEUE]
    queue.check_writable()
    async with queue.writing():
        task = queue.update(room_id, request.match_info["task_id"], update)
    await queue.flush()
    return json_response(_task_payload(queue, task))


async def delete_task(request: web.Request) -> web.Response:
    room_id = validate.room_id(request.match_info["room_id"])
    queue = request.app[QUEUE]
    queue.check_writable()
    async with queue.writing():
        task = queue.cancel(room_id, request.match_info["task_id"])
    await queue.flush()
    log.info("task %s in room %s cancelled", task.id, room_id)
    return json_response(_task_payload(queue, task))


async def join_room(request: web.Request) -> web.Response:
    room_id = validate.room_id(request.match_info["room_id"])
    body = await read_json(request, optional=True)
    if body is not None and not isinstance(body, dict):
        raise BadRequest("body must be a JSON object", code="invalid_body")
    dispatch = body.get("dispatch") if body else None
    if dispatch is not None and not isinstance(dispatch, bool):
        raise BadRequest("dispatch must be true or false", code="invalid_dispatch")
    wire = body.get("wire") if body else None
    if wire is not None and wire not in WIRES:
        raise BadRequest(f"wire must be one of {', '.join(WIRES)}", code="invalid_wire")
    helper, queue = request.app[HELPER], request.app[QUEUE]
    leases = request.app.get(LEASES)
    if leases is not None:
        return await _join_shared(request, leases, room_id, wire, dispatch)
    queue.check_writable()  # before the helper joins: a join the store cannot remember is refused
    joined = await helper.join(room_id, wire)
    if dispatch is not None:
        helper.set_dispatch(room_id, dispatch)
    async with queue.writing():
        queue.set_helper_joined(room_id, True)
        queue.set_helper_options(room_id, wire=wire, dispatch=dispatch)  # rejoined so after a restart
    await queue.flush()
    log.info("helper joined room %s (%s, wire %s)", room_id, helper.mode, joined.wire)
    return json_response(
        {
            "success": True,
            "message": f"server joined room {room_id} as helper ({helper.mode})",
            "roomId": room_id,
            "mode": helper.mode,
            "wire": joined.wire,
        },
        202,
    )


async def _join_shared(
    request: web.Request, leases: RoomLeases, room_id: str, wire: str | None, dispatch: bool | None
) -> web.Response:
    """Several nodes: the room is recorded as wanted and the node that takes its lease joins it
    (p2pdiff/ops/cluster.py); the answer names that node once one holds the room."""
    helper, queue = request.app[HELPER], request.app[QUEUE]
    default_wire = request.app[CONFIG].p2p.wire
    queue.check_writable()
    async with queue.writing():
        room = queue.get_room(room_id)
        if room is not None and room.helper_joined:
            check_wire(HelperRoom(room_id, wire=room.helper_wire or default_wire), wire)
        queue.set_helper_joined(room_id, True)
        queue.set_helper_options(room_id, wire=wire, dispatch=dispatch)  # for whichever node joins
    await queue.flush()
    node = await leases.settle(room_id, SETTLE_SECONDS)
    stored = queue.get_room(room_id)
    joined_wire = (stored.helper_wire if stored is not None else None) or default_wire
    log.info("helper room %s wanted; held by node %s", room_id, node)
    return json_response(
        {
            "success": True,
            "message": (
                f"room {room_id} joined by the helper of node {node} ({helper.mode})"
                if node is not None
                else f"room {room_id} will be joined by the first node with room for it"
            ),
            "roomId": room_id,
            "mode": helper.mode,
            "wire": joined_wire,
            "node": node,
        },
        202,
    )


async def leave_room(request: web.Request) -> web.Response:
    room_id = validate.room_id(request.match_info["room_id"])
    helper, queue = request.app[HELPER], request.app[QUEUE]
    leases = request.app.get(LEASES)
    if leases is not None:
        return await _leave_shared(request, leases, room_id)
    queue.check_writable()
    was_in = await helper.leave(room_id)
    async with queue.writing():
        room = queue.get_room(room_id)
        if not was_in and not (room and room.helper_joined):
            raise NotFound(f"the helper is not in room '{room_id}'", code="room_not_joined")
        queue.set_helper_joined(room_id, False)
    await queue.flush()
    log.info("helper left room %s", room_id)
    return json_response({"success": True, "message": f"server left room {room_id}", "roomId": room_id})


async def _leave_shared(request: web.Request, leases: RoomLeases, room_id: str) -> web.Response:
    """Several nodes: the room is no longer wanted; the node holding it leaves at its next round,
    which this request starts on every node."""
    queue = request.app[QUEUE]
    queue.check_writable()
    async with queue.writing():
        room = queue.get_room(room_id)
        if not (room and room.helper_joined):
            raise NotFound(f"the helper is not in room '{room_id}'", code="room_not_joined")
        queue.set_helper_joined(room_id, False)
    await queue.flush()
    await leases.released_everywhere()
    log.info("helper room %s no longer wanted", room_id)
    return json_response({"success": True, "message": f"server left room {room_id}", "roomId": room_id})


def add_routes(app: web.Application) -> None:
    app[NODE] = app[CONFIG].cluster.node_name()
    app[LISTINGS] = ListingCache()
    app.router.add_get("/api/health", health)
    app.router.add_get("/api/stats", stats)
    # The router tries the routes under /api/queue in this order: the listing (the hot path) first.
    app.router.add_get("/api/queue/{room_id}", get_queue)
    app.router.add_post("/api/queue/{room_id}", post_queue)
    app.router.add_get("/api/queue/{room_id}/{task_id}", get_task)
    app.router.add_patch("/api/queue/{room_id}/{task_id}", patch_task)
    app.router.add_delete("/api/queue/{room_id}/{task_id}", delete_task)
    app.router.add_post("/api/queue", post_queue_default)
    app.router.add_post("/api/join/{room_id}", join_room)
    app.router.add_delete("/api/join/{room_id}", leave_room)
