"""A stored row of each table, as every backend writes and reads it (sqlite_store, pg_store).

Both backends keep the same columns with the same types (JSON as text, booleans as 0/1), so a row
is encoded once (``task_row``, ``room_row``) and decoded once, every value checked: damage is named
instead of failing somewhere later.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from p2pdiff.tasks.model import STATUSES, Room, Task

TASK_COLUMNS = (
    "room_id, id, seq, prompt, options, extra, status, created_at, queued_at, updated_at, "
    "claimed_by, claimed_at, finished_at, progress, result, error, requeues"
)
ROOM_COLUMNS = "room_id, generated, last_activity, helper_joined, helper_wire, helper_dispatch"


def task_row(task: Task) -> tuple[Any, ...]:
    """``task`` in TASK_COLUMNS order; serialized now, so a value orjson refuses fails the change
    that made it, not a later commit."""
    return (
        task.room_id,
        task.id,
        task.seq,
        task.prompt,
        orjson.dumps(task.options).decode(),
        orjson.dumps(task.extra).decode(),
        task.status,
        task.created_at,
        task.queued_at,
        task.updated_at,
        task.claimed_by,
        task.claimed_at,
        task.finished_at,
        task.progress,
        json_or_none(task.result),
        task.error,
        task.requeues,
    )


def room_row(room: Room) -> tuple[Any, ...]:
    """``room`` in ROOM_COLUMNS order."""
    return (
        room.id,
        room.generated,
        room.last_activity,
        int(room.helper_joined),
        room.helper_wire,
        None if room.helper_dispatch is None else int(room.helper_dispatch),
    )


def json_or_none(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


class BadRow(Exception):
    pass


def show(value: Any) -> str:
    """A short, one-line rendering of a stored value for messages."""
    if isinstance(value, bytes):
        return f"a {len(value)}-byte blob"
    if isinstance(value, str):
        text = orjson.dumps(value[:40]).decode()  # quoted, control characters escaped
        return text if len(value) <= 40 else text[:-1] + '..."'
    return repr(value)


def _need(ok: bool, column: str, value: Any, want: str) -> None:
    if not ok:
        raise BadRow(f"column {column} is {show(value)}, not {want}")


def _int(column: str, value: Any, *, null: bool = False) -> None:
    _need(type(value) is int or (null and value is None), column, value, "an integer")


def _text(column: str, value: Any, *, null: bool = False) -> None:
    _need(isinstance(value, str) or (null and value is None), column, value, "text")


def _json(column: str, value: Any, *, null: bool = False, obj: bool = False) -> Any:
    if null and value is None:
        return None
    _need(isinstance(value, str), column, value, "JSON text")
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadRow(f"column {column} is not valid JSON ({exc})") from None
    _need(not obj or isinstance(data, dict), column, value, "a JSON object")
    return data


def room_from_row(r: tuple[Any, ...]) -> Room:
    room_id, generated, last_activity, joined, wire, dispatch = r
    _text("room_id", room_id)
    _int("generated", generated)
    _int("last_activity", last_activity)
    _need(joined in (0, 1), "helper_joined", joined, "0 or 1")
    _text("helper_wire", wire, null=True)
    _need(dispatch in (None, 0, 1), "helper_dispatch", dispatch, "0, 1 or NULL")
    return Room(
        room_id, generated, last_activity, bool(joined), wire, None if dispatch is None else bool(dispatch)
    )


def task_from_row(r: tuple[Any, ...]) -> Task:
    (room_id, tid, seq, prompt, options, extra, status, created, queued, updated) = r[:10]
    (claimed_by, claimed_at, finished_at, progress, result, error, requeues) = r[10:]
    _text("room_id", room_id)
    _text("id", tid)
    _int("seq", seq)
    _text("prompt", prompt)
    _need(status in STATUSES, "status", status, f"one of {', '.join(STATUSES)}")
    for column, value in (("created_at", created), ("queued_at", queued), ("updated_at", updated)):
        _int(column, value)
    _text("claimed_by", claimed_by, null=True)
    _int("claimed_at", claimed_at, null=True)
    _int("finished_at", finished_at, null=True)
    _need(type(progress) in (int, float) and math.isfinite(progress), "progress", progress, "a number")
    _text("error", error, null=True)
    _int("requeues", requeues)
    return Task(
        room_id=room_id,
        id=tid,
        seq=seq,
        prompt=prompt,
        options=_json("options", options, obj=True),
        extra=_json("extra", extra, obj=True),
        status=status,
        created_at=created,
        queued_at=queued,
        updated_at=updated,
        claimed_by=claimed_by,
        claimed_at=claimed_at,
        finished_at=finished_at,
        progress=float(progress),
        result=_json("result", result, null=True),
        error=error,
        requeues=requeues,
    )


def counter_from_row(r: tuple[Any, ...]) -> tuple[str, int]:
    name, value = r
    _text("name", name)
    _int("value", value)
    return name, value


