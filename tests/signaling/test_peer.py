"""Unit tests for signaling.peer: candidate parsing and buffering, ICE host-address restriction,
ICE server config, and a Python<->Python smoke pair.

The py<->py pair only shows that our wrapper is wired correctly; interoperability with the stack
Trystero runs on is what tests/interop/test_peer_raw.py checks against node-datachannel.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator

import aioice.ice
import pytest
from aiortc import RTCIceCandidate, RTCIceServer

from signaling import peer as peer_mod
from signaling.peer import (
    MAX_PENDING_CANDIDATES,
    ChannelNotOpen,
    InvalidCandidate,
    InvalidDescription,
    MessageTooLarge,
    Peer,
    PeerError,
    get_host_address_restriction,
    host_addresses,
    ice_servers_from_config,
    parse_candidate,
    restrict_host_addresses,
)

LOOPBACK = ["127.0.0.1"]
TIMEOUT = 15.0
HOST_LINE = "candidate:842163049 1 udp 1677729535 127.0.0.1 50000 typ host generation 0 ufrag abcd"


@pytest.fixture(autouse=True)
def _pristine_aioice() -> Iterator[None]:
    original = aioice.ice.get_host_addresses
    yield
    restrict_host_addresses(None)
    assert aioice.ice.get_host_addresses is original


def _sdp_candidate_ips(sdp: str) -> set[str]:
    return {line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")}


# --------------------------------------------------------------------------- parse_candidate


def test_parse_browser_shape() -> None:
    c = parse_candidate(
        {"candidate": HOST_LINE, "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": "abcd"}
    )
    assert c.ice is not None and not c.end_of_candidates
    assert (c.ice.ip, c.ice.port, c.ice.type, c.ice.protocol) == ("127.0.0.1", 50000, "host", "udp")
    assert (c.ice.sdpMid, c.ice.sdpMLineIndex) == ("0", 0)
    assert c.username_fragment == "abcd"


def test_parse_node_datachannel_shape() -> None:
    c = parse_candidate(
        {
            "candidate": "a=candidate:1 1 UDP 2114977791 127.0.0.1 40000 typ host",
            "sdpMLineIndex": None,
            "sdpMid": "0",
            "usernameFragment": None,
        }
    )
    assert c.ice is not None and c.ice.port == 40000 and c.ice.protocol == "UDP"
    assert (c.ice.sdpMid, c.ice.sdpMLineIndex) == ("0", None)
    assert c.username_fragment is None


def test_parse_json_string_and_bare_lines_share_a_key() -> None:
    as_json = json.dumps({"candidate": HOST_LINE, "sdpMid": "0", "sdpMLineIndex": 0})
    keys = {
        parse_candidate(as_json).key,
        parse_candidate(HOST_LINE).key,
        parse_candidate("a=" + HOST_LINE).key,
        parse_candidate(HOST_LINE.removeprefix("candidate:")).key,
    }
    assert len(keys) == 1
    # Without sdpMid/sdpMLineIndex the single data m-line is targeted.
    bare = parse_candidate(HOST_LINE).ice
    assert bare is not None and bare.sdpMLineIndex == 0 and bare.sdpMid is None


def test_parse_srflx_and_tcp() -> None:
    srflx = parse_candidate("candidate:1 1 udp 100 203.0.113.5 6000 typ srflx raddr 10.0.0.2 rport 5000").ice
    assert srflx is not None and srflx.type == "srflx"
    assert (srflx.relatedAddress, srflx.relatedPort) == ("10.0.0.2", 5000)
    tcp = parse_candidate("candidate:2 1 tcp 50 10.0.0.2 9 typ host tcptype active").ice
    assert tcp is not None and tcp.tcpType == "active"


def test_parse_rtc_ice_candidate_passthrough() -> None:
    ice = RTCIceCandidate(
        component=1,
        foundation="f",
        ip="127.0.0.1",
        port=1,
        priority=1,
        protocol="udp",
        type="host",
        sdpMid="0",
    )
    assert parse_candidate(ice).ice is ice


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "a=end-of-candidates",
        "end-of-candidates",
        {"candidate": ""},
        {"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0},
        '{"candidate":""}',
    ],
)
def test_parse_end_of_candidates(value: object) -> None:
    assert parse_candidate(value).end_of_candidates


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "candidate:1 1 udp 1 127.0.0.1",
        "candidate:1 1 udp x 127.0.0.1 9 typ host",
        "candidate:1 1 udp 1 127.0.0.1 9 type host",
        "{not json",
        42,
        ["candidate"],
        {"candidate": 5},
        {"candidate": HOST_LINE, "sdpMLineIndex": -1},
        {"candidate": HOST_LINE, "sdpMLineIndex": True},
        {"candidate": HOST_LINE, "sdpMid": 0},
        {"candidate": HOST_LINE, "usernameFragment": 1},
    ],
)
def test_parse_rejects(value: object) -> None:
    with pytest.raises(InvalidCandidate):
        parse_candidate(value)


# --------------------------------------------------------------------------- buffering


async def test_candidates_buffered_before_remote_description() -> None:
    p = Peer(initiator=False, host_addresses=LOOPBACK)
    try:
        assert await p.add_remote_candidate({"candidate": HOST_LINE, "sdpMid": "0"}) is True
        assert p.pending_candidate_count == 1
        # The same candidate again, over another relay or in another shape: dropped.
        assert await p.add_remote_candidate("a=" + HOST_LINE) is False
        assert await p.add_remote_candidate(HOST_LINE) is False
        # End-of-candidates and garbage are dropped, never raised.
        assert await p.add_remote_candidate(None) is False
        assert await p.add_remote_candidate({"candidate": ""}) is False
        assert await p.add_remote_candidate("garbage") is False
        assert await p.add_remote_candidate({"candidate": 7}) is False
        assert p.pending_candidate_count == 1
    finally:
        await p.close()
    assert p.pending_candidate_count == 0
    assert await p.add_remote_candidate(HOST_LINE.replace("50000", "50001")) is False


async def test_candidate_buffer_is_bounded() -> None:
    p = Peer(initiator=False, host_addresses=LOOPBACK)
    try:
        results = [
            await p.add_remote_candidate(f"candidate:{i} 1 udp 1 127.0.0.1 {20000 + i} typ host")
            for i in range(MAX_PENDING_CANDIDATES + 5)
        ]
        assert results == [True] * MAX_PENDING_CANDIDATES + [False] * 5
        assert p.pending_candidate_count == MAX_PENDING_CANDIDATES
    finally:
        await p.close()


def _trickle_style(sdp: str) -> str:
    """An offer as a trickling browser sends it: no candidates, no end-of-candidates."""
    keep = [ln for ln in sdp.split("\r\n") if not ln.startswith(("a=candidate:", "a=end-of-candidates"))]
    return "\r\n".join(keep)


async def test_buffered_candidates_flushed_into_ice_on_offer() -> None:
    offerer = Peer(initiator=True, host_addresses=LOOPBACK)
    answerer = Peer(initiator=False, host_addresses=LOOPBACK)
    try:
        offer = await offerer.create_offer()
        ufrag = next(ln.split(":", 1)[1] for ln in offer.splitlines() if ln.startswith("a=ice-ufrag:"))
        host = offerer.local_candidates()[0]
        line = f"candidate:{host.foundation} 1 udp {host.priority} 127.0.0.1 {host.port} typ host"
        extra = "candidate:9 1 udp 5 127.0.0.1 9 typ host"
        assert await answerer.add_remote_candidate(
            {"candidate": line, "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": ufrag}
        )
        assert await answerer.add_remote_candidate(
            {"candidate": extra, "sdpMid": "0", "usernameFragment": "other-session"}
        )
        await answerer.accept_offer(_trickle_style(offer))
        assert answerer.pending_candidate_count == 0
        remote = {(c.ip, c.port) for c in answerer.remote_candidates()}
        assert remote == {("127.0.0.1", host.port)}  # the other ICE session's candidate was dropped
        # After the description the same ufrag check applies directly.
        late = "candidate:8 1 udp 5 127.0.0.1 8 typ host"
        bad = {"candidate": late, "sdpMid": "0", "usernameFragment": "nope"}
        good = {"candidate": late, "sdpMid": "0", "usernameFragment": ufrag}
        assert await answerer.add_remote_candidate(bad) is False
        assert await answerer.add_remote_candidate(good) is True
        assert ("127.0.0.1", 8) in {(c.ip, c.port) for c in answerer.remote_candidates()}
    finally:
        await offerer.close()
        await answerer.close()


async def test_candidates_after_end_of_candidates_sdp_are_reported_ignored() -> None:
    offerer = Peer(initiator=True, host_addresses=LOOPBACK)
    answerer = Peer(initiator=False, host_addresses=LOOPBACK)
    try:
        offer = await offerer.create_offer()
        assert "a=end-of-candidates" in offer  # aiortc never trickles
        await answerer.accept_offer(offer)
        assert await answerer.add_remote_candidate("candidate:8 1 udp 5 127.0.0.1 8 typ host") is False
    finally:
        await offerer.close()
        await answerer.close()


# --------------------------------------------------------------------------- host addresses


def test_restriction_on_and_off() -> None:
    original = aioice.ice.get_host_addresses
    unrestricted = original(True, True)
    assert "127.0.0.1" not in unrestricted  # aioice's default skips loopback

    assert restrict_host_addresses(LOOPBACK) is None
    assert aioice.ice.get_host_addresses is not original
    assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses(False, True) == []
    assert get_host_address_restriction() == ("127.0.0.1",)

    assert restrict_host_addresses(["127.0.0.1", "::1", "127.0.0.1"]) == ("127.0.0.1",)
    assert aioice.ice.get_host_addresses(True, False) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1", "::1"]

    assert restrict_host_addresses([]) == ("127.0.0.1", "::1")
    assert aioice.ice.get_host_addresses(True, True) == []

    restrict_host_addresses(None)
    assert aioice.ice.get_host_addresses is original
    assert get_host_address_restriction() is None
    assert aioice.ice.get_host_addresses(True, True) == unrestricted


def test_restriction_validates() -> None:
    with pytest.raises(ValueError):
        restrict_host_addresses(["localhost"])
    with pytest.raises(TypeError):
        restrict_host_addresses("127.0.0.1")  # type: ignore[arg-type]
    assert get_host_address_restriction() is None


async def test_scoped_restriction_is_per_task() -> None:
    restrict_host_addresses(["127.0.0.2"])
    seen: dict[str, list[str]] = {}
    gate = asyncio.Event()

    async def worker(name: str, addrs: list[str] | None) -> None:
        with host_addresses(addrs):
            await gate.wait()  # both scopes are active at the same time
            seen[name] = aioice.ice.get_host_addresses(True, True)

    tasks = [
        asyncio.ensure_future(worker("a", ["127.0.0.1"])),
        asyncio.ensure_future(worker("b", ["127.0.0.3"])),
    ]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    assert seen == {"a": ["127.0.0.1"], "b": ["127.0.0.3"]}
    assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.2"]
    with host_addresses(None):
        assert get_host_address_restriction() is None  # aioice's own choice inside
    assert peer_mod._active_scopes == 0


async def test_peer_candidates_loopback_only_with_restriction() -> None:
    p = Peer(initiator=True, host_addresses=LOOPBACK)
    try:
        sdp = await p.create_offer()
        assert _sdp_candidate_ips(sdp) == {"127.0.0.1"}
        assert {c.ip for c in p.local_candidates()} == {"127.0.0.1"}
        assert {c.type for c in p.local_candidates()} == {"host"}  # no STUN configured
    finally:
        await p.close()
    # The per-connection scope does not outlive the call.
    assert get_host_address_restriction() is None


async def test_process_wide_restriction_applies_to_peers() -> None:
    restrict_host_addresses(LOOPBACK)
    p = Peer(initiator=True)
    try:
        assert _sdp_candidate_ips(await p.create_offer()) == {"127.0.0.1"}
    finally:
        await p.close()


async def test_no_restriction_means_aioice_default() -> None:
    p = Peer(initiator=True)
    try:
        ips = _sdp_candidate_ips(await p.create_offer())
    finally:
        await p.close()
    assert "127.0.0.1" not in ips
    assert ips == set(aioice.ice.get_host_addresses(True, True))


# --------------------------------------------------------------------------- ICE servers


def test_ice_servers_from_config() -> None:
    assert ice_servers_from_config(None) == []
    assert ice_servers_from_config([]) == []
    servers = ice_servers_from_config(
        [
            "stun:127.0.0.1:3478",
            {"urls": ["turn:127.0.0.1:3478"], "username": "u", "credential": "p"},
            RTCIceServer(urls="stun:127.0.0.1:3479"),
        ]
    )
    assert servers[0] == RTCIceServer(urls="stun:127.0.0.1:3478")
    assert servers[1] == RTCIceServer(urls=["turn:127.0.0.1:3478"], username="u", credential="p")
    assert servers[2].urls == "stun:127.0.0.1:3479"
    with pytest.raises(ValueError):
        ice_servers_from_config([{"username": "u"}])
    with pytest.raises(TypeError):
        ice_servers_from_config([42])  # type: ignore[list-item]


# --------------------------------------------------------------------------- py <-> py smoke


PairT = tuple[Peer, Peer, list[bytes | str], list[str]]


@pytest.fixture
async def pair() -> AsyncIterator[PairT]:
    got: list[bytes | str] = []
    events: list[str] = []
    a = Peer(
        initiator=True,
        host_addresses=LOOPBACK,
        name="a",
        on_open=lambda: events.append("a-open"),
        on_close=lambda: events.append("a-close"),
    )
    b = Peer(
        initiator=False,
        host_addresses=LOOPBACK,
        name="b",
        on_message=got.append,
        on_open=lambda: events.append("b-open"),
        on_close=lambda: events.append("b-close"),
    )
    async with asyncio.timeout(TIMEOUT):
        answer = await b.accept_offer(await a.create_offer())
        await a.accept_answer(answer)
        await asyncio.gather(a.wait_open(), b.wait_open())
    yield a, b, got, events
    await a.close()
    await b.close()


async def _until(pred: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        # Polls state that aiortc callbacks change; an Event per condition would only add noise.
        while not pred():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_pair_opens_like_trystero(pair: PairT) -> None:
    a, b, _, events = pair
    assert sorted(events) == ["a-open", "b-open"]
    for p in (a, b):
        assert p.channel.label == "data" and p.channel.ordered and not p.channel.negotiated
        assert p.channel.maxRetransmits is None and p.channel.maxPacketLifeTime is None
        assert p.connection_state == "connected" and p.is_open
    assert a.channel.id == b.channel.id
    # Our SDP carries a single sha-256 fingerprint (see _sha256_fingerprint_only).
    fps = [ln for ln in a.local_description.splitlines() if ln.startswith("a=fingerprint:")]
    assert len(fps) == 1 and fps[0].startswith("a=fingerprint:sha-256 ")


async def test_pair_messages(pair: PairT) -> None:
    a, _, got, _ = pair
    await a.send(b"\x01binary")
    a.send_nowait(bytearray(b"\x02more"))
    a.channel.send("a text frame")  # what a browser could send; we never do
    await _until(lambda: len(got) == 3)
    assert got == [b"\x01binary", b"\x02more", "a text frame"]
    with pytest.raises(TypeError):
        await a.send("text")  # type: ignore[arg-type]
    with pytest.raises(MessageTooLarge):
        await a.send(bytes(65537))
    assert a.max_message_size == 65536


async def test_early_messages_kept_until_handler_set(pair: PairT) -> None:
    a, b, _, _ = pair
    b.on_message = None
    for i in range(3):
        await a.send(bytes([i]))
    await asyncio.sleep(0.3)
    later: list[bytes | str] = []
    b.on_message = later.append
    assert later == [b"\x00", b"\x01", b"\x02"]


async def test_callback_exception_does_not_break_channel(pair: PairT) -> None:
    a, b, _, _ = pair
    got: list[bytes | str] = []

    def handler(data: bytes | str) -> None:
        got.append(data)
        raise RuntimeError("boom")

    b.on_message = handler
    await a.send(b"1")
    await a.send(b"2")
    await _until(lambda: len(got) == 2)
    assert b.is_open


async def test_send_is_back_pressured(pair: PairT) -> None:
    a, b, _, _ = pair
    a._buffer_high, a._buffer_low = 128 << 10, 32 << 10  # small, to make the effect visible
    a.channel.bufferedAmountLowThreshold = a._buffer_low
    digest = hashlib.sha256()
    received = 0

    def on_message(data: bytes | str) -> None:
        nonlocal received
        assert isinstance(data, bytes)
        digest.update(data)
        received += len(data)

    b.on_message = on_message
    data = os.urandom(2 << 20)
    peak = 0
    for i in range(0, len(data), 16384):
        await a.send(data[i : i + 16384])
        peak = max(peak, a.buffered_amount)
    assert peak <= (128 << 10)
    await _until(lambda: received == len(data))
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    async with asyncio.timeout(TIMEOUT):
        await a.drain()


async def test_close_seen_by_other_side(pair: PairT) -> None:
    a, b, _, events = pair
    await a.close()
    assert a.closed and a.close_reason == "closed locally" and a.connection_state == "closed"
    async with asyncio.timeout(TIMEOUT):
        await b.wait_closed()
    assert b.close_reason in ("channel closed", "connection closed", "connection failed")
    assert b.connection_state == "closed"
    assert events.count("a-close") == 1 and events.count("b-close") == 1
    await a.close()  # idempotent, no second callback
    assert events.count("a-close") == 1
    with pytest.raises(ChannelNotOpen):
        await a.send(b"x")
    with pytest.raises(ChannelNotOpen):
        await a.wait_open()


async def test_drain_wakes_on_close(pair: PairT) -> None:
    a, *_ = pair
    a._buffer_low = 0
    a.channel.bufferedAmountLowThreshold = 0
    for _ in range(64):
        a.send_nowait(bytes(16384))
    drain = asyncio.ensure_future(a.drain())
    await asyncio.sleep(0)
    await a.close()
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(ChannelNotOpen):
            await drain


# --------------------------------------------------------------------------- misuse


async def test_role_and_order_errors() -> None:
    offerer = Peer(initiator=True, host_addresses=LOOPBACK)
    answerer = Peer(initiator=False, host_addresses=LOOPBACK)
    try:
        with pytest.raises(PeerError):
            await answerer.create_offer()
        with pytest.raises(PeerError):
            await offerer.accept_offer("v=0")
        with pytest.raises(PeerError):
            await offerer.accept_answer("v=0")  # before create_offer
        with pytest.raises(ChannelNotOpen):
            offerer.send_nowait(b"x")  # not open yet
        await offerer.create_offer()
        with pytest.raises(PeerError):
            await offerer.create_offer()
    finally:
        await offerer.close()
        await answerer.close()
    with pytest.raises(ValueError):
        Peer(initiator=True, buffer_high=10, buffer_low=10)


async def test_invalid_offer_closes_peer() -> None:
    p = Peer(initiator=False, host_addresses=LOOPBACK)
    closed: list[str | None] = []
    p.on_close = lambda: closed.append(p.close_reason)
    with pytest.raises(InvalidDescription):
        await p.accept_offer("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n")
    assert p.closed and closed == ["invalid remote offer"]
    with pytest.raises(ChannelNotOpen):
        await p.accept_offer("v=0")
