"""Interop cases shared by the nostr and torrent room tests (test_room_nostr.py, test_room_torrent.py).

The MQTT file (test_room_mqtt.py) spells the same cases out for one broker; here they take a
:class:`Rig`: the strategy, the relay URLs the JS peers use, and a RoomConfig factory for ours.
Payload exchange and the Watch helper are the MQTT file's, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import signaling
from signaling import Room, RoomConfig
from signaling.crypto import gen_id
from tests.interop.jspeer import JsPeer
from tests.interop.test_room_mqtt import JOIN_TIMEOUT, MIB, STEP, Watch, eventually, exchange_payloads

from .conftest import ANSWERER_PREFIX, LOOPBACK_ICE, OFFERER_PREFIX

__all__ = [
    "JOIN_TIMEOUT",
    "LOOPBACK_ICE",
    "MIB",
    "STEP",
    "Rig",
    "SessionFactory",
    "Watch",
    "eventually",
    "exchange_payloads",
    "loop_errors_caught",
    "new_room_id",
    "session_pool",
    "silent_listener",
]

SessionFactory = Callable[..., signaling.Session]


class Restartable(Protocol):
    @property
    def url(self) -> str: ...

    def kill(self) -> None: ...

    def start(self) -> None: ...


def new_room_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def make_session(role: str | None = None) -> signaling.Session:
    """A session whose selfId makes it the offerer ("offer"), the answerer ("answer") or random."""
    prefix = {"offer": OFFERER_PREFIX, "answer": ANSWERER_PREFIX, None: ""}[role]
    return signaling.Session(prefix + gen_id(20 - len(prefix)) if prefix else None)


@contextlib.asynccontextmanager
async def session_pool() -> AsyncIterator[SessionFactory]:
    """``make(role)``: fresh sessions (see make_session), all closed on exit."""
    made: list[signaling.Session] = []

    def make(role: str | None = None) -> signaling.Session:
        made.append(make_session(role))
        return made[-1]

    try:
        yield make
    finally:
        for session in made:
            await session.close()


@contextlib.contextmanager
def loop_errors_caught() -> Iterator[list[dict[str, Any]]]:
    """Unhandled exceptions reported to the running loop inside the block (should stay empty)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """A TCP port whose kernel accepts connections that nobody ever reads or answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}/"


@dataclass
class Rig:
    """How the JS peers and we reach each other in one test."""

    strategy: str
    #: Relays the JS peers join (ours may list more, see ``make_config``).
    urls: list[str]
    make_config: Callable[..., RoomConfig]

    @property
    def app_id(self) -> str:
        return self.make_config().app_id

    async def js_join(self, js: JsPeer, room_id: str, **kwargs: Any) -> None:
        await js.join(room_id, app_id=self.app_id, relay_urls=self.urls, strategy=self.strategy, **kwargs)
        await js.make_action(room_id, "data")

    async def meet(
        self,
        js: JsPeer,
        room_id: str,
        *,
        js_first: bool,
        session: signaling.Session | None = None,
        config: RoomConfig | None = None,
        settle: float = 0.0,
    ) -> tuple[Room, Watch, float]:
        """JS and we join ``room_id`` in the given order (with ``settle`` seconds between, e.g.
        to let JS's warm-up announces pass); returns once both see each other."""
        if js_first:
            await self.js_join(js, room_id)
            await asyncio.sleep(settle)
        since = js.mark()
        t0 = time.monotonic()
        room = signaling.join_room(config or self.make_config(), room_id, session=session)
        watch = Watch(room, "data")
        if not js_first:
            await self.js_join(js, room_id)
        await watch.join_of(js.self_id)
        join_ms = (time.monotonic() - t0) * 1000
        await js.wait_peer_join(room_id, room.self_id, timeout=JOIN_TIMEOUT, since=since)
        return room, watch, join_ms


# --------------------------------------------------------------------------- the cases


async def join_and_ping(
    rig: Rig, session: signaling.Session, *, js_first: bool, role: str, settle: float = 0.0
) -> float:
    """(a) Meet in the given order; ping both ways. Returns the join time in ms."""
    async with JsPeer.start("node") as js:
        assert (session.self_id < js.self_id) == (role == "offer")
        room_id = new_room_id("join")
        room, _, join_ms = await rig.meet(js, room_id, js_first=js_first, session=session, settle=settle)
        assert set(room.peers) == {js.self_id}
        assert await js.peers(room_id) == [room.self_id]
        assert 0 <= await js.ping(room_id, room.self_id) < 2000
        assert 0 < await room.ping(js.self_id) < 2000
        assert set(room.relay_states.values()) == {"connected"}
        assert room.stats["dropped"] == {}, room.stats
        return join_ms


async def payloads(rig: Rig) -> Room:
    """(b) JSON (+meta), text, binary and 1 MiB binary both ways."""
    async with JsPeer.start("node") as js:
        room_id = new_room_id("data")
        room, watch, _ = await rig.meet(js, room_id, js_first=True)
        await exchange_payloads(js, room, watch, room_id, big_json=False)
        assert room.stats["dropped"] == {}
        assert room.stats["bytes_in"] > MIB and room.stats["bytes_out"] > MIB
        return room


async def password(rig: Rig) -> Room:
    """(c) A password room: the right password gets in, a wrong one never connects."""
    room_id = new_room_id("pw")
    async with JsPeer.start("node", name="good") as good, JsPeer.start("node", name="bad") as bad:
        await rig.js_join(good, room_id, password="s3cret")
        room = signaling.join_room(rig.make_config(password="s3cret"), room_id)
        watch = Watch(room, "data")
        await watch.join_of(good.self_id)
        await good.wait_peer_join(room_id, room.self_id, timeout=JOIN_TIMEOUT)
        since = good.mark()
        await room.make_action("data").send({"secret": True})
        ev = await good.wait_action(room_id, "data", peer=room.self_id, since=since)
        assert ev["value"] == {"secret": True}
        await good.send(room_id, "data", "back", target=room.self_id)
        assert (await watch.next_action("data", good.self_id))[0] == "back"

        await rig.js_join(bad, room_id, password="wrong")
        # Whoever offers, the other side cannot decrypt it (we count it, JS reports join-error).
        await eventually(
            lambda: room.stats["dropped"].get("decrypt_failed", 0) > 0 or bool(bad.events("join-error")),
            "a decrypt failure on either side",
            timeout=JOIN_TIMEOUT,
        )
        await asyncio.sleep(2)
        assert set(room.peers) == {good.self_id}
        assert bad.self_id not in watch.joined
        assert await bad.peers(room_id) == []
        assert bad.self_id not in signaling.default_session().links(rig.app_id)
        assert 0 < await room.ping(good.self_id) < 2000
        return room


async def leave_both_ways(rig: Rig) -> None:
    """(d) JS leaves (and comes back over the idle shared connection); then we leave."""
    async with JsPeer.start("node") as js:
        room_id = new_room_id("leave")
        room, watch, _ = await rig.meet(js, room_id, js_first=False)
        session = signaling.default_session()
        link = session.links(room.app_id)[js.self_id]

        await js.leave(room_id)
        await watch.leave_of(js.self_id, timeout=10)
        assert room.peers == {}

        since = js.mark()
        await rig.js_join(js, room_id)
        await watch.until(lambda: watch.joined.count(js.self_id) == 2, "second join", JOIN_TIMEOUT)
        await js.wait_peer_join(room_id, room.self_id, since=since, timeout=JOIN_TIMEOUT)
        assert session.links(room.app_id)[js.self_id] is link

        since = js.mark()
        await room.leave()
        await js.wait_peer_leave(room_id, room.self_id, since=since, timeout=10)
        assert room.left and room.peers == {}
        assert session.links(room.app_id) == {}


async def relay_restart(rig: Rig, service: Restartable) -> Room:
    """(f) The relay dies and comes back on the same port: we reconnect, the channel to the
    first peer never depended on it, and a JS peer started afterwards finds us."""
    room_id = new_room_id("restart")
    async with JsPeer.start("node", name="before") as first:
        room, watch, _ = await rig.meet(first, room_id, js_first=True)
        url = service.url
        service.kill()
        await eventually(lambda: room.relay_states[url] != "connected", "relay drop", 10)
        announced = room.stats["announces_out"]
        service.start()  # same port
        await eventually(lambda: room.relay_states[url] == "connected", "relay reconnect", 30)
        # Announced again at once on the new connection (Trystero does the same).
        await eventually(lambda: room.stats["announces_out"] > announced, "an announce after reconnecting", 5)

        async with JsPeer.start("node", name="after") as second:
            since = second.mark()
            await rig.js_join(second, room_id)
            await watch.join_of(second.self_id, timeout=30)
            await second.wait_peer_join(room_id, room.self_id, since=since, timeout=JOIN_TIMEOUT)
        assert first.self_id in room.peers
        assert 0 < await room.ping(first.self_id) < 2000
        return room


async def still_fine(room: Room, js: JsPeer, room_id: str, watch: Watch) -> None:
    """The connected JS peer is undisturbed: pings and data both ways."""
    assert js.self_id in room.peers
    assert 0 < await room.ping(js.self_id) < 2000
    assert 0 <= await js.ping(room_id, room.self_id) < 2000
    since = js.mark()
    await room.make_action("data").send({"after": "garbage"}, target=js.self_id)
    ev = await js.wait_action(room_id, "data", peer=room.self_id, since=since)
    assert ev["value"] == {"after": "garbage"}
    await js.send(room_id, "data", "still here", target=room.self_id)
    assert (await watch.next_action("data", js.self_id))[0] == "still here"
