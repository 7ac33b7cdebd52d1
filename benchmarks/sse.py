"""Event stream fan-out: events/s delivered to N SSE clients, and server memory with stuck clients.

``python -m benchmarks.sse [clients] [events]``. The server runs in this process (so events can be
published straight into its bus, at the rate the queue would); the clients run in a subprocess with
their own event loop and count ``data:`` lines on raw sockets. Everything on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time

from aiohttp import web

from p2pdiff.app import create_app
from p2pdiff.appkeys import EVENTS
from p2pdiff.config import Config
from tests.server_process import free_port

CLIENT_SCRIPT = r"""
import asyncio, socket, sys, time
port, n, m, stuck = (int(a) for a in sys.argv[1:5])

async def reader(done):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    seen, tail = 0, b""
    ready.release()
    while seen < m + 1:  # + the hello
        chunk = await r.read(1 << 16)
        if not chunk:
            break
        data = tail + chunk
        seen += data.count(b"\ndata: ")
        tail = data[-8:]
    if seen >= m + 1:
        done.append(time.perf_counter())
    w.close()

async def sleeper():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
    await asyncio.get_running_loop().sock_sendall(s, b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
    holders.append(s)  # never read
    ready.release()

async def main():
    global ready, holders
    ready, holders, done = asyncio.Semaphore(0), [], []
    tasks = [asyncio.create_task(reader(done)) for _ in range(n)]
    tasks += [asyncio.create_task(sleeper()) for _ in range(stuck)]
    for _ in range(n + stuck):
        await ready.acquire()
    print("ready", flush=True)
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    print("done", len(done), max(done) if done else 0, flush=True)

asyncio.run(main())
"""


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def run(clients: int, events: int, stuck: int, payload_bytes: int, rate: float | None = None) -> None:
    """``rate`` None: publish as fast as the loop allows (50 per turn); else that many per second."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Config()
        config.store.path = f"{tmp}/db.sqlite3"
        config.p2p.enabled = False
        config.server.sse_max_clients = clients + stuck + 8
        config.server.sse_max_clients_per_address = config.server.sse_max_clients  # all from 127.0.0.1
        app = create_app(config)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        bus = app[EVENTS]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT_SCRIPT,
            str(port),
            str(clients),
            str(events),
            str(stuck),
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert (await proc.stdout.readline()).strip() == b"ready"
        for _ in range(1000):  # the server side of the last connections may lag the client's
            if bus.subscribers >= clients + stuck:
                break
            await asyncio.sleep(0.01)
        before = rss_mib()
        # Like a task.progress event: the whole task, about payload_bytes of JSON.
        data = {"task": {"id": "task_1", "roomId": "bench", "prompt": "p" * payload_bytes, "progress": 0.5}}
        started = time.perf_counter()
        tick = 0.01
        batch = 50 if rate is None else max(1, round(rate * tick))
        for n, i in enumerate(range(0, events, batch)):
            for _ in range(min(batch, events - i)):
                bus.publish("task.progress", "bench", data)
            if rate is None:
                await asyncio.sleep(0)
            else:  # on schedule, not "tick after the last": publishing itself takes time
                await asyncio.sleep(max(0.0, started + (n + 1) * tick - time.perf_counter()))
        published = time.perf_counter()
        line = (await proc.stdout.readline()).split()
        await proc.wait()
        finished = float(line[2]) if len(line) > 2 else time.perf_counter()
        after = rss_mib()
        got = int(line[1]) if len(line) > 1 else 0
        elapsed = max(finished, published) - started
        target = "max" if rate is None else f"{rate:,.0f}/s"
        print(
            f"clients={clients} stuck={stuck} events={events} payload={payload_bytes}B rate={target}: "
            f"{got}/{clients} clients got everything in {elapsed:.2f}s -> "
            f"{events * got / elapsed:,.0f} events/s delivered ({events / elapsed:,.0f}/s per client); "
            f"slow disconnects {bus.slow_disconnects}, max buffered {bus.max_buffered}; "
            f"server RSS {before:.1f} -> {after:.1f} MiB"
        )
        await runner.cleanup()


def main() -> None:
    clients = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    events = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    for rate in (1000, 5000, None):
        asyncio.run(run(clients, events, stuck=0, payload_bytes=400, rate=rate))
    asyncio.run(run(clients, events, stuck=50, payload_bytes=400, rate=1000))
    asyncio.run(run(10, 3000, stuck=50, payload_bytes=16_000, rate=500))


if __name__ == "__main__":
    main()
