"""The OpenAPI 3.1 document (``GET /api/openapi.json``) and the API docs page (``GET /api/docs``).

The document is data: the schemas below are written from the constants in ``validate.py`` (limits,
patterns, enums), so a rule changes in one place. ``build`` keeps the operations whose routes the app
really registered and adds what depends on the config (admin token, rate limit), so the document
describes this server as configured. A test fails when a route has no entry in ``PATHS``.

The docs page is Swagger UI, vendored in ``web/vendor/swagger-ui/`` (no CDN), served from memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import zlib
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from p2pdiff.appkeys import CONFIG
from p2pdiff.config import Config
from p2pdiff.errors import NotFound
from p2pdiff.rest import appfiles, dashboard, security
from p2pdiff.rest.api import MAX_BODY_BYTES, VERSION
from p2pdiff.tasks import validate
from signaling.wire import WIRE_VERSIONS

JSON = "application/json"
# HEAD is answered for every GET route by aiohttp and means the same without a body.
IMPLIED_METHODS = {"HEAD": "GET"}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


ID = {"type": "string", "pattern": f"^{validate.ID_RE.pattern}$"}
STATUS = {"type": "string", "enum": list(validate.STATUSES)}
MILLIS = {"type": "integer", "description": "milliseconds since the epoch, like Date.now()"}
WIRE = {"type": "string", "enum": list(WIRE_VERSIONS), "description": "Trystero wire of the helper's room"}
_STATUS_ALT = "|".join(validate.STATUSES)

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "success"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "additionalProperties": False,
                "properties": {
                    "code": {"type": "string", "description": "stable, machine-readable", "minLength": 1},
                    "message": {"type": "string", "description": "for people", "minLength": 1},
                },
            },
            "success": {"const": False},
        },
    },
    "NewTask": {
        "type": "object",
        "required": ["prompt"],
        "description": "Fields other than the server-owned ones are kept and returned with the task. "
        f"Every value may nest at most {validate.MAX_JSON_DEPTH} arrays/objects deep and hold no integer "
        "outside -2^63..2^64-1 (400 invalid_value).",
        "properties": {
            "id": {**nullable(ID), "description": "optional; the server makes task_<ms>_<hex>"},
            "prompt": {
                "type": "string",
                "minLength": 1,
                "maxLength": validate.MAX_PROMPT_CHARS,
                "pattern": r"\S",
            },
            "options": {
                **nullable({"type": "object"}),
                "description": f"at most {validate.MAX_OPTIONS_BYTES} bytes as JSON (413 past it)",
            },
            "createdAt": {
                **nullable({"type": "integer", "minimum": 0, "maximum": validate.MAX_SAFE_INTEGER}),
                "description": "Date.now() of the client; absent or null: the server's clock",
            },
        },
    },
    "NewTaskWithRoom": {
        "allOf": [ref("NewTask")],
        "properties": {
            "roomId": {
                **nullable(ID),
                "description": "null or absent: the helper room with this task, else [server] default_room",
            }
        },
    },
    "TaskUpdate": {
        "type": "object",
        "required": ["action"],
        "properties": {
            "action": {"type": "string", "enum": list(validate.PATCH_ACTIONS)},
            "worker": nullable({"type": "string", "minLength": 1, "maxLength": validate.MAX_WORKER_CHARS}),
            "progress": nullable({"type": "number", "minimum": 0, "maximum": 1}),
            "result": {"description": f"any JSON, at most {validate.MAX_RESULT_BYTES} bytes (413 past it)"},
            "error": nullable({"type": "string", "maxLength": validate.MAX_ERROR_CHARS}),
        },
        "allOf": [
            {
                "if": {"properties": {"action": {"const": "claim"}}},
                "then": {"required": ["worker"], "properties": {"worker": {"type": "string"}}},
            },
            {
                "if": {"properties": {"action": {"const": "progress"}}},
                "then": {"required": ["progress"], "properties": {"progress": {"type": "number"}}},
            },
        ],
    },
    "Task": {
        "type": "object",
        "description": "Plus any other fields the client sent (type, negativePrompt, createdBy, ...).",
        "required": [
            "id",
            "roomId",
            "prompt",
            "options",
            "status",
            "createdAt",
            "queuedAt",
            "updatedAt",
            "claimedBy",
            "claimedAt",
            "finishedAt",
            "progress",
            "result",
            "error",
            "requeues",
        ],
        "properties": {
            "id": ID,
            "roomId": ID,
            "prompt": {"type": "string"},
            "options": {"type": "object"},
            "status": STATUS,
            "position": {"type": "integer", "minimum": 1, "description": "1-based, while pending"},
            "createdAt": MILLIS,
            "queuedAt": MILLIS,
            "updatedAt": MILLIS,
            "claimedBy": nullable({"type": "string"}),
            "claimedAt": nullable(MILLIS),
            "finishedAt": nullable(MILLIS),
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "result": {},
            "error": nullable({"type": "string"}),
            "requeues": {"type": "integer", "minimum": 0},
        },
    },
    "ByStatus": {
        "type": "object",
        "required": list(validate.STATUSES),
        "properties": {s: {"type": "integer", "minimum": 0} for s in validate.STATUSES},
    },
    "RoomStats": {
        "type": "object",
        "required": ["queueLength", "generated", "lastActivity", "tasks", "byStatus", "helperJoined"],
        "properties": {
            "queueLength": {"type": "integer", "minimum": 0},
            "generated": {"type": "integer", "minimum": 0},
            "lastActivity": MILLIS,
            "tasks": {"type": "integer", "minimum": 0},
            "byStatus": ref("ByStatus"),
            "helperJoined": {"type": "boolean"},
            "peers": {"type": "array", "items": ref("Peer")},
        },
    },
    "Peer": {
        "type": "object",
        "required": ["id"],
        "properties": {
            "id": {"type": "string"},
            "joinedAt": MILLIS,
            "lastSeen": MILLIS,
            "rttMs": nullable({"type": "number"}),
        },
    },
    "HelperRoom": {
        "type": "object",
        "required": ["roomId", "joinedAt", "peers"],
        "properties": {
            "roomId": ID,
            "joinedAt": MILLIS,
            "wire": WIRE,
            "peers": {"type": "array", "items": ref("Peer")},
            "selfId": {"type": "string", "description": "p2p mode: the helper's peer id"},
            "relays": {
                "type": "object",
                "description": "p2p mode: relay URL -> state",
                "additionalProperties": {"type": "string"},
            },
        },
    },
    "Timing": {
        "type": "object",
        "required": ["count", "mean", "p95"],
        "properties": {
            "count": {"type": "integer", "minimum": 0},
            "mean": nullable({"type": "number"}),
            "p95": nullable({"type": "number"}),
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "p2pEnabled", "uptime", "memory", "version", "p2p", "node"],
        "properties": {
            "status": {"const": "ok"},
            "p2pEnabled": {"type": "boolean"},
            "uptime": {"type": "number", "description": "seconds"},
            "memory": {
                "type": "object",
                "required": ["rss", "maxRss"],
                "properties": {"rss": {"type": "integer"}, "maxRss": {"type": "integer"}},
            },
            "version": {"type": "string"},
            "p2p": {
                "type": "object",
                "required": ["available", "mode", "rooms"],
                "properties": {
                    "available": {
                        "type": "boolean",
                        "description": "always true: WebRTC is a dependency (kept for older clients)",
                    },
                    "mode": {"type": "string", "enum": ["p2p", "api-only"]},
                    "rooms": {"type": "array", "items": ref("HelperRoom")},
                },
            },
            "node": {"type": "string", "description": "this node's id ([cluster] node_id)"},
            "cluster": {
                "type": "object",
                "description": "PostgreSQL store only: the live nodes and the helper rooms this node "
                "holds the lease of, as of its last lease round",
                "required": ["nodes", "rooms"],
                "properties": {
                    "nodes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["id", "seenAt", "rooms"],
                            "properties": {
                                "id": {"type": "string"},
                                "seenAt": MILLIS,
                                "rooms": {"type": "integer", "minimum": 0, "description": "rooms it holds"},
                            },
                        },
                    },
                    "rooms": {"type": "array", "items": ID},
                },
            },
        },
    },
    "Stats": {
        "type": "object",
        "required": [
            "activeRooms",
            "totalQueued",
            "p2pEnabled",
            "rooms",
            "tasksByStatus",
            "peers",
            "helperRooms",
            "requeues",
            "waitSeconds",
            "runSeconds",
        ],
        "properties": {
            "activeRooms": {"type": "integer", "minimum": 0},
            "totalQueued": {"type": "integer", "minimum": 0},
            "p2pEnabled": {"type": "boolean"},
            "rooms": {"type": "object", "additionalProperties": ref("RoomStats")},
            "tasksByStatus": ref("ByStatus"),
            "peers": {"type": "integer", "minimum": 0},
            "helperRooms": {"type": "array", "items": ID},
            "requeues": {"type": "integer", "minimum": 0},
            "waitSeconds": ref("Timing"),
            "runSeconds": ref("Timing"),
            "events": {"type": "object", "description": "the event bus: lastId, published, clients, ..."},
            "store": {
                "type": "object",
                "description": "commits, failures by code, refused, rollbacks, failing (a code or null), "
                "retryAfter, busyRetries; on PostgreSQL also appliedChange, deliveredEvent, conflicts, "
                "rowsCaughtUp, eventsDropped",
            },
        },
    },
    "QueueList": {
        "type": "object",
        "required": ["roomId", "queue", "stats", "peers"],
        "properties": {
            "roomId": ID,
            "queue": {"type": "array", "items": ref("Task")},
            "stats": ref("RoomStats"),
            "peers": {"type": "array", "items": ref("Peer")},
        },
    },
    "Added": {
        "type": "object",
        "required": ["success", "taskId", "roomId", "position", "task"],
        "properties": {
            "success": {"const": True},
            "taskId": ID,
            "roomId": ID,
            "position": nullable({"type": "integer", "minimum": 1}),
            "task": ref("Task"),
            "duplicate": {"const": True, "description": "present on a repeat of an earlier POST (200)"},
        },
    },
    "TaskResult": {
        "type": "object",
        "required": ["success", "task"],
        "properties": {"success": {"const": True}, "task": ref("Task")},
    },
    "Joined": {
        "type": "object",
        "required": ["success", "message", "roomId", "mode"],
        "properties": {
            "success": {"const": True},
            "message": {"type": "string"},
            "roomId": ID,
            "mode": {"type": "string"},
            "wire": WIRE,
            "node": {
                **nullable({"type": "string"}),
                "description": "PostgreSQL store only: the node whose helper holds the room (null: none "
                "took it within 5 s; one will)",
            },
        },
    },
    "Left": {
        "type": "object",
        "required": ["success", "message", "roomId"],
        "properties": {"success": {"const": True}, "message": {"type": "string"}, "roomId": ID},
    },
}

# -- operations -------------------------------------------------------------------------------------

ERROR_TEXT = {
    400: "invalid input: bad id, body field, query parameter or JSON",
    401: "no admin token (Authorization: Bearer <token>)",
    403: "wrong admin token",
    404: "no such task, room or file",
    409: "conflict: same id with other content, illegal transition, or another worker's task",
    413: f"body over {MAX_BODY_BYTES} bytes, or options/result over their limit",
    415: "a body that is not application/json",
    429: "rate limited, or this client's share of event streams is open: retry after Retry-After seconds",
    503: "the store could not save the change (nothing was changed: store_busy, store_unavailable; retry "
    "after Retry-After seconds), or too many event streams",
}


def _param(
    name: str, where: str, schema: dict[str, Any], text: str, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema,
        "description": text,
    }


ROOM = _param("room_id", "path", ID, "room id")
TASK = _param("task_id", "path", ID, "task id")
STATUS_QUERY = _param(
    "status",
    "query",
    {"type": "string", "pattern": f"^$|^[ \\t]*({_STATUS_ALT})[ \\t]*(,[ \\t]*({_STATUS_ALT})[ \\t]*)*$"},
    "comma-separated states to list",
)
LIMIT_QUERY = _param(
    "limit", "query", {"type": "integer", "minimum": 1, "maximum": validate.MAX_LIMIT}, "at most this many"
)
ASSETS_DOC = "a file of the page"
VENDORED = ("swagger-ui-bundle.js", "swagger-ui.css")


def _op(
    op_id: str,
    summary: str,
    ok: dict[int, tuple[str | tuple[str, ...], Any]],
    errors: tuple[int, ...] = (),
    *,
    params: tuple[dict[str, Any], ...] = (),
    body: str | None = None,
    body_required: bool = True,
    flushes: bool = False,
) -> dict[str, Any]:
    """An operation: ``ok`` maps status -> (media type or types, schema); errors all use the Error shape."""
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "_ok": ok, "_errors": set(errors)}
    if params:
        op["parameters"] = list(params)
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": {JSON: {"schema": ref(body)}}}
        op["_errors"] |= {400, 413, 415}
    if flushes:
        op["_errors"].add(503)
    return op


TEXT = {"type": "string"}
FILE_TYPES = (
    "text/html",
    "text/css",
    "text/javascript",
    "application/javascript",
    "image/svg+xml",
    "image/png",
)

# Route template -> method -> operation. Keep every route the app registers here.
PATHS: dict[str, dict[str, dict[str, Any]]] = {
    "/api/health": {"get": _op("health", "Liveness and mode", {200: (JSON, ref("Health"))})},
    "/api/stats": {"get": _op("stats", "Queue, room and peer statistics", {200: (JSON, ref("Stats"))})},
    "/api/queue": {
        "post": _op(
            "addTaskDefaultRoom",
            "Add a task to the body's roomId. Without one: the task a helper room already holds under "
            "this id, prompt and createdBy (the browser app announces a task to its room, then POSTs "
            "it here), its missing fields filled in (200, duplicate: true, roomId that room); else "
            "the default room",
            {201: (JSON, ref("Added")), 200: (JSON, ref("Added"))},
            (409,),
            body="NewTaskWithRoom",
            flushes=True,
        )
    },
    "/api/queue/{room_id}": {
        "get": _op(
            "listQueue",
            "A room's tasks in queue order (unknown rooms are empty)",
            {200: (JSON, ref("QueueList"))},
            (400,),
            params=(ROOM, STATUS_QUERY, LIMIT_QUERY),
        ),
        "post": _op(
            "addTask",
            "Add a task (201; a repeated id with the same content is 200 with duplicate: true)",
            {201: (JSON, ref("Added")), 200: (JSON, ref("Added"))},
            (400, 409),
            params=(ROOM,),
            body="NewTask",
            flushes=True,
        ),
    },
    "/api/queue/{room_id}/{task_id}": {
        "get": _op("getTask", "One task", {200: (JSON, ref("TaskResult"))}, (400, 404), params=(ROOM, TASK)),
        "patch": _op(
            "updateTask",
            "Worker actions: claim, progress, complete, fail, requeue",
            {200: (JSON, ref("TaskResult"))},
            (400, 404, 409),
            params=(ROOM, TASK),
            body="TaskUpdate",
            flushes=True,
        ),
        "delete": _op(
            "cancelTask",
            "Cancel a pending or processing task",
            {200: (JSON, ref("TaskResult"))},
            (400, 404, 409),
            params=(ROOM, TASK),
            flushes=True,
        ),
    },
    "/api/join/{room_id}": {
        "post": _op(
            "joinRoom",
            "The helper joins the room (remembered across restarts); the body is optional",
            {202: (JSON, ref("Joined"))},
            (400, 409),
            params=(ROOM,),
            body="JoinOptions",
            body_required=False,
            flushes=True,
        ),
        "delete": _op(
            "leaveRoom",
            "The helper leaves the room",
            {200: (JSON, ref("Left"))},
            (400, 404),
            params=(ROOM,),
            flushes=True,
        ),
    },
    "/api/events": {
        "get": _op(
            "events",
            "Server-Sent Events: one `data: {id, type, room, ts, data}` message per event, until closed",
            {200: ("text/event-stream", TEXT)},
            (400, 429, 503),
            params=(
                _param("room", "query", {"anyOf": [ID, {"const": ""}]}, "only this room's events"),
                _param(
                    "lastEventId",
                    "query",
                    {"type": "integer"},
                    "resume after this id (or the Last-Event-ID header)",
                ),
                _param(
                    "Last-Event-ID",
                    "header",
                    {"type": "integer"},
                    "resume after this id (EventSource sets it)",
                ),
            ),
        )
    },
    "/api/openapi.json": {"get": _op("openapi", "This document", {200: (JSON, {"type": "object"})})},
    "/api/docs": {"get": _op("docs", "API docs page (Swagger UI)", {200: ("text/html", TEXT)})},
    "/api/docs/{asset}": {
        "get": _op(
            "docsAsset",
            "Scripts and styles of the docs page",
            {200: (("text/javascript", "text/css"), TEXT)},
            (404,),
            params=(_param("asset", "path", {"type": "string", "enum": ["init.js", *VENDORED]}, ASSETS_DOC),),
        )
    },
    "/metrics": {"get": _op("metrics", "Prometheus metrics", {200: ("text/plain", TEXT)})},
    "/": {"get": _op("dashboard", "The dashboard page", {200: ("text/html", TEXT)})},
    "/static/{name}": {
        "get": _op(
            "dashboardFile",
            "The dashboard's scripts, styles and images",
            {200: (FILE_TYPES, TEXT)},
            (404,),
            params=(
                _param("name", "path", {"type": "string", "enum": sorted(dashboard.FILES)}, "file name"),
            ),
        )
    },
}

SCHEMAS["JoinOptions"] = {
    "type": ["object", "null"],
    "description": "optional; send {} (or null) or nothing for the defaults",
    "properties": {
        "dispatch": {
            **nullable({"type": "boolean"}),
            "description": "hand this room's pending tasks to GPU peers (null or absent: [p2p] dispatch)",
        },
        "wire": {
            **nullable(WIRE),
            "description": "Trystero wire for this room (null or absent: [p2p] wire; 0.22 = the published "
            "browser app), kept across restarts; 409 if the helper is in the room with the other one",
        },
    },
}

# The helper's view of the browser app's room (P2P mode; see docs/protocol.md).
SCHEMAS["Peer"]["properties"]["capabilities"] = {
    "type": "object",
    "description": "what the peer announced: hasGPU, gpuName, memory, cores, gpuArchitecture?, ...",
}
SCHEMAS["RoomStats"]["properties"].update(
    {
        "gpuPeers": {"type": "integer", "minimum": 0, "description": "P2P: peers that announced hasGPU"},
        "dispatch": {"type": "boolean", "description": "P2P: the helper hands tasks to GPU peers"},
        "protocol": {
            "type": "object",
            "description": "P2P: messages by action, ignored ones by `<action>.<reason>`, dispatch counts",
        },
    }
)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
PATHS["/api/queue/{room_id}/{task_id}/result"] = {
    "get": _op(
        "getTaskResult",
        "The task's result image (PNG, JPEG or WebP, as a peer delivered it); 404 if it has none",
        {200: (IMAGE_TYPES, {"description": "the image bytes"})},
        (400, 404, 503),
        params=(ROOM, TASK),
    )
}

HEADERS = {
    "X-Request-Id": {
        "description": "this request's id, as in the server's logs (the caller's own if it sent a plain one)",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": 64},
    }
}


def _response(
    description: str, media: str | tuple[str, ...], schema: Any, headers: dict[str, Any]
) -> dict[str, Any]:
    types = (media,) if isinstance(media, str) else media
    return {"description": description, "headers": headers, "content": {t: {"schema": schema} for t in types}}


def _error(status: int) -> dict[str, Any]:
    headers = dict(HEADERS)
    if status == 401:
        headers["WWW-Authenticate"] = {"required": True, "schema": {"type": "string", "pattern": "^Bearer"}}
    elif status in (429, 503):
        headers["Retry-After"] = {
            "description": "seconds" if status == 429 else "seconds (store_busy, store_unavailable)",
            "required": status == 429,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    return _response(ERROR_TEXT[status], JSON, ref("Error"), headers)


def _finish(method: str, path: str, template: dict[str, Any], config: Config) -> dict[str, Any]:
    op = {k: v for k, v in template.items() if not k.startswith("_")}
    errors = set(template["_errors"])
    server = config.server
    needs_token = bool(server.admin_token) and security.token_required(
        server.queue_requires_token, method.upper(), path
    )
    if needs_token:
        op["security"] = [{"adminToken": []}]
        errors |= {401, 403}
    limited = server.rate_limit_per_second > 0 and (method == "post" or needs_token)
    if limited:
        errors.add(429)
    streaming = any(media == "text/event-stream" for media, _ in template["_ok"].values())
    responses: dict[str, Any] = {}
    for status, (media, schema) in sorted(template["_ok"].items()):
        # A stream's headers go out before the middleware could add the request id.
        responses[str(status)] = _response("OK", media, schema, {} if streaming else HEADERS)
    for status in sorted(errors):
        responses[str(status)] = _error(status)
    op["responses"] = responses
    return op


TAGS = (
    ("/api/queue", "queue", "Tasks of a room: add, list, claim, progress, finish, cancel"),
    ("/api/join", "helper", "The helper peer's rooms"),
    ("/api/docs", "docs", "This documentation"),
    ("/api/openapi.json", "docs", ""),
    ("/static", "dashboard", "The dashboard page and its files"),
    ("/api", "monitoring", "Health, statistics, live events and metrics"),
    ("/metrics", "monitoring", ""),
    ("/", "dashboard", ""),
)


def _tag(path: str) -> str:
    return next(tag for prefix, tag, _ in TAGS if path.startswith(prefix))


def registered_operations(app: web.Application) -> set[tuple[str, str]]:
    """(method, route template) of every API route the app answers, HEAD folded into GET.

    The browser app's files (``[server] static_dir``) are left out: they are the deployer's pages,
    not this server's API, and their paths hold slashes that an OpenAPI path parameter cannot. So
    is the room relay (``[relay]``): WebSocket endpoints, which OpenAPI does not describe.
    """
    found = set()
    server, relay = app[CONFIG].server, app[CONFIG].relay
    for route in app.router.routes():
        resource = route.resource
        if resource is None or appfiles.owns(server, resource.canonical):
            continue
        if relay.enabled and resource.canonical in (relay.path, relay.ws_relay_path):  # WebSockets
            continue
        method = IMPLIED_METHODS.get(route.method, route.method)
        found.add((method.lower(), resource.canonical))
    return found


def build(app: web.Application) -> dict[str, Any]:
    """The document for this app: its registered routes, its config's security and limits."""
    config = app[CONFIG]
    registered = registered_operations(app)
    paths: dict[str, dict[str, Any]] = {}
    for path, methods in PATHS.items():  # in PATHS order: the docs page lists them so
        for method, template in methods.items():
            if (method, path) in registered:
                op = _finish(method, path, template, config)
                op["tags"] = [_tag(path)]
                paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "p2pdiff",
            "version": VERSION,
            "description": (
                "Durable per-room queue of image tasks for P2P WebGPU Diffusion, and its helper peer.\n\n"
                'Every error is `{"error": {"code", "message"}, "success": false}`. A method a '
                "path does not have is 405 with an `Allow` header; a path that does not exist is 404; a "
                f"body over {MAX_BODY_BYTES} bytes is 413. Times are milliseconds since the epoch."
            ),
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [{"name": tag, "description": text} for _, tag, text in TAGS if text],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "[server] admin_token; needed by mutating routes when it is set",
                }
            },
        },
    }


# -- docs page --------------------------------------------------------------------------------------

WEB_DIR = dashboard.WEB_DIR
_TYPES = {".js": "text/javascript", ".css": "text/css"}
ASSETS = {
    "init.js": (WEB_DIR / "api-docs" / "init.js", "text/javascript"),
    **{name: (WEB_DIR / "vendor" / "swagger-ui" / name, _TYPES[Path(name).suffix]) for name in VENDORED},
}
PAGE = (WEB_DIR / "api-docs" / "index.html", "text/html")


class _Asset:
    """A file kept in memory with its gzip form (the Swagger bundle is 1.7 MB raw, 0.45 MB gzipped),
    served with an ETag so browsers revalidate cheaply."""

    __slots__ = ("body", "content_type", "etag", "gzipped")

    def __init__(self, path: Path, content_type: str) -> None:
        self.body = path.read_bytes()
        self.gzipped: bytes | None = None
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:20] + '"'

    async def compress(self) -> bytes:
        """Gzip in slices, yielding between them: compressing the bundle in one go would hold the
        loop for ~0.2 s. Concurrent first requests may both compress; the result is the same."""
        if self.gzipped is None:
            packer = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip framing
            parts = []
            for start in range(0, len(self.body), GZIP_SLICE):
                parts.append(packer.compress(self.body[start : start + GZIP_SLICE]))
                await asyncio.sleep(0)
            parts.append(packer.flush())
            self.gzipped = b"".join(parts)
        return self.gzipped

    async def response(self, request: web.Request) -> web.Response:
        headers = {"ETag": self.etag, "Cache-Control": "no-cache", "Vary": "Accept-Encoding"}
        if request.headers.get("If-None-Match") == self.etag:
            return web.Response(status=304, headers=headers)
        body = self.body
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            body = await self.compress()
            headers["Content-Encoding"] = "gzip"
        response = web.Response(body=body, headers=headers)
        response.content_type = self.content_type
        if self.content_type.startswith("text/"):
            response.charset = "utf-8"
        return response


# Each slice is compressed without yielding: 64 KiB takes a few milliseconds.
GZIP_SLICE = 64 * 1024
_loaded: dict[str, _Asset] = {}  # at most len(ASSETS) + 1 entries: the files never change


def _asset(name: str) -> _Asset:
    asset = _loaded.get(name)
    if asset is None:
        path, content_type = PAGE if name == "" else ASSETS[name]
        asset = _loaded[name] = _Asset(path, content_type)
    return asset


def add_routes(app: web.Application) -> None:
    cache: dict[str, bytes] = {}

    async def openapi_json(request: web.Request) -> web.Response:
        # Built on first use, when every module has registered its routes; the app cannot change after.
        body = cache.get("doc")
        if body is None:
            body = cache["doc"] = orjson.dumps(build(request.app))
        return web.Response(body=body, content_type=JSON)

    async def docs_page(request: web.Request) -> web.Response:
        return await _asset("").response(request)

    async def docs_asset(request: web.Request) -> web.Response:
        name = request.match_info["asset"]
        if name not in ASSETS:
            raise NotFound(f"no docs file {name[:80]!r}")
        return await _asset(name).response(request)

    app.router.add_get("/api/openapi.json", openapi_json)
    app.router.add_get("/api/docs", docs_page)
    app.router.add_get("/api/docs/{asset}", docs_asset)
