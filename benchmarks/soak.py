"""Soak: the real server under mixed load for ``SOAK_MINUTES`` (default 30), its memory (RSS) and open
descriptors sampled every 10 s; prints their slopes per hour at the end. ``make soak``; not in CI.

Everything on 127.0.0.1, all at once:

- REST: a steady stream of tasks, each claimed, worked and completed or cancelled over REST, with
  reads of queues, stats, health and metrics. The tasks go to rooms that take turns, and retention
  is set short, so idle rooms are pruned and the number of tasks held stays flat: growth that
  remains is a leak, not data (tasks in the helper rooms do accumulate: they are never idle).
- SSE: streams that read everything and reconnect with Last-Event-ID every minute or so, one of
  them room-filtered, and one that stops reading and gets disconnected as too slow, again and again.
- P2P: the helper in two rooms on the published app's setup (trystero@0.22, nostr, dispatch) with
  a GPU page in each that works every dispatched task and submits tasks of its own as the app
  does; a third page joins and leaves every two minutes.

A slope is fitted to the samples after the warm-up (the first quarter of the run, at most 2 min).
Slopes near zero over 30 minutes are what a leak-free server shows; a run of a few minutes says
little beyond "no runaway". The server's exit after SIGTERM is timed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import statistics
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from tests.interop.jspeer import JsPeer
from tests.server_process import ServerProcess, app_helper_env
from tests.services import NostrRelay, running
from tests.sse_client import SSEStream

MINUTES = float(os.environ.get("SOAK_MINUTES", "30"))
SAMPLE_SECONDS = 10.0
HELPER_ROOMS = ("soak-a", "soak-b")
# REST tasks go to one of REST_ROOMS rooms, the next one every REST_ROOM_SECONDS; with retention at
# RETENTION_HOURS a room is pruned soon after it is left, so what the server holds levels off in a
# minute or so.
REST_ROOMS = 10
REST_ROOM_SECONDS = 20
RETENTION_HOURS = 0.005  # 18 s
GPU = {"hasGPU": True, "gpuName": "soak GPU", "memory": 8, "cores": 4}
OPTIONS = {"steps": 4, "width": 512, "height": 512}
# Some bulk in every REST task event, so a stream that stops reading falls behind within a minute.
REST_OPTIONS = {**OPTIONS, "notes": "x" * 2000}


@dataclass
class Tally:
    started: float = field(default_factory=time.monotonic)
    requests: Counter[str] = field(default_factory=Counter)  # "GET 200", "POST 201", ...
    events: int = 0
    reconnects: int = 0
    slow_streams: int = 0
    churns: int = 0
    page_tasks: int = 0
    # (seconds, RSS MiB, open fds, tasks held): tasks in the helper rooms are never idle, so never
    # pruned, and they grow; their count tells that growth from a leak.
    samples: list[tuple[float, float, int, int]] = field(default_factory=list)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def sample(pid: int, http: aiohttp.ClientSession, tally: Tally, stop: asyncio.Event) -> None:
    while not stop.is_set():
        async with http.get("/api/stats") as resp:
            tasks = sum((await resp.json())["tasksByStatus"].values())
        tally.samples.append((time.monotonic() - tally.started, rss_mib(pid), open_fds(pid), tasks))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)


async def request(http: aiohttp.ClientSession, tally: Tally, method: str, path: str, **kw: object) -> int:
    async with http.request(method, path, **kw) as resp:  # type: ignore[arg-type]
        await resp.read()
        tally.requests[f"{method} {resp.status}"] += 1
        return resp.status


async def rest_load(http: aiohttp.ClientSession, tally: Tally, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        room = f"soak-r{int((time.monotonic() - tally.started) // REST_ROOM_SECONDS) % REST_ROOMS}"
        task_id = f"rest-{n}"
        body = {"id": task_id, "prompt": "soak", "options": REST_OPTIONS}
        await request(http, tally, "POST", f"/api/queue/{room}", json=body)
        # Every task is finished (pending work is never pruned): cancelled, or worked over REST.
        task = f"/api/queue/{room}/{task_id}"
        if n % 7 == 0:
            await request(http, tally, "DELETE", task)
        else:
            for action in ("claim", "progress", "complete"):
                update = {"action": action, "worker": "soak", "progress": 0.5, "result": {"url": "x"}}
                await request(http, tally, "PATCH", task, json=update)
        if n % 5 == 0:
            await request(http, tally, "GET", f"/api/queue/{room}?status=pending,processing&limit=50")
        if n % 10 == 0:
            await request(http, tally, "GET", "/api/stats")
            await request(http, tally, "GET", "/api/health")
        if n % 30 == 0:
            await request(http, tally, "GET", "/metrics")
        # Helper rooms get a task now and then: dispatched to the GPU pages there.
        if n % 100 == 0:
            for helper_room in HELPER_ROOMS:
                await request(http, tally, "POST", f"/api/queue/{helper_room}", json={"prompt": "p2p soak"})
        n += 1
        await asyncio.sleep(0.05)  # about 20 requests a second: the load's pace


async def sse_reader(url: str, query: str, tally: Tally, stop: asyncio.Event) -> None:
    """Reads everything; reconnects every 30-90 s with Last-Event-ID, as a browser does."""
    last_id: int | None = None
    async with aiohttp.ClientSession(url) as http:
        while not stop.is_set():
            headers = {} if last_id is None else {"Last-Event-ID": str(last_id)}
            stream = SSEStream(await http.get(f"/api/events{query}", headers=headers))
            deadline = time.monotonic() + random.uniform(30, 90)
            with contextlib.suppress(TimeoutError, EOFError, aiohttp.ClientError):
                while time.monotonic() < deadline and not stop.is_set():
                    await stream.block(within=20)
                    tally.events += 1
            last_id = stream.last_id if stream.last_id is not None else last_id
            stream.resp.close()
            tally.reconnects += 1


async def slow_reader(port: int, tally: Tally, stop: asyncio.Event) -> None:
    """A stream that never reads, for a minute at a time: the server drops it once it is
    sse_client_buffer events behind (counted in /api/stats as slowDisconnects)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 60)
        tally.slow_streams += 1


async def page_tasks(page: JsPeer, room: str, api: str, tally: Tally, stop: asyncio.Event) -> None:
    """The app's own way of adding a task: a queue message to the room, then a POST without a room."""
    while not stop.is_set():
        await page.submit_task(room, "page soak", api=api, options=OPTIONS)
        tally.page_tasks += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 10)


async def churn(relay: NostrRelay, app_id: str, tally: Tally, stop: asyncio.Event) -> None:
    """A page joins a helper room, stays 30 s, leaves; every two minutes."""
    while not stop.is_set():
        async with JsPeer.start("node", "0.22", name="churn") as page:
            await page.join(HELPER_ROOMS[0], app_id=app_id, relay_urls=[relay.url], strategy="nostr")
            await page.behave_like_app(HELPER_ROOMS[0], {"hasGPU": False}, step_ms=50)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 30)
            await page.leave(HELPER_ROOMS[0])
        tally.churns += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 90)


def slope_per_hour(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 3:
        return float("nan")
    xs, ys = zip(*samples, strict=True)
    return statistics.linear_regression([x / 3600 for x in xs], ys).slope


def report(
    tally: Tally, server: ServerProcess, events: dict[str, int], exit_seconds: float, code: int
) -> None:
    duration = tally.samples[-1][0] if tally.samples else 0.0
    warmup = min(120.0, duration / 4)
    steady = [s for s in tally.samples if s[0] >= warmup]
    records = [orjson.loads(line) for line in (server.workdir / "server.log").read_text().splitlines()]
    levels = Counter(r.get("level", "?") for r in records)
    worst = Counter(f"{r['logger']}: {r['msg'][:100]}" for r in records if r["level"] in ("warning", "error"))
    print(f"\nSoak: {duration / 60:.1f} min, {len(tally.samples)} samples (slopes after {warmup:.0f} s)\n")
    print("| | start | end | min | max | slope per hour |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, index, unit in (("RSS", 1, "MiB"), ("open fds", 2, ""), ("tasks held", 3, "")):
        values = [s[index] for s in tally.samples]
        slope = slope_per_hour([(s[0], s[index]) for s in steady])
        print(
            f"| {name} | {values[0]:.1f} | {values[-1]:.1f} | {min(values):.1f} | {max(values):.1f} "
            f"| {slope:+.2f} {unit} |"
        )
    print(f"\nrequests: {dict(sorted(tally.requests.items()))}")
    print(
        f"events read: {tally.events}, stream reconnects: {tally.reconnects}, streams that did not "
        f"read: {tally.slow_streams} (server dropped {events['slowDisconnects']} as too slow), "
        f"page tasks: {tally.page_tasks}, peer churns: {tally.churns}"
    )
    print(f"server log lines by level: {dict(levels)}")
    for line, count in worst.most_common(8):
        print(f"  {count} x {line}")
    print(f"SIGTERM -> exit {code} in {exit_seconds:.2f} s")


async def run() -> None:
    app_id = f"p2pdiff-soak-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp, running(NostrRelay(Path(tmp) / "nostr")) as relay:
        server = ServerProcess(
            Path(tmp),
            env={
                "P2PDIFF_STORE_PATH": f"{tmp}/db.sqlite3",
                "P2PDIFF_SERVER_SSE_MAX_CLIENTS_PER_ADDRESS": "16",
                "P2PDIFF_SERVER_SSE_CLIENT_BUFFER": "64",
                "P2PDIFF_QUEUE_RETENTION_HOURS": str(RETENTION_HOURS),
                "P2PDIFF_QUEUE_SWEEP_INTERVAL_SECONDS": "10",
                **app_helper_env(relay.url, app_id, HELPER_ROOMS),
                "P2PDIFF_SERVER_ACCESS_LOG": "false",
            },
        )
        await server.start()
        assert server.proc is not None
        tally, stop = Tally(), asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            pages = [
                await stack.enter_async_context(JsPeer.start("node", "0.22", name=r)) for r in HELPER_ROOMS
            ]
            for page, room in zip(pages, HELPER_ROOMS, strict=True):
                await page.join(room, app_id=app_id, relay_urls=[relay.url], strategy="nostr")
                await page.behave_like_app(room, GPU, step_ms=50)
            http = await stack.enter_async_context(aiohttp.ClientSession(server.url))
            work = [
                sample(server.proc.pid, http, tally, stop),
                rest_load(http, tally, stop),
                sse_reader(server.url, "", tally, stop),
                sse_reader(server.url, "", tally, stop),
                sse_reader(server.url, f"?room={HELPER_ROOMS[0]}", tally, stop),
                slow_reader(server.port, tally, stop),
                churn(relay, app_id, tally, stop),
                *(
                    page_tasks(p, r, server.url, tally, stop)
                    for p, r in zip(pages, HELPER_ROOMS, strict=True)
                ),
            ]
            tasks = [asyncio.create_task(w) for w in work]
            await asyncio.wait(tasks, timeout=MINUTES * 60, return_when=asyncio.FIRST_EXCEPTION)
            stop.set()
            await asyncio.gather(*tasks)  # re-raises what failed early
            async with http.get("/api/stats") as resp:
                events = (await resp.json())["events"]
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = await server.proc.wait()
        report(tally, server, events, time.monotonic() - started, code)


def main() -> None:
    asyncio.run(run())


if __name__ == "__main__":
    main()
