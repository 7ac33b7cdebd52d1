"""Poison values (issue 12): whatever a client or peer gives is refused up front (a 4xx, or a counted
drop for a peer) or stored and served back intact, and nothing it sends can break a later answer.

The property tests feed one app many generated REST bodies or peer payloads (deep nesting, huge and
odd numbers, odd unicode) and after each one check: no 5xx, the room listing, /api/stats and an
/api/events replay still answer, every acknowledged task is listed as it was acknowledged, and the
store on disk holds exactly what memory holds (a refused task is never half-stored). The cases the
adversarial run reported are regression tests below them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from p2pdiff.appkeys import EVENTS, QUEUE
from p2pdiff.config import Config
from p2pdiff.errors import BadRequest
from p2pdiff.tasks import validate
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.sqlite_store import SqliteStore
from p2pdiff.tasks.validate import NewTask, TaskUpdate
from tests.app_room import Room, RoomFactory, app_task, until
from tests.conftest import ClientFactory, post_task
from tests.sse_client import SSEStream

# Modest and deterministic: the suite stays fast and CI sees the same examples every run.
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- values ---------------------------------------------------------------------------------------

ODD_TEXT = st.sampled_from(
    [
        "", "\x00", "a\x00b", "\u200f\u202eevil", "\U0001f600", "\U0010ffff", "\ufeff", "\ud800",
        "x\udc00y", "\ud83d", "e\u0301" * 50, "é" * 3000, "</script>", "\\u0000",
    ]
)  # fmt: skip
TEXT = st.one_of(
    st.text(max_size=10),
    st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=4),  # unpaired surrogates
    ODD_TEXT,
)
ODD_NUMBERS = st.sampled_from(
    [
        2**53 - 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30, -(10**30),
        1e308, -1e308, 5e-324, -0.0, math.inf, -math.inf, math.nan,
    ]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    ODD_NUMBERS,
    TEXT,
)


def mostly(good: Any, odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four, else a value of ``odd``."""
    return st.integers(0, 3).flatmap(lambda n: st.just(good) if n else odd)


def nest(depth: int, leaf: Any, dicts: bool) -> Any:
    for level in range(depth):
        leaf = {"k": leaf} if dicts and level % 2 else [leaf]
    return leaf


DEEP = st.builds(nest, st.sampled_from([31, 32, 33, 64, 250, 253, 254, 255, 300]), SCALARS, st.booleans())
VALUES = st.one_of(
    SCALARS,
    DEEP,
    st.recursive(
        SCALARS,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
        max_leaves=6,
    ),
)
OBJECTS = st.dictionaries(TEXT, VALUES, max_size=3)
EXTRA_KEYS = st.one_of(st.sampled_from(["type", "negativePrompt", "createdBy", "seed", "chunks"]), TEXT)
# Task fields the server changes; the others are what the client gave.
SERVER_SET = frozenset(
    {
        "status", "position", "queuedAt", "updatedAt", "claimedBy", "claimedAt", "finishedAt", "progress",
        "result", "error", "requeues",
    }
)  # fmt: skip


def to_json_text(value: Any, escape: bool = True) -> bytes:
    """JSON as a hostile client writes it: integers of any size, infinities as 1e400 (orjson refuses
    those), NaN as it is (not JSON at all), and text either escaped (an unpaired surrogate as
    \\ud800) or raw (an unpaired surrogate as the invalid UTF-8 it encodes to)."""

    def text(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "NaN"
            if math.isinf(value):
                return "1e400" if value > 0 else "-1e400"
            return repr(value)
        if isinstance(value, list):
            return "[" + ",".join(text(item) for item in value) + "]"
        if isinstance(value, dict):
            return "{" + ",".join(f"{text(k)}:{text(v)}" for k, v in value.items()) + "}"
        return json.dumps(value, ensure_ascii=escape)

    return text(value).encode("utf-8", "surrogatepass")


def given_fields(task: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in task.items() if k not in SERVER_SET}


# -- the checker and the queue boundary ----------------------------------------------------------


async def reloaded(store: SqliteStore) -> QueueManager:
    """The queue as a restarted process sees it: a second connection to the same database file."""
    other = SqliteStore(store.path)
    await other.open()
    queue = QueueManager(other, lease_seconds=60)
    await queue.load()
    await other.close()
    return queue


@pytest.fixture
async def queue(tmp_path: Path) -> QueueManager:
    store = SqliteStore(tmp_path / "q.sqlite3")
    await store.open()
    return QueueManager(store, lease_seconds=60)


@PROPERTY
@given(value=VALUES, where=st.sampled_from(["options", "extra", "result"]))
async def test_the_queue_stores_only_what_comes_back_intact(
    queue: QueueManager, value: Any, where: str
) -> None:
    """The queue checks again what it stores, even from a caller that skipped validation (with room
    for the levels its own results add): what it takes survives the store and orjson inside the
    deepest envelope an answer adds; what it refuses leaves memory and disk as they were."""
    before = queue.list_tasks("r")
    tid = f"t{len(before)}"
    new = NewTask(
        id=tid, prompt="p", options={"v": value} if where == "options" else {}, extra={}, created_at=None
    )
    if where == "extra":
        new.extra = {"v": value}
    field = {"options": {"v": value}, "extra": value, "result": value}[where]
    storable = validate.json_problem(field, validate.MAX_STORED_DEPTH) is None
    try:
        queue.add("r", new)
        if where == "result":
            queue.update("r", tid, TaskUpdate("claim", "w", None, None, None))
            queue.update("r", tid, TaskUpdate("complete", "w", None, value, None))
    except BadRequest as exc:
        assert not storable and exc.code == "invalid_value", exc
    else:
        assert storable
    await queue.flush()
    after = queue.list_tasks("r")
    assert (await reloaded(queue.store)).list_tasks("r") == after
    if storable:
        task = after[-1]
        served = {"options": task["options"].get("v"), "extra": task.get("v"), "result": task["result"]}
        assert served[where] == value
        envelope = nest(4, {"queue": after}, True)
        assert orjson.loads(orjson.dumps(envelope)) == envelope
    elif where != "result":
        assert after == before
    else:
        assert after[-1]["status"] == "processing" and after[-1]["result"] is None
    assert validate.json_problem(value) is not None or storable  # the stricter rule for what clients give


def test_checker_rules_at_their_edges() -> None:
    ok = [
        nest(32, 1, False),
        nest(32, "x", True),
        2**64 - 1,
        -(2**63),
        1e308,
        -0.0,
        "\x00\u200f\U0010ffff",
        {"\ufeff": [None, True]},
    ]
    for value in ok:
        assert validate.json_problem(value) is None, value
    bad = {
        "nests arrays/objects too deep (more than 32 levels)": [nest(33, 1, False), nest(300, 1, True)],
        "holds an integer outside -2^63..2^64-1": [2**64, -(2**63) - 1, [10**30]],
        "holds a number that is not finite": [math.inf, {"a": -math.inf}, [math.nan]],
        "holds a string with an unpaired UTF-16 surrogate": ["\ud800", ["x\udc00"], "\ud83d"],
        "holds a key that is not a valid string": [{"\ud800": 1}],
        "holds a tuple, which is not JSON": [(1, 2)],
    }
    for problem, values in bad.items():
        for value in values:
            assert validate.json_problem(value) == problem, value
    assert validate.json_problem(nest(64, 1, False), validate.MAX_STORED_DEPTH) is None


# -- REST --------------------------------------------------------------------------------------------


class Api:
    """One app that every example of a property test talks to, and what it acknowledged so far."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.acked: dict[tuple[str, str], dict[str, Any]] = {}  # (room, id) -> the task as answered
        self.rooms: set[str] = set()

    @property
    def queue(self) -> QueueManager:
        return self.client.server.app[QUEUE]

    def ack(self, task: dict[str, Any]) -> None:
        self.rooms.add(task["roomId"])
        self.acked[(task["roomId"], task["id"])] = task

    async def send(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        resp = await self.client.request(method, path, data=body, headers=headers)
        assert resp.status < 500, (method, path, body[:300], await resp.text())
        return resp.status, await resp.json()

    async def check(self, since: int) -> None:
        """Every answer still works, every acknowledged task is listed as acknowledged, the disk
        holds what memory holds, and the events since ``since`` replay."""
        for room in sorted(self.rooms):
            resp = await self.client.get(f"/api/queue/{room}")
            assert resp.status == 200, await resp.text()
            listed = {t["id"]: t for t in (await resp.json())["queue"]}
            for (ack_room, tid), task in self.acked.items():
                if ack_room == room:
                    assert given_fields(listed[tid]) == given_fields(task)
                    assert listed[tid]["result"] == task["result"]
            assert (await reloaded(self.queue.store)).list_tasks(room) == self.queue.list_tasks(room)
        assert (await self.client.get("/api/stats")).status == 200
        await replay(self.client, since)


async def replay(client: TestClient, since: int) -> None:
    """Every event after ``since`` comes through /api/events as JSON."""
    last = client.server.app[EVENTS].last_id
    if last == since:
        return
    resp = await client.get(f"/api/events?lastEventId={since}")
    assert resp.status == 200
    stream = SSEStream(resp)
    try:
        while (await stream.event())["id"] < last:
            pass
    finally:
        resp.close()


@pytest.fixture
async def api(make_client: ClientFactory, config: Config) -> Api:
    config.server.rate_limit_per_second = 0  # hundreds of POSTs from one client
    return Api(await make_client(config))


GOOD_IDS = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)


@st.composite
def task_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly a task the server takes, with odd values in its extra fields and options, and now
    and then any value at all in one of its own fields."""
    body: dict[str, Any] = {
        "prompt": draw(st.sampled_from(["a cat", "a lighthouse"]) | TEXT.map("p {}".format))
    }
    if draw(st.booleans()):
        body["id"] = draw(GOOD_IDS)
    if draw(st.booleans()):
        body["options"] = draw(OBJECTS)
    if draw(st.booleans()):
        body["createdAt"] = draw(st.integers(0, validate.MAX_SAFE_INTEGER) | SCALARS)
    body.update(draw(st.dictionaries(EXTRA_KEYS, VALUES, max_size=2)))
    if draw(st.integers(0, 3)) == 0:
        body[draw(st.sampled_from(["id", "prompt", "options", "createdAt", "roomId"]))] = draw(VALUES)
    return body


@st.composite
def patch_bodies(draw: st.DrawFn) -> dict[str, Any]:
    actions = st.sampled_from(["claim", "progress", "fail", "requeue"])
    body: dict[str, Any] = {"action": draw(mostly("complete", actions))}  # the one that keeps a result
    body["worker"] = draw(mostly("w", st.just("other") | TEXT | VALUES))
    if draw(st.integers(0, 3)) == 0:
        body["progress"] = draw(mostly(0.5, SCALARS))
    for key, odds in (("result", 0), ("error", 3), ("note", 3)):
        if draw(st.integers(0, odds)) == 0:
            body[key] = draw(TEXT | VALUES)
    return body


CLAIM = {"action": "claim", "worker": "w"}


@settings(PROPERTY, max_examples=80)
@given(
    body=task_bodies(),
    to_room=st.booleans(),
    patches=st.lists(patch_bodies(), max_size=3).map(lambda patches: [CLAIM, *patches]),
    query=st.sampled_from(
        ["limit=²", "limit=1", "limit=\u0663", "status=pending", "status=\u00e9", "limit=" + "9" * 5000]
    ),
    escape=st.booleans(),
)
async def test_no_rest_body_poisons_the_queue(
    api: Api, body: dict[str, Any], to_room: bool, patches: list[dict[str, Any]], query: str, escape: bool
) -> None:
    since = api.client.server.app[EVENTS].last_id
    text = to_json_text(body, escape)
    path = "/api/queue/lobby" if to_room else "/api/queue"
    status, data = await api.send("POST", path, text)
    event(f"POST {status} {data.get('error', {}).get('code', '')}")
    if status in (200, 201):
        task = data["task"]
        sent = orjson.loads(text)  # the server's reading of the body (big integers become floats)
        before = api.acked.get((task["roomId"], task["id"]), {})
        for key, value in sent.items():
            # A repeated POST fills in what the task lacked; what it had stays.
            if key not in validate.SERVER_OWNED and key not in before:
                assert task[key] == value, key
        assert task["prompt"] == sent["prompt"]
        if sent.get("options"):
            assert task["options"] == sent["options"]
        if sent.get("createdAt") is not None and status == 201:
            assert task["createdAt"] == sent["createdAt"]
        api.ack(task)
        for patch in patches:
            patch_text = to_json_text(patch, escape)
            status, data = await api.send("PATCH", f"/api/queue/{task['roomId']}/{task['id']}", patch_text)
            event(f"PATCH {patch['action']} {status} {data.get('error', {}).get('code', '')}")
            if status == 200:
                if patch["action"] == "complete" and orjson.loads(patch_text).get("result") is not None:
                    assert data["task"]["result"] == orjson.loads(patch_text)["result"]
                api.ack(data["task"])
    else:
        assert status in (400, 409, 413, 415), (status, data)
    resp = await api.client.get(f"/api/queue/lobby?{query}")
    assert resp.status in (200, 400), await resp.text()
    await api.check(since)


# -- peers ---------------------------------------------------------------------------------------------

PEER_STATUSES = st.sampled_from(["pending", "pending", "processing", "complete", "failed", "queued"])


@st.composite
def peer_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A peer's capabilities, a `queue` message with one task, its progress and its result: mostly
    what the app sends, with odd values in the free-form parts and now and then anywhere."""
    task: dict[str, Any] = {
        "id": draw(GOOD_IDS),
        "type": "generate",
        "prompt": draw(st.sampled_from(["a cat", "a lighthouse"]) | TEXT.map("p {}".format)),
        "status": draw(PEER_STATUSES),
        "createdAt": draw(mostly(1765100000000, SCALARS)),
    }
    if draw(st.booleans()):
        task["options"] = draw(OBJECTS)
    task.update(draw(st.dictionaries(EXTRA_KEYS, VALUES, max_size=2)))
    progress: dict[str, Any] = {"taskId": task["id"], "progress": draw(mostly(0.5, st.just(1.0) | SCALARS))}
    result: dict[str, Any] = {"taskId": task["id"], "status": draw(st.sampled_from(["complete", "failed"]))}
    result["data"] = draw(VALUES)
    if draw(st.booleans()):
        result["error"] = draw(TEXT | VALUES)
    caps: dict[str, Any] = {
        "hasGPU": draw(st.booleans()),
        "gpuName": draw(TEXT),
        "memory": draw(mostly(8, SCALARS)),
    }
    messages = {"capabilities": caps, "queue": {"tasks": [task]}, "progress": progress, "result": result}
    if draw(st.integers(0, 2)) == 0:
        action = draw(st.sampled_from(sorted(messages)))
        target = task if action == "queue" else messages[action]
        target[draw(st.sampled_from([*target, "chunkId", "workerId"]))] = draw(VALUES)
    return messages


@settings(PROPERTY, max_examples=60)
@given(messages=peer_messages(), leave=st.booleans())
async def test_no_peer_payload_poisons_the_queue(
    peer_room: Room, loop_errors: list[dict[str, Any]], messages: dict[str, Any], leave: bool
) -> None:
    room = peer_room
    bus = room.client.server.app[EVENTS]
    since = bus.last_id
    peer = f"peer-{since}"
    room.join(peer)
    (task,) = messages["queue"]["tasks"]
    if isinstance(task["id"], str):  # one task per example (unless its id is the odd value)
        task["id"] = messages["progress"]["taskId"] = messages["result"]["taskId"] = f"{task['id']}-{since}"
    for action in ("capabilities", "queue", "progress", "result"):
        before = await room.dropped()
        room.say(peer, action, messages[action])
        after = await room.dropped()
        assert not [k for k in after if k.endswith(".internal_error")], after
        event(f"{action} " + " ".join(k for k in after if after[k] != before.get(k, 0)))
    await room.queue.flush()

    # What the queue took, it serves back as the peer gave it.
    listing = await room.client.get(f"/api/queue/{room.name}")
    assert listing.status == 200, await listing.text()
    listed = {t["id"]: t for t in (await listing.json())["queue"]}
    stored = listed.get(task["id"])
    if stored is not None:
        for key, value in task.items():
            if key not in validate.SERVER_OWNED:
                assert stored[key] == value, key
        assert stored["prompt"] == task["prompt"]
        if task.get("options"):
            assert stored["options"] == task["options"]
        if isinstance(stored["result"], dict) and "data" in stored["result"]:
            assert stored["result"]["data"] == messages["result"]["data"]
    stats = await room.client.get("/api/stats")
    assert stats.status == 200
    for peer_info in (await stats.json())["rooms"][room.name]["peers"]:
        caps = peer_info.get("capabilities")
        if peer_info["id"] == peer and caps is not None:
            name = messages["capabilities"]["gpuName"]
            assert caps["gpuName"] == (str(name) if type(name) is int else name)  # names may be numbers
            assert caps["memory"] == messages["capabilities"]["memory"]
    assert (await room.client.get("/api/health")).status == 200
    if leave:
        room.leave(peer)
        await room.queue.flush()
    assert (await reloaded(room.queue.store)).list_tasks(room.name) == room.queue.list_tasks(room.name)
    await replay(room.client, since)
    assert loop_errors == []


@pytest.fixture
async def peer_room(make_room: RoomFactory) -> Room:
    return await make_room()


# -- the reported cases ----------------------------------------------------------------------------

DEPTH_300 = nest(300, "x", True)


async def test_deep_values_are_refused_before_anything_is_stored(
    make_client: ClientFactory, config: Config
) -> None:
    """Nesting ~300 deep in an extra field, in options or in a PATCH result used to be accepted,
    fail serialisation (500), break every later listing of the room and vanish on restart."""
    client = await make_client(config)
    task = (await post_task(client, "r", {"id": "kept", "prompt": "p"}))["task"]
    for body in (
        {"id": "t1", "prompt": "p", "extra": DEPTH_300},
        {"id": "t2", "prompt": "p", "options": {"a": DEPTH_300}},
    ):
        resp = await client.post("/api/queue/r", json=body)
        error = (await resp.json())["error"]
        assert resp.status == 400 and error["code"] == "invalid_value", error
        assert "more than 32 levels" in error["message"] and (
            "'extra'" in error["message"] or "'options'" in error["message"]
        )
    resp = await client.post("/api/queue", json={"id": "t3", "prompt": "p", "roomId": "r", "x": DEPTH_300})
    assert resp.status == 400
    assert (await client.patch("/api/queue/r/kept", json={"action": "claim", "worker": "w"})).status == 200
    resp = await client.patch(
        "/api/queue/r/kept", json={"action": "complete", "worker": "w", "result": DEPTH_300}
    )
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_value"

    listing = await client.get("/api/queue/r")
    assert listing.status == 200
    (listed,) = (await listing.json())["queue"]
    assert listed["id"] == "kept" and listed["status"] == "processing" and listed["result"] is None
    assert given_fields(listed) == given_fields(task)
    assert (await client.get("/api/stats")).status == 200
    await client.close()
    restarted = await make_client(config)
    assert (await (await restarted.get("/api/queue/r")).json())["queue"] == [listed]


async def test_32_levels_come_back_intact_33_are_refused(make_client: ClientFactory, config: Config) -> None:
    client = await make_client(config)
    # 32 levels each: the options object and 31 inside it; 31 lists around a list.
    body = {
        "id": "t",
        "prompt": "p",
        "options": {"a": nest(31, 1, False)},
        "deep": nest(31, [1.5, "\u200f"], False),
    }
    task = (await post_task(client, "r", body))["task"]
    assert task["options"] == body["options"] and task["deep"] == body["deep"]
    resp = await client.post("/api/queue/r", json={**body, "id": "u", "deep": [body["deep"]]})
    assert resp.status == 400 and "'deep'" in (await resp.json())["error"]["message"]
    await client.close()
    restarted = await make_client(config)
    (listed,) = (await (await restarted.get("/api/queue/r")).json())["queue"]
    assert listed == task


@pytest.mark.parametrize("created_at", [2**63, 2**53, -1, 1.5, "1732550000000", True])
async def test_created_at_must_be_a_date_now(client: TestClient, created_at: Any) -> None:
    resp = await client.post("/api/queue/r", json={"prompt": "p", "createdAt": created_at})
    data = await resp.json()
    assert resp.status == 400 and data["error"]["code"] == "invalid_created_at", data
    assert (await client.get("/api/queue/r")).status == 200
    task = (await post_task(client, "r", {"prompt": "p", "createdAt": 2**53 - 1}))["task"]
    assert task["createdAt"] == 2**53 - 1


@pytest.mark.parametrize("limit", ["²", "\u0661", "1_0", "+1", " 1", "9" * 5000, "0" * 9 + "1"])
async def test_limit_takes_ascii_digits_only(client: TestClient, limit: str) -> None:
    resp = await client.get("/api/queue/r", params={"limit": limit})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_limit"
    assert (await client.get("/api/queue/r", params={"limit": "0010"})).status == 200


@pytest.mark.parametrize(
    "raw",
    ["9" * 5000, "1" * 19, str(2**64), "abc", "²", "-1", "1_000", "12 34", "\u0661\u0662"],
    ids=lambda raw: raw[:24],
)
async def test_an_id_that_cannot_be_ours_resets_the_stream(client: TestClient, raw: str) -> None:
    """A Last-Event-ID of thousands of digits used to get an empty stream (or a 400)."""
    await post_task(client, "r", {"prompt": "p"})
    for request in ({"headers": {"Last-Event-ID": raw}}, {"params": {"lastEventId": raw}}):
        resp = await client.get("/api/events", **request)
        assert resp.status == 200
        stream = SSEStream(resp)
        reset = await stream.event()
        assert reset["type"] == "reset" and reset["id"] == client.server.app[EVENTS].last_id
        assert reset["data"] == {"reason": "invalid_id", "lastEventId": None}
        resp.close()


async def test_a_peer_cannot_poison_the_queue_either(make_room: RoomFactory) -> None:
    room = await make_room()
    since = room.client.server.app[EVENTS].last_id
    room.join("p")
    room.say("p", "capabilities", {"hasGPU": True, "gpuName": "\ud800", "memory": 8})
    room.say("p", "capabilities", {"hasGPU": True, "gpuName": "gpu", "memory": 10**30})
    poisoned = [
        app_task("deep", extra=DEPTH_300),
        app_task("late", createdAt=2**63),
        app_task("odd", prompt="a \ud800 prompt"),
        app_task("inf", options={"steps": math.inf}),
    ]
    room.say("p", "queue", {"tasks": [*poisoned, app_task("ok")]})
    room.say("p", "progress", {"taskId": "ok", "progress": 0.5, "chunkId": "c\udfff"})
    room.say("p", "progress", {"taskId": "ok", "progress": 0.5})
    for data in ("x\udc00", -math.inf, DEPTH_300, 2**64):
        room.say("p", "result", {"taskId": "ok", "data": data})
    room.say("p", "result", {"taskId": "ok", "status": "failed", "error": {"why": "\ud800"}})
    assert await room.dropped() == {
        "capabilities.bad_value": 2,
        "queue.bad_value": 4,
        "progress.bad_value": 1,
        "result.bad_value": 5,
    }
    listing = await room.client.get("/api/queue/lobby")
    assert [t["id"] for t in (await listing.json())["queue"]] == ["ok"]
    assert room.task("ok")["status"] == "processing"
    assert (await room.client.get("/api/health")).status == 200
    room.say("p", "result", {"taskId": "ok", "data": {"note": "\u200f\U0001f600", "n": 2**64 - 1}})
    await until(lambda: room.task("ok")["status"] == "complete")
    assert room.task("ok")["result"]["data"] == {"note": "\u200f\U0001f600", "n": 2**64 - 1}
    await room.queue.flush()
    assert (await reloaded(room.queue.store)).list_tasks("lobby") == room.queue.list_tasks("lobby")
    await replay(room.client, since)
