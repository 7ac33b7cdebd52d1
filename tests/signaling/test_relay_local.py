"""signaling.relays.local: servers in this process, reached without a socket.

A small nostr relay and a small tracker that live in the test process (``LocalServer`` fakes)
stand in for a hosted server. Their hosts do not resolve (``.invalid``), so a client that opened a
socket instead of the in-process link would never connect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest

from signaling.relays import NostrKeys, NostrRelay
from signaling.relays.base import WebSocketLink
from signaling.relays.local import (
    LocalLink,
    lookup,
    make_link,
    normalise_url,
    register,
    unregister,
)
from signaling.relays.nostr import event_topic
from signaling.relays.torrent import TorrentOffer, TorrentRelay
from signaling.relays.wsrelay import WsRelay

from .relay_helpers import FAST, Inbox, relays_closed_after, until, wait_state

URL = "ws://relay.invalid:3000/nostr"
TRACKER_URL = "wss://tracker.invalid/announce"
log = logging.getLogger(__name__)


class FakeConnection:
    """The server's side of one client; the server's ``answer`` scripts what it does with a frame."""

    def __init__(
        self, server: FakeServer, on_text: Callable[[str], None], on_lost: Callable[[], None]
    ) -> None:
        self.server = server
        self.on_text = on_text
        self.on_lost = on_lost
        self.frames: list[str] = []
        self.closed = False  # the client hung up
        self.lost = False  # we hung up

    def receive(self, frame: str) -> None:
        assert not self.closed, "a frame after the client hung up"
        self.frames.append(frame)
        self.server.answer(self, frame)

    def close(self) -> None:
        self.closed = True

    def send(self, frame: object) -> None:
        self.on_text(frame if isinstance(frame, str) else orjson.dumps(frame).decode())

    def hang_up(self) -> None:
        self.lost = True
        self.on_lost()


class FakeServer:
    """Records its connections; answers nothing unless ``answer`` is scripted. ``refuse``: take
    no clients."""

    def __init__(self) -> None:
        self.connections: list[FakeConnection] = []
        self.refuse = False

    def connect_local(self, on_text: Callable[[str], None], on_lost: Callable[[], None]) -> FakeConnection:
        if self.refuse:
            raise ConnectionRefusedError("full")
        conn = FakeConnection(self, on_text, on_lost)
        self.connections.append(conn)
        return conn

    @property
    def open_connections(self) -> list[FakeConnection]:
        return [c for c in self.connections if not (c.closed or c.lost)]

    def answer(self, conn: FakeConnection, frame: str) -> None:
        pass


class FakeNostrRelay(FakeServer):
    """REQ -> EOSE, EVENT -> OK and the event to every subscription whose ``#x`` names its topic,
    all answered synchronously inside ``receive`` (the link must keep that from re-entering its
    owner)."""

    def __init__(self) -> None:
        super().__init__()
        self.subs: dict[tuple[FakeConnection, str], set[str]] = {}

    def answer(self, conn: FakeConnection, frame: str) -> None:
        msg = orjson.loads(frame)
        if msg[0] == "REQ":
            self.subs[(conn, msg[1])] = set(msg[2]["#x"])
            conn.send(["EOSE", msg[1]])
        elif msg[0] == "CLOSE":
            self.subs.pop((conn, msg[1]), None)
        elif msg[0] == "EVENT":
            event = msg[1]
            conn.send(["OK", event["id"], True, ""])
            topic = event_topic(event)
            for (other, sub_id), topics in self.subs.items():
                if topic in topics and not other.closed:
                    other.send(["EVENT", sub_id, event])


class FakeWsRelay(FakeServer):
    """Trystero's ws-relay protocol: publish goes to every subscriber of the topic."""

    def __init__(self) -> None:
        super().__init__()
        self.topics: dict[str, set[FakeConnection]] = {}

    def answer(self, conn: FakeConnection, frame: str) -> None:
        msg = orjson.loads(frame)
        if msg["type"] == "subscribe":
            self.topics.setdefault(msg["topic"], set()).add(conn)
        elif msg["type"] == "publish":
            for other in self.topics.get(msg["topic"], ()):
                other.send({"topic": msg["topic"], "payload": msg["payload"]})


class FakeTracker(FakeServer):
    """Answers announces as bittorrent-tracker does."""

    def answer(self, conn: FakeConnection, frame: str) -> None:
        msg = orjson.loads(frame)
        if "answer" not in msg:
            conn.send({"action": "announce", "interval": 120, "info_hash": msg["info_hash"]})


@pytest.fixture
def served() -> Iterator[Callable[[FakeServer, str], FakeServer]]:
    """``served(server, url)``: ``server`` registered under ``url`` until the test ends."""
    registered: list[tuple[str, FakeServer]] = []

    def serve(server: FakeServer, url: str = URL) -> FakeServer:
        register(url, server)
        registered.append((url, server))
        return server

    yield serve
    for url, server in registered:
        unregister(url, server)


@pytest.fixture
async def make_relay() -> AsyncIterator[Callable[..., NostrRelay]]:
    async with relays_closed_after(NostrRelay, keys=NostrKeys) as make:
        yield make


class Recorder:
    """The owner's side of a bare LocalLink: what it got, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.sending = False  # inside a send(): nothing may reach us then

    def on_text(self, frame: str) -> None:
        assert not self.sending, "delivered inside send()"
        self.events.append(frame)

    def on_lost(self) -> None:
        self.events.append("<lost>")


def bare_link(recorder: Recorder, *, max_msg_size: int = 1024, inbox_chars: int = 1 << 20) -> LocalLink:
    return LocalLink(
        URL,
        peer="relay",
        logger=log,
        max_msg_size=max_msg_size,
        on_text=recorder.on_text,
        on_lost=recorder.on_lost,
        inbox_chars=inbox_chars,
    )


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_urls_are_normalised() -> None:
    assert normalise_url("WS://Relay.Example:80/nostr/") == "ws://relay.example/nostr"
    assert normalise_url("wss://relay.example:443/") == "wss://relay.example"
    assert normalise_url("wss://relay.example:8443/nostr#x") == "wss://relay.example:8443/nostr"
    assert normalise_url("ws://user:secret@127.0.0.1:3000/nostr") == "ws://127.0.0.1:3000/nostr"
    assert normalise_url("ws://[::1]:3000/nostr?a=1") == "ws://[::1]:3000/nostr?a=1"
    assert normalise_url("ws://localhost:3000/nostr") != normalise_url("wss://localhost:3000/nostr")
    with pytest.raises(ValueError):
        normalise_url("ws:///nostr")
    with pytest.raises(ValueError):
        normalise_url("ws://host:99999/")
    assert lookup("ws://host:99999/") is None


def test_one_server_per_url(served: Callable[[FakeServer, str], FakeServer]) -> None:
    first, second = FakeServer(), FakeServer()
    served(first, URL)
    served(first, URL.upper().replace("/NOSTR", "/nostr/"))  # the same server again: fine
    assert lookup("ws://RELAY.invalid:3000/nostr/") is first
    with pytest.raises(ValueError, match="already served"):
        register(URL, second)
    unregister(URL, second)  # not its URL: nothing happens
    assert lookup(URL) is first
    unregister(URL, first)
    assert lookup(URL) is None


async def test_make_link_picks_the_in_process_server(served: Callable[[FakeServer, str], FakeServer]) -> None:
    common: dict[str, Any] = dict(
        label="nostr",
        peer="relay",
        logger=log,
        heartbeat=30.0,
        max_msg_size=1024,
        ssl_context=None,
        on_text=lambda _: None,
        on_binary=lambda: None,
        on_lost=lambda: None,
    )
    assert isinstance(make_link(URL, **common), WebSocketLink)
    served(FakeServer(), URL)
    assert isinstance(make_link("ws://relay.invalid:3000/nostr/", **common), LocalLink)
    assert isinstance(make_link("ws://relay.invalid:3001/nostr", **common), WebSocketLink)


async def test_nostr_relays_meet_through_an_in_process_relay(
    served: Callable[[FakeServer, str], FakeServer], make_relay: Callable[..., NostrRelay]
) -> None:
    server = served(FakeNostrRelay(), URL)
    a, b = make_relay(URL, backoff=FAST), make_relay(URL, backoff=FAST)
    inbox = Inbox()
    b.on_message = inbox
    b.subscribe("topic-1")
    await a.start()
    await b.start()
    await asyncio.gather(a.wait_connected(), b.wait_connected())
    a.publish("topic-1", "hello")
    a.publish("topic-2", "nobody listens")
    assert await inbox.wait_for(1) == ["hello"]
    assert len(server.open_connections) == 2
    await until(lambda: a.counters.get("accepted", 0) == 2, what="both events acknowledged")
    await a.close()
    assert server.connections[0].closed  # the goodbye reached the server


async def test_deliveries_are_never_reentrant(served: Callable[[FakeServer, str], FakeServer]) -> None:
    """The server answers inside receive(); the owner hears it only after send() returned, and
    the server gets the frame only after the owner's call returned."""
    server = served(FakeServer(), URL)
    seen_by_server: list[str] = []
    owner = Recorder()

    def echo(conn: FakeConnection, frame: str) -> None:
        seen_by_server.append(frame)
        conn.send(f"echo {frame}")

    server.answer = echo  # type: ignore[method-assign]
    link = bare_link(owner)
    await link.open()
    owner.sending = True
    link.send("one")
    link.send("two")
    owner.sending = False
    assert seen_by_server == [] and link.backlog == len("one") + len("two")
    assert await link.drain()
    assert seen_by_server == ["one", "two"] and link.backlog == 0
    await settle()
    assert owner.events == ["echo one", "echo two"]


async def test_the_server_hanging_up_is_a_lost_connection(
    served: Callable[[FakeServer, str], FakeServer], make_relay: Callable[..., NostrRelay]
) -> None:
    server = served(FakeNostrRelay(), URL)
    owner = Recorder()
    link = bare_link(owner)
    await link.open()
    conn = server.connections[0]
    conn.send("last words")
    conn.hang_up()
    conn.send("after the end")  # a server bug: ignored, as a closed socket would
    link.send("unsent")  # the server is gone: nobody gets it
    await settle()
    assert owner.events == ["last words", "<lost>"]
    assert conn.frames == []
    assert link.connected  # until the owner drops it, as with a socket
    assert link.drop() and not link.connected and not link.drop()
    await link.wait_closed()

    # An owner reconnects as it would over a socket.
    relay = make_relay(URL, backoff=FAST)
    relay.subscribe("t")
    await relay.start()
    await relay.wait_connected()
    server.open_connections[0].hang_up()
    await wait_state(relay, "reconnecting")
    await wait_state(relay, "connected")
    assert len(server.open_connections) == 1 and len(server.connections) == 3


async def test_a_server_gone_or_full_is_retried(
    served: Callable[[FakeServer, str], FakeServer], make_relay: Callable[..., NostrRelay]
) -> None:
    server = served(FakeNostrRelay(), URL)
    relay = make_relay(URL, backoff=FAST)
    relay.subscribe("t")
    await relay.start()
    await relay.wait_connected()
    unregister(URL, server)  # the host stops: its server hangs up and takes no one any more
    server.open_connections[0].hang_up()
    await wait_state(relay, "reconnecting")
    attempts = relay.connect_attempts
    await until(lambda: relay.connect_attempts >= attempts + 2, what="retries while the server is gone")
    server.refuse = True
    served(server, URL)
    attempts = relay.connect_attempts
    await until(lambda: relay.connect_attempts >= attempts + 2, what="retries while the server is full")
    assert relay.state == "reconnecting"
    server.refuse = False
    await wait_state(relay, "connected")
    assert len(server.open_connections) == 1


async def test_bounds_drop_the_connection(served: Callable[[FakeServer, str], FakeServer]) -> None:
    server = served(FakeServer(), URL)
    owner = Recorder()
    link = bare_link(owner, max_msg_size=10)
    await link.open()
    conn = server.connections[0]
    conn.send("short")
    conn.send("x" * 11)  # over max_msg_size: dropped as aiohttp drops it
    conn.send("never read")
    await settle()
    assert owner.events == ["short", "<lost>"] and conn.closed
    link.drop()

    flooded = Recorder()
    link = bare_link(flooded, inbox_chars=100)
    await link.open()
    conn = server.connections[1]
    for _ in range(11):  # 110 characters before the owner had a chance to read any
        conn.send("0123456789")
    await settle()
    assert flooded.events == ["<lost>"] and conn.closed
    link.drop()


async def test_a_flooding_server_does_not_starve_the_loop(
    served: Callable[[FakeServer, str], FakeServer],
) -> None:
    server = served(FakeServer(), URL)
    owner = Recorder()
    link = bare_link(owner)
    await link.open()
    marks: list[int] = []
    for i in range(1000):
        server.connections[0].send(str(i))
    asyncio.get_running_loop().call_soon(lambda: marks.append(len(owner.events)))
    await until(lambda: len(owner.events) == 1000)
    assert marks and marks[0] < 1000
    assert owner.events == [str(i) for i in range(1000)]
    link.drop()


async def test_a_tracker_in_process(served: Callable[[FakeServer, str], FakeServer]) -> None:
    server = served(FakeTracker(), TRACKER_URL)
    relay = TorrentRelay(TRACKER_URL, peer_id="AbCdEfGhIjKlMnOpQrSt", backoff=FAST)
    offers: list[TorrentOffer] = []
    relay.set_announce("2j432q6wtm54z4742363", lambda: offers)
    await relay.start()
    try:
        await until(lambda: relay.counters.get("reply", 0) >= 1, what="the tracker's reply")
        assert orjson.loads(server.connections[0].frames[0])["action"] == "announce"
    finally:
        await relay.close()
    assert server.connections[0].closed


async def test_a_ws_relay_in_process(served: Callable[[FakeServer, str], FakeServer]) -> None:
    server = served(FakeWsRelay(), "ws://relay.invalid/ws-relay")
    async with relays_closed_after(WsRelay) as make:
        a, b = make("ws://relay.invalid/ws-relay"), make("ws://relay.invalid:80/ws-relay/")
        inbox = Inbox()
        b.on_message = inbox
        b.subscribe("t")
        await a.start()
        await b.start()
        await asyncio.gather(a.wait_connected(), b.wait_connected())
        a.publish("t", "hi")
        assert await inbox.wait_for(1) == ["hi"]
        assert len(server.open_connections) == 2
