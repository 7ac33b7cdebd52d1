"""signaling.peer.Peer against a raw node-datachannel peer (tests/interop/ndc_peer.mjs).

node-datachannel is the WebRTC stack Trystero runs on in Node, so this pins the data-channel layer
without any relay: SDP and candidates go over the Node process' stdin/stdout as JSON lines.
Everything binds 127.0.0.1 and uses no STUN, so it also runs in a loopback-only namespace:

    unshare -n -- bash -c 'ip link set lo up; .venv/bin/pytest tests/interop/test_peer_raw.py'
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from signaling.peer import InvalidDescription, Peer

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
NODE_PEER = HERE / "ndc_peer.mjs"
NODE = shutil.which("node")
HOST = ["127.0.0.1"]
STEP_TIMEOUT = 20.0  # generous: a loaded 2-core CI box runs aiortc's pure-Python SCTP slowly
MIB = 1 << 20
CHUNK = 16 << 10

pytestmark = [
    pytest.mark.interop,
]


class NodePeer:
    """Drives one ndc_peer.mjs process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.sigs: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, role: str, *opts: str) -> NodePeer:
        assert NODE is not None
        proc = await asyncio.create_subprocess_exec(
            NODE,
            str(NODE_PEER),
            "--role",
            role,
            "--bind",
            "127.0.0.1",
            *opts,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=HERE,
            limit=1 << 22,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            try:
                m = json.loads(raw)
            except ValueError:
                logger.warning("node: %r", raw)
                continue
            if "sig" in m:
                self.sigs.put_nowait(m["sig"])
            else:
                logger.debug("node event %s", m)
                self.events.append(m)
            self._changed.set()
        self.events.append({"ev": "eof"})
        self._changed.set()

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        await self.proc.stdin.drain()

    async def signal(self, sig: dict[str, Any]) -> None:
        await self.send({"sig": sig})

    async def command(self, cmd: str, **kw: Any) -> None:
        n = len(self.events)
        await self.send({"cmd": cmd, **kw})
        await self.wait_event("ack", lambda e: e.get("cmd") == cmd, start=n)

    async def next_sig(self) -> dict[str, Any]:
        async with asyncio.timeout(STEP_TIMEOUT):
            return await self.sigs.get()

    async def wait_event(
        self, name: str, pred: Callable[[dict[str, Any]], bool] | None = None, start: int = 0
    ) -> dict[str, Any]:
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                for e in self.events[start:]:
                    if e.get("ev") == name and (pred is None or pred(e)):
                        return e
                    if e.get("ev") == "error":
                        raise AssertionError(f"node reported {e}")
                if self.events and self.events[-1].get("ev") == "eof" and name != "eof":
                    raise AssertionError(f"node exited before {name!r}: {self.events[-5:]}")
                self._changed.clear()
                await self._changed.wait()

    def has_event(self, name: str) -> bool:
        return any(e.get("ev") == name for e in self.events)

    async def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()  # ndc_peer.mjs exits on stdin EOF
        try:
            async with asyncio.timeout(3):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@pytest.fixture
async def nodes() -> AsyncIterator[list[NodePeer]]:
    started: list[NodePeer] = []
    yield started
    for n in started:
        await n.stop()


@pytest.fixture
async def peers() -> AsyncIterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        await p.close()


class Inbox:
    """Collects what Peer.on_message delivers."""

    def __init__(self) -> None:
        self.items: list[bytes | str] = []
        self.binary_bytes = 0
        self.hash = hashlib.sha256()
        self.changed = asyncio.Event()
        self.bulk = False

    def __call__(self, data: bytes | str) -> None:
        if self.bulk and isinstance(data, bytes):
            self.hash.update(data)
            self.binary_bytes += len(data)
        else:
            self.items.append(data)
        self.changed.set()

    async def wait_for(self, pred: Callable[[], bool]) -> None:
        async with asyncio.timeout(STEP_TIMEOUT):
            while not pred():
                self.changed.clear()
                await self.changed.wait()


async def connect(
    py_offers: bool, node_opts: tuple[str, ...], nodes: list[NodePeer], peers: list[Peer]
) -> tuple[Peer, NodePeer, Inbox, dict[str, Any]]:
    """Run offer/answer/candidates between a Peer and a fresh ndc_peer.mjs; wait for open both sides."""
    inbox = Inbox()
    info: dict[str, Any] = {"candidate_results": [], "pending_before_description": 0}
    peer = Peer(initiator=py_offers, host_addresses=HOST, on_message=inbox, name="py")
    peers.append(peer)
    if py_offers:
        node = await NodePeer.start("answer", *node_opts)
        nodes.append(node)
        await node.wait_event("ready")  # keep Node's start-up out of the open time
        t0 = time.monotonic()
        offer = await peer.create_offer()
        await node.signal({"type": "offer", "sdp": offer})
        while True:
            sig = await node.next_sig()
            if sig["type"] == "candidate":
                info["candidate_results"].append(await peer.add_remote_candidate(sig["candidate"]))
                info["pending_before_description"] = peer.pending_candidate_count
                continue
            assert sig["type"] == "answer"
            await peer.accept_answer(sig["sdp"])
            break
    else:
        node = await NodePeer.start("offer", *node_opts)
        nodes.append(node)
        t0 = 0.0
        while True:
            sig = await node.next_sig()
            if not t0:
                t0 = time.monotonic()  # excludes Node's start-up (~0.1 s)
            if sig["type"] == "candidate":
                info["candidate_results"].append(await peer.add_remote_candidate(sig["candidate"]))
                info["pending_before_description"] = peer.pending_candidate_count
                continue
            assert sig["type"] == "offer"
            answer = await peer.accept_offer(sig["sdp"])
            await node.signal({"type": "answer", "sdp": answer})
            break

    got_candidate = asyncio.Event()
    if info["candidate_results"]:
        got_candidate.set()

    async def feed_late_candidates() -> None:
        # Trickled candidates that come after the description (desc-first ordering).
        while True:
            sig = await node.sigs.get()
            if sig["type"] == "candidate":
                info["candidate_results"].append(await peer.add_remote_candidate(sig["candidate"]))
                got_candidate.set()

    feeder = asyncio.ensure_future(feed_late_candidates())
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            await peer.wait_open()
        opened_py = time.monotonic()
        await node.wait_event("open")
        opened_node = time.monotonic()
        # Let candidates trickled right behind the description land before the caller inspects them.
        async with asyncio.timeout(STEP_TIMEOUT):
            await got_candidate.wait()
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
    info["open_ms_py"] = round((opened_py - t0) * 1000)
    info["open_ms_node"] = round((opened_node - t0) * 1000)
    print(
        f"\n[open] py_offers={py_offers} {' '.join(node_opts)}: py {info['open_ms_py']} ms, "
        f"node {info['open_ms_node']} ms"
    )
    return peer, node, inbox, info


# Node options by case name. "strip" removes candidates from Node's SDP, so the Python side can
# only learn Node's address from trickled candidates (checked via remote_candidates()).
NODE_OPTS = {
    "ndc-after": ("--cand-shape", "ndc", "--order", "desc-first"),
    "ndc-before-strip": ("--cand-shape", "ndc", "--order", "cands-first", "--sdp-cands", "strip"),
    "browser-before-strip": ("--cand-shape", "browser", "--order", "cands-first", "--sdp-cands", "strip"),
    "browser-after-strip": ("--cand-shape", "browser", "--order", "desc-first", "--sdp-cands", "strip"),
}
# (py offers?, node options): each set of options with either side offering.
CASES = [
    pytest.param(py_offers, opts, id=f"{'py' if py_offers else 'node'}-offers-{name}")
    for py_offers in (True, False)
    for name, opts in NODE_OPTS.items()
]


@pytest.mark.parametrize(("py_offers", "node_opts"), CASES)
async def test_connect_and_echo(
    py_offers: bool, node_opts: tuple[str, ...], nodes: list[NodePeer], peers: list[Peer]
) -> None:
    peer, node, inbox, info = await connect(py_offers, node_opts, nodes, peers)

    # Channel as Trystero creates it (spec §6.2), seen from both ends.
    open_ev = next(e for e in node.events if e["ev"] == "open")
    assert open_ev["label"] == "data" and peer.channel is not None and peer.channel.label == "data"
    assert open_ev["ordered"] is True and open_ev["negotiated"] is False
    assert open_ev["maxRetransmits"] is None and open_ev["maxPacketLifeTime"] is None
    if py_offers:
        # node-datachannel's polyfill caches the id at creation, before the DTLS role picks it
        # (its offerer reports 65535), so compare only when Node received the channel.
        assert open_ev["id"] == peer.channel.id
    assert peer.channel.ordered and not peer.channel.negotiated
    assert peer.connection_state == "connected"

    # Candidates: nothing left in the buffer, and Node's address reached ICE. With "strip" it can
    # only have come from the trickled candidates, which must all have been accepted. Otherwise
    # Node's SDP already ended its candidates (a=end-of-candidates) and the trickled copies are
    # reported as ignored, as aiortc would ignore them.
    assert info["candidate_results"]
    if "strip" in node_opts:
        assert all(info["candidate_results"])
    else:
        assert not any(info["candidate_results"])
    if "cands-first" in node_opts:
        assert info["pending_before_description"] >= 1
    assert peer.pending_candidate_count == 0
    assert any(c.ip == "127.0.0.1" and c.type == "host" for c in peer.remote_candidates())
    # Local side: loopback only.
    assert {c.ip for c in peer.local_candidates()} == {"127.0.0.1"}

    # Text from the remote arrives as str, unconverted.
    text = "héllo ✓ from node"
    await node.command("send", text=text)
    await inbox.wait_for(lambda: text in inbox.items)

    # Text-ish bytes, binary, a full 16 KiB chunk and an empty message echo back intact as bytes.
    samples = [
        "hello ✓ from python".encode(),
        os.urandom(1000),
        bytes(range(256)) * 64,
        b"",
    ]
    for s in samples:
        await peer.send(s)
    await inbox.wait_for(lambda: len(inbox.items) >= 1 + len(samples))
    assert inbox.items[1:] == samples
    assert all(isinstance(x, bytes) for x in inbox.items[1:])
    # Node logs each message before echoing it, but its stdout may be read after the echo arrived.
    await node.wait_event("msg", lambda e: e["kind"] == "binary" and e["bytes"] == 0)
    node_msgs = [e for e in node.events if e["ev"] == "msg" and e["kind"] == "binary"]
    assert [bytes.fromhex(e["hex"]) for e in node_msgs] == samples

    # The peer that goes away is noticed by the other side.
    await peer.close()
    assert peer.closed and peer.close_reason == "closed locally"
    await node.wait_event("dc-close")


@pytest.mark.parametrize("py_offers", [True, False], ids=["py-offers", "node-offers"])
async def test_bulk_1mib_both_ways(py_offers: bool, nodes: list[NodePeer], peers: list[Peer]) -> None:
    peer, node, inbox, _ = await connect(py_offers, ("--echo", "0"), nodes, peers)

    # Python -> Node: 64 x 16 KiB, checksummed by the receiver.
    data = os.urandom(MIB)
    await node.command("expect", bytes=MIB)
    t = time.monotonic()
    for i in range(0, MIB, CHUNK):
        await peer.send(data[i : i + CHUNK])
    done = await node.wait_event("expect-done")
    py_to_node_ms = round((time.monotonic() - t) * 1000)
    assert done["bytes"] == MIB
    assert done["sha256"] == hashlib.sha256(data).hexdigest()

    # Node -> Python, with Trystero's bufferedamountlow pacing on the sender.
    inbox.bulk = True
    t = time.monotonic()
    await node.command("bulk", bytes=MIB, msg=CHUNK)
    await inbox.wait_for(lambda: inbox.binary_bytes >= MIB)
    node_to_py_ms = round((time.monotonic() - t) * 1000)
    sent = await node.wait_event("bulk-sent")
    assert inbox.binary_bytes == MIB == sent["bytes"]
    assert inbox.hash.hexdigest() == sent["sha256"]
    print(f"\n[bulk] py_offers={py_offers}: py->node {py_to_node_ms} ms, node->py {node_to_py_ms} ms")

    # The send buffer is bounded by the high watermark and drains fully.
    async with asyncio.timeout(STEP_TIMEOUT):
        await peer.drain()
    assert peer.buffered_amount <= 256 << 10


@pytest.mark.parametrize("py_offers", [True, False], ids=["py-offers", "node-offers"])
async def test_node_close_seen_by_python(py_offers: bool, nodes: list[NodePeer], peers: list[Peer]) -> None:
    closed: list[str | None] = []
    peer, node, _, _ = await connect(py_offers, (), nodes, peers)
    peer.on_close = lambda: closed.append(peer.close_reason)
    await node.send({"cmd": "close"})
    async with asyncio.timeout(STEP_TIMEOUT):
        await peer.wait_closed()
    assert len(closed) == 1 and closed[0] in ("channel closed", "connection closed", "connection failed")
    assert peer.connection_state == "closed"
    with pytest.raises(ConnectionError):
        await peer.send(b"x")
    await node.wait_event("eof")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _assert_no_leftovers(fds_before: int, tasks_before: set[asyncio.Task[Any]]) -> None:
    # aiortc finishes a few fire-and-forget tasks after close(); give them a moment.
    async with asyncio.timeout(5):
        while True:
            extra = asyncio.all_tasks() - tasks_before - {asyncio.current_task()}
            if not extra and _open_fds() <= fds_before:
                return
            await asyncio.sleep(0.02)


def _without(sdp: str, *prefixes: str) -> str:
    return "\r\n".join(line for line in sdp.splitlines() if not line.startswith(prefixes)) + "\r\n"


async def test_garbage_sdp_raises_cleanly(nodes: list[NodePeer]) -> None:
    node = await NodePeer.start("offer")
    nodes.append(node)
    real_offer = ""
    while not real_offer:
        sig = await node.next_sig()
        if sig["type"] == "offer":
            real_offer = sig["sdp"]
    audio_only = (
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n"
        "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuv\r\na=setup:actpass\r\n"
        "a=fingerprint:sha-256 00:11\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    garbage_offers = [
        "garbage",
        "",
        "v=0\r\n",
        "\x00\xff" * 50,
        audio_only,
        _without(real_offer, "a=fingerprint"),
        _without(real_offer, "a=ice-pwd", "a=ice-ufrag"),
        real_offer.replace("m=application", "m=application x"),
        real_offer.replace("a=candidate:", "a=candidate:1 broken\r\na=x:"),
    ]
    fds = _open_fds()
    tasks = asyncio.all_tasks()
    for bad in garbage_offers:
        peer = Peer(initiator=False, host_addresses=HOST)
        with pytest.raises(InvalidDescription):
            await peer.accept_offer(bad)
        assert peer.closed and peer.connection_state == "closed"
        assert await peer.add_remote_candidate("candidate:1 1 udp 1 127.0.0.1 9 typ host") is False
    await _assert_no_leftovers(fds, tasks)

    # An offerer that already gathered (UDP socket open) and gets a bad answer: aiortc itself
    # rejects an SDP with a=setup:actpass as an answer; our check lets it through.
    for bad_answer in ("garbage", real_offer):
        peer = Peer(initiator=True, host_addresses=HOST)
        await peer.create_offer()
        assert _open_fds() > fds
        with pytest.raises(InvalidDescription):
            await peer.accept_answer(bad_answer)
        assert peer.closed
        await _assert_no_leftovers(fds, tasks)
