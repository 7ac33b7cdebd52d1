"""Our rooms over nostr (wire 0.25) against real Trystero 0.25.4 peers through real local relays.

The cases that exercise the relay run against both relays of tests.conftest.NOSTR_RELAYS (ids
``[pypi-relay]``: PyPI ``nostr-relay``, ``[p2pdiff-relay]``: p2pdiff's own, issue 15), each
shared by the module; tests that kill a relay start their own of the same kind. The cases mirror
test_room_mqtt.py: (a) meet in either order and role, (b) payloads, (c) password, (d) leave, (f)
relay restart; then cross-relay duplicates, a rate-limiting relay, and the REST server while its
relay is down. The bad-input cases are about our client, not the relay, and run once, on PyPI's:
garbage on the room's topics (through a PyPI relay that relays events with bad signatures, which
ours never does), a relay that never answers, and a relay that closes mid-subscription.
Run them in a loopback-only namespace: ``scripts/netns.sh .venv/bin/pytest tests/interop/test_room_nostr.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

import signaling
from p2pdiff.app import create_app
from signaling import Timeouts, crypto
from signaling.relays import NostrKeys
from signaling.relays import NostrRelay as NostrClient
from signaling.relays.nostr import event_message, make_event
from tests.conftest import NOSTR_RELAYS, NostrRelayService, event_rate_limit
from tests.interop.jspeer import JsPeer
from tests.interop.test_helper_app import helper_config, poll, relays_are
from tests.services import NostrRelay, running
from tests.support import service_or_fail

from .conftest import SessionFactory
from .room_cases import (
    STEP,
    RigFactory,
    eventually,
    join_and_ping,
    leave_both_ways,
    new_room_id,
    password,
    payloads,
    relay_restart,
    rig_factory,
    session_relay,
    silent_listener,
    still_fine,
)

pytestmark = [
    pytest.mark.interop,
]


@pytest.fixture(scope="module")
def lax_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NostrRelay]:
    """A relay that relays events with bad signatures and ids (it verifies nothing)."""
    with running(service_or_fail(NostrRelay, tmp_path_factory.mktemp("nostr-lax"), verify=False)) as service:
        yield service


@pytest.fixture
def rig(nostr_relay: NostrRelayService, app_id: str, signaling_cleanup: None) -> RigFactory:
    """``rig(js_urls=None, our_urls=None, **config)``: JS on ``js_urls`` (default: the shared
    relay of the test's kind), us on ``our_urls`` (default: the same)."""
    return rig_factory("nostr", [nostr_relay.url], app_id)


@pytest.fixture
def pypi_relay(nostr_relays: Callable[[str], NostrRelayService]) -> NostrRelayService:
    """The module's PyPI relay, for the cases that run once (about our client, not the relay)."""
    return nostr_relays("pypi-relay")


@pytest.fixture
def pypi_rig(pypi_relay: NostrRelayService, app_id: str, signaling_cleanup: None) -> RigFactory:
    """``rig`` on the PyPI relay only."""
    return rig_factory("nostr", [pypi_relay.url], app_id)


def our_relay(url: str) -> NostrClient:
    return session_relay(url, NostrClient)


# --------------------------------------------------------------------------- (a) - (f)


@pytest.mark.parametrize("role", ["offer", "answer"], ids=["we-offer", "we-answer"])
@pytest.mark.parametrize("js_first", [True, False], ids=["js-first", "py-first"])
async def test_join_and_ping(js_first: bool, role: str, rig: RigFactory, sessions: SessionFactory) -> None:
    join_ms = await join_and_ping(rig(), sessions(role), js_first=js_first, role=role)
    assert join_ms < 5000  # announces and answers are immediate over nostr


async def test_payloads_both_ways(rig: RigFactory) -> None:
    await payloads(rig())


async def test_password_room(rig: RigFactory) -> None:
    await password(rig())


async def test_leave_both_ways(rig: RigFactory) -> None:
    await leave_both_ways(rig())


async def test_relay_restart(tmp_path: Path, nostr_relay_name: str, rig: RigFactory) -> None:
    with running(service_or_fail(NOSTR_RELAYS[nostr_relay_name], tmp_path / "nostr")) as own:
        await relay_restart(rig(js_urls=[own.url]), own)
        assert our_relay(own.url).counters["req"] >= 2  # subscriptions re-sent after the restart


# --------------------------------------------------------------------------- duplicates across relays


async def test_two_relays_one_connection(
    nostr_relay: NostrRelayService, lax_relay: NostrRelay, rig: RigFactory
) -> None:
    """JS publishes every announce, offer, answer and candidate on both relays: we negotiate once,
    and candidates held before their offer are not stored twice."""
    both = rig(js_urls=[nostr_relay.url, lax_relay.url])
    async with JsPeer.start("node") as js:
        room_id = new_room_id("dup")
        room, _, _ = await both.meet(js, room_id, js_first=True, session=None)
        app = signaling.default_session().apps[both.app_id]
        await eventually(lambda: not app.negotiator.pending, "negotiations to settle")
        assert set(signaling.default_session().links(both.app_id)) == {js.self_id}
        stats = room.stats
        # Both relays delivered JS's messages (it announces on each) ...
        assert all(our_relay(url).counters.get("delivered", 0) > 0 for url in both.urls)
        # ... yet nothing was negotiated twice or overflowed a buffer.
        assert stats["dropped"] == {} and stats["app"]["dropped"] == {}, stats
        assert "glare_ignored" not in stats and "negotiation_failures" not in stats, stats
        assert 0 < await room.ping(js.self_id) < 2000


# --------------------------------------------------------------------------- bad input


def _forged(
    keys: NostrKeys, topic: str, content: str, *, kind: int | None = None, bad_sig: bool = False
) -> str:
    """An EVENT frame as a hostile client would write it."""
    event = make_event(keys, topic, content, int(time.time()))
    if kind is not None:  # a valid signature over the wrong kind
        event["kind"] = kind
        event["id"] = crypto.nostr_event_id(keys.pubkey, event["created_at"], kind, event["tags"], content)
        event["sig"] = keys.sign(event["id"])
    if bad_sig:
        event["sig"] = ("0" if event["sig"][0] != "0" else "1") + event["sig"][1:]
    return event_message(event)


async def test_garbage_on_room_topics(
    lax_relay: NostrRelay, pypi_rig: RigFactory, loop_errors: list[dict[str, Any]]
) -> None:
    """Bad signatures, wrong kinds and garbage contents on the room's root topic and on our self
    topic, through a relay that checks nothing: dropped and counted, the connected peer is fine."""
    r = pypi_rig(js_urls=[lax_relay.url])
    async with JsPeer.start("node") as js:
        room_id = new_room_id("garbage")
        room, watch, _ = await r.meet(js, room_id, js_first=True)
        signaller = room.signaller
        root, mine = signaller.root_topic, signaller.self_topic
        keys = NostrKeys()
        ghost = "ghost" + crypto.gen_id(15)
        key = signaller.key

        def content(**fields: Any) -> str:
            return orjson.dumps(fields).decode()

        # On both topics (JS hears the root topic too: nothing here makes it do anything).
        common = [
            "not json",
            "[1,2,3]",
            "null",
            '{"no":"peerId"}',
            content(peerId=ghost, offer=5),
            content(peerId=ghost, offer=""),
        ]
        # Only on our self topic: forged signals, some claiming to be the connected peer.
        targeted = [
            content(peerId="x" * 500),
            content(peerId=ghost, offerId="o1", offer="not sealed"),
            content(peerId=ghost, offerId="o2", offer=crypto.encrypt(key, "v=0 not an sdp")),
            content(peerId=ghost, answer=crypto.encrypt(key, "v=0")),
            content(peerId=ghost, candidate="garbage"),
            content(peerId=js.self_id, answer=crypto.encrypt(key, "v=0")),
            content(peerId=js.self_id, offerId="o3", offer=crypto.encrypt(key, "v=0")),
        ]
        frames = [_forged(keys, topic, c) for topic in (mine, root) for c in common]
        frames += [_forged(keys, mine, c) for c in targeted]
        for topic, other in ((mine, root), (root, mine)):
            frames.append(_forged(keys, topic, "bad signature", bad_sig=True))
            frames.append(_forged(keys, topic, "wrong kind", kind=crypto.nostr_kind(other)))
        async with aiohttp.ClientSession() as http, http.ws_connect(lax_relay.url) as ws:
            for frame in frames:
                await ws.send_str(frame)
            # Stay until the relay took them all (it drops what a closing socket still had).
            async with asyncio.timeout(STEP):
                for _ in frames:
                    assert orjson.loads((await ws.receive()).data)[0] == "OK"
        ours = our_relay(lax_relay.url)

        def relay_dropped(reason: str) -> int:
            return ours.counters.get(f"dropped:{reason}", 0)

        await eventually(
            lambda: relay_dropped("bad_sig") >= 2 and relay_dropped("wrong_kind") >= 2,
            "bad signatures and kinds dropped at the relay",
        )
        await eventually(lambda: sum(room.stats["dropped"].values()) >= 10, "garbage dropped by the room")
        await asyncio.sleep(1)  # the forged offer's negotiation fails on its bad SDP
        await still_fine(room, js, room_id, watch)
        dropped = room.stats["dropped"]
        assert {"relay_not_json", "relay_not_object", "relay_no_peer_id", "relay_bad_field"} <= set(dropped)
        assert dropped.get("relay_bad_peer_id", 0) >= 1 and dropped.get("decrypt_failed", 0) >= 1
        assert set(signaling.default_session().links(r.app_id)) == {js.self_id}
        assert set(room.peers) == {js.self_id}
    assert loop_errors == []


@contextlib.asynccontextmanager
async def _mute_relay(how: str, aiohttp_server: Any) -> AsyncIterator[str]:
    """A relay URL that accepts connections and never answers."""
    if how == "tcp":
        with silent_listener() as url:
            yield url
        return

    sockets: list[web.WebSocketResponse] = []

    async def mute(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)  # not even pongs
        sockets.append(ws)
        await ws.prepare(request)
        async for _ in ws:  # read everything, answer nothing
            pass
        return ws

    app = web.Application()
    app.router.add_get("/", mute)
    server = await aiohttp_server(app, host="127.0.0.1")
    try:
        yield f"ws://127.0.0.1:{server.port}/"
    finally:
        for ws in sockets:  # or the server's shutdown waits for our client to give up
            await ws.close()


@pytest.mark.parametrize("how", ["tcp", "websocket"])
async def test_relay_that_never_answers(
    how: str,
    pypi_relay: NostrRelayService,
    pypi_rig: RigFactory,
    aiohttp_server: Any,
    loop_errors: list[dict[str, Any]],
) -> None:
    """One relay in our list accepts the connection and then says nothing (tcp: not even the
    WebSocket upgrade; websocket: no EOSE, no OK): the room works through the other one."""

    async with _mute_relay(how, aiohttp_server) as dead:
        r = pypi_rig(js_urls=[pypi_relay.url], our_urls=[dead, pypi_relay.url])
        async with JsPeer.start("node") as js:
            room_id = new_room_id("mute")
            t0 = time.monotonic()
            room, watch, _ = await r.meet(js, room_id, js_first=True)
            assert time.monotonic() - t0 < 5
            assert room.relay_states[dead] != "connected" and room.relay_states[pypi_relay.url] == "connected"
            await still_fine(room, js, room_id, watch)
    assert loop_errors == []


async def test_relay_that_closes_mid_subscription(
    pypi_relay: NostrRelayService,
    pypi_rig: RigFactory,
    aiohttp_server: Any,
    loop_errors: list[dict[str, Any]],
) -> None:
    """A relay acknowledges our subscription, then drops the socket, every time: we reconnect
    with backoff and the room keeps working through the other relay."""
    sessions_seen = 0

    async def flaky(request: web.Request) -> web.WebSocketResponse:
        nonlocal sessions_seen
        sessions_seen += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            frame = orjson.loads(msg.data)
            if frame[0] == "REQ":
                await ws.send_str(orjson.dumps(["EOSE", frame[1]]).decode())
                await asyncio.sleep(0.3)
                break
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/", flaky)
    server = await aiohttp_server(app, host="127.0.0.1")
    flaky_url = f"ws://127.0.0.1:{server.port}/"
    r = pypi_rig(js_urls=[pypi_relay.url], our_urls=[flaky_url, pypi_relay.url])
    async with JsPeer.start("node") as js:
        room_id = new_room_id("flaky")
        room, watch, _ = await r.meet(js, room_id, js_first=True)
        await eventually(lambda: sessions_seen >= 2, "a reconnect to the flaky relay")
        await asyncio.sleep(2)
        await still_fine(room, js, room_id, watch)
        # Backoff, not a tight loop: 3.3 s doubling (jittered) allows a handful in a few seconds.
        assert sessions_seen <= 8, sessions_seen
        assert room.relay_states[pypi_relay.url] == "connected"
    assert loop_errors == []


async def test_rate_limited_relay_pauses_announces(
    tmp_path: Path, nostr_relay_name: str, rig: RigFactory
) -> None:
    """A relay that answers rate-limited: our announces there pause (and are not counted as
    sent) instead of going on into the refusal."""
    limit = event_rate_limit(nostr_relay_name, 1, seconds=1)
    with running(service_or_fail(NOSTR_RELAYS[nostr_relay_name], tmp_path / "nostr", **limit)) as strict:
        fast = Timeouts(announce_warmup=(0.05,) * 3, announce_interval=1.0, announce_interval_stable=1.0)
        config = rig(js_urls=[strict.url]).make_config(timeouts=fast)
        room = signaling.join_room(config, new_room_id("limited"))
        await eventually(lambda: room.stats.get("announces_deferred", 0) >= 1, "a deferred announce")
        ours = our_relay(strict.url)
        assert ours.counters.get("rejected:rate-limited", 0) >= 1
        assert ours.announce_backoff > 30  # Trystero's 60 s pause, minus what has passed
        sent = room.stats["announces_out"]
        await asyncio.sleep(3)  # three more 1 s intervals: all deferred
        assert room.stats["announces_out"] == sent
        assert room.relay_states[strict.url] == "connected"


# --------------------------------------------------------------------------- REST while the relay is down


async def test_rest_keeps_serving_while_the_relay_is_down(
    aiohttp_client: Any, tmp_path: Path, app_id: str, nostr_relay_name: str
) -> None:
    with running(service_or_fail(NOSTR_RELAYS[nostr_relay_name], tmp_path / "nostr")) as own:
        config = helper_config(tmp_path, "nostr", [own.url], app_id)
        client = await aiohttp_client(create_app(config))
        assert (await client.post("/api/join/lobby")).status == 202

        await poll(lambda: relays_are(client, "connected"))
        own.kill()
        await poll(lambda: relays_are(client, "reconnecting"))
        for i in range(20):
            t0 = time.monotonic()
            resp = await client.post("/api/queue/lobby", json={"id": f"t{i}", "prompt": "still here"})
            assert resp.status == 201
            assert time.monotonic() - t0 < 1.0
        own.start()
        await poll(lambda: relays_are(client, "connected"), within=STEP * 3)
        queue = await (await client.get("/api/queue/lobby")).json()
        assert len(queue["queue"]) == 20
