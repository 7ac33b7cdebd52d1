"""REST benchmark: p2pdiff's GET and POST against a bare aiohttp handler, loaded by wrk in another process.

p2pdiff runs as deployed, access log on (one JSON line per request, to a file here); the bare handler
logs nothing. Targets: the queue listing at >= 0.8x the bare handler serving the same bytes,
/api/health at least as fast as the listing.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.server_process import ServerProcess, free_port

DURATION = int(os.environ.get("BENCH_SECONDS", "8"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
POST_BODY = (
    '{"prompt":"a lighthouse at dusk","options":{"model":"prx-1024","steps":20,"width":1024,"height":1024},'
    '"type":"generate","createdBy":"bench"}'
)
POST_LUA = f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{POST_BODY}'
"""


@dataclass
class Result:
    name: str
    rps: float
    p99_ms: float
    errors: int
    # Server CPU per request: steadier than requests/s when other work shares the 2 cores.
    cpu_us: float


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def wrk(
    name: str,
    url: str,
    server_pid: int | Sequence[int],
    script: str | None = None,
    *,
    threads: int = 1,
    seconds: int = DURATION,
) -> Result:
    """One wrk run; ``cpu_us`` sums the CPU of every pid in ``server_pid`` (several nodes)."""
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is not installed (apt-get install -y wrk)")
    pids = [server_pid] if isinstance(server_pid, int) else list(server_pid)
    args = ["wrk", f"-t{threads}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", url]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        if script:
            lua.write(script)
            lua.flush()
            args[1:1] = ["-s", lua.name]
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE)
        out = (await proc.communicate())[0].decode()
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
        if proc.returncode:
            raise SystemExit(f"bench: wrk failed ({proc.returncode}): {out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None, out
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return Result(name, rps, _ms(*p99.groups()), errors, cpu / max(total, 1) * 1e6)


async def seed(url: str, room: str, n: int) -> None:
    async with aiohttp.ClientSession() as http:
        for i in range(n):
            body = {
                "id": f"seed{i}",
                "prompt": f"a lighthouse at dusk, variation {i}",
                "options": {"model": "prx-1024"},
            }
            async with http.post(f"{url}/api/queue/{room}", json=body) as resp:
                assert resp.status == 201


async def _wait_up(url: str) -> None:
    for _ in range(200):
        try:
            async with aiohttp.ClientSession() as http, http.get(url):
                return
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
    raise SystemExit(f"bench: {url} never answered")


def median(results: list[Result]) -> Result:
    ordered = sorted(results, key=lambda r: r.rps)
    mid = ordered[len(ordered) // 2]
    cpu = sorted(r.cpu_us for r in results)[len(results) // 2]
    return Result(mid.name, mid.rps, mid.p99_ms, sum(r.errors for r in results), cpu)


async def run() -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "P2PDIFF_STORE_PATH": str(Path(tmp) / "bench.sqlite3"),
            "P2PDIFF_SERVER_LOG_LEVEL": "info",
            "P2PDIFF_SERVER_ACCESS_LOG": "true",
        }
        server = ServerProcess(Path(tmp), env=env)
        await server.start()
        bare = None
        try:
            await seed(server.url, "bench", 100)
            body_file = Path(tmp) / "body.json"
            async with aiohttp.ClientSession() as http, http.get(f"{server.url}/api/queue/bench") as resp:
                body = await resp.read()
            body_file.write_bytes(body)
            bare_port = free_port()
            bare_url = f"http://127.0.0.1:{bare_port}/api/queue/b"
            bare = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.bare_server", str(bare_port), str(body_file)
            )
            await _wait_up(bare_url)
            # Interleaved rounds, median of each: the machine is shared, so drift hits both sides alike.
            bare_runs: list[Result] = []
            get_runs: list[Result] = []
            health_runs: list[Result] = []
            for _ in range(ROUNDS):
                bare_runs.append(await wrk("bare aiohttp GET (same 100-task JSON)", bare_url, bare.pid))
                get_runs.append(
                    await wrk(
                        "p2pdiff GET /api/queue/{room} (100 tasks)",
                        f"{server.url}/api/queue/bench",
                        server.proc.pid,
                    )
                )
                health_runs.append(
                    await wrk("p2pdiff GET /api/health", f"{server.url}/api/health", server.proc.pid)
                )
            post = await wrk(
                "p2pdiff POST /api/queue/{room} (synchronous=full)",
                f"{server.url}/api/queue/post",
                server.proc.pid,
                POST_LUA,
            )
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{server.url}/api/queue/post?limit=1") as resp,
            ):
                stored = (await resp.json())["stats"]["queueLength"]
        finally:
            await server.stop()
            if bare is not None:
                bare.terminate()
                await bare.wait()
    print(f"\nPOST check: {stored} tasks accepted and queued; GET body: {len(body):,} bytes")
    for runs in (bare_runs, get_runs, health_runs):
        print(f"{runs[0].name}: " + ", ".join(f"{r.rps:,.0f}/s ({r.cpu_us:.0f} µs CPU)" for r in runs))
    return [median(bare_runs), median(get_runs), median(health_runs), post]


def report(results: list[Result]) -> None:
    bare = results[0]
    print(
        f"\nREST ({CONNECTIONS} connections, {DURATION}s a run, GETs: median of {ROUNDS} interleaved runs;"
        " p2pdiff with its access log on)\n"
    )
    print("| case | requests/s | p99 ms | errors | ratio to bare GET | server CPU µs/request | CPU ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.name} | {r.rps:,.0f} | {r.p99_ms:.2f} | {r.errors} | {r.rps / bare.rps:.2f}x"
            f" | {r.cpu_us:.0f} | {bare.cpu_us / r.cpu_us:.2f}x |"
        )
    get, health, post = results[1], results[2], results[3]
    get_ratio, cpu_ratio = get.rps / bare.rps, bare.cpu_us / get.cpu_us
    print(
        f"\nGET target >= 0.80x bare: {get_ratio:.2f}x by requests/s, {cpu_ratio:.2f}x by server CPU"
        f" per request {'PASS' if get_ratio >= 0.8 else 'MISS'};"
        f" /api/health target >= the listing: {health.rps / get.rps:.2f}x"
        f" {'PASS' if health.rps >= get.rps else 'MISS'};"
        f" POST target >= 2,000/s: {post.rps:,.0f}/s {'PASS' if post.rps >= 2000 else 'MISS'}"
    )


def main() -> None:
    report(asyncio.run(run()))
