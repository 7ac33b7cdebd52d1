"""Validation of untrusted input (REST bodies now, peer payloads later). Pure functions, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from p2pdiff.errors import BadRequest, PayloadTooLarge

ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
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


def check_room_id(value: Any) -> str | None:
    """Return a problem description, or None when ``value`` is a valid room id."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        return "must be 1..128 characters of A-Z a-z 0-9 _ . : -"
    return None


def room_id(value: Any) -> str:
    problem = check_room_id(value)
    if problem:
        raise BadRequest(f"roomId {problem}", code="invalid_room_id")
    return value


def task_id(value: Any) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise BadRequest("id must be 1..128 characters of A-Z a-z 0-9 _ . : -", code="invalid_task_id")
    return value


@dataclass(slots=True)
class NewTask:
    """A validated task submission."""

    id: str | None
    prompt: str
    options: dict[str, Any]
    extra: dict[str, Any]
    created_at: int | None


def new_task(body: Any) -> NewTask:
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object", code="invalid_body")
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
    created_at = body.get("createdAt")
    # The app sends Date.now(); anything else is ignored and the server's clock is used.
    if not (isinstance(created_at, int) and not isinstance(created_at, bool) and created_at >= 0):
        created_at = None
    extra = {k: v for k, v in body.items() if k not in SERVER_OWNED}
    return NewTask(id=tid, prompt=prompt, options=options, extra=extra, created_at=created_at)


@dataclass(slots=True)
class TaskUpdate:
    """A validated PATCH body."""

    action: str
    worker: str | None
    progress: float | None
    result: Any
    error: str | None


PATCH_ACTIONS = ("claim", "progress", "complete", "fail", "requeue")


def task_update(body: Any) -> TaskUpdate:
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object", code="invalid_body")
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
    return TaskUpdate(action=action, worker=worker, progress=progress, result=result, error=error)


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


def limit(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}", code="invalid_limit")
    return int(text)
