"""The 0.22 parts of the torrent strategy that need no network: the per-tracker offer batches and
the data-channel check that tells a stranger of the other wire (tracker frames are the same for
both wires). With real trystero@0.22.0 peers: tests/interop/test_room_torrent022.py."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest

from signaling import strategies
from signaling.foreign_wire import ForeignWireWatch, channel_wire
from signaling.negotiation022 import RoomSignaller022
from signaling.strategies.torrent import (
    DEFAULT_TRACKER_URLS,
    OfferBatches,
    TorrentRoomSignaller,
    TorrentRoomSignaller022,
    default_trackers,
)
from signaling.wire import v022, v025
from tests.signaling.test_pacing import FakePeer


def make_batches(**peer_kwargs: object) -> tuple[OfferBatches, list[FakePeer]]:
    peers: list[FakePeer] = []

    def make() -> FakePeer:
        peers.append(FakePeer(**peer_kwargs))  # type: ignore[arg-type]
        return peers[-1]

    return OfferBatches(make_peer=make, seal=lambda sdp: f"sealed({sdp})"), peers  # type: ignore[arg-type]


async def test_every_announce_gets_ten_fresh_offers_per_tracker() -> None:
    batches, peers = make_batches()
    first = await batches.current("wss://a")
    assert len(first) == 10 and len({o.offer_id for o in first}) == 10 and len(peers) == 10
    assert all(o.sdp.startswith("sealed(v=0") and len(o.offer_id) == 20 for o in first)
    other = await batches.current("wss://b")  # another tracker: its own batch, the first stays
    assert batches.outstanding == 20 and all(o.offer_id in batches for o in first + other)

    second = await batches.current("wss://a")
    await asyncio.sleep(0)
    assert not {o.offer_id for o in first} & {o.offer_id for o in second}
    assert all(p.closed == "offer superseded by a newer announce" for p in peers[:10])
    assert not any(p.closed for p in peers[10:])
    assert batches.outstanding == 20 and first[0].offer_id not in batches

    taken = batches.claim(second[3].offer_id)
    assert taken is peers[23] and batches.claim(second[3].offer_id) is None and batches.outstanding == 19
    await batches.current("wss://a")  # the claimed Peer is the negotiation's now: not closed
    await asyncio.sleep(0)
    assert not taken.closed

    await batches.close()
    assert all(p.closed for p in peers if p is not taken) and batches.outstanding == 0
    assert await batches.current("wss://a") == []


async def test_failed_and_abandoned_offers_leave_nothing_behind() -> None:
    failing, _ = make_batches(fail=True)
    assert await failing.current("wss://a") == [] and failing.outstanding == 0
    slow, peers = make_batches(delay=10)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # the tracker relay's offers timeout
            await slow.current("wss://a")
    await asyncio.sleep(0)
    assert len(peers) == 10 and all(p.closed == "offer abandoned" for p in peers)


def test_signaller_follows_strategy_and_wire() -> None:
    torrent = strategies.get("torrent")
    assert torrent.signaller("0.25") is TorrentRoomSignaller
    assert torrent.signaller("0.22") is TorrentRoomSignaller022
    # a topic strategy's 0.22 room runs the 0.22 flow's signaller, not a tracker one
    assert strategies.get("mqtt").signaller("0.22").func is RoomSignaller022
    assert TorrentRoomSignaller022.HUB_KEY != TorrentRoomSignaller.HUB_KEY
    assert TorrentRoomSignaller022.POLICY.max_offers == TorrentRoomSignaller022.POLICY.numwant == 10
    assert TorrentRoomSignaller022.channel_screen > 0 == TorrentRoomSignaller.channel_screen


# --------------------------------------------------------------------------- channel_wire


def test_channel_wire_tells_the_other_wire_by_its_first_message() -> None:
    token = "ab" * 32
    presence = v025.encode_presence(token, True)
    (room_frame,) = v025.encode_action(token, "data", {"x": 1}, nonce=0)
    (bare,) = v022.encode_chunks("data", {"x": 1}, nonce=0)
    assert channel_wire(presence, "0.22") == ("0.25", "room frames on the data channel")
    assert channel_wire(room_frame, "0.22") == ("0.25", "room frames on the data channel")
    assert channel_wire(bare, "0.25") == ("0.22", "bare action chunks on the data channel")
    # a room's own wire, text messages, short or unreadable data: no verdict
    assert channel_wire(presence, "0.25") is None and channel_wire(bare, "0.22") is None
    for data in ("text", b"", b"\x09abc", b"\xff" * 20, b"\x00" * 20, b"ab\ncd" + b"\x00" * 10):
        assert channel_wire(data, "0.25") is None, data


def test_report_logs_once_and_tells_the_owner(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="signaling.foreign_wire")
    counters: Counter[str] = Counter()
    found: list[str] = []
    watch = ForeignWireWatch(wire="0.22", room_id="lobby", counters=counters, on_stranger=found.append)
    for _ in range(3):
        watch.report("P25", "0.25", "room frames on the data channel")
    assert found == ["P25"] and "P25" in watch and counters["foreign_wire_peers"] == 1
    assert [r.getMessage() for r in caplog.records] == [
        "room lobby (Trystero wire 0.22): peer P25 seems to speak Trystero wire 0.25 (room frames on the "
        "data channel); it cannot join this room: both sides must use the same wire"
    ]


def test_default_trackers() -> None:
    assert default_trackers() == [
        "wss://open.ftorrent.com",
        "wss://tracker.webtorrent.dev",
        "wss://tracker.openwebtorrent.com",
    ]  # §10: the same three for every appId
    assert default_trackers(wire="0.22") == list(DEFAULT_TRACKER_URLS[1:4])
    assert len(default_trackers(9)) == 5
