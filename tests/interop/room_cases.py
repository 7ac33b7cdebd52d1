"""Room interop helpers and cases shared by the room tests (test_room_mqtt.py, test_room_nostr.py,
test_room_torrent.py, test_room_wire022.py, test_nostr_etiquette.py).

A :class:`Rig` says how one test's JS peers and our rooms meet: the strategy, the relay URLs the
JS peers use, and a RoomConfig factory for ours. :class:`Watch` records what a room sees. The
payload exchanges are built from steps that the 0.22 file reuses (0.22 allows metadata only with
binary data). The cases at the end are run as they are by the nostr and torrent files; the MQTT
file runs the password case with its own timings and spells its stricter versions of the others
out for one broker, from the same steps.
"""

# Timeouts are parameters on purpose (ASYNC109): on expiry the helpers raise an AssertionError
# naming what was awaited and the room's counters, which a bare asyncio.timeout would lose.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import signaling
from signaling import Action, Room, RoomConfig
from signaling.framing import to_json
from signaling.relays import Relay
from signaling.session import PeerLink
from tests.interop.jspeer import JsPeer, action_bytes, js_json, pattern_bytes, pattern_text, sha256_hex
from tests.support import (
    LOOPBACK_ICE,
    STEP,
    SessionFactory,
    changed_until,
    config_factory,
    eventually,
    loop_errors_caught,
)

__all__ = [
    "BIG_DOC",
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
    "rig_factory",
    "session_relay",
    "silent_listener",
]

MIB = 1 << 20
JOIN_TIMEOUT = 20.0  # joins take 0.1-1.4 s; a failed attempt is retried within seconds
#: ~300 KB of JSON (19 chunks): a structure, not one long string.
BIG_DOC = {"rows": [{"i": i, "name": f"row {i} ✓", "tags": ["a", "b"], "v": i / 7} for i in range(4200)]}

R = TypeVar("R", bound=Relay)


class Restartable(Protocol):
    @property
    def url(self) -> str: ...

    def kill(self) -> None: ...

    def start(self) -> None: ...


def new_room_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """A TCP port whose kernel accepts connections that nobody ever reads or answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}/"


def session_relay(url: str, cls: type[R]) -> R:
    """The default session's relay client for ``url`` (it must be a ``cls``)."""
    relay = next(r for r in signaling.default_session().hub.relays() if r.url == url)
    assert isinstance(relay, cls)
    return relay


class Watch:
    """Records a room's peer joins/leaves and received actions; every wait has a timeout."""

    def __init__(self, room: Room, *actions: str) -> None:
        self.room = room
        self.joined: list[str] = []
        self.left: list[str] = []
        self.received: dict[str, list[tuple[Any, str, Any]]] = {name: [] for name in actions}
        self._read: dict[tuple[str, str], int] = {}
        self._changed = asyncio.Event()
        room.on_peer_join(self._record(self.joined))
        room.on_peer_leave(self._record(self.left))
        for name in actions:
            room.make_action(name).on_receive(self._record_action(self.received[name]))

    def _record(self, into: list[str]) -> Callable[[str], None]:
        def record(peer_id: str) -> None:
            into.append(peer_id)
            self._changed.set()

        return record

    def _record_action(self, into: list[tuple[Any, str, Any]]) -> Callable[[Any, str, Any], None]:
        def record(payload: Any, peer_id: str, metadata: Any) -> None:
            into.append((payload, peer_id, metadata))
            self._changed.set()

        return record

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = STEP) -> None:
        try:
            await changed_until(self._changed, predicate, timeout)
        except TimeoutError:
            raise AssertionError(
                f"room {self.room.room_id}: no {what} within {timeout}s; stats {self.room.stats}"
            ) from None

    async def join_of(self, peer_id: str, timeout: float = JOIN_TIMEOUT) -> None:
        await self.until(lambda: peer_id in self.joined, f"join of {peer_id}", timeout)

    async def leave_of(self, peer_id: str, timeout: float = STEP) -> None:
        await self.until(lambda: peer_id in self.left, f"leave of {peer_id}", timeout)

    async def next_action(self, name: str, peer_id: str, timeout: float = 60.0) -> tuple[Any, str, Any]:
        """The next not yet consumed message of ``name`` from ``peer_id`` (in arrival order)."""
        inbox = self.received[name]

        def find() -> int | None:
            start = self._read.get((name, peer_id), 0)
            return next((i for i in range(start, len(inbox)) if inbox[i][1] == peer_id), None)

        await self.until(lambda: find() is not None, f"{name!r} from {peer_id}", timeout)
        index = find()
        assert index is not None
        self._read[(name, peer_id)] = index + 1
        return inbox[index]


@dataclass
class Rig:
    """How the JS peers and we reach each other in one test."""

    #: The JS peers' strategy (None: the JS peer's default, MQTT).
    strategy: str | None
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


RigFactory = Callable[..., Rig]


def rig_factory(strategy: str, default_urls: list[str], app_id: str) -> RigFactory:
    """``rig(js_urls=None, our_urls=None, **config)``: JS on ``js_urls`` (default:
    ``default_urls``), us on ``our_urls`` (default: the same) with ``config`` in our RoomConfigs."""

    def make(js_urls: list[str] | None = None, our_urls: list[str] | None = None, **base: Any) -> Rig:
        js = js_urls or list(default_urls)
        return Rig(strategy, js, config_factory(app_id, our_urls or js, strategy=strategy, **base))

    return make


# --------------------------------------------------------------------------- payload steps


async def text_and_binary_from_js(js: JsPeer, watch: Watch, room_id: str) -> None:
    """JS -> us: text, small binary with metadata, and 1 MiB of binary."""
    me, other = watch.room.self_id, js.self_id
    await js.send(room_id, "data", "plain text ✓", target=me)
    assert await watch.next_action("data", other) == ("plain text ✓", other, None)
    small = bytes(range(256)) * 5
    await js.send(room_id, "data", small, meta={"k": "bin"}, target=me)
    assert await watch.next_action("data", other) == (small, other, {"k": "bin"})
    sent = await js.send(room_id, "data", size=MIB, seed=7, target=me)
    payload, _, meta = await watch.next_action("data", other)
    assert isinstance(payload, bytes) and meta is None
    assert hashlib.sha256(payload).hexdigest() == sent["sha256"] == sha256_hex(pattern_bytes(MIB, 7))


async def binary_to_js(js: JsPeer, data: Action, room_id: str) -> None:
    """Us -> JS on ``data``: small binary with metadata, and 1 MiB of binary."""
    me, other = data.room.self_id, js.self_id
    small = bytes(range(256)) * 5
    since = js.mark()
    await data.send(small, metadata={"k": "bin"})
    ev = await js.wait_action(room_id, "data", peer=me, since=since)
    assert (ev["kind"], action_bytes(ev), ev["meta"]) == ("binary", small, {"k": "bin"})
    blob = pattern_bytes(MIB, 8)
    since = js.mark()
    await data.send(blob, target=[other])
    ev = await js.wait_action(room_id, "data", peer=me, since=since, timeout=60)
    assert (ev["kind"], ev["bytes"], ev["sha256"]) == ("binary", MIB, sha256_hex(blob))


async def big_payloads_both_ways(js: JsPeer, data: Action, watch: Watch, room_id: str) -> None:
    """BIG_DOC both ways on ``data``, and ~300 KB of text from JS."""
    me, other = data.room.self_id, js.self_id
    encoded = to_json(BIG_DOC)
    since = js.mark()
    await data.send(BIG_DOC)
    ev = await js.wait_action(room_id, "data", peer=me, since=since, timeout=60)
    assert (ev["kind"], ev["len"], ev["sha256"]) == ("json", len(encoded), sha256_hex(encoded))
    await js.send(room_id, "data", BIG_DOC, target=me)
    assert (await watch.next_action("data", other))[0] == BIG_DOC
    await js.send(room_id, "data", kind="text", size=300_000, seed=9, target=me)
    assert (await watch.next_action("data", other))[0] == pattern_text(300_000, 9)


async def exchange_payloads(
    js: JsPeer, room: Room, watch: Watch, room_id: str, *, big_json: bool = True
) -> None:
    """JSON (+meta), text, small binary (+meta) and 1 MiB binary both ways; big JSON optionally."""
    me, other = room.self_id, js.self_id
    data = room.make_action("data")

    # JS -> us
    value = {"n": 1, "s": "héllo ✓", "list": [1, 2.5, None, True], "nested": {"a": []}}
    await js.send(room_id, "data", value, meta={"seq": 1}, target=me)
    assert await watch.next_action("data", other) == (value, other, {"seq": 1})
    await text_and_binary_from_js(js, watch, room_id)

    # us -> JS
    since = js.mark()
    await data.send(value, target=other, metadata={"seq": 2})
    ev = await js.wait_action(room_id, "data", peer=me, since=since)
    assert (ev["kind"], ev["value"], ev["meta"]) == ("json", value, {"seq": 2})
    assert ev["sha256"] == sha256_hex(js_json(value)) == sha256_hex(to_json(value))
    since = js.mark()
    await data.send("plain text ✓")
    ev = await js.wait_action(room_id, "data", peer=me, since=since)
    assert (ev["kind"], ev["value"], "meta" in ev) == ("text", "plain text ✓", False)
    await binary_to_js(js, data, room_id)

    if not big_json:
        return
    assert 280_000 < len(to_json(BIG_DOC)) < 330_000
    await big_payloads_both_ways(js, data, watch, room_id)


async def meet_with_password(good: JsPeer, room: Room, room_id: str) -> Watch:
    """``good`` (joined with the room's password) and our ``room`` meet; data flows both ways."""
    watch = Watch(room, "data")
    await watch.join_of(good.self_id)
    await good.wait_peer_join(room_id, room.self_id, timeout=JOIN_TIMEOUT)
    since = good.mark()
    await room.make_action("data").send({"secret": True})
    ev = await good.wait_action(room_id, "data", peer=room.self_id, since=since)
    assert ev["value"] == {"secret": True}
    await good.send(room_id, "data", "back", target=room.self_id)
    assert (await watch.next_action("data", good.self_id))[0] == "back"
    return watch


async def rejoin_then_we_leave(rig: Rig, js: JsPeer, room_id: str, watch: Watch, link: PeerLink) -> None:
    """JS, gone from our room, joins again over the idle connection ``link`` (reused: presence and
    handshake, no new offer); then we leave, and JS sees it."""
    room = watch.room
    session = signaling.default_session()
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


async def wrong_password_stays_out(
    watch: Watch, good: JsPeer, bad: JsPeer, *, timeout: float = STEP, quiet: float
) -> None:
    """``bad`` joined our room (where ``good`` is) with a wrong password: whoever offers, the other
    side cannot decrypt it (we count it, JS reports join-error); ``quiet`` seconds later only
    ``good`` is in."""
    room = watch.room
    await eventually(
        lambda: room.stats["dropped"].get("decrypt_failed", 0) > 0 or bool(bad.events("join-error")),
        "a decrypt failure on either side",
        timeout=timeout,
    )
    await asyncio.sleep(quiet)
    assert set(room.peers) == {good.self_id}
    assert bad.self_id not in watch.joined


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


async def password(rig: Rig, *, timeout: float = JOIN_TIMEOUT, quiet: float = 2.0) -> Room:
    """(c) A password room: the right password gets in, a wrong one never connects (a decrypt
    failure within ``timeout``, then ``quiet`` seconds to see it stay out)."""
    room_id = new_room_id("pw")
    async with JsPeer.start("node", name="good") as good, JsPeer.start("node", name="bad") as bad:
        await rig.js_join(good, room_id, password="s3cret")
        room = signaling.join_room(rig.make_config(password="s3cret"), room_id)
        watch = await meet_with_password(good, room, room_id)

        # A peer with the wrong password: its SDPs do not decrypt; it must never get in.
        await rig.js_join(bad, room_id, password="wrong")
        await wrong_password_stays_out(watch, good, bad, timeout=timeout, quiet=quiet)
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
        await rejoin_then_we_leave(rig, js, room_id, watch, link)


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
