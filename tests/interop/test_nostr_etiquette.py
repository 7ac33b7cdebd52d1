"""Relay etiquette: in an idle room we publish no more nostr events than Trystero itself does.

One real Trystero 0.25.4 peer and our room meet on a local nostr relay; once both warm-ups are
over, a raw subscriber on the same relay counts, for 60 s, every event on the room's topics and
attributes it by the ``peerId`` inside. Trystero announces every 60 s whether connected or not;
we stretch our steady interval while the room is stable (signaling.pacing), so ours must not
exceed theirs. Takes ~70 s, hence ``slow``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

import signaling
from signaling import crypto
from tests.interop.jspeer import JsPeer
from tests.services import NostrRelay, running
from tests.support import loopback_config, service_or_fail

from .room_cases import JOIN_TIMEOUT, Watch, new_room_id

WINDOW_S = 60.0
WARMUP_S = 3.0  # Trystero's warm-up lasts 2.1 s after joining

pytestmark = [
    pytest.mark.interop,
    pytest.mark.slow,
]


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[NostrRelay]:
    with running(service_or_fail(NostrRelay, tmp_path / "nostr")) as service:
        yield service


class EventCounter:
    """A raw NIP-01 subscriber counting events on some topics by the peerId inside."""

    def __init__(self, url: str, topics: list[str]) -> None:
        self.url = url
        self.topics = topics
        self.counting_since: float | None = None
        self.counts: Counter[str] = Counter()
        self.topics_seen: Counter[str] = Counter()

    async def run(self, ready: asyncio.Event) -> None:
        kinds = sorted({crypto.nostr_kind(t) for t in self.topics})
        req = ["REQ", "etiquette", {"kinds": kinds, "#x": self.topics, "since": int(time.time())}]
        async with aiohttp.ClientSession() as http, http.ws_connect(self.url) as ws:
            await ws.send_str(orjson.dumps(req).decode())
            async for msg in ws:
                frame = orjson.loads(msg.data)
                if frame[0] == "EOSE":
                    ready.set()
                elif frame[0] == "EVENT" and self.counting_since is not None:
                    event = frame[2]
                    try:
                        peer = orjson.loads(event["content"]).get("peerId", "?")
                    except (orjson.JSONDecodeError, AttributeError):
                        peer = "?"
                    self.counts[peer] += 1
                    self.topics_seen[f"{peer}@{event['tags'][0][1]}"] += 1


async def test_idle_room_publishes_no_more_than_trystero(
    relay: NostrRelay, app_id: str, signaling_cleanup: None, record_property: Any
) -> None:
    room_id = new_room_id("idle")
    config = loopback_config(app_id, [relay.url], strategy="nostr")
    async with JsPeer.start("node") as js:
        me = signaling.default_session().self_id
        topics = [crypto.root_topic(app_id, room_id)] + [
            crypto.self_topic(app_id, room_id, peer) for peer in (me, js.self_id)
        ]
        counter = EventCounter(relay.url, topics)
        ready = asyncio.Event()
        reader = asyncio.create_task(counter.run(ready))
        try:
            async with asyncio.timeout(10):
                await ready.wait()
            room = signaling.join_room(config, room_id)
            watch = Watch(room)
            await js.join(room_id, app_id=app_id, relay_urls=[relay.url], strategy="nostr")
            await watch.join_of(js.self_id, timeout=JOIN_TIMEOUT)
            await js.wait_peer_join(room_id, me, timeout=JOIN_TIMEOUT)
            await asyncio.sleep(WARMUP_S)  # both warm-ups are over: the room is idle from here

            counter.counting_since = time.monotonic()
            await asyncio.sleep(WINDOW_S)
            counts = dict(counter.counts)
            ours, theirs = counts.get(me, 0), counts.get(js.self_id, 0)
            assert set(room.peers) == {js.self_id}  # idle, not broken
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    record_property("events_per_60s", {"ours": ours, "trystero": theirs})
    print(f"\nevents in {WINDOW_S:.0f} s of an idle room: ours {ours}, Trystero's {theirs}")
    assert theirs >= 1, counts  # the counter works: Trystero announces every 60 s
    assert ours <= theirs, counts
    assert room.stats.get("announces_stretched", 0) >= 1, room.stats
