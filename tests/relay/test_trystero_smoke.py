"""Real Trystero peers (Node) meet through p2pdiff's own relay, with no other relay configured.

A smoke test of the relay with the clients it is for; the broad matrix (0.22, Chromium, the
helper, passwords, rejoins) lives in tests/interop.
"""

from __future__ import annotations

import uuid

import pytest
from aiohttp.test_utils import TestClient

from tests.interop.jspeer import JsPeer, meet
from tests.relay.conftest import metric

pytestmark = [pytest.mark.interop]


@pytest.mark.parametrize("wire", ["0.25", "0.22"])
async def test_two_trystero_peers_meet_through_our_relay(relay_client: TestClient, wire: str) -> None:
    url = f"ws://127.0.0.1:{relay_client.port}/nostr"
    room, app_id = f"smoke-{uuid.uuid4().hex[:8]}", f"p2pdiff-relay-{uuid.uuid4().hex[:8]}"
    nostr = ["--strategy", "nostr"]
    async with (
        JsPeer.start("node", wire, name="a", args=nostr) as a,
        JsPeer.start("node", wire, name="b", args=nostr) as b,
    ):
        await meet(a, b, room, url, app_id)  # rejoins when node-datachannel's loopback ICE fails
        await a.send(room, "data", {"hello": "through p2pdiff"}, target=b.self_id)
        received = await b.wait_action(room, "data", peer=a.self_id)
        assert received["value"] == {"hello": "through p2pdiff"}
        for peer in (a, b):
            assert not [e for e in peer.events("error")], peer.describe()
    text = await (await relay_client.get("/metrics")).text()
    assert metric(text, "p2pdiff_relay_events_total", protocol="nostr", result="accepted") >= 2
    for refusal in ("invalid", "bad_signature", "rate_limited", "not_ephemeral", "too_large"):
        assert metric(text, "p2pdiff_relay_events_total", protocol="nostr", result=refusal) == 0
    assert not any(line.startswith("p2pdiff_relay_refused_total{") for line in text.splitlines())
