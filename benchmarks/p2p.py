"""P2P benchmark: our helper peer vs real Trystero 0.25.4 Node peers, over a local mosquitto.

Join: time from a peer's join to its first action round trip (Trystero ping) with a peer already in
the room — our helper joining vs a second Node peer joining — interleaved, fresh app id each time so
no shared connection is reused; both joiners already have their broker connection. Throughput:
8 MiB binary action helper->JS and JS->helper vs JS->JS.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import signaling
from tests.interop.jspeer import JsPeer, pattern_bytes, sha256_hex
from tests.services import Mosquitto

JOINS = int(os.environ.get("BENCH_JOINS", "10"))
SIZE = 8 * 1024 * 1024
TRANSFERS = int(os.environ.get("BENCH_TRANSFERS", "3"))


def room_config(app_id: str, url: str, *, strategy: str = "mqtt", wire: str = "0.25") -> signaling.RoomConfig:
    """Our room on one local relay, ICE on loopback without STUN."""
    return signaling.RoomConfig(
        app_id=app_id,
        relay_urls=[url],
        strategy=strategy,
        wire=wire,
        ice_servers=[],
        ice_host_addresses=["127.0.0.1"],
    )


async def helper_join(session: signaling.Session, broker: Mosquitto, host: JsPeer) -> float:
    app_id = f"bench-{uuid.uuid4().hex[:8]}"
    await host.join("bench", app_id=app_id, relay_urls=[broker.ws_url])
    joined = asyncio.get_running_loop().create_future()
    start = time.perf_counter()
    room = signaling.join_room(room_config(app_id, broker.ws_url), "bench", session=session)
    room.on_peer_join(lambda peer_id: joined.done() or joined.set_result(peer_id))
    peer_id = await asyncio.wait_for(joined, 30)
    await room.ping(peer_id)
    elapsed = time.perf_counter() - start
    # JS first: our leave closes the connection (the app has no room left), and a JS leave that
    # lands in the same few milliseconds would send its @_leave on a closing channel.
    await host.leave("bench")
    await room.leave()
    return elapsed


async def js_join(broker: Mosquitto, host: JsPeer, joiner: JsPeer) -> float:
    app_id = f"bench-{uuid.uuid4().hex[:8]}"
    await host.join("bench", app_id=app_id, relay_urls=[broker.ws_url])
    mark = joiner.mark()
    start = time.perf_counter()
    await joiner.join("bench", app_id=app_id, relay_urls=[broker.ws_url])
    await joiner.wait_peer_join("bench", host.self_id, since=mark)
    await joiner.ping("bench", host.self_id)
    elapsed = time.perf_counter() - start
    await joiner.leave("bench")
    await host.leave("bench")
    return elapsed


async def throughput(
    session: signaling.Session, broker: Mosquitto, a: JsPeer, b: JsPeer
) -> dict[str, list[float]]:
    app_id = f"bench-{uuid.uuid4().hex[:8]}"
    data = pattern_bytes(SIZE, 7)
    digest = sha256_hex(data)
    for js in (a, b):
        await js.join("tp", app_id=app_id, relay_urls=[broker.ws_url])
        await js.make_action("tp", "blob")
    room = signaling.join_room(room_config(app_id, broker.ws_url), "tp", session=session)
    blob = room.make_action("blob")
    received: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    blob.on_receive(lambda payload, peer_id, meta: received.put_nowait((time.time(), payload)))
    for js in (a, b):
        await js.wait_peer_join("tp", room.self_id)
    await a.wait_peer_join("tp", b.self_id)
    out: dict[str, list[float]] = {"helper -> JS": [], "JS -> helper": [], "JS -> JS": []}
    for _ in range(TRANSFERS):
        mark = a.mark()
        start = time.time()
        await blob.send(data, target=a.self_id)
        ev = await a.wait_action("tp", "blob", since=mark, timeout=120)
        assert ev["sha256"] == digest, ev
        out["helper -> JS"].append(SIZE / (ev["ts"] / 1000 - start))

        start = time.time()
        await a.send("tp", "blob", None, kind="binary", size=SIZE, seed=7, target=room.self_id)
        ts, payload = await asyncio.wait_for(received.get(), 120)
        assert sha256_hex(payload) == digest
        out["JS -> helper"].append(SIZE / (ts - start))

        mark = b.mark()
        start = time.time()
        await a.send("tp", "blob", None, kind="binary", size=SIZE, seed=7, target=b.self_id)
        ev = await b.wait_action("tp", "blob", since=mark, timeout=120)
        assert ev["sha256"] == digest, ev
        out["JS -> JS"].append(SIZE / (ev["ts"] / 1000 - start))
    await room.leave()
    return out


async def run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto")
        broker.start()
        session = signaling.Session()
        try:
            # Trystero keeps its relay sockets open between rooms; our relay hub closes a relay
            # with its last room. A room nobody else joins keeps ours open too, so both sides
            # join with a warm broker connection, as a helper already serving a room does.
            signaling.join_room(room_config("bench-anchor", broker.ws_url), "anchor", session=session)
            (relay,) = session.hub.relays()
            await asyncio.wait_for(relay.wait_connected(), 30)
            ours, theirs = [], []
            for _ in range(JOINS):
                # Fresh Node peers (fresh selfIds) for every join: who offers depends on the id
                # order, and JS<->JS joins over node-datachannel are bimodal with it (~0.05 s or
                # ~1 s), so a fixed pair would measure one mode for the whole run. Fresh processes
                # also keep Trystero's idle shared connections (kept 123 s) from piling up.
                async with JsPeer.start(kind="node") as host:
                    ours.append(await helper_join(session, broker, host))
                async with JsPeer.start(kind="node") as host, JsPeer.start(kind="node") as joiner:
                    theirs.append(await js_join(broker, host, joiner))
            async with JsPeer.start(kind="node") as a, JsPeer.start(kind="node") as b:
                rates = await throughput(session, broker, a, b)
        finally:
            await session.close()
            broker.cleanup()
    ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)
    print(f"\nP2P join -> first action round trip (median of {JOINS}, interleaved, all fresh)\n")
    print("| joiner | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    print(f"| helper (aiortc) | {ours_med:.3f} | {min(ours):.3f} | {max(ours):.3f} |")
    print(f"| Node Trystero | {theirs_med:.3f} | {min(theirs):.3f} | {max(theirs):.3f} |")
    ratio = ours_med / theirs_med
    print(f"\njoin ratio helper/JS: {ratio:.2f}x (target <= 1.2x) {'PASS' if ratio <= 1.2 else 'MISS'}")
    mib = {k: statistics.median(v) / 2**20 for k, v in rates.items()}
    print(f"\n8 MiB binary action throughput (median of {TRANSFERS})\n")
    print("| direction | MiB/s | ratio to JS -> JS |")
    print("|---|---:|---:|")
    for name, value in mib.items():
        print(f"| {name} | {value:.1f} | {value / mib['JS -> JS']:.2f}x |")
    worst = min(mib["helper -> JS"], mib["JS -> helper"]) / mib["JS -> JS"]
    print(f"\nthroughput target >= 0.2x both ways: {worst:.2f}x {'PASS' if worst >= 0.2 else 'MISS'}")


def main() -> None:
    asyncio.run(run())
