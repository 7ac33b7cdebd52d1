"""Validation of untrusted input (REST bodies; rooms/protocol.py builds on it for peer payloads).
Pure functions, no I/O."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import orjson

from p2pdiff.errors import BadRequest, PayloadTooLarge

ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
ID_PROBLEM = "must be 1..128 characters of A-Z a-z 0-9 _ . : -"
MAX_PROMPT_CHARS = 4000
MAX_OPTIONS_BYTES = 16 * 1024
MAX_RESULT_BYTES = 16 * 1024
MAX_ERROR_CHARS = 2000
MAX_WORKER_CHARS = 128
# Keys the server owns: a client sending them does not get to set them.
SERVER_OWNED = frozenset(
    {
        "id", "roomId", "prompt", "options", "status", "position", "updatedAt", "claimedBy", "claimedAt",
        "progress", "result", "error", "requeues", "queuedAt", "finishedAt", "createdAt",
    }
)  # fmt: skip


# What any value a client or peer gives may hold (README "Rules worth knowing"). Values are stored as
# JSON text in SQLite, served back by orjson inside a few levels of envelope (a listing, an event, a
# peer message) and parsed by browsers. orjson refuses nesting past 254 levels, integers outside
# -2^63..2^64-1 and unpaired surrogates, and writes NaN and Infinity as null. (Reading JSON, orjson
# makes longer integers floats, as browsers do.) Within these limits a value comes back as given.
MAX_JSON_DEPTH = 32  # arrays/objects inside one given value
# What the queue stores may wrap given values in a few levels of its own (a result's chunks), and
# answers add their envelopes: still far below orjson's 254.
MAX_STORED_DEPTH = 2 * MAX_JSON_DEPTH
MIN_INT, MAX_INT = -(2**63), 2**64 - 1
MAX_SAFE_INTEGER = 2**53 - 1  # JS Number.MAX_SAFE_INTEGER: the largest Date.now() a browser can send
_TOO_DEEP = "nests arrays/objects too deep"


def _valid_text(text: str) -> bool:
    # Only a lone surrogate (JSON's "\ud800", which Python parsers let through) makes encoding fail.
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _scalar_problem(value: Any) -> str | None:
    kind = type(value)
    if kind is str:
        return None if _valid_text(value) else "holds a string with an unpaired UTF-16 surrogate"
    if kind is int:
        return None if MIN_INT <= value <= MAX_INT else "holds an integer outside -2^63..2^64-1"
    if kind is float:
        return None if math.isfinite(value) else "holds a number that is not finite"
    if value is None or kind is bool:
        return None
    return f"holds a {kind.__name__}, which is not JSON"


def _problem(value: Any, levels_left: int) -> str | None:
    kind = type(value)
    if kind is dict:
        for key in value:
            if type(key) is not str or not _valid_text(key):
                return "holds a key that is not a valid string"
        items: Iterable[Any] = value.values()
    elif kind is list:
        items = value
    else:
        return _scalar_problem(value)
    if levels_left <= 0:
        return _TOO_DEEP
    for item in items:
        # The common cases inline, without a call: this loop is the cost of checking a large body.
        kind = type(item)
        if kind is str:
            if item.isascii():
                continue
        elif kind is int:
            if MIN_INT <= item <= MAX_INT:
                continue
        elif kind is dict or kind is list:
            if not item:
                continue
            problem = _problem(item, levels_left - 1)
            if problem is None:
                continue
            return problem
        problem = _scalar_problem(item)
        if problem is not None:
            return problem
    return None


def json_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``value`` would not come back intact from the store and every JSON answer, or None.

    The one check for every value a client or peer gives (REST bodies, peer payloads), and again,
    with ``MAX_STORED_DEPTH``, for what the queue stores."""
    problem = _problem(value, max_depth)
    return f"{_TOO_DEEP} (more than {max_depth} levels)" if problem is _TOO_DEEP else problem


def check_fields(fields: Mapping[str, Any], max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise ``invalid_value`` naming the first field whose value :func:`json_problem` refuses."""
    for name, value in fields.items():
        if type(name) is not str or not _valid_text(name):
            raise BadRequest("a field name is not a valid string", code="invalid_value")
        problem = json_problem(value, max_depth)
        if problem is not None:
            raise BadRequest(f"field {name[:40]!r} {problem}", code="invalid_value")


def is_id(value: object) -> TypeGuard[str]:
    """True when ``value`` is a valid task or room id (ID_RE)."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def check_room_id(value: Any) -> str | None:
    """Return a problem description, or None when ``value`` is a valid room id."""
    return None if is_id(value) else ID_PROBLEM


def room_id(value: Any) -> str:
    if not is_id(value):
        raise BadRequest(f"roomId {ID_PROBLEM}", code="invalid_room_id")
    return value


def task_id(value: Any) -> str:
    if not is_id(value):
        raise BadRequest(f"id {ID_PROBLEM}", code="invalid_task_id")
    return value


@dataclass(slots=True)
class NewTask:
    """A validated task submission."""

    id: str | None
    prompt: str
    options: dict[str, Any]
    extra: dict[str, Any]
    created_at: int | None
    # new_task() checked every value already: the queue's own check need not walk them again.
    checked: bool = field(default=False, compare=False)


def new_task(body: Any) -> NewTask:
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object", code="invalid_body")
    check_fields(body)  # every field is stored: the server-owned ones as well as the extra ones
    tid = body.get("id")
    if tid is not None:
        tid = task_id(tid)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("prompt must be a non-empty string", code="invalid_prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadRequest(f"prompt must be at most {MAX_PROMPT_CHARS} characters", code="invalid_prompt")
    options = body.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise BadRequest("options must be a JSON object", code="invalid_options")
    if len(orjson.dumps(options)) > MAX_OPTIONS_BYTES:
        raise PayloadTooLarge(f"options must serialize to at most {MAX_OPTIONS_BYTES} bytes")
    created_at = _created_at(body.get("createdAt"))
    extra = {k: v for k, v in body.items() if k not in SERVER_OWNED}
    return NewTask(id=tid, prompt=prompt, options=options, extra=extra, created_at=created_at, checked=True)


def _created_at(value: Any) -> int | None:
    # The app sends Date.now(); without one the server's clock is used. Stored in an INTEGER column.
    if value is not None and (type(value) is not int or not 0 <= value <= MAX_SAFE_INTEGER):
        raise BadRequest(
            f"createdAt must be an integer from 0 to {MAX_SAFE_INTEGER} (milliseconds, like Date.now())",
            code="invalid_created_at",
        )
    return value


def check_new_task(new: NewTask) -> None:
    """The queue's check of what it stores, for a submission that did not come through new_task()
    (defence in depth: one unstorable value would fail every later listing of its room)."""
    if not new.checked:
        _created_at(new.created_at)
        check_fields({"options": new.options, **new.extra}, MAX_STORED_DEPTH)


@dataclass(slots=True)
class TaskUpdate:
    """A validated PATCH body."""

    action: str
    worker: str | None
    progress: float | None
    result: Any
    error: str | None
    # task_update() checked every value already; an update the helper builds from a peer's
    # messages (a result of several chunks) is checked by the queue.
    checked: bool = field(default=False, compare=False)


def check_update(update: TaskUpdate) -> None:
    """The queue's check of what it stores of an update (see check_new_task)."""
    if not update.checked:
        stored = {"worker": update.worker, "result": update.result, "error": update.error}
        check_fields(stored, MAX_STORED_DEPTH)


PATCH_ACTIONS = ("claim", "progress", "complete", "fail", "requeue")


def task_update(body: Any) -> TaskUpdate:
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object", code="invalid_body")
    check_fields(body)
    action = body.get("action")
    if action not in PATCH_ACTIONS:
        raise BadRequest(f"action must be one of {', '.join(PATCH_ACTIONS)}", code="invalid_action")
    worker = body.get("worker")
    if worker is not None and (not isinstance(worker, str) or not 0 < len(worker) <= MAX_WORKER_CHARS):
        raise BadRequest(
            f"worker must be a string of 1..{MAX_WORKER_CHARS} characters", code="invalid_worker"
        )
    if action == "claim" and worker is None:
        raise BadRequest("claim needs a worker", code="invalid_worker")
    progress = body.get("progress")
    if progress is not None:
        if isinstance(progress, bool) or not isinstance(progress, int | float) or not 0 <= progress <= 1:
            raise BadRequest("progress must be a number from 0 to 1", code="invalid_progress")
        progress = float(progress)
    elif action == "progress":
        raise BadRequest("progress action needs a progress value", code="invalid_progress")
    result = body.get("result")
    if result is not None and len(orjson.dumps(result)) > MAX_RESULT_BYTES:
        raise PayloadTooLarge(f"result must serialize to at most {MAX_RESULT_BYTES} bytes")
    error = body.get("error")
    if error is not None and (not isinstance(error, str) or len(error) > MAX_ERROR_CHARS):
        raise BadRequest(
            f"error must be a string of at most {MAX_ERROR_CHARS} characters", code="invalid_error"
        )
    return TaskUpdate(
        action=action, worker=worker, progress=progress, result=result, error=error, checked=True
    )


STATUSES = ("pending", "processing", "complete", "failed", "cancelled")


def status_filter(text: str | None) -> frozenset[str] | None:
    if text is None or text == "":
        return None
    wanted = frozenset(part.strip() for part in text.split(","))
    unknown = wanted - set(STATUSES)
    if unknown:
        raise BadRequest(
            f"status must be one or more of {', '.join(STATUSES)} (comma-separated)", code="invalid_status"
        )
    return wanted


MAX_LIMIT = 10000


def ascii_int(text: str, max_digits: int) -> int | None:
    """``text`` as an integer if it is 1..``max_digits`` ASCII digits, else None. (``str.isdigit``
    and ``int`` also take superscripts and other scripts' digits, and ``int`` signs, spaces and ``_``.)"""
    if 0 < len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None


def limit(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    value = ascii_int(text, 9)  # a few leading zeros are fine; thousands of digits need no int()
    if value is None or not 1 <= value <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}", code="invalid_limit")
    return value
