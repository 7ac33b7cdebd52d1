"""Conformance of signaling.wire.v022 with Trystero 0.22.0 (trystero-wire.md §9).

``SPEC`` vectors are copied from §9.11 (and §10, which §9.1/§9.11 say 0.22 shares). ``NODE``
vectors were produced by running the real ``trystero@0.22.0`` sources
(tests/interop/node_modules/trystero022/src) in Node 20: ``room.js`` with a capturing fake peer
for frames, ``strategy.js``/``torrent.js`` with a fake RTCPeerConnection, ``Math.random`` pinned
to yield selfId ``AbCdEfGhIjKlMnOpQrSt`` and ``crypto.getRandomValues`` pinned to IV bytes 0..15.
They settle what the spec leaves open (falsy metadata, metadata on non-binary data at the
receiver, falsy/odd relay fields, exact relay JSON). The ``live`` tests at the end re-run such
harnesses against the installed JS when Node is available.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from signaling import crypto
from signaling.errors import FramingError, PayloadError
from signaling.framing import NO_METADATA
from signaling.strategies.mqtt import PROFILE_022 as MQTT_022
from signaling.strategies.nostr import PROFILE_022 as NOSTR_022
from signaling.strategies.torrent import PROFILE_022 as TORRENT_PROFILE_022
from signaling.wire import v022, v025
from signaling.wire.v022 import (
    PROFILE,
    Decoder,
    Presence,
    Progress,
    Received,
    RelaySignal,
    RoomEncoder,
)
from tests.services import INTEROP_DIR

from .wire_helpers import feed_all, h, run_node

APP, ROOM = "harness-app", "r1"
SELF = "AbCdEfGhIjKlMnOpQrSt"  # §10 peer id; also the pinned selfId of the NODE runs
T = bytes.fromhex("636861740000000000000000")  # §9.11: "chat", NUL-padded to 12 bytes
IV = bytes(range(16))
KEY = crypto.derive_key("", APP, ROOM)
JS_SRC = INTEROP_DIR / "node_modules" / "trystero022" / "src"


def name(action: str) -> bytes:
    return action.encode().ljust(12, b"\0")


# --- §9.11 / §10: topics and encryption (unchanged in 0.22, §9.1) -----------------------------------


def test_spec_topics_info_hash_and_kinds() -> None:
    root = crypto.root_topic(APP, ROOM)
    assert root == "575i5ptb234329582o5d374u6f1s95l92g63"
    assert crypto.self_topic(APP, ROOM, SELF) == "4b5c5cg353n6y2d4g6f2g672t3h6l496f1c6b49"
    assert crypto.torrent_info_hash(root) == "2j432q6wtm54z4742363"
    assert crypto.nostr_kind(root) == 22507
    assert crypto.nostr_kind(crypto.self_topic(APP, ROOM, SELF)) == 22877


def test_spec_encryption() -> None:
    assert crypto.encrypt(KEY, "hello trystero", IV) == (
        "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15$AiHPHWSHia2ffxoTLPmPQeKsivlwHDTmoPdihbw6"
    )
    assert crypto.encrypt(crypto.derive_key("s3cret", APP, ROOM), "hello trystero", IV) == (
        "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15$VSWoWhJbfM2lJ54/JOuPwtSwse3nqVtL5uR9Gp9d"
    )


def test_spec_nostr_relays_for_0_22() -> None:
    from signaling.strategies.nostr import default_relays_022

    assert default_relays_022(APP) == [
        "wss://relay.binaryrobot.com",
        "wss://black.nostrcity.club",
        "wss://ftp.halifax.rwth-aachen.de/nostr",
        "wss://relay.fountain.fm",
        "wss://yabu.me/v2",
    ]
    assert default_relays_022("p2p-webgpu-diffusion-v1") == [  # §9.4
        "wss://ftp.halifax.rwth-aachen.de/nostr",
        "wss://relay.binaryrobot.com",
        "wss://nostr.cool110.xyz",
        "wss://relay.nostromo.social",
        "wss://nos.lol",
    ]
    assert NOSTR_022.redundancy == 5


# --- §9.11: frames -----------------------------------------------------------------------------


def test_spec_header_constants() -> None:
    assert (v022.HEADER_SIZE, v022.CHUNK_PAYLOAD_SIZE, v022.MAX_ACTION_NAME_BYTES) == (15, 16369, 12)
    assert v022.LAYOUT.nonce_modulus == 256


def test_spec_frames_of_consecutive_sends() -> None:
    # §9.11 lists eight sends of `chat` in a row: nonces 0..7 come from one encoder.
    enc = RoomEncoder()
    assert enc.encode("chat", "hi") == [T + h("00 01 ff 6869")]
    assert enc.encode("chat", {"a": 1}) == [T + h("01 09 ff 7b2261223a317d")]
    assert enc.encode("chat", bytes([1, 2, 3]), {"name": "f"}) == [
        T + h("02 0e 80 7b226e616d65223a2266227d"),
        T + h("02 0d ff 010203"),
    ]
    empty = enc.encode("chat", "")
    assert empty == [T + h("03 01 ff")] and len(empty[0]) == 15
    big = enc.encode("chat", "x" * 40000)
    assert [len(m) for m in big] == [16384, 16384, 7277]
    assert [m[12:15].hex(" ") for m in big] == ["04 00 55", "04 00 aa", "04 01 ff"]
    assert b"".join(m[15:] for m in big) == b"x" * 40000
    assert enc.encode("chat", b"", {"m": 1}) == [T + h("05 0f ff 7b226d223a317d")]
    exact = enc.encode("chat", bytes(16369))
    assert len(exact) == 1 and len(exact[0]) == 16384 and exact[0][:15] == T + h("06 0d ff")
    assert enc.encode("chat", 5) == [T + h("07 09 ff 35")]


def test_spec_nonce_after_259_sends() -> None:
    enc = RoomEncoder()
    nonces = [enc.encode("chat", "")[0][12] for _ in range(259)]
    assert nonces[-1] == 0x02
    assert nonces[255:257] == [0xFF, 0x00]  # NODE: wraps at 256


def test_spec_internal_action_frames() -> None:
    assert v022.encode_chunks(v022.ACTION_PING, "", nonce=0) == [h("405f70696e67000000000000 00 01 ff")]
    assert v022.encode_chunks(v022.ACTION_LEAVE, "", nonce=0) == [h("405f6c656176650000000000 00 01 ff")]
    assert v022.encode_chunks(v022.ACTION_STREAM, {"name": "cam"}, nonce=0) == [
        h("405f73747265616d00000000 00 09 ff 7b226e616d65223a2263616d227d")
    ]


def test_spec_internal_action_names() -> None:
    assert (v022.ACTION_PING, v022.ACTION_PONG, v022.ACTION_LEAVE) == ("@_ping", "@_pong", "@_leave")
    assert (v022.ACTION_SIGNAL, v022.ACTION_STREAM, v022.ACTION_TRACK) == ("@_signal", "@_stream", "@_track")
    expected = {"@_ping", "@_pong", "@_leave", "@_signal", "@_stream", "@_track"}
    assert expected == v022.INTERNAL_ACTIONS
    assert all(n.startswith(v022.INTERNAL_PREFIX) for n in v022.INTERNAL_ACTIONS)


def test_decode_spec_frames() -> None:
    dec = Decoder(token="room")
    assert dec.feed(T + h("00 01 ff 6869")) == [Received("room", "chat", 0, "hi")]
    assert dec.feed(T + h("01 09 ff 7b2261223a317d")) == [Received("room", "chat", 1, {"a": 1})]
    assert feed_all(dec, [T + h("02 0e 80 7b226e616d65223a2266227d"), T + h("02 0d ff 010203")]) == [
        Progress("room", "chat", 2, 128 / 255, {"name": "f"}),
        Received("room", "chat", 2, b"\x01\x02\x03", {"name": "f"}),
    ]
    assert dec.feed(T + h("03 01 ff")) == [Received("room", "chat", 3, "")]
    assert dec.feed(T + h("05 0f ff 7b226d223a317d")) == [Received("room", "chat", 5, b"", {"m": 1})]
    assert dec.feed(T + h("07 09 ff 35")) == [Received("room", "chat", 7, 5)]
    assert dec.feed(h("405f70696e67000000000000 00 01 ff")) == [Received("room", "@_ping", 0, "")]
    assert dec.feed(h("405f73747265616d00000000 00 09 ff 7b226e616d65223a2263616d227d")) == [
        Received("room", "@_stream", 0, {"name": "cam"})
    ]
    assert dec.pending_count == 0


def test_decode_40000_byte_string_with_progress() -> None:
    dec = Decoder()
    assert feed_all(dec, v022.encode_chunks("chat", "x" * 40000, nonce=4)) == [
        Progress("", "chat", 4, 0x55 / 255),
        Progress("", "chat", 4, 0xAA / 255),
        Received("", "chat", 4, "x" * 40000),
    ]
    assert dec.buffered_bytes == 0


# --- NODE: frames (room.js send/handleData) ------------------------------------------------------

NODE_FRAMES: list[tuple[str, object, object, int, list[bytes]]] = [
    # (action, payload, metadata, nonce, messages)
    ("m5", b"\x09", [1, 2], 0, [name("m5") + h("00 0e 80") + b"[1,2]", name("m5") + h("00 0d ff 09")]),
    ("m6", b"\x09", {}, 0, [name("m6") + h("00 0e 80") + b"{}", name("m6") + h("00 0d ff 09")]),
    ("m2", b"\x09", None, 0, [name("m2") + h("00 0d ff 09")]),  # JS: falsy meta = no meta chunk
    ("j", None, NO_METADATA, 0, [name("j") + h("00 09 ff") + b"null"]),
    ("j", True, NO_METADATA, 1, [name("j") + h("01 09 ff") + b"true"]),
    (
        "j",
        {
            "v": 0.1,
            "w": -0.0,
            "big": 1e21,
            "small": 1e-7,
            "i": 1.0,
            "n": float("nan"),
            "e": 1.5e-7,
            "s": 1e20,
        },
        NO_METADATA,
        2,
        [
            name("j")
            + h("02 09 ff")
            + b'{"v":0.1,"w":0,"big":1e+21,"small":1e-7,"i":1,"n":null,"e":1.5e-7,"s":100000000000000000000}'
        ],
    ),
    (
        "j",
        {"b": 1, "2": 2, "a": 3, "1": 4, "01": 5},
        NO_METADATA,
        3,
        [name("j") + h("03 09 ff") + b'{"1":4,"2":2,"b":1,"a":3,"01":5}'],
    ),
    (
        "j",
        {"é": '\U0001f600\u2028\u0000\u001f\u007f"\\/'},
        NO_METADATA,
        4,
        [name("j") + h("04 09 ff 7b22c3a9223a22f09f9880e280a85c75303030305c75303031667f5c225c5c2f227d")],
    ),
    ("j", ["a\ud800", "\udc00"], NO_METADATA, 5, [name("j") + h("05 09 ff") + b'["a\\ud800","\\udc00"]']),
    ("t", "a\ud800b\ud83d\ude00", NO_METADATA, 0, [name("t") + h("00 01 ff 61efbfbd62f09f9880")]),
    ("b", b"", NO_METADATA, 0, [name("b") + h("00 0d ff")]),
    ("capabilities", "x", NO_METADATA, 0, [b"capabilities" + h("00 01 ff 78")]),
    ("çhat", "x", NO_METADATA, 0, [h("c3a7686174000000000000000001ff78")]),
    ("éééééé", "x", NO_METADATA, 0, [h("c3a9c3a9c3a9c3a9c3a9c3a90001ff78")]),
]


@pytest.mark.parametrize(("action", "payload", "metadata", "nonce", "expected"), NODE_FRAMES)
def test_node_frames(
    action: str, payload: object, metadata: object, nonce: int, expected: list[bytes]
) -> None:
    assert v022.encode_chunks(action, payload, nonce=nonce, metadata=metadata) == expected


@pytest.mark.parametrize(("action", "payload", "metadata", "nonce", "expected"), NODE_FRAMES)
def test_decode_node_frames(
    action: str, payload: object, metadata: object, nonce: int, expected: list[bytes]
) -> None:
    last = feed_all(Decoder(), expected)[-1]
    assert isinstance(last, Received)
    assert (last.action, last.nonce) == (action, nonce)
    # Re-encoding what a JS receiver gets yields the same bytes (NaN/-0.0 come back as null/0).
    meta = NO_METADATA if metadata is None else metadata
    assert last.metadata == meta
    assert v022.encode_chunks(action, last.payload, nonce=nonce, metadata=last.metadata) == expected


@pytest.mark.parametrize(
    ("size", "meta", "expected"),
    [
        # NODE: binary sizes around the 16369-byte chunk payload, with the 21-byte meta JSON
        (16370, NO_METADATA, [(16384, "0c 80"), (16, "0d ff")]),
        (16369, {"k": "bin32697_meta"}, [(36, "0e 80"), (16384, "0d ff")]),
        (32738, {"k": "bin32697_meta"}, [(36, "0e 55"), (16384, "0c aa"), (16384, "0d ff")]),
        (32739, NO_METADATA, [(16384, "0c 55"), (16384, "0c aa"), (16, "0d ff")]),
    ],
)
def test_node_chunk_boundaries(size: int, meta: object, expected: list[tuple[int, str]]) -> None:
    chunks = v022.encode_chunks("b", bytes(size), nonce=0, metadata=meta)
    assert [(len(c), c[13:15].hex(" ")) for c in chunks] == expected
    last = feed_all(Decoder(), chunks)[-1]
    assert last == Received("", "b", 0, bytes(size), meta)


@pytest.mark.parametrize(
    ("payload", "metadata", "error"),
    [
        # NODE: "action meta argument can only be used with binary data"
        ("hey", {"x": [1, 2]}, ValueError),
        ({"a": 1}, {"b": 2}, ValueError),
        (None, [1], ValueError),
        # NODE: "action meta argument must be an object" (JS lets falsy scalars pass as none;
        # we reject every scalar)
        (b"\x09", "m", TypeError),
        (b"\x09", True, TypeError),
        (b"\x09", 0, TypeError),
        (b"\x09", 1.5, TypeError),
    ],
)
def test_metadata_rules_raise_before_nonce_advances(payload: object, metadata: object, error: type) -> None:
    enc = RoomEncoder()
    with pytest.raises(error):
        enc.encode("chat", payload, metadata)
    assert enc.encode("chat", "")[0][12] == 0


def test_action_name_limits() -> None:
    with pytest.raises(ValueError):
        v022.encode_chunks("capabilities!", "x", nonce=0)  # NODE: 13 bytes, JS throws
    with pytest.raises(ValueError):
        v022.encode_chunks("ééééééé", "x", nonce=0)  # NODE: 14 bytes
    with pytest.raises(ValueError):
        v022.encode_chunks("", "x", nonce=0)
    with pytest.raises(ValueError):
        v022.encode_chunks("chat", "x", nonce=256)
    with pytest.raises(TypeError):
        RoomEncoder().encode("chat", {1, 2})


def test_nonce_per_action_per_send_not_per_chunk() -> None:
    enc = RoomEncoder("token-ignored")
    assert enc.token == "token-ignored"
    nonces = [enc.encode(a, "")[0][12] for a in ("chat", "chat", "@_ping", "chat", "@_ping")]
    assert nonces == [0, 1, 0, 2, 1]
    assert {m[12] for m in enc.encode("chat", "x" * 40000)} == {3}
    assert enc.encode("chat", "")[0][12] == 4


def test_encode_action_ignores_token() -> None:
    assert v022.encode_action("any", "chat", "hi", nonce=0) == v022.encode_chunks("chat", "hi", nonce=0)
    assert v022.encode_action(None, "chat", b"", nonce=5, metadata={"m": 1}) == [
        T + h("05 0f ff 7b226d223a317d")
    ]


# --- NODE: receiver semantics (room.js handleData) -----------------------------------------------


def test_node_metadata_reaches_binary_payloads_only() -> None:
    # NODE: a meta chunk before text/JSON data shows up in onProgress, but onComplete(data, id)
    # gets no meta; for binary, onComplete(data, id, meta).
    dec = Decoder()
    assert feed_all(dec, [T + h("00 02 80 7b2278223a317d"), T + h("00 01 ff 686579")]) == [
        Progress("", "chat", 0, 128 / 255, {"x": 1}),
        Received("", "chat", 0, "hey"),
    ]
    assert feed_all(dec, [T + h("01 0a 80 7b2278223a317d"), T + h("01 09 ff 7b7d")])[-1] == Received(
        "", "chat", 1, {}
    )
    # NODE: a wire meta of `null` is delivered as null for binary data.
    assert feed_all(dec, [T + h("03 0e 80 6e756c6c"), T + h("03 0d ff 09")])[-1] == Received(
        "", "chat", 3, b"\x09", None
    )
    # NODE: a meta chunk arriving after a data chunk still sets meta.
    assert feed_all(dec, [T + h("0f 0c 80 6161"), T + h("0f 0e 80 7b7d"), T + h("0f 0d ff 6262")])[-1] == (
        Received("", "chat", 15, b"aabb", {})
    )


def test_node_progress_bytes_are_passed_through() -> None:
    events = feed_all(Decoder(), [T + h("0e 00 01 6161"), T + h("0e 00 fe 6262"), T + h("0e 01 00")])
    assert events == [
        Progress("", "chat", 14, 1 / 255),
        Progress("", "chat", 14, 254 / 255),
        Received("", "chat", 14, "aabb"),
    ]


def test_node_interleaved_nonces_and_unknown_flags() -> None:
    dec = Decoder()
    events = feed_all(dec, [T + h("0b 00 55 6161"), T + h("0c 00 80 6262"), T + h("0b 01 ff 6161")])
    assert events[-1] == Received("", "chat", 11, "aaaa")
    assert dec.feed(T + h("0c 01 ff 6262")) == [Received("", "chat", 12, "bbbb")]
    assert dec.feed(T + h("0d f1 ff 6869")) == [Received("", "chat", 13, "hi")]  # NODE: high bits ignored
    assert dec.feed(h("630068006174000000000000 00 01 ff 6869")) == [Received("", "chat", 0, "hi")]


def test_node_text_decoding_like_text_decoder() -> None:
    # NODE: BOM dropped, invalid byte replaced.
    assert Decoder().feed(T + h("0a 01 ff efbbbf6869ff")) == [Received("", "chat", 10, "hi\ufffd")]


def test_node_unregistered_types_dropped_with_accepts() -> None:
    registered = {"chat", *v022.INTERNAL_ACTIONS}
    dec = Decoder(accepts=registered.__contains__)
    # NODE: "received message with unregistered type (nope)"
    assert dec.feed(h("6e6f70650000000000000000 00 01 ff 6869")) == []
    # NODE: a 0.25 room frame reads as type "\x01@fe369a144" (§9.10) and is dropped.
    token = crypto.room_token(APP, ROOM)
    frame = v025.encode_action(token, "chat", "hi", nonce=0)[0]
    assert v022.LAYOUT.parse(frame)[0].action == "\x01@fe369a144"
    assert dec.feed(frame) == []
    assert (dec.ignored, dec.pending_count, dec.buffered_bytes) == (2, 0, 0)
    assert dec.feed(T + h("00 01 ff 6869")) == [Received("", "chat", 0, "hi")]


def test_without_accepts_every_action_is_reassembled() -> None:
    assert Decoder().feed(h("6e6f70650000000000000000 00 01 ff 6869")) == [Received("", "nope", 0, "hi")]


def test_node_text_and_empty_messages_are_ignored() -> None:
    # NODE: both decode as an empty type in JS ("unregistered type ()") and are dropped.
    dec = Decoder()
    assert dec.feed("hi there!!!!!!!!!") == []
    assert dec.feed(b"") == []
    assert dec.ignored == 2


def test_node_bad_meta_json_then_message_completes_without_meta() -> None:
    # NODE: JSON.parse throws on the meta chunk; the data chunk then completes with no meta.
    dec = Decoder()
    with pytest.raises(PayloadError):
        dec.feed(T + h("09 0e 80 7b6e6f"))
    assert dec.feed(T + h("09 0d ff 01")) == [Received("", "chat", 9, b"\x01")]


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    ["", "hi", "é😀", {"a": [1, None, True]}, [], 0, -1.5, None, False, "y" * 16369, "z" * 16370],
)
def test_round_trip_non_binary(payload: object) -> None:
    messages = RoomEncoder().encode("chat", payload)
    last = feed_all(Decoder(token="tk"), messages)[-1]
    assert last == Received("tk", "chat", 0, payload)
    assert type(last.payload) is type(payload)


@pytest.mark.parametrize(
    "payload", [b"", b"\x00", bytes(range(256)) * 200, bytearray(b"ab"), memoryview(b"cd")]
)
@pytest.mark.parametrize("metadata", [NO_METADATA, None, {"name": "f"}, [1, "x"], {}])
def test_round_trip_binary(payload: bytes, metadata: object) -> None:
    messages = RoomEncoder().encode("blob", payload, metadata)
    last = feed_all(Decoder(), messages)[-1]
    expected_meta = NO_METADATA if metadata is None else metadata
    assert last == Received("", "blob", 0, bytes(payload), expected_meta)
    assert isinstance(last, Received) and last.has_metadata is (expected_meta is not NO_METADATA)


def test_encoder_and_decoder_interleaved_actions() -> None:
    enc = RoomEncoder()
    a = enc.encode("chat", "a" * 20000)
    b = enc.encode("chat", b"b" * 20000, {"n": 1})
    c = enc.encode("file", {"c": "c" * 20000})
    events = feed_all(Decoder(), [a[0], b[0], c[0], b[1], c[1], b[2], a[1]])
    assert [e for e in events if isinstance(e, Received)] == [
        Received("", "file", 0, {"c": "c" * 20000}),
        Received("", "chat", 1, b"b" * 20000, {"n": 1}),
        Received("", "chat", 0, "a" * 20000),
    ]


# --- garbage and caps ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 12, 13, 14])
def test_truncated_header_raises_framing_error(size: int) -> None:
    # JS would buffer such a fragment forever; a real 0.22 peer never sends one.
    with pytest.raises(FramingError):
        Decoder().feed((T + h("00 01 ff"))[:size])


def test_empty_action_name_raises_framing_error() -> None:
    with pytest.raises(FramingError):
        Decoder().feed(bytes(12) + h("00 01 ff 6869"))


def test_endless_chunk_stream_hits_action_cap() -> None:
    dec = Decoder(max_action_bytes=100_000, max_buffered_bytes=10**6)
    chunk = T + h("00 00 01") + bytes(16369)  # never isLast
    with pytest.raises(FramingError):
        for _ in range(1000):
            dec.feed(chunk)
            assert dec.buffered_bytes <= 100_000
    assert dec.buffered_bytes == 0


def test_endless_meta_chunks_hit_action_cap() -> None:
    dec = Decoder(max_action_bytes=10_000)
    with pytest.raises(FramingError):
        for _ in range(1000):
            dec.feed(T + h("00 0e 01") + b'"' + b"m" * 1000 + b'"')


def test_too_many_unfinished_actions() -> None:
    dec = Decoder(max_pending=8)
    for nonce in range(8):
        dec.feed(T + bytes([nonce]) + h("00 01 61"))
    with pytest.raises(FramingError):
        dec.feed(T + h("08 00 01 61"))
    assert dec.pending_count == 8


def test_all_256_nonces_of_many_actions_are_bounded() -> None:
    dec = Decoder(max_pending=32)
    with pytest.raises(FramingError):
        for action in ("a", "b", "c"):
            for nonce in range(256):
                dec.feed(name(action) + bytes([nonce]) + h("00 01 61"))
    assert dec.pending_count == 32


def test_total_buffered_bytes_cap() -> None:
    dec = Decoder(max_action_bytes=40_000, max_pending=100, max_buffered_bytes=50_000)
    with pytest.raises(FramingError):
        for nonce in range(100):
            dec.feed(T + bytes([nonce]) + h("00 01") + bytes(16369))
            assert dec.buffered_bytes <= 50_000


def test_single_oversized_message_rejected() -> None:
    with pytest.raises(FramingError):
        Decoder(max_action_bytes=1000).feed(T + h("00 01 ff") + bytes(1001))


def test_invalid_json_payload_raises_payload_error_and_decoder_survives() -> None:
    dec = Decoder()
    with pytest.raises(PayloadError):
        dec.feed(T + h("08 09 ff 7b6e6f7065"))  # NODE: JSON.parse throws in handleData
    with pytest.raises(PayloadError):
        dec.feed(T + h("01 09 ff"))  # empty JSON, as JS sends for a function payload
    assert dec.feed(T + h("02 01 ff 6f6b")) == [Received("", "chat", 2, "ok")]


def test_forget_room_and_reset() -> None:
    dec = Decoder(token="r1")
    dec.feed(v022.encode_chunks("chat", "a" * 20000, nonce=0)[0])
    assert dec.forget_room("other") == 0 and dec.pending_count == 1
    assert dec.forget_room("r1") == 1
    assert (dec.pending_count, dec.buffered_bytes) == (0, 0)
    dec.feed(v022.encode_chunks("chat", "a" * 20000, nonce=1)[0])
    dec.reset()
    assert (dec.pending_count, dec.buffered_bytes) == (0, 0)


# --- interface shared with v025 -----------------------------------------------------------------

SHARED_NAMES = [
    "ACTION_LEAVE",
    "ACTION_PING",
    "ACTION_PONG",
    "ACTION_SIGNAL",
    "ACTION_STREAM",
    "ACTION_TRACK",
    "CHUNK_PAYLOAD_SIZE",
    "HANDSHAKE_TIMEOUT_S",
    "HEADER_SIZE",
    "INTERNAL_PREFIX",
    "LAYOUT",
    "MAX_ACTION_NAME_BYTES",
    "NO_METADATA",
    "Decoder",
    "Event",
    "Presence",
    "Progress",
    "Received",
    "RoomEncoder",
    "encode_action",
    "encode_chunks",
    "progress_byte",
]


def test_names_shared_with_v025() -> None:
    for attr in SHARED_NAMES:
        assert hasattr(v022, attr) and hasattr(v025, attr), attr
    # Same event classes, so isinstance dispatch works for either wire.
    assert (v022.Received, v022.Progress, v022.Presence) == (v025.Received, v025.Progress, v025.Presence)
    assert set(v022.__all__) >= set(SHARED_NAMES)


def test_admission_names_are_absent() -> None:
    for attr in ("ACTION_HSREADY", "ACTION_HSDATA", "ACTION_RESPONSE", "PENDING_ACTIONS", "encode_presence"):
        assert not hasattr(v022, attr), attr
    assert (v022.ROOM_FRAMES, v022.ADMISSION, v022.SHARED_CONNECTIONS) == (False, False, False)
    assert (v022.QUEUE_UNHANDLED, v022.METADATA_BINARY_ONLY, v022.HANDSHAKE_TIMEOUT_S) == (False, True, None)
    assert v022.WIRE_VERSION == PROFILE.version == "0.22"
    assert Presence not in v022.Event.__args__


# --- profile (§9.2-9.6) ---------------------------------------------------------------------------


def test_profile_cadence_and_roles() -> None:
    # NODE (strategy.js with fake relays): announce right after subscribe, then every 5333 ms; a
    # pending offer PC closed 4799 ms after it was sent; a new announcement then got a new offer.
    assert PROFILE.announce_warmup == ()
    assert PROFILE.announce_interval == 5.333
    assert PROFILE.pending_offer_ttl == pytest.approx(4.7997)
    assert (PROFILE.offer_pool_size, PROFILE.offer_pool_ttl) == (20, 57.333)
    assert PROFILE.offer_pool_sweep == pytest.approx(59.053, abs=1e-3)
    assert PROFILE.everyone_offers and not PROFILE.announce_reply and PROFILE.glare_winner == "larger"
    assert (PROFILE.offer_shape, PROFILE.offer_ids, PROFILE.trickle_candidates) == ("object", False, False)
    assert (PROFILE.leave_grace, PROFILE.disconnect_grace, PROFILE.ice_gather_timeout) == (0.099, 0.0, 5.0)
    assert not PROFILE.admission and PROFILE.handshake_timeout is None and not PROFILE.shared_connections
    assert TORRENT_PROFILE_022.offers_per_announce == 10 and TORRENT_PROFILE_022.announce_interval == 33.333


def test_is_offerer_and_glare() -> None:
    assert v022.is_offerer("a", "b") and v022.is_offerer("b", "a")
    # NODE: selfId AbCd… with an offer pending to 0PEER… ignored 0PEER's offer (larger id wins).
    assert v022.wins_glare(SELF, "0PEER0PEER0PEER0PEER")
    assert not v022.wins_glare(SELF, "zPEERzPEERzPEERzPEER")
    assert v022.wins_glare("a", "Z")  # code-point order, as JS `>`


def _js_default_urls(module: str) -> list[str]:
    text = (JS_SRC / module).read_text()
    block = text[text.index("defaultRelayUrls = [") :]
    block = block[: block.index("]")]
    return ["wss://" + u for u in re.findall(r"'([^']+)'", block)]


def test_profile_default_urls_match_js_source() -> None:
    from signaling.strategies.nostr import DEFAULT_RELAY_URLS_022
    from signaling.strategies.torrent import DEFAULT_TRACKER_URLS_022

    assert list(MQTT_022.default_urls) == _js_default_urls("mqtt.js")
    assert list(DEFAULT_TRACKER_URLS_022) == _js_default_urls("torrent.js")
    assert list(DEFAULT_RELAY_URLS_022) == _js_default_urls("nostr.js")
    assert "const defaultRedundancy = 4" in (JS_SRC / "mqtt.js").read_text()
    assert "const offerPoolSize = 10" in (JS_SRC / "torrent.js").read_text()
    strategy_js = (JS_SRC / "strategy.js").read_text()
    assert "const announceIntervalMs = 5_333" in strategy_js and "const poolSize = 20" in strategy_js


# --- relay payloads: build ------------------------------------------------------------------------

P_SMALL, P_LARGE = "0PEER0PEER0PEER0PEER", "zPEERzPEERzPEERzPEER"
# NODE: the fake PC's raw SDP, and what JS sealed after stripping the trickle line.
RAW_OFFER_SDP = (
    "v=0\r\na=ice-options:trickle\r\na=x-offer\r\na=ice-options:trickle \r\na=ice-options:trickle\n\n"
)
NODE_OFFER = (
    '{"peerId":"AbCdEfGhIjKlMnOpQrSt","offer":{"type":"offer","sdp":"0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15'
    '$HHmTfAHGwKfLYwgQO+SeuhgzmkjC5hWaaP7kXtMldoRsh1zvopVXhB32/sGQ2j5hXz+WfBVnIso="}}'
)
NODE_OFFER_TOPIC = "603p664i2c3i351d63525232q7l3b2r723o4k"  # self topic of P_SMALL
NODE_ANSWER = (
    '{"peerId":"AbCdEfGhIjKlMnOpQrSt","answer":{"type":"answer","sdp":"0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15'
    '$HHmTfAHGwKfLbQAFKfPhvXNvzkLErleFbOPiX85sOIJ3jVToq9B6g6enauTIfdupiQdxtLHV9NtB"}}'
)
NODE_ANSWER_TOPIC = "6w4b622m2i1o15k4q4616n656f1i404n5w3c1r"  # self topic of P_LARGE
TORRENT_SEALED = "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15$HHmTfAF4VQu8lq/Sm3w/7e3GdPx4"  # "v=0\r\n"
NODE_TORRENT_OFFER_IDS = [
    "08SJlb2QQxgLu23Lp0g4",
    "hQNxVL5PhqXsD2rFoSzG",
    "cZRSP4oWDisjCdGAKwX3",
    "XkLezKD5Y4kgdXLJY3ss",
    "u70QvorRzwCEfkNVhVDh",
    "ljda9mt2lKySMwOV9bR8",
    "5d0h1RYCaeWP9QgHK9NV",
    "NyM9Zh8mcKJy7Beo7POt",
    "cjHB1wI8Yh8W5A4Gc8TJ",
    "fJUxPbQXcvjknUSJYoiu",
]
NODE_TORRENT_ANNOUNCE = (
    '{"action":"announce","info_hash":"2j432q6wtm54z4742363","peer_id":"AbCdEfGhIjKlMnOpQrSt","numwant":10,'
    '"offers":['
    + ",".join(
        f'{{"offer_id":"{oid}","offer":{{"type":"offer","sdp":"{TORRENT_SEALED}"}}}}'
        for oid in NODE_TORRENT_OFFER_IDS
    )
    + "]}"
)
NODE_TORRENT_ANSWER = (
    '{"action":"announce","info_hash":"2j432q6wtm54z4742363","peer_id":"AbCdEfGhIjKlMnOpQrSt",'
    f'"answer":{{"type":"answer","sdp":"{TORRENT_SEALED}"}},"offer_id":"OFFERIDOFFERIDOFFER1","to_peer_id":"0PEER"}}'
)


def test_spec_announce_payload() -> None:
    assert v022.make_announce_payload(SELF) == '{"peerId":"AbCdEfGhIjKlMnOpQrSt"}'


def test_node_offer_payload() -> None:
    sdp = v022.strip_trickle_option(RAW_OFFER_SDP)
    assert sdp == "v=0\r\na=x-offer\r\na=ice-options:trickle \r\n"
    assert v022.make_offer_payload(SELF, crypto.encrypt(KEY, sdp, IV)) == NODE_OFFER
    assert crypto.self_topic(APP, ROOM, P_SMALL) == NODE_OFFER_TOPIC


def test_node_answer_payload() -> None:
    sealed = crypto.encrypt(KEY, "v=0\r\na=x-answer\r\na=ice-options:trickle \r\n", IV)
    assert v022.make_answer_payload(SELF, sealed) == NODE_ANSWER
    assert crypto.self_topic(APP, ROOM, P_LARGE) == NODE_ANSWER_TOPIC


def test_node_torrent_payloads_via_torrent_relay() -> None:
    # Tracker frames are shared by both wires and built by signaling.relays.torrent; these are the
    # 0.22 NODE frames (torrent.js with a fake tracker socket).
    from signaling.relays.torrent import TORRENT_022, announce_message, answer_message

    info_hash = crypto.torrent_info_hash(crypto.root_topic(APP, ROOM))
    assert crypto.encrypt(KEY, "v=0\r\n", IV) == TORRENT_SEALED
    offers = [(oid, TORRENT_SEALED) for oid in NODE_TORRENT_OFFER_IDS]
    assert announce_message(info_hash, SELF, offers, numwant=TORRENT_022.numwant) == NODE_TORRENT_ANNOUNCE
    answer = answer_message(info_hash, SELF, "0PEER", "OFFERIDOFFERIDOFFER1", TORRENT_SEALED)
    assert answer == NODE_TORRENT_ANSWER


def test_torrent_profile_agrees_with_torrent_relay_policy() -> None:
    from signaling.relays.torrent import TORRENT_022

    t = TORRENT_PROFILE_022
    assert (
        (TORRENT_022.numwant, TORRENT_022.max_offers)
        == (t.offers_per_announce, t.offers_per_announce)
        == (10, 10)
    )
    assert (TORRENT_022.default_interval, TORRENT_022.max_interval) == (
        t.announce_interval,
        t.max_announce_interval,
    )
    assert TORRENT_022.warmup == PROFILE.announce_warmup == ()
    assert (
        TORRENT_022.interval_raise_only and TORRENT_022.dedupe_window is None and t.dedupe_offer_ids_forever
    )
    # NODE (torrent.js): a forwarded offer from a smaller id (0PEER < AbCd…) was answered too.
    assert not t.glare_check


@pytest.mark.parametrize(
    ("sdp", "expected"),
    [
        ("a=ice-options:trickle\r\nx", "x"),
        ("a=ice-options:trickle\n\nx", "x"),  # `\s` takes the first \n
        ("a=ice-options:trickle\nx", "a=ice-options:trickle\nx"),  # LF only: JS keeps it
        ("a=ice-options:trickle \r\n", "a=ice-options:trickle \r\n"),
        ("a=ice-options:trickle renomination\r\n", "a=ice-options:trickle renomination\r\n"),
        ("a=ice-options:trickle\u00a0\n", ""),  # JS \s includes NBSP
        ("a=ice-options:trickle\x1c\n", "a=ice-options:trickle\x1c\n"),  # Python \s would, JS not
    ],
)
def test_strip_trickle_option_like_js_regex(sdp: str, expected: str) -> None:
    assert v022.strip_trickle_option(sdp) == expected


# --- relay payloads: parse ------------------------------------------------------------------------


def test_parse_spec_shapes() -> None:
    assert v022.parse_relay_payload('{"peerId":"P"}', SELF) == RelaySignal("P")
    offer = v022.parse_relay_payload(NODE_OFFER, "other")
    assert offer == RelaySignal(SELF, offer=json.loads(NODE_OFFER)["offer"]["sdp"])
    assert isinstance(offer, RelaySignal) and offer.kind == "offer" and not offer.is_announcement
    assert crypto.decrypt(KEY, offer.offer or "") == "v=0\r\na=x-offer\r\na=ice-options:trickle \r\n"
    answer = v022.parse_relay_payload(NODE_ANSWER, "other")
    assert isinstance(answer, RelaySignal) and answer.kind == "answer" and answer.offer is None
    assert RelaySignal("P").kind == "announce" and RelaySignal("P").is_announcement


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        # NODE: JS answered these with an offer, i.e. read them as announcements.
        ({"peerId": "yPEER", "offer": None}, RelaySignal("yPEER")),
        ({"peerId": "xPEER", "offerId": "abc", "candidate": "0,1$xx"}, RelaySignal("xPEER")),
        ({"peerId": "P", "offer": "", "answer": 0, "extra": [1]}, RelaySignal("P")),
        ({"peerId": "P", "offer": False}, RelaySignal("P")),
        # NODE: with both present JS answers the offer.
        (
            {
                "peerId": "sPEER",
                "answer": {"type": "answer", "sdp": "A"},
                "offer": {"type": "offer", "sdp": "O"},
            },
            RelaySignal("sPEER", offer="O"),
        ),
        ({"peerId": "P", "answer": {"type": "answer", "sdp": "A", "x": 1}}, RelaySignal("P", answer="A")),
        # NODE: a 0.25 string offer → onJoinError("incorrect password (undefined) when decrypting offer")
        ({"peerId": "wPEER", "offerId": "abc", "offer": "0,1$x"}, "relay_foreign_shape"),
        ({"peerId": "P", "answer": "0,1$x"}, "relay_foreign_shape"),
        # NODE: an offer without "type" made JS crash (unhandled TypeError): never act on it.
        ({"peerId": "rPEER", "offer": {"sdp": "O"}}, "relay_bad_field"),
        ({"peerId": "P", "offer": {"type": "answer", "sdp": "O"}}, "relay_bad_field"),
        ({"peerId": "P", "offer": {"type": "offer", "sdp": ""}}, "relay_bad_field"),
        ({"peerId": "P", "offer": {"type": "offer", "sdp": 5}}, "relay_bad_field"),
        ({"peerId": "P", "offer": {}}, "relay_bad_field"),
        ({"peerId": "P", "offer": [1]}, "relay_bad_field"),
        ({"peerId": "P", "answer": {"type": "offer", "sdp": "A"}}, "relay_bad_field"),
        # NODE: JS ignores its own id, and an empty peerId.
        ({"peerId": SELF}, "relay_own"),
        ({"peerId": ""}, "relay_no_peer_id"),
        # NODE: JS offers to peerId 7 and answers an offer with no peerId (to the self topic of
        # "undefined"); we refuse both.
        ({"peerId": 7}, "relay_no_peer_id"),
        ({"offer": {"type": "offer", "sdp": "O"}}, "relay_no_peer_id"),
        ({"peerId": "p" * 129}, "relay_bad_peer_id"),
        (5, "relay_not_object"),  # NODE: "5" is ignored
        (None, "relay_not_object"),  # JS: unhandled TypeError
        ([{"peerId": "P"}], "relay_not_object"),
    ],
)
def test_parse_relay_payload(message: Any, expected: RelaySignal | str) -> None:
    assert v022.parse_relay_payload(json.dumps(message), SELF) == expected


def test_parse_relay_payload_text_level_rejects() -> None:
    assert v022.parse_relay_payload("{nope", SELF) == "relay_not_json"
    assert v022.parse_relay_payload("", SELF) == "relay_not_json"
    assert v022.parse_relay_payload('{"peerId":"P","pad":"' + "x" * 200 + '"}', SELF, max_bytes=100) == (
        "relay_oversize"
    )
    assert v022.parse_relay_payload(b'{"peerId":"P"}', SELF) == RelaySignal("P")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (NODE_OFFER, "0.22"),
        (NODE_ANSWER, "0.22"),
        ('{"peerId":"P","offerId":"abcdefghijkl","offer":"0,1$x"}', "0.25"),
        ('{"peerId":"P","answer":"0,1$x","offerId":"abcdefghijkl"}', "0.25"),
        ('{"peerId":"P","offerId":"abcdefghijkl","candidate":"0,1$x"}', "0.25"),
        ('{"peerId":"P","passive":true}', "0.25"),
        ('{"peerId":"P"}', None),
        ("not json", None),
        ("[1]", None),
    ],
)
def test_detect_wire_version(message: str, expected: str | None) -> None:
    assert v022.detect_wire_version(message) == expected
    if expected is not None:
        assert v022.detect_wire_version(json.loads(message)) == expected


# --- live cross-checks against trystero@0.22.0 in Node ---------------------------------------------


ROOM_HARNESS = """
import { readFileSync } from "node:fs";
import room from "./node_modules/trystero022/src/room.js";
const { sends, feeds } = JSON.parse(readFileSync(0, "utf8"));
const hex = (u8) => Buffer.from(u8).toString("hex");
const out = [];
const got = [];
let connect;
const r = room((f) => (connect = f), () => {}, () => {});
const peer = {
  channel: {
    bufferedAmount: 0, bufferedAmountLowThreshold: 65535, addEventListener() {}, removeEventListener() {},
  },
  sendData: (d) => out.push(hex(d)), setHandlers(h) { this.h = h; }, destroy() {}, connection: {},
};
connect(peer, "PEER");
console.warn = () => {};
const actions = {};
const action = (name) => (actions[name] ||= (() => {
  const [send, onData] = r.makeAction(name);
  onData((data, id, meta) => got.push([name, data instanceof Uint8Array ? { bin: hex(data) } : { json: data },
    meta === undefined ? null : { json: meta }]));
  return send;
})());
const frames = [];
for (const [name, payload, meta] of sends) {
  out.length = 0;
  const data = payload.bin !== undefined ? new Uint8Array(Buffer.from(payload.bin, "hex")) : payload.json;
  try { await action(name)(data, null, meta === null ? undefined : meta.json); frames.push(out.slice()); }
  catch (e) { frames.push({ error: e.message }); }
}
const received = [];
for (const messages of feeds) {
  got.length = 0;
  for (const m of messages) { try { peer.h.data(new Uint8Array(Buffer.from(m, "hex")).buffer); } catch {} }
  received.push(got.slice());
}
console.log(JSON.stringify({ frames, received }));
"""

LIVE_SENDS: list[tuple[str, object, object]] = [
    ("chat", "hi", NO_METADATA),
    ("chat", {"a": [1, None, True, "é"]}, NO_METADATA),
    ("chat", b"\x01\x02\x03", {"name": "f"}),
    ("chat", "", NO_METADATA),
    ("chat", "x" * 40000, NO_METADATA),
    ("chat", b"", {"m": 1}),
    ("blob", bytes(range(256)) * 130, [1, "two"]),
    ("blob", bytes(16369), NO_METADATA),
    ("capabilities", 5, NO_METADATA),
    ("@_ping", "", NO_METADATA),
    ("chat", "no meta on text", {"x": 1}),  # JS throws; so must we
]


def _to_js(value: object) -> dict[str, object]:
    return {"bin": bytes(value).hex()} if isinstance(value, bytes | bytearray) else {"json": value}


def test_live_frames_match_trystero_022() -> None:
    enc = RoomEncoder()
    ours: list[list[bytes] | None] = []
    for action, payload, meta in LIVE_SENDS:
        try:
            ours.append(enc.encode(action, payload, meta))
        except (TypeError, ValueError):
            ours.append(None)
    # Extra receiver cases: meta chunk before text data, and our own frames fed back.
    extra = [[T + h("00 02 80 7b2278223a317d"), T + h("00 01 ff 686579")]]
    feeds = [m for m in ours if m is not None] + extra
    request = {
        "sends": [[a, _to_js(p), None if m is NO_METADATA else {"json": m}] for a, p, m in LIVE_SENDS],
        "feeds": [[m.hex() for m in messages] for messages in feeds],
    }
    js = json.loads(run_node(ROOM_HARNESS, json.dumps(request)))
    for (action, _, _), mine, theirs in zip(LIVE_SENDS, ours, js["frames"], strict=True):
        if mine is None:
            assert "error" in theirs, action
        else:
            assert theirs == [m.hex() for m in mine], action
    for messages, theirs in zip(feeds, js["received"], strict=True):
        events = feed_all(Decoder(), messages)
        assert len(theirs) == 1
        js_action, js_data, js_meta = theirs[0]
        last = events[-1]
        assert isinstance(last, Received)
        assert last.action == js_action
        mine_data = {"bin": last.payload.hex()} if isinstance(last.payload, bytes) else {"json": last.payload}
        assert mine_data == js_data
        assert (None if last.metadata is NO_METADATA else {"json": last.metadata}) == js_meta


STRATEGY_HARNESS = """
import { readFileSync } from "node:fs";
const input = JSON.parse(readFileSync(0, "utf8"));
const CS = "0123456789AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVvWwXxYyZz";
let k = 0;
Math.random = () => (k < input.selfId.length ? (CS.indexOf(input.selfId[k++]) + 0.5) / 62 : 0.5);
crypto.getRandomValues = (a) => { for (let i = 0; i < a.length; i++) a[i] = i; return a; };
const { default: strategy } = await import("./node_modules/trystero022/src/strategy.js");
const { sha1 } = await import("./node_modules/trystero022/src/crypto.js");
class FakePC {
  constructor() {
    this.iceGatheringState = "complete"; this.connectionState = "new"; this.signalingState = "stable";
  }
  createDataChannel(label) { return (this.dc = { label, readyState: "connecting", close() {} }); }
  addEventListener() {} removeEventListener() {}
  async setLocalDescription() {
    const type = this.remote?.type === "offer" ? "answer" : "offer";
    this.localDescription = { type, sdp: input.sdp[type] };
  }
  async setRemoteDescription(d) { this.remote = d; this.seen = d.sdp; }
  close() { this.connectionState = "closed"; }
  getSenders() { return []; }
}
const log = [];
let handle;
const joinRoom = strategy({
  init: () => [Promise.resolve({})],
  subscribe: (relay, root, self, onMessage) => {
    handle = (topic, msg) => onMessage(topic, msg, (t, p) => log.push(["publish", t, p]));
    return () => {};
  },
  announce: (relay, root) => { log.push(["announce", root]); },  // a number would set the interval
});
joinRoom({ appId: input.appId, rtcPolyfill: FakePC }, input.roomId, (e) => log.push(["joinError", e.error]));
const root = await sha1(`Trystero@${input.appId}@${input.roomId}`);
const self = await sha1(`Trystero@${input.appId}@${input.roomId}@${input.selfId}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
await sleep(100);
for (const [where, msg] of input.messages) {
  log.push(["--"]);
  handle(where === "root" ? root : self, msg);
  await sleep(50);
}
console.log(JSON.stringify(log));
process.exit(0);
"""


def test_live_relay_payloads_match_trystero_022() -> None:
    """Our announce and offer make real 0.22 code offer and answer with exactly our shapes."""
    js_id = SELF
    sdp = {"offer": RAW_OFFER_SDP, "answer": "v=0\r\na=ice-options:trickle\r\na=x-answer\r\n"}
    our_offer = v022.make_offer_payload(P_LARGE, crypto.encrypt(KEY, "v=0\r\na=from-python\r\n"))
    messages = [
        ["root", v022.make_announce_payload(P_SMALL)],  # → JS offers to P_SMALL
        ["self", our_offer],  # → JS answers P_LARGE
        ["self", '{"peerId":"wPEER","offerId":"abcdefghijkl","offer":"0,1$x"}'],  # 0.25 shape → joinError
    ]
    request = {"selfId": js_id, "appId": APP, "roomId": ROOM, "sdp": sdp, "messages": messages}
    log = json.loads(run_node(STRATEGY_HARNESS, json.dumps(request)))
    sections: list[list[list[str]]] = [[]]
    for entry in log:
        if entry == ["--"]:
            sections.append([])
        else:
            sections[-1].append(entry)
    assert sections[0] == [["announce", crypto.root_topic(APP, ROOM)]]

    [(kind, topic, offer_text)] = sections[1]
    assert (kind, topic) == ("publish", crypto.self_topic(APP, ROOM, P_SMALL))
    expected = crypto.encrypt(KEY, v022.strip_trickle_option(sdp["offer"]), IV)
    assert offer_text == v022.make_offer_payload(js_id, expected)
    assert v022.parse_relay_payload(offer_text, P_SMALL) == RelaySignal(js_id, offer=expected)

    [(kind, topic, answer_text)] = sections[2]
    assert (kind, topic) == ("publish", crypto.self_topic(APP, ROOM, P_LARGE))
    expected = crypto.encrypt(KEY, v022.strip_trickle_option(sdp["answer"]), IV)
    assert answer_text == v022.make_answer_payload(js_id, expected)
    assert v022.detect_wire_version(answer_text) == "0.22"

    assert sections[3] == [["joinError", "incorrect password (undefined) when decrypting offer"]]
