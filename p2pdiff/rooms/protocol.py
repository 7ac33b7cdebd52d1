"""The browser app's room protocol: what its peers send, checked, and what the helper sends back.

The browser app (P2P WebGPU Diffusion) talks over six Trystero actions. Their names and payload
shapes are the app's and must not change here (see ``docs/protocol.md``):

==============  ===================================================================================
capabilities    ``{hasGPU, gpuName, memory, cores, gpuArchitecture?}`` (the helper adds
                ``isServer, canQueue``)
queue           ``{tasks: [{id, prompt, status, createdBy, createdAt, ...}]}``: how tasks spread
task            ``{...task, type: 'process_chunk', chunk: {id, taskId, startStep, endStep,
                workerIndex, status}}``: work handed to a GPU peer
progress        ``{taskId, chunkId, progress: 0..1, workerId}``
result          ``{taskId, chunkId, workerId, data, status: 'complete'}`` (``data`` may be a
                ``data:image/...;base64,`` URL)
chunk           binary image bytes, metadata ``{taskId, chunkId}``
==============  ===================================================================================

Everything here is pure (no I/O, no queue, no network): parsers turn an untrusted payload into a
small dataclass or raise :class:`ProtocolError` with a short, stable ``reason`` that the room
counts (``/api/stats`` → ``rooms[id].protocol.dropped["<action>.<reason>"]``); builders turn queue
tasks into the app's shapes. Every string, list and number from a peer is bounded here, so
nothing a peer sends can make the helper hold more than these caps.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from p2pdiff.errors import AppError
from p2pdiff.tasks import images, validate

if TYPE_CHECKING:
    from p2pdiff.tasks.model import Task

CAPABILITIES, QUEUE, TASK, PROGRESS, RESULT, CHUNK = (
    "capabilities",
    "queue",
    "task",
    "progress",
    "result",
    "chunk",
)
ACTIONS = (CAPABILITIES, QUEUE, TASK, PROGRESS, RESULT, CHUNK)

# Why a message (or one task of a ``queue`` message) was ignored. Stable: they are stats keys.
NOT_OBJECT = "not_object"  # the payload (or a task in it) is not a JSON object
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_VALUE = "bad_value"  # right type, impossible value (progress 7, unknown status, ...)
BAD_ID = "bad_id"  # a task id that is not 1..128 of A-Za-z0-9_.:-
TOO_LARGE = images.TOO_LARGE  # a string, list or result over its cap
TOO_MANY_TASKS = "too_many_tasks"  # a queue message listing more than MAX_TASKS_IN (the rest is used)
UNKNOWN_TASK = "unknown_task"  # no such task in the room's queue
NOT_HANDED_OUT = "not_handed_out"  # progress/result/bytes for a task nobody was given
WORKER_MISMATCH = "worker_mismatch"  # the task is another worker's
LATE = "late"  # from a worker the task was taken away from (it left, went silent, or was cancelled)
DUPLICATE = "duplicate"  # the same worker reporting a finished task or chunk again
CONFLICT = "conflict"  # a known task id announced with another prompt or options
INVALID_TRANSITION = "invalid_transition"  # the state machine refused (e.g. progress on a finished task)
NOT_AN_IMAGE = images.NOT_AN_IMAGE  # result bytes that are not PNG, JPEG or WebP
BAD_DATA_URL = "bad_data_url"
NOT_A_WORKER = "not_a_worker"  # a `task` sent to the helper, which has no GPU
RATE_LIMITED = "rate_limited"  # past the peer's message or new-task budget (rooms/agent.py)
NOT_A_PEER = "not_a_peer"  # capabilities from a peer no longer in the room (or past the peer cap)
STORE_ERROR = "store_error"  # the queue could not save the change (it is not applied)
INTERNAL_ERROR = "internal_error"  # a bug; logged with its traceback

# Caps on what one message may carry. The queue's REST rules (validate.py) apply on top.
MAX_TASKS_IN = 500  # tasks read from one `queue` message
MAX_TASKS_OUT = 256  # tasks the helper lists in one `queue` message it sends
MAX_NAME_CHARS = 128  # gpuName, gpuArchitecture, worker and chunk ids
MAX_EXTRA_BYTES = 16 * 1024  # a peer task's other fields (type, negativePrompt, ...) as JSON
MAX_RESULT_DATA_BYTES = validate.MAX_RESULT_BYTES  # non-image `result.data` kept in the task
MAX_CORES = 65536
MAX_STEPS = 10000
DEFAULT_STEPS = 20  # when a task's options carry no usable `steps`
MAX_CHUNKS = 8  # a task may ask to be split into at most this many chunks (`options.chunks`)
PEER_STATUSES = ("pending", "processing", "complete", "failed", "cancelled")
# Words apps use for the same states; anything else is a bad value.
STATUS_ALIASES = {"queued": "pending", "assigned": "processing", "completed": "complete", "error": "failed"}

_DATA_URL_RE = re.compile(r"data:([A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+)?((?:;[A-Za-z0-9=._+-]+)*);base64,")


class ProtocolError(Exception):
    """A payload the helper ignores; ``reason`` is one of the constants above."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# -- small checks ---------------------------------------------------------------------------------


def _object(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise ProtocolError(NOT_OBJECT, f"expected a JSON object, got {type(payload).__name__}")
    return payload


def _task_id(data: dict[str, Any], key: str = "taskId") -> str:
    value = data.get(key)
    if value is None:
        raise ProtocolError(MISSING_FIELD, key)
    if not isinstance(value, str):
        raise ProtocolError(WRONG_TYPE, f"{key} must be a string")
    if not validate.ID_RE.fullmatch(value):
        raise ProtocolError(TOO_LARGE if len(value) > 128 else BAD_ID, key)
    return value


_V = TypeVar("_V")


def _storable(value: _V, key: str) -> _V:
    """``value``, if the store and every JSON answer carry it intact (validate.json_problem)."""
    problem = validate.json_problem(value)
    if problem is not None:
        raise ProtocolError(BAD_VALUE, f"{key} {problem}")
    return value


def _name(data: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    """An optional short string (ids, names); ints are accepted for ids and made strings."""
    value = data.get(key)
    if value is None:
        if required:
            raise ProtocolError(MISSING_FIELD, key)
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ProtocolError(WRONG_TYPE, f"{key} must be a string")
    if len(value) > MAX_NAME_CHARS:
        raise ProtocolError(TOO_LARGE, f"{key} over {MAX_NAME_CHARS} characters")
    return _storable(value, key)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# -- capabilities -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a peer says it can do. Only GPU peers (``has_gpu``) are handed work."""

    has_gpu: bool
    gpu_name: str | None = None
    memory: float | None = None
    cores: int | None = None
    gpu_architecture: str | None = None
    is_server: bool = False
    can_queue: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "hasGPU": self.has_gpu,
            "gpuName": self.gpu_name,
            "memory": self.memory,
            "cores": self.cores,
        }
        if self.gpu_architecture is not None:
            data["gpuArchitecture"] = self.gpu_architecture
        if self.is_server:
            data["isServer"] = True
        if self.can_queue:
            data["canQueue"] = True
        return data


def parse_capabilities(payload: Any) -> Capabilities:
    data = _object(payload)
    has_gpu = data.get("hasGPU")
    if has_gpu is None:
        raise ProtocolError(MISSING_FIELD, "hasGPU")
    if not isinstance(has_gpu, bool):
        raise ProtocolError(WRONG_TYPE, "hasGPU must be true or false")
    memory = data.get("memory")
    if memory is not None and (not _number(memory) or memory < 0):
        raise ProtocolError(WRONG_TYPE, "memory must be a number >= 0")
    _storable(memory, "memory")
    cores = data.get("cores")
    if cores is not None and (
        not isinstance(cores, int) or isinstance(cores, bool) or not 0 <= cores <= MAX_CORES
    ):
        raise ProtocolError(WRONG_TYPE, f"cores must be an integer 0..{MAX_CORES}")
    flags = {}
    for key in ("isServer", "canQueue"):
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise ProtocolError(WRONG_TYPE, f"{key} must be true or false")
        flags[key] = value
    return Capabilities(
        has_gpu=has_gpu,
        gpu_name=_name(data, "gpuName"),
        memory=memory,
        cores=cores,
        gpu_architecture=_name(data, "gpuArchitecture"),
        is_server=flags["isServer"],
        can_queue=flags["canQueue"],
    )


def _memory_gib() -> float | None:
    """This machine's RAM in GiB, like a browser's navigator.deviceMemory (None if unknown)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def helper_capabilities() -> dict[str, Any]:
    """What the helper announces: no GPU (it never takes work), but it keeps a durable queue."""
    return Capabilities(
        has_gpu=False,
        gpu_name=None,
        memory=_memory_gib(),
        cores=os.cpu_count(),
        is_server=True,
        can_queue=True,
    ).to_json()


# -- queue ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class PeerTask:
    """One task of a peer's ``queue`` message, as a queue submission plus the state the peer saw."""

    new: validate.NewTask
    status: str
    worker: str | None  # the worker the peer names for a processing task, if it names one


@dataclass(slots=True)
class QueueMessage:
    tasks: list[PeerTask]
    # One reason per task that was skipped (the others are still used).
    rejected: list[str]


def parse_peer_task(item: Any) -> PeerTask:
    data = _object(item)
    if "id" not in data:
        raise ProtocolError(MISSING_FIELD, "id")  # a peer task must name itself: others refer to it
    _task_id(data, "id")
    status = data.get("status", "pending")
    if not isinstance(status, str):
        raise ProtocolError(WRONG_TYPE, "status must be a string")
    status = STATUS_ALIASES.get(status, status)
    if status not in PEER_STATUSES:
        raise ProtocolError(BAD_VALUE, f"unknown status {status[:40]!r}")
    created_by = data.get("createdBy")
    if created_by is not None and (not isinstance(created_by, str) or len(created_by) > MAX_NAME_CHARS):
        raise ProtocolError(WRONG_TYPE, f"createdBy must be a string of at most {MAX_NAME_CHARS} characters")
    # The app's worker fields, if any: who a processing task is with.
    worker = None
    for key in ("workerId", "assignedTo", "claimedBy"):
        if isinstance(data.get(key), str) and 0 < len(data[key]) <= MAX_NAME_CHARS:
            worker = data[key]
            break
    try:
        new = validate.new_task(data)
    except AppError as exc:
        # REST's rules; their codes map onto ours (e.g. invalid_prompt: missing, wrong type or huge).
        prompt = data.get("prompt")
        if exc.code == "invalid_prompt":
            if prompt is None:
                raise ProtocolError(MISSING_FIELD, "prompt") from None
            if not isinstance(prompt, str):
                raise ProtocolError(WRONG_TYPE, exc.message) from None
            raise ProtocolError(TOO_LARGE if prompt.strip() else BAD_VALUE, exc.message) from None
        if exc.status == 413:
            raise ProtocolError(TOO_LARGE, exc.message) from None
        if exc.code in ("invalid_value", "invalid_created_at"):
            raise ProtocolError(BAD_VALUE, exc.message) from None
        raise ProtocolError(WRONG_TYPE, exc.message) from None
    if len(orjson.dumps(new.extra)) > MAX_EXTRA_BYTES:
        raise ProtocolError(TOO_LARGE, f"task fields over {MAX_EXTRA_BYTES} bytes")
    return PeerTask(new=new, status=status, worker=worker)


def parse_queue(payload: Any) -> QueueMessage:
    data = _object(payload)
    tasks = data.get("tasks")
    if tasks is None:
        raise ProtocolError(MISSING_FIELD, "tasks")
    if not isinstance(tasks, list):
        raise ProtocolError(WRONG_TYPE, "tasks must be a list")
    rejected: list[str] = []
    if len(tasks) > MAX_TASKS_IN:
        rejected.append(TOO_MANY_TASKS)
        tasks = tasks[:MAX_TASKS_IN]
    parsed: list[PeerTask] = []
    for item in tasks:
        try:
            parsed.append(parse_peer_task(item))
        except ProtocolError as exc:
            rejected.append(exc.reason)
    return QueueMessage(tasks=parsed, rejected=rejected)


# -- progress, result, chunk ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    task_id: str
    chunk_id: str | None
    progress: float
    worker_id: str | None


def parse_progress(payload: Any) -> Progress:
    data = _object(payload)
    task_id = _task_id(data)
    progress = data.get("progress")
    if progress is None:
        raise ProtocolError(MISSING_FIELD, "progress")
    if not _number(progress):
        raise ProtocolError(WRONG_TYPE, "progress must be a number")
    if not 0 <= progress <= 1:
        raise ProtocolError(BAD_VALUE, "progress must be 0..1")
    return Progress(task_id, _name(data, "chunkId"), float(progress), _name(data, "workerId"))


@dataclass(frozen=True, slots=True)
class Result:
    task_id: str
    chunk_id: str | None
    worker_id: str | None
    status: str  # "complete" or "failed"
    data: Any  # as sent; may be a data URL (see decode_data_url)
    error: str | None


def parse_result(payload: Any) -> Result:
    data = _object(payload)
    task_id = _task_id(data)
    status = data.get("status", "complete")
    if not isinstance(status, str):
        raise ProtocolError(WRONG_TYPE, "status must be a string")
    status = STATUS_ALIASES.get(status, status)
    if status not in ("complete", "failed"):
        raise ProtocolError(BAD_VALUE, f"result status must be complete or failed, not {status[:40]!r}")
    error = _storable(data.get("error"), "error")
    if error is not None:
        if not isinstance(error, str):
            error = orjson.dumps(error)[: validate.MAX_ERROR_CHARS].decode(errors="replace")
        error = error[: validate.MAX_ERROR_CHARS]
    return Result(
        task_id=task_id,
        chunk_id=_name(data, "chunkId"),
        worker_id=_name(data, "workerId"),
        status=status,
        data=_storable(data.get("data"), "data"),
        error=error,
    )


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    task_id: str
    chunk_id: str | None


def parse_chunk(payload: Any, metadata: Any) -> tuple[bytes, ChunkMeta]:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ProtocolError(WRONG_TYPE, "chunk payload must be binary")
    if metadata is None:
        raise ProtocolError(MISSING_FIELD, "metadata {taskId, chunkId}")
    meta = _object(metadata)
    return bytes(payload), ChunkMeta(_task_id(meta), _name(meta, "chunkId"))


# -- data URLs (result images; which bytes are images: p2pdiff.tasks.images) -----------------------


def is_data_url(value: Any) -> bool:
    return isinstance(value, str) and value[:5].lower() == "data:"


def decode_data_url(text: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:<type>;base64,...`` URL (the app's ``canvas.toDataURL()``).

    The length is checked before decoding, so an oversized URL costs no second copy."""
    match = _DATA_URL_RE.match(text[:256])
    if match is None:
        raise ProtocolError(BAD_DATA_URL, "not a base64 data: URL")
    body = text[match.end() :]
    if len(body) > (max_bytes + 2) // 3 * 4 + 4:
        raise ProtocolError(TOO_LARGE, f"data URL over {max_bytes} bytes")
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(BAD_DATA_URL, "invalid base64") from None
    if len(data) > max_bytes:
        raise ProtocolError(TOO_LARGE, f"data URL over {max_bytes} bytes")
    return data


def small_data(value: Any) -> Any:
    """``result.data`` that is not an image, kept in the task if it is small (else a note)."""
    if value is None:
        return None
    size = len(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS))
    if size > MAX_RESULT_DATA_BYTES:
        return {"omitted": TOO_LARGE, "bytes": size}
    return value


# -- what the helper sends ------------------------------------------------------------------------


def app_task(task: Task, created_by: str) -> dict[str, Any]:
    """A queue task in the app's shape (``queue`` and ``task`` messages)."""
    data: dict[str, Any] = {"type": "generate", **task.extra}
    data.update(
        id=task.id,
        prompt=task.prompt,
        options=task.options,
        createdAt=task.created_at,
        createdBy=task.extra.get("createdBy") if isinstance(task.extra.get("createdBy"), str) else created_by,
        status=task.status,
    )
    return data


def queue_message(tasks: list[Task], created_by: str) -> dict[str, Any]:
    return {"tasks": [app_task(t, created_by) for t in tasks[:MAX_TASKS_OUT]]}


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """One piece of a task handed to one GPU peer: steps ``start_step`` (inclusive) to
    ``end_step`` (exclusive)."""

    id: str
    task_id: str
    start_step: int
    end_step: int
    worker_index: int


def _positive_int(value: Any, cap: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return min(value, cap)
    return None


def task_steps(task: Task) -> int:
    return _positive_int(task.options.get("steps"), MAX_STEPS) or DEFAULT_STEPS


def plan_chunks(task: Task) -> list[ChunkPlan]:
    """One chunk with every step, unless the task asks for more (``options.chunks`` or a
    top-level ``chunks``): then contiguous step ranges, at most MAX_CHUNKS and one step each."""
    steps = task_steps(task)
    wanted = _positive_int(task.options.get("chunks"), MAX_CHUNKS) or _positive_int(
        task.extra.get("chunks"), MAX_CHUNKS
    )
    count = min(wanted or 1, steps)
    bounds = [round(i * steps / count) for i in range(count + 1)]
    return [
        ChunkPlan(
            id=f"{task.id}_chunk_{i}",
            task_id=task.id,
            start_step=bounds[i],
            end_step=bounds[i + 1],
            worker_index=i,
        )
        for i in range(count)
    ]


def task_message(task: Task, chunk: ChunkPlan, created_by: str) -> dict[str, Any]:
    """The ``task`` message that hands ``chunk`` to a GPU peer."""
    data = app_task(task, created_by)
    data["status"] = "processing"
    data["type"] = "process_chunk"
    data["chunk"] = {
        "id": chunk.id,
        "taskId": chunk.task_id,
        "startStep": chunk.start_step,
        "endStep": chunk.end_step,
        "workerIndex": chunk.worker_index,
        "status": "processing",
    }
    return data
