"""Several nodes on one PostgreSQL: REST throughput and event fan-out next to one SQLite node.

``python -m benchmarks cluster``. One run starts a throwaway PostgreSQL (tests/services.py
``PostgresServer``) and four p2pdiff processes, all on 127.0.0.1, access log on as deployed:

- ``sqlite``: one node on its SQLite file (the default store);
- ``solo``: one node on PostgreSQL database ``bench_one``;
- ``a`` and ``b``: two nodes on PostgreSQL database ``bench_two``.

REST: one wrk process with two threads loads each case with the same 32 connections. Its Lua
``setup()`` points thread i at node i mod the case's node count, so with two nodes each node gets
16 connections and wrk's numbers (requests/s, p99) are those of the two together, from one
latency histogram. The cases take turns, ``ROUNDS`` times, and each reports its median round.
GETs list a room of 100 tasks; POSTs add tasks to a room of their own each round.

Event fan-out: ``SUBSCRIBERS`` streams (``GET /api/events?room=...``) on one node, ``FANOUT_TASKS``
tasks POSTed one at a time to a node; the latency is from just before the POST is sent to the
moment a stream reads that task's ``task.created``, for every stream and task. Cases: within the
SQLite node, within PostgreSQL node ``a``, and POSTed to ``a`` while the streams are on ``b``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from benchmarks.http import POST_LUA, Result, median, seed, wrk
from tests.server_process import ServerProcess
from tests.services import PostgresServer, ServiceNotInstalled, running

SECONDS = int(os.environ.get("BENCH_CLUSTER_SECONDS", "4"))
ROUNDS = int(os.environ.get("BENCH_CLUSTER_ROUNDS", "3"))
SUBSCRIBERS = int(os.environ.get("BENCH_SUBSCRIBERS", "20"))
FANOUT_TASKS = int(os.environ.get("BENCH_FANOUT_TASKS", "100"))
# Between two POSTs of the fan-out: each event is timed alone, not behind a queue of others.
FANOUT_INTERVAL = 0.03
WRK_THREADS = 2


def _targets_lua(ports: Sequence[int]) -> str:
    """wrk threads share out over the nodes: thread i sends to ports[i mod len(ports)]."""
    listed = ", ".join(f'"{port}"' for port in ports)
    return f"""
local ports = {{{listed}}}
local threads = 0
function setup(thread)
  thread.addr = wrk.lookup("127.0.0.1", ports[threads % #ports + 1])[1]
  threads = threads + 1
end
"""


@dataclass
class Case:
    name: str
    nodes: list[ServerProcess]

    @property
    def pids(self) -> list[int]:
        return [node.proc.pid for node in self.nodes if node.proc is not None]

    def lua(self, extra: str = "") -> str:
        return _targets_lua([node.port for node in self.nodes]) + extra


@dataclass
class Fanout:
    name: str
    samples: int
    expected: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def _node(workdir: Path, env: dict[str, str]) -> ServerProcess:
    workdir.mkdir()
    return ServerProcess(
        workdir,
        env={
            "P2PDIFF_SERVER_LOG_LEVEL": "info",
            "P2PDIFF_SERVER_ACCESS_LOG": "true",
            # Every stream of the fan-out comes from 127.0.0.1.
            "P2PDIFF_SERVER_SSE_MAX_CLIENTS_PER_ADDRESS": str(SUBSCRIBERS + 8),
            "P2PDIFF_SERVER_SSE_MAX_CLIENTS": str(SUBSCRIBERS + 8),
            **env,
        },
    )


@contextlib.asynccontextmanager
async def _started(nodes: Sequence[ServerProcess]) -> AsyncIterator[None]:
    try:
        for node in nodes:  # one at a time: nodes on one database migrate it once anyway
            await node.start()
        yield
    finally:
        for node in nodes:
            if node.proc is not None:
                await node.stop()


async def _rest(cases: list[Case]) -> tuple[list[Result], list[Result]]:
    gets: dict[str, list[Result]] = {case.name: [] for case in cases}
    posts: dict[str, list[Result]] = {case.name: [] for case in cases}
    for n in range(ROUNDS):
        for case in cases:
            url = f"{case.nodes[0].url}/api/queue/bench"
            gets[case.name].append(
                await wrk(case.name, url, case.pids, case.lua(), threads=WRK_THREADS, seconds=SECONDS)
            )
        for case in cases:
            # A fresh room each round: the rounds compare alike.
            url = f"{case.nodes[0].url}/api/queue/post{n}"
            script = case.lua(POST_LUA)
            posts[case.name].append(
                await wrk(case.name, url, case.pids, script, threads=WRK_THREADS, seconds=SECONDS)
            )
    for kind, runs in (("GET", gets), ("POST", posts)):
        for name, results in runs.items():
            print(f"{kind} {name}: " + ", ".join(f"{r.rps:,.0f}/s p99 {r.p99_ms:.1f} ms" for r in results))
    return [median(gets[c.name]) for c in cases], [median(posts[c.name]) for c in cases]


async def _fanout(name: str, post_to: ServerProcess, listen_on: ServerProcess, room: str) -> Fanout:
    sent: dict[str, float] = {}
    latencies: list[float] = []
    hello = asyncio.Semaphore(0)

    async def listen(http: aiohttp.ClientSession) -> None:
        seen = 0
        async with http.get(f"{listen_on.url}/api/events", params={"room": room}) as resp:
            assert resp.status == 200, resp.status
            greeted = False
            while seen < FANOUT_TASKS:
                line = await resp.content.readline()
                if not line:
                    return
                if not line.startswith(b"data: "):
                    continue
                if not greeted:  # the stream's first event: it is subscribed from here on
                    greeted = True
                    hello.release()
                    continue
                event = orjson.loads(line[6:])
                if event["type"] == "task.created":
                    latencies.append(time.perf_counter() - sent[event["data"]["task"]["id"]])
                    seen += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        listeners = [asyncio.create_task(listen(http)) for _ in range(SUBSCRIBERS)]
        for _ in range(SUBSCRIBERS):
            await hello.acquire()
        for i in range(FANOUT_TASKS):
            task_id = f"fan{i}"
            body = {"id": task_id, "prompt": f"a lighthouse at dusk, variation {i}", "options": {}}
            sent[task_id] = time.perf_counter()
            async with http.post(f"{post_to.url}/api/queue/{room}", json=body) as resp:
                assert resp.status == 201, resp.status
            await asyncio.sleep(FANOUT_INTERVAL)
        done, pending = await asyncio.wait(listeners, timeout=10)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()
    ms = sorted(x * 1000 for x in latencies)
    return Fanout(
        name,
        len(ms),
        SUBSCRIBERS * FANOUT_TASKS,
        statistics.median(ms),
        ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        ms[-1],
    )


async def run() -> tuple[list[Result], list[Result], list[Fanout]]:
    try:
        postgres = PostgresServer()
    except ServiceNotInstalled as err:
        raise SystemExit(f"bench: {err}") from None
    with running(postgres), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one_url = await postgres.create_database("bench_one")
        two_url = await postgres.create_database("bench_two")
        sqlite = _node(root / "sqlite", {"P2PDIFF_STORE_PATH": str(root / "sqlite" / "bench.sqlite3")})
        solo = _node(root / "solo", {"P2PDIFF_STORE_URL": one_url, "P2PDIFF_CLUSTER_NODE_ID": "solo"})
        a = _node(root / "a", {"P2PDIFF_STORE_URL": two_url, "P2PDIFF_CLUSTER_NODE_ID": "a"})
        b = _node(root / "b", {"P2PDIFF_STORE_URL": two_url, "P2PDIFF_CLUSTER_NODE_ID": "b"})
        async with _started([sqlite, solo, a, b]):
            for node in (sqlite, solo, a):
                await seed(node.url, "bench", 100)
            cases = [
                Case("SQLite, 1 node", [sqlite]),
                Case("PostgreSQL, 1 node", [solo]),
                Case("PostgreSQL, 2 nodes", [a, b]),
            ]
            gets, posts = await _rest(cases)
            fanouts = [
                await _fanout("SQLite, within the node", sqlite, sqlite, "fan-sqlite"),
                await _fanout("PostgreSQL, within node a", a, a, "fan-same"),
                await _fanout("PostgreSQL, POST on a, streams on b", a, b, "fan-cross"),
            ]
    return gets, posts, fanouts


def report(gets: list[Result], posts: list[Result], fanouts: list[Fanout]) -> None:
    print(
        f"\nREST on several nodes ({WRK_THREADS} wrk threads, 32 connections shared over the case's nodes,"
        f" {SECONDS}s a run, median of {ROUNDS} interleaved rounds; access log on)\n"
    )
    print("| request | case | requests/s | p99 ms | errors | server CPU µs/request | ratio |")
    print("|---|---|---:|---:|---:|---:|---|")
    for kind, results in (("GET /api/queue/{room} (100 tasks)", gets), ("POST /api/queue/{room}", posts)):
        sqlite, one, two = results
        ratios = [
            "",
            f"{one.rps / sqlite.rps:.2f}x of SQLite (p99 {one.p99_ms / sqlite.p99_ms:.2f}x)",
            f"{two.rps / one.rps:.2f}x of 1 node (p99 {two.p99_ms / one.p99_ms:.2f}x)",
        ]
        for r, ratio in zip(results, ratios, strict=True):
            print(
                f"| {kind} | {r.name} | {r.rps:,.0f} | {r.p99_ms:.2f} | {r.errors} | {r.cpu_us:.0f}"
                f" | {ratio} |"
            )
    print(
        f"\nEvent fan-out ({SUBSCRIBERS} streams, {FANOUT_TASKS} tasks POSTed one at a time every"
        f" {FANOUT_INTERVAL * 1000:.0f} ms; from POST sent to task.created read)\n"
    )
    print("| case | events read | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for f in fanouts:
        print(f"| {f.name} | {f.samples}/{f.expected} | {f.p50_ms:.2f} | {f.p99_ms:.2f} | {f.max_ms:.2f} |")


def main() -> None:
    report(*asyncio.run(run()))
