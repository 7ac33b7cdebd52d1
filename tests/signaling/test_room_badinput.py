"""Bad input against our rooms: nothing crashes, memory and sockets stay bounded.

Two Python sessions (two selfIds) meet through a real mosquitto on 127.0.0.1; garbage is injected
on the room's MQTT topics with a raw relay client, or written straight into an established data
channel with hand-made 0.25 frames. Every test also checks that the event loop saw no unhandled
exception.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from signaling import Limits, Room, RoomConfig, Timeouts, crypto
from signaling.framing import FLAG_BINARY, FLAG_JSON, FLAG_LAST
from signaling.peer import ChannelNotOpen
from signaling.relays import MqttRelay
from signaling.session import PeerLink
from signaling.wire import v025
from tests.services import Mosquitto
from tests.support import STEP, SessionFactory, config_factory, eventually, open_peer_connections

ConfigFactory = Callable[..., RoomConfig]


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def config(mosquitto: Mosquitto) -> ConfigFactory:
    return config_factory(f"badinput-{uuid.uuid4().hex[:10]}", [mosquitto.ws_url])


async def connected_pair(
    sessions: SessionFactory, config: ConfigFactory, room_id: str, **a_overrides: Any
) -> tuple[Room, Room, PeerLink, PeerLink]:
    """Rooms of two fresh sessions that see each other, and each side's link to the other."""
    a, b = sessions(), sessions()
    room_a = a.join(config(**a_overrides), room_id)
    room_b = b.join(config(), room_id)
    await eventually(lambda: b.self_id in room_a.peers and a.self_id in room_b.peers, "pair to join")
    return room_a, room_b, a.links(room_a.app_id)[b.self_id], b.links(room_b.app_id)[a.self_id]


def raw_chunk(action: str, payload: bytes, *, nonce: int, flags: int) -> bytes:
    """One 36-byte-header chunk with any flags (the encoder only makes well-formed runs)."""
    header = v025.LAYOUT.name_field(action) + nonce.to_bytes(2, "big") + bytes((flags, 0))
    return header + payload


async def send_unfinished(
    link: PeerLink, token: str, action: str, *, nonce: int, count: int
) -> tuple[int, int]:
    """Send up to ``count`` full chunks of one message that never ends, until the peer drops us
    (it must); returns the bytes sent and the size of one frame."""
    chunk = raw_chunk(action, bytes(v025.CHUNK_PAYLOAD_SIZE), nonce=nonce, flags=FLAG_BINARY | FLAG_JSON)
    frame = v025.wrap_room_frame(token, chunk)
    sent = 0
    with pytest.raises(ChannelNotOpen):
        for _ in range(count):
            await link.peer.send(frame)
            sent += len(frame)
    return sent, len(frame)


# --------------------------------------------------------------------------- relay topics


async def test_garbage_on_room_topics(
    sessions: SessionFactory,
    config: ConfigFactory,
    raw_relay: MqttRelay,
    loop_errors: list[dict[str, Any]],
) -> None:
    a = sessions()
    # A small signal cap keeps the oversize case fast: mosquitto 2.0's WebSocket listener needs
    # about 5 s to deliver a 200 KB message (mqtt.js sees the same).
    room = a.join(config(limits=Limits(max_signal_bytes=16 * 1024)), "garbage")
    await eventually(lambda: room.stats["announces_out"] > 0, "first announce")
    key = crypto.derive_key("", room.app_id, "garbage")
    sealed = lambda text: crypto.encrypt(key, text)  # noqa: E731
    bad_messages = [
        "not json",
        "",
        "[1, 2]",
        "null",
        '"just a string"',
        '{"peerId": 5}',
        '{"peerId": ""}',
        "{}",
        orjson.dumps({"peerId": a.self_id}).decode(),  # our own id
        orjson.dumps({"peerId": "x" * 1000}).decode(),
        '{"peerId": "fake0", "offer": 123}',
        '{"peerId": "fake0", "offer": ""}',
        '{"peerId": "fake0", "answer": null}',
        '{"peerId": "fake0", "candidate": ["a"]}',
        '{"peerId": "fake1", "offerId": "o1", "offer": "garbage$$"}',
        '{"peerId": "fake1", "offerId": "o2", "offer": "1,2,3$AAAA"}',
        orjson.dumps({"peerId": "fake2", "offerId": "o3", "offer": sealed("v=0 this is no SDP")}).decode(),
        orjson.dumps({"peerId": "fake3", "offerId": "o4", "offer": sealed("")}).decode(),
        orjson.dumps({"peerId": "fake4", "answer": sealed("v=0")}).decode(),
        '{"peerId": "fake5", "offerId": "o5", "candidate": "junk"}',
        orjson.dumps({"peerId": "fake6", "offerId": "o6", "candidate": sealed("not a candidate")}).decode(),
        "x" * 20_000,
    ]
    for topic in (room.signaller.root_topic, room.signaller.self_topic):
        for text in bad_messages:
            raw_relay.publish(topic, text)
    # Not UTF-8 at all: the relay drops it before the room sees it (raw paho publish).
    assert raw_relay._client is not None
    raw_relay._client.publish(room.signaller.root_topic, b"\xff\xfe{", qos=0)

    def dropped(reason: str) -> int:
        return room.stats["dropped"].get(reason, 0)

    await eventually(lambda: dropped("bad_sdp") >= 2 and dropped("relay_oversize") >= 2, "garbage handled")
    for reason in ("relay_not_json", "relay_not_object", "relay_no_peer_id", "relay_bad_peer_id"):
        assert dropped(reason) >= 2, (reason, room.stats)
    assert dropped("relay_bad_field") == 8
    assert dropped("decrypt_failed") == 4  # the two unsealed offers, once per topic
    assert dropped("unexpected_answer") == 2
    assert dropped("candidate_decrypt_failed") == 2
    app = a.apps[room.app_id]
    await eventually(lambda: not app.negotiator.pending, "bad negotiations to be dropped")
    await eventually(lambda: not open_peer_connections(), "no connection left over")

    # The room still works: a real peer joins.
    b = sessions()
    room_b = b.join(config(), "garbage")
    await eventually(lambda: b.self_id in room.peers and a.self_id in room_b.peers, "a real peer to join")
    assert loop_errors == []


async def test_announcement_flood_is_bounded(
    sessions: SessionFactory,
    config: ConfigFactory,
    raw_relay: MqttRelay,
    loop_errors: list[dict[str, Any]],
) -> None:
    limits = Limits(max_pending_connections=4, offer_rate=20, reply_rate=10)
    a = sessions()
    room = a.join(config(limits=limits, timeouts=Timeouts(offer=1.5)), "flood")
    await eventually(lambda: room.stats["announces_out"] > 0, "first announce")
    app = a.apps[room.app_id]

    # "~" sorts after every id character: we lead and would offer to each. "!" sorts first: we
    # would ask each to offer (announce-reply).
    most_pending = 0
    for i in range(400):
        fake = f"~fake{i:04d}{uuid.uuid4().hex[:8]}" if i % 2 else f"!fake{i:04d}{uuid.uuid4().hex[:8]}"
        raw_relay.publish(room.signaller.root_topic, orjson.dumps({"peerId": fake}).decode())
        # a fake candidate for an offer that never comes, per fake peer
        raw_relay.publish(
            room.signaller.self_topic,
            orjson.dumps(
                {"peerId": fake, "offerId": "x", "candidate": crypto.encrypt(room.signaller.key, "{}")}
            ).decode(),
        )
        if i % 20 == 0:
            await asyncio.sleep(0.01)
            most_pending = max(most_pending, len(app.negotiator.pending))
    await eventually(lambda: room.stats["signals_in"] >= 800, "the flood to arrive")
    most_pending = max(most_pending, len(app.negotiator.pending))
    assert most_pending <= 4
    stats = room.stats
    assert stats["dropped"]["connection_rate_limited"] > 0
    assert stats["dropped"]["reply_rate_limited"] > 0
    assert stats["dropped"].get("early_candidate_overflow", 0) == 0
    assert len(app.negotiator._early) <= limits.early_candidate_keys
    assert stats.get("evicted_negotiations", 0) > 0

    # Every fake offer expires; nothing stays allocated.
    await eventually(lambda: not app.negotiator.pending, "fake offers to expire", 10)
    await eventually(lambda: not open_peer_connections(), "sockets to be released")

    # A real peer still gets in.
    b = sessions()
    room_b = b.join(config(), "flood")
    await eventually(lambda: b.self_id in room.peers and a.self_id in room_b.peers, "a real peer to join")
    assert loop_errors == []


async def test_wrong_password_never_joins(
    sessions: SessionFactory, config: ConfigFactory, loop_errors: list[dict[str, Any]]
) -> None:
    a, b = sessions(), sessions()
    room_a = a.join(config(password="right"), "pw")
    room_b = b.join(config(password="wrong"), "pw")
    await eventually(
        lambda: (
            room_a.stats["dropped"].get("decrypt_failed", 0)
            + room_b.stats["dropped"].get("decrypt_failed", 0)
            > 0
        ),
        "a decrypt failure",
    )
    await asyncio.sleep(2)
    assert room_a.peers == {} and room_b.peers == {}
    assert a.links(room_a.app_id) == {} and b.links(room_b.app_id) == {}
    assert loop_errors == []


# --------------------------------------------------------------------------- data channel


async def test_never_ending_chunk_stream_drops_the_peer(
    sessions: SessionFactory, config: ConfigFactory, loop_errors: list[dict[str, Any]]
) -> None:
    cap = 256 * 1024
    room_a, room_b, link_ab, link_ba = await connected_pair(
        sessions, config, "chunks", limits=Limits(max_action_bytes=cap, max_buffered_bytes=2 * cap)
    )
    left = asyncio.Event()
    room_b.on_peer_leave(lambda peer_id: left.set())
    # 3.2 MB of chunks, none of them the last; A drops us mid-stream
    sent, frame_size = await send_unfinished(link_ba, room_b.token, "flood", nonce=0, count=200)
    async with asyncio.timeout(STEP):
        await left.wait()
    await eventually(lambda: link_ab.closed, "the link to be dropped")
    assert cap <= sent < 200 * frame_size
    assert room_a.stats["app"]["dropped_peers"] == 1
    assert room_a.peers == {} and link_ab.decoder.buffered_bytes == 0
    assert loop_errors == []


async def test_pending_peer_actions_are_dropped(
    sessions: SessionFactory, config: ConfigFactory, loop_errors: list[dict[str, Any]]
) -> None:
    """B is in room 1 only; frames it sends for room 2 bind it there as *pending* on A's side:
    its actions are dropped, and the handshake times out."""
    room_a, room_b, link_ab, link_ba = await connected_pair(
        sessions, config, "one", timeouts=Timeouts(handshake=1.0)
    )
    a = room_a._app.session
    room_a2 = a.join(config(timeouts=Timeouts(handshake=1.0)), "two")
    got: list[Any] = []
    room_a2.make_action("data").on_receive(lambda *args: got.append(args))
    for frame in v025.encode_action(room_a2.token, "data", {"sneaky": True}, nonce=0):
        link_ba.send_nowait(frame)
    await eventually(lambda: room_a2.stats["dropped"].get("pending_peer", 0) == 1, "the action to be dropped")
    assert room_b.self_id in room_a2.bindings and room_a2.peers == {}
    await eventually(
        lambda: room_a2.stats["dropped"].get("handshake_timeout", 0) == 1, "the handshake timeout", 5
    )
    assert room_a2.bindings == {} and got == []
    # room 1 is unaffected, on the same connection
    assert set(room_a.peers) == {room_b.self_id} and not link_ab.closed
    assert 0 < await room_a.ping(room_b.self_id) < 2000
    assert loop_errors == []


async def test_silent_channel_is_a_handshake_timeout_then_a_new_connection(
    sessions: SessionFactory,
    config: ConfigFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    loop_errors: list[dict[str, Any]],
) -> None:
    """B's first connection to A carries nothing to A (B's sends on it vanish, as on a channel
    that works one way only), so A's handshake times out. B was negotiated with over MQTT in
    0.25 shapes: no 0.22 stranger, but a handshake timeout on our wire. A closes the silent
    connection and announces again; B is not shunned, and the two meet on a new connection."""
    caplog.set_level(logging.WARNING)
    a, b = sessions(), sessions()
    muted: list[PeerLink] = []
    send_nowait = PeerLink.send_nowait

    def lose_b_first_link_sends(link: PeerLink, frame: bytes) -> bool:
        if link.app.session is b and (not muted or muted[0] is link):
            if not muted:
                muted.append(link)
            return True  # "sent", never arrives
        return send_nowait(link, frame)

    monkeypatch.setattr(PeerLink, "send_nowait", lose_b_first_link_sends)
    timeouts = Timeouts(handshake=1.0)
    room_a = a.join(config(timeouts=timeouts), "silent")
    room_b = b.join(config(timeouts=timeouts), "silent")
    await eventually(lambda: muted and muted[0].closed, "the silent connection to close")
    await eventually(
        lambda: b.self_id in room_a.peers and a.self_id in room_b.peers, "the pair to meet anew"
    )
    link_ab = a.links(room_a.app_id)[b.self_id]
    assert link_ab.screened and not link_ab.closed
    assert room_a.stats["dropped"].get("handshake_timeout") == 1
    assert room_a.stats.get("foreign_wire_peers", 0) == 0 and b.self_id not in room_a.signaller.strangers
    assert "foreign_wire_connection" not in room_a.stats["app"]["dropped"]
    assert "its channel stayed silent" in caplog.text and "seems to speak" not in caplog.text
    assert 0 < await room_a.ping(b.self_id) < 2000
    assert loop_errors == []


async def test_malformed_frames_are_counted_not_fatal(
    sessions: SessionFactory, config: ConfigFactory, loop_errors: list[dict[str, Any]]
) -> None:
    room_a, room_b, link_ab, link_ba = await connected_pair(sessions, config, "frames")
    got: list[tuple[Any, str, Any]] = []
    room_a.make_action("data").on_receive(lambda *args: got.append(args))
    token = room_b.token
    assert link_ba.peer.channel is not None
    link_ba.peer.channel.send("a text message is never a frame")
    for frame in (b"", b"\x01", b"\x09abc", b"\x01\x00\x00", b"\x01\x00\x40short", b"\x02\x01\x00\x00"):
        link_ba.send_nowait(frame)
    # a JSON-flagged single chunk that does not parse: that message only is dropped
    link_ba.send_nowait(
        v025.wrap_room_frame(token, raw_chunk("data", b"{nope", nonce=7, flags=FLAG_JSON | FLAG_LAST))
    )
    # a room we are not in, and a flood of presence frames for made-up rooms
    for frame in v025.encode_action("f" * 64, "data", "elsewhere", nonce=0):
        link_ba.send_nowait(frame)
    for _ in range(500):
        link_ba.send_nowait(v025.encode_presence(uuid.uuid4().hex * 2, True))
    await room_b.make_action("data").send("still fine")
    await eventually(lambda: len(got) == 1, "the good message")
    assert got == [("still fine", room_b.self_id, None)]
    assert link_ab.decoder.ignored == 7
    app_dropped = room_a.stats["app"]["dropped"]
    assert app_dropped["bad_payload"] == 1 and app_dropped["unknown_room"] == 1
    assert len(link_ab.remote_tokens) == Limits().max_remote_tokens
    assert not link_ab.closed and set(room_a.peers) == {room_b.self_id}
    assert loop_errors == []


async def test_app_reassembly_budget_drops_the_peer(
    sessions: SessionFactory, config: ConfigFactory, loop_errors: list[dict[str, Any]]
) -> None:
    """Each peer stays under its own caps, but the app-wide budget for unfinished messages holds."""
    budget = 128 * 1024
    room_a, room_b, link_ab, link_ba = await connected_pair(
        sessions, config, "budget", limits=Limits(max_total_buffered_bytes=budget)
    )
    await send_unfinished(link_ba, room_b.token, "slow", nonce=1, count=100)
    await eventually(lambda: link_ab.closed, "the link to be dropped")
    assert room_a.stats["app"]["dropped_peers"] == 1
    assert room_a._app.buffered_total == 0
    assert loop_errors == []


async def test_unconsumed_messages_are_bounded_in_bytes(
    sessions: SessionFactory, config: ConfigFactory, loop_errors: list[dict[str, Any]]
) -> None:
    """Messages for an action nobody listens to are kept (Trystero replays them), within budget."""
    room_a, room_b, _, _ = await connected_pair(
        sessions, config, "queued", limits=Limits(max_queued_bytes=1536 * 1024)
    )
    blob = room_b.make_action("later")
    for i in range(8):
        await blob.send(bytes([i]) * (512 * 1024))
    await room_b.make_action("marker").send("done")
    marker: list[Any] = []
    room_a.make_action("marker").on_receive(lambda *args: marker.append(args))
    await eventually(lambda: marker != [], "the marker message")
    assert room_a.queued_bytes <= 1536 * 1024
    assert room_a.stats["dropped"]["queue_overflow"] >= 5
    late: list[bytes] = []
    room_a.make_action("later").on_receive(lambda payload, peer_id, meta: late.append(payload))
    # 1.5 MiB hold two 512 KiB messages plus frame headers: the two newest survive
    assert [p[0] for p in late] == [6, 7] and late[-1] == bytes([7]) * (512 * 1024)
    assert room_a.queued_bytes == 0
    assert loop_errors == []
