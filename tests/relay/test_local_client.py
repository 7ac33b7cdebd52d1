"""``RelayServer.connect_local``: an in-process client, treated like a socket."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from p2pdiff.config import RelayConfig
from p2pdiff.relay import RELAY
from p2pdiff.relay.nip01 import Event, parse_event
from signaling.relays.nostr import NostrKeys
from tests.relay.nostr_client import NostrClient, eventually, signed, topic_filter

TOPIC = "localtopic"


class Inbox:
    def __init__(self) -> None:
        self.frames: list[list[Any]] = []
        self.lost = 0

    def on_text(self, frame: str) -> None:
        self.frames.append(orjson.loads(frame))

    def on_lost(self) -> None:
        self.lost += 1


async def test_local_and_socket_clients_hear_each_other(relay_client: TestClient) -> None:
    relay = relay_client.app[RELAY]
    inbox = Inbox()
    local = relay.connect_local(inbox.on_text, inbox.on_lost)
    local.receive(orjson.dumps(["REQ", "loc", topic_filter(TOPIC)]).decode())
    assert inbox.frames == []  # answers come later, never inside receive()
    await eventually(lambda: inbox.frames == [["EOSE", "loc"]])

    socket = await NostrClient.connect(relay_client)
    await socket.req("sock", topic_filter(TOPIC))
    from_socket = signed(NostrKeys(), TOPIC, "from the socket")
    await socket.publish(from_socket)
    assert await socket.recv() == ["EVENT", "sock", from_socket]
    await eventually(lambda: ["EVENT", "loc", from_socket] in inbox.frames)

    from_local = signed(NostrKeys(), TOPIC, "from the helper")
    local.receive(orjson.dumps(["EVENT", from_local]).decode())
    assert await socket.recv() == ["EVENT", "sock", from_local]
    await eventually(lambda: ["OK", from_local["id"], True, ""] in inbox.frames)

    local.close()
    assert local.closed
    await asyncio.sleep(0.05)
    assert inbox.lost == 0  # the client closed it itself


async def test_local_client_is_lost_when_it_reads_too_slowly(relay_client: TestClient) -> None:
    relay = relay_client.app[RELAY]
    inbox = Inbox()
    local = relay.connect_local(inbox.on_text, inbox.on_lost)
    local.receive(orjson.dumps(["REQ", "loc", topic_filter(TOPIC)]).decode())
    socket = await NostrClient.connect(relay_client)
    big = "x" * 60_000
    # Published from this very callback, with no loop turn between: the local outbox fills up.
    for _ in range(relay.limits.outbox_bytes // len(big) + 2):
        relay.nostr.publish(relay_nostr_event(big))
    await eventually(lambda: inbox.lost == 1)
    assert local.closed
    await socket.close()


def relay_nostr_event(content: str) -> Event:
    return parse_event(signed(NostrKeys(), TOPIC, content), RelayConfig())
