"""p2pdiff.rooms.protocol: the app's payloads, checked (every malformed shape has its reason)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from p2pdiff.rooms import protocol as rp
from p2pdiff.tasks.images import sniff_image
from p2pdiff.tasks.model import Task

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 32
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 32


def app_task(**overrides: Any) -> dict[str, Any]:
    """A task exactly as the browser app creates it."""
    task = {
        "id": "task_1732550000000_k3j9x2m1q",
        "type": "generate",
        "prompt": "a lighthouse in a storm",
        "negativePrompt": "blurry",
        "options": {"model": "prx-1024", "steps": 20, "width": 1024, "height": 1024},
        "createdAt": 1732550000000,
        "createdBy": "Xq3pEv9aTz1rBc7dLm2s",
        "status": "pending",
    }
    task.update(overrides)
    return {k: v for k, v in task.items() if v is not ...}


def reason(call: Any, *args: Any) -> str:
    with pytest.raises(rp.ProtocolError) as info:
        call(*args)
    return info.value.reason


# -- capabilities -------------------------------------------------------------------------------


def test_capabilities_of_a_gpu_browser() -> None:
    caps = rp.parse_capabilities(
        {"hasGPU": True, "gpuName": "Apple M2", "memory": 8, "cores": 8, "gpuArchitecture": "metal-3"}
    )
    assert caps.has_gpu and caps.gpu_name == "Apple M2" and caps.cores == 8
    assert caps.to_json() == {
        "hasGPU": True,
        "gpuName": "Apple M2",
        "memory": 8,
        "cores": 8,
        "gpuArchitecture": "metal-3",
    }
    # gpuArchitecture is optional, nulls are fine (a browser without WebGPU says so)
    assert rp.parse_capabilities({"hasGPU": False, "gpuName": None, "memory": None, "cores": 4}).cores == 4


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ("hasGPU", rp.NOT_OBJECT),
        ([True], rp.NOT_OBJECT),
        ({}, rp.MISSING_FIELD),
        ({"hasGPU": "yes"}, rp.WRONG_TYPE),
        ({"hasGPU": 1}, rp.WRONG_TYPE),
        ({"hasGPU": True, "memory": -1}, rp.WRONG_TYPE),
        ({"hasGPU": True, "memory": "8GB"}, rp.WRONG_TYPE),
        ({"hasGPU": True, "cores": 2.5}, rp.WRONG_TYPE),
        ({"hasGPU": True, "cores": 10**9}, rp.WRONG_TYPE),
        ({"hasGPU": True, "gpuName": {"x": 1}}, rp.WRONG_TYPE),
        ({"hasGPU": True, "gpuName": "x" * 10_000}, rp.TOO_LARGE),
        ({"hasGPU": True, "isServer": "true"}, rp.WRONG_TYPE),
    ],
)
def test_malformed_capabilities(payload: Any, why: str) -> None:
    assert reason(rp.parse_capabilities, payload) == why


def test_helper_announces_no_gpu_but_a_queue() -> None:
    caps = rp.helper_capabilities()
    assert caps["hasGPU"] is False and caps["isServer"] is True and caps["canQueue"] is True
    assert {"gpuName", "memory", "cores"} <= set(caps)
    assert rp.parse_capabilities(caps).is_server  # and it parses as what it is


# -- queue --------------------------------------------------------------------------------------


def test_queue_message_from_the_app() -> None:
    message = rp.parse_queue({"tasks": [app_task(), app_task(id="task_2_b", status="processing")]})
    assert message.rejected == []
    first, second = message.tasks
    assert first.new.id == "task_1732550000000_k3j9x2m1q" and first.status == "pending"
    assert first.new.prompt == "a lighthouse in a storm" and first.new.created_at == 1732550000000
    assert first.new.options["model"] == "prx-1024"
    # the app's own fields are kept with the task; the status is the queue's to set
    assert first.new.extra == {
        "type": "generate",
        "negativePrompt": "blurry",
        "createdBy": "Xq3pEv9aTz1rBc7dLm2s",
    }
    assert second.status == "processing" and second.worker is None


def test_queue_names_the_worker_when_the_app_does() -> None:
    (task,) = rp.parse_queue({"tasks": [app_task(status="processing", workerId="peer-w")]}).tasks
    assert task.worker == "peer-w"


@pytest.mark.parametrize(
    ("task", "why"),
    [
        ("task_1", rp.NOT_OBJECT),
        (app_task(id=...), rp.MISSING_FIELD),
        (app_task(id=12), rp.WRONG_TYPE),
        (app_task(id="has space"), rp.BAD_ID),
        (app_task(id="../../etc/passwd"), rp.BAD_ID),
        (app_task(id="t" * 129), rp.TOO_LARGE),
        (app_task(prompt=...), rp.MISSING_FIELD),
        (app_task(prompt=None), rp.MISSING_FIELD),
        (app_task(prompt=42), rp.WRONG_TYPE),
        (app_task(prompt="  "), rp.BAD_VALUE),
        (app_task(prompt="x" * 4001), rp.TOO_LARGE),
        (app_task(prompt="x" * 1_000_000), rp.TOO_LARGE),
        (app_task(options=[1, 2]), rp.WRONG_TYPE),
        (app_task(options={"blob": "x" * 20_000}), rp.TOO_LARGE),
        (app_task(status=3), rp.WRONG_TYPE),
        (app_task(status="exploded"), rp.BAD_VALUE),
        (app_task(createdBy=["me"]), rp.WRONG_TYPE),
        (app_task(createdBy="x" * 500), rp.WRONG_TYPE),
        (app_task(negativePrompt="x" * 20_000), rp.TOO_LARGE),
    ],
)
def test_malformed_tasks_are_skipped_with_their_reason(task: Any, why: str) -> None:
    message = rp.parse_queue({"tasks": [task, app_task(id="good_one")]})
    assert message.rejected == [why]
    assert [t.new.id for t in message.tasks] == ["good_one"]  # the rest of the message is used


@pytest.mark.parametrize(
    ("payload", "why"),
    [(None, rp.NOT_OBJECT), ("tasks", rp.NOT_OBJECT), ({}, rp.MISSING_FIELD), ({"tasks": {}}, rp.WRONG_TYPE)],
)
def test_malformed_queue_envelopes(payload: Any, why: str) -> None:
    assert reason(rp.parse_queue, payload) == why


def test_queue_with_too_many_tasks_uses_the_first_ones() -> None:
    tasks = [app_task(id=f"t{i}") for i in range(rp.MAX_TASKS_IN + 5)]
    message = rp.parse_queue({"tasks": tasks})
    assert message.rejected == [rp.TOO_MANY_TASKS]
    assert len(message.tasks) == rp.MAX_TASKS_IN


def test_status_aliases() -> None:
    (task,) = rp.parse_queue({"tasks": [app_task(status="completed")]}).tasks
    assert task.status == "complete"


# -- progress, result, chunk ---------------------------------------------------------------------


def test_progress_from_the_app() -> None:
    msg = rp.parse_progress({"taskId": "t1", "chunkId": "t1_chunk_0", "progress": 0.25, "workerId": "w"})
    assert msg == rp.Progress("t1", "t1_chunk_0", 0.25, "w")
    # numeric chunk ids become strings; integers 0 and 1 are valid progress
    assert rp.parse_progress({"taskId": "t1", "chunkId": 3, "progress": 1}).chunk_id == "3"


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"\x00", rp.NOT_OBJECT),
        ({"progress": 0.5}, rp.MISSING_FIELD),
        ({"taskId": "t1"}, rp.MISSING_FIELD),
        ({"taskId": 7, "progress": 0.5}, rp.WRONG_TYPE),
        ({"taskId": "t1", "progress": "50%"}, rp.WRONG_TYPE),
        ({"taskId": "t1", "progress": True}, rp.WRONG_TYPE),
        ({"taskId": "t1", "progress": 1.5}, rp.BAD_VALUE),
        ({"taskId": "t1", "progress": -0.1}, rp.BAD_VALUE),
        ({"taskId": "t1", "progress": 0.5, "chunkId": {"a": 1}}, rp.WRONG_TYPE),
        ({"taskId": "t1", "progress": 0.5, "workerId": "w" * 1000}, rp.TOO_LARGE),
        ({"taskId": "x" * 100_000, "progress": 0.5}, rp.TOO_LARGE),
    ],
)
def test_malformed_progress(payload: Any, why: str) -> None:
    assert reason(rp.parse_progress, payload) == why


def test_result_from_the_app() -> None:
    msg = rp.parse_result(
        {
            "taskId": "t1",
            "chunkId": "c0",
            "workerId": "w",
            "data": "data:image/png;base64,AA==",
            "status": "complete",
        }
    )
    assert msg.status == "complete" and msg.data.startswith("data:")
    failed = rp.parse_result({"taskId": "t1", "status": "error", "error": {"oom": True}})
    assert failed.status == "failed" and failed.error == '{"oom":true}'


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ([], rp.NOT_OBJECT),
        ({"status": "complete"}, rp.MISSING_FIELD),
        ({"taskId": "t1", "status": 1}, rp.WRONG_TYPE),
        ({"taskId": "t1", "status": "maybe"}, rp.BAD_VALUE),
        ({"taskId": "t1", "chunkId": 1.5}, rp.WRONG_TYPE),
    ],
)
def test_malformed_results(payload: Any, why: str) -> None:
    assert reason(rp.parse_result, payload) == why


def test_chunk_needs_bytes_and_metadata() -> None:
    data, meta = rp.parse_chunk(bytearray(PNG), {"taskId": "t1", "chunkId": "t1_chunk_0"})
    assert data == PNG and meta == rp.ChunkMeta("t1", "t1_chunk_0")
    assert reason(rp.parse_chunk, "text", {"taskId": "t1"}) == rp.WRONG_TYPE
    assert reason(rp.parse_chunk, {"json": 1}, {"taskId": "t1"}) == rp.WRONG_TYPE
    assert reason(rp.parse_chunk, PNG, None) == rp.MISSING_FIELD
    assert reason(rp.parse_chunk, PNG, "t1") == rp.NOT_OBJECT
    assert reason(rp.parse_chunk, PNG, {"chunkId": "c"}) == rp.MISSING_FIELD


# -- images -------------------------------------------------------------------------------------


def test_sniff_by_magic_bytes() -> None:
    assert sniff_image(PNG) == "image/png"
    assert sniff_image(JPEG) == "image/jpeg"
    assert sniff_image(WEBP) == "image/webp"
    assert sniff_image(b"<svg xmlns=...>") is None
    assert sniff_image(b"RIFF\x00\x00\x00\x00WAVE") is None
    assert sniff_image(b"") is None


def test_data_urls() -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert rp.is_data_url(url) and not rp.is_data_url("https://x") and not rp.is_data_url(None)
    assert rp.decode_data_url(url, 1000) == PNG
    # parameters before ;base64 are allowed, the declared type is not trusted (the bytes are sniffed)
    assert (
        rp.decode_data_url("data:image/jpeg;charset=x;base64," + base64.b64encode(PNG).decode(), 100) == PNG
    )
    assert reason(rp.decode_data_url, url, 10) == rp.TOO_LARGE
    assert reason(rp.decode_data_url, "data:," + "x" * 10, 1000) == rp.BAD_DATA_URL  # not base64
    assert reason(rp.decode_data_url, "data:image/png;base64,!!!!", 1000) == rp.BAD_DATA_URL
    assert reason(rp.decode_data_url, "data:image/png;base64," + "A" * 10_000_000, 1000) == rp.TOO_LARGE


def test_small_data_is_kept_big_data_is_noted() -> None:
    assert rp.small_data({"latent": [1, 2]}) == {"latent": [1, 2]}
    assert rp.small_data("x" * 100_000) == {"omitted": rp.TOO_LARGE, "bytes": 100_002}


# -- what the helper sends ----------------------------------------------------------------------


def task(**kw: Any) -> Task:
    defaults: dict[str, Any] = dict(
        room_id="r",
        id="t1",
        seq=1,
        prompt="p",
        options={"model": "prx-1024", "steps": 20},
        extra={},
        status="pending",
        created_at=1,
        queued_at=1,
        updated_at=1,
    )
    defaults.update(kw)
    return Task(**defaults)


def test_app_task_shape() -> None:
    shaped = rp.app_task(task(extra={"negativePrompt": "n", "type": "generate"}), "helper-id")
    assert shaped == {
        "type": "generate",
        "negativePrompt": "n",
        "id": "t1",
        "prompt": "p",
        "options": {"model": "prx-1024", "steps": 20},
        "createdAt": 1,
        "createdBy": "helper-id",
        "status": "pending",
    }
    assert rp.app_task(task(extra={"createdBy": "browser"}), "helper-id")["createdBy"] == "browser"


def test_one_chunk_covers_every_step_unless_asked() -> None:
    (chunk,) = rp.plan_chunks(task())
    assert (chunk.start_step, chunk.end_step, chunk.worker_index) == (0, 20, 0)
    message = rp.task_message(task(), chunk, "helper-id")
    assert message["type"] == "process_chunk" and message["id"] == "t1"
    assert message["chunk"] == {
        "id": "t1_chunk_0",
        "taskId": "t1",
        "startStep": 0,
        "endStep": 20,
        "workerIndex": 0,
        "status": "processing",
    }
    split = rp.plan_chunks(task(options={"steps": 10, "chunks": 3}))
    assert [(c.start_step, c.end_step) for c in split] == [(0, 3), (3, 7), (7, 10)]
    assert len(rp.plan_chunks(task(options={"steps": 2, "chunks": 50}))) == 2  # at most one step each
    assert len(rp.plan_chunks(task(options={"steps": 500, "chunks": 50}))) == rp.MAX_CHUNKS
    assert rp.plan_chunks(task(options={"steps": "many"}))[0].end_step == rp.DEFAULT_STEPS
