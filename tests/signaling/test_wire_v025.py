"""Conformance of signaling.wire.v025 with Trystero 0.25.4 (trystero-wire.md §6.3, §6.4, §7, §10).

``SPEC`` vectors are copied from the spec's §10. ``NODE`` vectors were produced by running the
published ``@trystero-p2p/core@0.25.4`` ``action-wire.mjs`` (tests/interop/node_modules) in Node 20
with a capturing fake peer; they cover cases the spec does not list (metadata on text, JSON number
formatting, key order, surrogates, chunk-size boundaries).
"""

from __future__ import annotations

import pytest

from signaling import crypto
from signaling.errors import FramingError, HandshakeError, PayloadError, SignalingError
from signaling.framing import NO_METADATA, to_json
from signaling.wire import v025
from signaling.wire.v025 import Decoder, Presence, Progress, Received, RoomEncoder

from .wire_helpers import feed_all, h

APP, ROOM = "harness-app", "r1"
TOKEN = "fe369a14485b28120013d1b266b4aeb80c82ac55732f727f4bb3997224cb0f5c"  # §10 room token


def name(action: str) -> bytes:
    """The 32-byte zero-padded type field."""
    return action.encode().ljust(32, b"\0")


P = name("chat")  # §10: 63686174 followed by 28 bytes 00


# --- §10 action chunk vectors ---------------------------------------------------------------------


def test_spec_type_field_of_chat() -> None:
    assert h("63686174" + "00" * 28) == P


def test_spec_chunk_text_hi() -> None:
    chunks = v025.encode_chunks("chat", "hi", nonce=0)
    assert chunks == [P + h("0000 01 ff 6869")]
    assert len(chunks[0]) == 38


def test_spec_chunk_json_object() -> None:
    assert v025.encode_chunks("chat", {"a": 1}, nonce=1) == [P + h("0001 09 ff 7b2261223a317d")]


def test_spec_chunks_binary_with_metadata() -> None:
    assert v025.encode_chunks("chat", bytes([1, 2, 3]), nonce=2, metadata={"name": "f"}) == [
        P + h("0002 0e 80 7b226e616d65223a2266227d"),
        P + h("0002 0d ff 010203"),
    ]


def test_spec_chunk_empty_string() -> None:
    chunks = v025.encode_chunks("chat", "", nonce=3)
    assert chunks == [P + h("0003 01 ff")]
    assert len(chunks[0]) == 36


def test_spec_chunk_hsready() -> None:
    expected = h("405f6873726561647900") + bytes(22) + h("0000 01 ff")
    assert len(expected) == 36
    assert v025.encode_chunks(v025.ACTION_HSREADY, "", nonce=0) == [expected]


def test_spec_chunks_40000_byte_string() -> None:
    chunks = v025.encode_chunks("chat", "x" * 40000, nonce=0)
    assert [len(c) for c in chunks] == [16384, 16384, 7340]
    assert [c[35] for c in chunks] == [0x55, 0xAA, 0xFF]
    assert [c[34] for c in chunks] == [0x00, 0x00, 0x01]
    assert b"".join(c[36:] for c in chunks) == b"x" * 40000


def test_spec_header_constants() -> None:
    assert (v025.HEADER_SIZE, v025.CHUNK_PAYLOAD_SIZE, v025.MAX_ACTION_NAME_BYTES) == (36, 16348, 32)


# --- §10 room and presence frames -----------------------------------------------------------------


def test_spec_room_token_is_the_frame_token() -> None:
    assert crypto.room_token(APP, ROOM) == TOKEN


def test_spec_room_frame_around_hi() -> None:
    frames = v025.encode_action(TOKEN, "chat", "hi", nonce=0)
    assert len(frames) == 1
    frame = frames[0]
    assert len(frame) == 105
    assert frame[:3] == h("01 0040")
    assert frame[3:6] == h("666533") and frame[64:67] == h("663563")  # "fe3" … "f5c"
    assert frame == h("01 0040") + TOKEN.encode("ascii") + P + h("0000 01 ff 6869")
    assert v025.wrap_room_frame(TOKEN, P + h("0000 01 ff 6869")) == frame


def test_spec_presence_frames() -> None:
    join = v025.encode_presence(TOKEN, True)
    leave = v025.encode_presence(TOKEN, False)
    assert join == h("02 01 0040") + TOKEN.encode("ascii")
    assert leave == h("02 00 0040") + TOKEN.encode("ascii")
    assert len(join) == len(leave) == 68


def test_max_frame_size_with_standard_token() -> None:
    frames = v025.encode_action(TOKEN, "chat", bytes(50_000), nonce=0)
    assert max(len(f) for f in frames) == 16451  # 16384 + 67, spec §6.4


# --- §7 internal action names -------------------------------------------------------------------


def test_internal_action_names() -> None:
    names = [
        v025.ACTION_HSREADY,
        v025.ACTION_HSDATA,
        v025.ACTION_PING,
        v025.ACTION_PONG,
        v025.ACTION_LEAVE,
        v025.ACTION_SIGNAL,
        v025.ACTION_STREAM,
        v025.ACTION_TRACK,
        v025.ACTION_RESPONSE,
    ]
    assert names == [
        "@_hsready",
        "@_hsdata",
        "@_ping",
        "@_pong",
        "@_leave",
        "@_signal",
        "@_stream",
        "@_track",
        "@_response",
    ]
    assert all(n.startswith(v025.INTERNAL_PREFIX) for n in names)
    assert {"@_hsready", "@_hsdata", "@_leave"} == v025.PENDING_ACTIONS
    assert v025.HANDSHAKE_TIMEOUT_S == 10.0


# --- Node-generated vectors (trystero@0.25.4 action-wire.mjs) ------------------------------------

NODE: list[tuple[str, object, object, int, list[bytes]]] = [
    # (action, payload, metadata, nonce, expected chunks)
    ("chat", "hey", {"x": [1, 2]}, 0, [P + h("0000 02 80") + b'{"x":[1,2]}', P + h("0000 01 ff") + b"hey"]),
    ("chat", None, NO_METADATA, 1, [P + h("0001 09 ff") + b"null"]),
    ("chat", True, NO_METADATA, 2, [P + h("0002 09 ff") + b"true"]),
    (
        "chat",
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
        3,
        [
            P
            + h("0003 09 ff")
            + b'{"v":0.1,"w":0,"big":1e+21,"small":1e-7,"i":1,"n":null,"e":1.5e-7,"s":100000000000000000000}'
        ],
    ),
    (
        "chat",
        {"b": 1, "2": 2, "a": 3, "1": 4, "01": 5},
        NO_METADATA,
        4,
        [P + h("0004 09 ff") + b'{"1":4,"2":2,"b":1,"a":3,"01":5}'],
    ),
    (
        "chat",
        {"é": '\U0001f600\u2028\u0000\u001f\u007f"\\/'},
        NO_METADATA,
        5,
        [P + h("0005 09 ff 7b22c3a9223a22f09f9880e280a85c75303030305c75303031667f5c225c5c2f227d")],
    ),
    ("chat", "a\ud800b\ud83d\ude00", NO_METADATA, 6, [P + h("0006 01 ff 61efbfbd62f09f9880")]),
    ("chat", ["a\ud800", "\udc00"], NO_METADATA, 7, [P + h("0007 09 ff") + b'["a\\ud800","\\udc00"]']),
    ("chat", b"\x09", None, 8, [P + h("0008 0e 80") + b"null", P + h("0008 0d ff 09")]),
    ("chat", b"", {"m": 1}, 9, [P + h("0009 0f ff") + b'{"m":1}']),
    (
        "@_response",
        None,
        {"r": "abcdefghijklmnopqrst"},
        0,
        [
            name("@_response") + h("0000 0a 80") + b'{"r":"abcdefghijklmnopqrst"}',
            name("@_response") + h("0000 09 ff") + b"null",
        ],
    ),
    (
        "@_hsdata",
        {"__trystero_pw": "challenge", "c": "ChallengeChallengeChallengeChalleng1"},
        NO_METADATA,
        0,
        [
            name("@_hsdata")
            + h("0000 09 ff")
            + b'{"__trystero_pw":"challenge","c":"ChallengeChallengeChallengeChalleng1"}'
        ],
    ),
    (
        "abcdefghijklmnopqrstuvwxyz012345",
        "x",
        NO_METADATA,
        0,
        [b"abcdefghijklmnopqrstuvwxyz012345" + h("0000 01 ff 78")],
    ),
    ("çhat", "x", NO_METADATA, 0, [h("c3a7686174") + bytes(27) + h("0000 01 ff 78")]),
]


@pytest.mark.parametrize(("action", "payload", "metadata", "nonce", "expected"), NODE)
def test_node_vectors(
    action: str, payload: object, metadata: object, nonce: int, expected: list[bytes]
) -> None:
    assert v025.encode_chunks(action, payload, nonce=nonce, metadata=metadata) == expected


@pytest.mark.parametrize(
    ("size", "with_meta", "expected"),
    [
        (16348, False, [(16384, "0d ff")]),
        (16349, False, [(16384, "0c 80"), (37, "0d ff")]),
        (16348, True, [(57, "0e 80"), (16384, "0d ff")]),
        (32697, True, [(57, "0e 40"), (16384, "0c 80"), (16384, "0c bf"), (37, "0d ff")]),
    ],
)
def test_node_chunk_boundaries(size: int, with_meta: bool, expected: list[tuple[int, str]]) -> None:
    meta = {"k": "bin32697_meta"} if with_meta else NO_METADATA  # 21 bytes of JSON, as in the Node run
    chunks = v025.encode_chunks("blob", bytes(i % 251 for i in range(size)), nonce=0, metadata=meta)
    assert [(len(c), c[34:36].hex(" ")) for c in chunks] == expected


def test_action_name_limits() -> None:
    with pytest.raises(ValueError):
        v025.encode_chunks("abcdefghijklmnopqrstuvwxyz0123456", "", nonce=0)  # 33 bytes
    with pytest.raises(ValueError):
        v025.encode_chunks("", "", nonce=0)
    with pytest.raises(ValueError):
        v025.encode_chunks("chat", "", nonce=65536)


def test_non_json_payload_rejected_before_nonce_advances() -> None:
    enc = RoomEncoder(TOKEN)
    with pytest.raises(TypeError):
        enc.encode("chat", {1, 2})
    assert enc.encode("chat", "")[0][-4:] == h("0000 01 ff")


# --- RoomEncoder nonces ---------------------------------------------------------------------------


def test_room_encoder_nonce_per_action() -> None:
    enc = RoomEncoder(TOKEN)
    nonces = [enc.encode(a, "")[0][-4:-2].hex() for a in ("chat", "chat", "@_ping", "chat", "@_ping")]
    assert nonces == ["0000", "0001", "0000", "0002", "0001"]
    assert enc.presence(True) == v025.encode_presence(TOKEN, True)


def test_room_encoder_nonce_advances_per_send_not_per_chunk() -> None:
    enc = RoomEncoder(TOKEN)
    frames = enc.encode("chat", "x" * 40000)
    assert {f[-16348 - 4 : -16348 - 2] for f in frames[:2]} == {h("0000")}
    assert enc.encode("chat", "")[0][-4:-2] == h("0001")


def test_room_encoder_nonce_wraps_at_65536() -> None:
    # Node: after 65537 sends of one action the last two chunks carry nonces ffff and 0000.
    enc = RoomEncoder(TOKEN)
    tails = [enc.encode("wrap", "")[0][-4:] for _ in range(65537)]
    assert [t.hex() for t in tails[-2:]] == ["ffff01ff", "000001ff"]


# --- Decoder: vectors back to values --------------------------------------------------------------


def test_decode_spec_room_frame() -> None:
    frame = h("01 0040") + TOKEN.encode() + P + h("0000 01 ff 6869")
    assert Decoder().feed(frame) == [Received(TOKEN, "chat", 0, "hi")]


def test_decode_spec_presence() -> None:
    dec = Decoder()
    assert dec.feed(h("02 01 0040") + TOKEN.encode()) == [Presence(TOKEN, True)]
    assert dec.feed(h("02 00 0040") + TOKEN.encode()) == [Presence(TOKEN, False)]
    assert dec.feed(h("02 02 0040") + TOKEN.encode()) == [Presence(TOKEN, False)]  # JS: === 1


def test_decode_spec_vectors_to_python_types() -> None:
    dec = Decoder()
    wrap = lambda chunk: v025.wrap_room_frame(TOKEN, chunk)  # noqa: E731
    assert dec.feed(wrap(P + h("0001 09 ff 7b2261223a317d"))) == [Received(TOKEN, "chat", 1, {"a": 1})]
    got = feed_all(
        dec, [wrap(P + h("0002 0e 80 7b226e616d65223a2266227d")), wrap(P + h("0002 0d ff 010203"))]
    )
    assert got == [
        Progress(TOKEN, "chat", 2, 128 / 255, {"name": "f"}),
        Received(TOKEN, "chat", 2, b"\x01\x02\x03", {"name": "f"}),
    ]
    assert isinstance(got[1], Received) and got[1].has_metadata
    assert dec.feed(wrap(P + h("0003 01 ff"))) == [Received(TOKEN, "chat", 3, "")]
    hsready = h("405f6873726561647900") + bytes(22) + h("0000 01 ff")
    assert dec.feed(wrap(hsready)) == [Received(TOKEN, "@_hsready", 0, "")]
    assert dec.pending_count == 0


def test_decode_40000_byte_string_with_progress() -> None:
    dec = Decoder()
    events = feed_all(dec, v025.encode_action(TOKEN, "chat", "x" * 40000, nonce=7))
    assert events == [
        Progress(TOKEN, "chat", 7, 0x55 / 255),
        Progress(TOKEN, "chat", 7, 0xAA / 255),
        Received(TOKEN, "chat", 7, "x" * 40000),
    ]
    assert dec.buffered_bytes == 0


@pytest.mark.parametrize(("action", "payload", "metadata", "nonce", "expected"), NODE)
def test_decode_node_vectors(
    action: str, payload: object, metadata: object, nonce: int, expected: list[bytes]
) -> None:
    events = feed_all(Decoder(), [v025.wrap_room_frame(TOKEN, c) for c in expected])
    last = events[-1]
    assert isinstance(last, Received)
    assert (last.token, last.action, last.nonce, last.metadata) == (TOKEN, action, nonce, metadata)
    # The value a JS receiver gets: re-encoding it yields the same bytes.
    assert v025.encode_chunks(action, last.payload, nonce=nonce, metadata=last.metadata) == expected


@pytest.mark.parametrize(
    "payload",
    ["", "hi", "é😀", {"a": [1, None, True]}, [], 0, -1.5, None, False, b"", b"\x00" * 40000, "y" * 16348],
)
@pytest.mark.parametrize("metadata", [NO_METADATA, None, {"name": "f"}, "m"])
def test_round_trip(payload: object, metadata: object) -> None:
    frames = RoomEncoder(TOKEN).encode("chat", payload, metadata=metadata)
    last = feed_all(Decoder(), frames)[-1]
    assert last == Received(TOKEN, "chat", 0, payload, metadata)
    assert type(last.payload) is type(payload)


def test_decode_like_js_text_decoder_and_json_parse() -> None:
    # Node (0.25.4 handleData): BOM dropped + invalid byte replaced; "\ud800" parsed; big int → double.
    dec = Decoder()
    wrap = lambda chunk: v025.wrap_room_frame(TOKEN, chunk)  # noqa: E731
    assert dec.feed(wrap(P + h("0000 01 ff efbbbf6869ff")))[0].payload == "hi\ufffd"
    assert dec.feed(wrap(P + h("0001 09 ff") + b'"\\ud800"'))[0].payload == "\ud800"
    big = dec.feed(wrap(P + h("0002 09 ff") + b"123456789012345678901234567890"))[0].payload
    assert big == 1.2345678901234568e29


def test_interleaved_rooms_actions_and_nonces() -> None:
    other = crypto.room_token(APP, "r2")
    a = v025.encode_action(TOKEN, "chat", "a" * 20000, nonce=0)
    b = v025.encode_action(TOKEN, "chat", b"b" * 20000, nonce=1)
    c = v025.encode_action(other, "chat", {"c": "c" * 20000}, nonce=0)
    events = feed_all(Decoder(), [a[0], b[0], c[0], c[1], b[1], a[1]])
    received = [e for e in events if isinstance(e, Received)]
    assert received == [
        Received(other, "chat", 0, {"c": "c" * 20000}),
        Received(TOKEN, "chat", 1, b"b" * 20000),
        Received(TOKEN, "chat", 0, "a" * 20000),
    ]


def test_metadata_on_text_payload_is_delivered() -> None:
    # 0.25 allows metadata with any payload (0.22 only with binary).
    frames = v025.encode_action(TOKEN, "chat", "hey", nonce=0, metadata={"x": [1, 2]})
    assert feed_all(Decoder(), frames)[-1] == Received(TOKEN, "chat", 0, "hey", {"x": [1, 2]})


# --- Decoder: garbage and caps --------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        b"",
        h("01"),
        h("01 00"),  # shorter than 3 bytes
        h("01 0000") + P + h("0000 01 ff"),  # zero token length
        h("01 0040") + b"short",  # token length beyond the message
        h("02 01 00"),  # presence shorter than 4 bytes
        h("02 01 0000"),  # presence with zero token length
        h("02 01 0040") + b"short",
        h("00 0040") + TOKEN.encode() + P + h("0000 01 ff"),  # unknown frame kinds
        h("03 0040") + TOKEN.encode() + P + h("0000 01 ff"),
        h("ff ffff"),
    ],
)
def test_frames_js_drops_are_ignored_and_counted(message: bytes) -> None:
    dec = Decoder()
    assert dec.feed(message) == []
    assert dec.ignored == 1
    assert dec.feed(v025.encode_presence(TOKEN, True)) == [Presence(TOKEN, True)]  # still usable


def test_text_messages_are_ignored_like_js() -> None:
    dec = Decoder()
    assert dec.feed("hi") == []
    assert dec.ignored == 1


@pytest.mark.parametrize(
    "chunk",
    [
        b"",  # room frame with no chunk at all
        P[:10],
        P + h("0000 01"),  # 35 bytes: no progress byte
        bytes(32) + h("0000 01 ff"),  # empty action name
    ],
)
def test_truncated_or_nameless_chunks_raise_framing_error(chunk: bytes) -> None:
    with pytest.raises(FramingError):
        Decoder().feed(v025.wrap_room_frame(TOKEN, chunk))


def test_unknown_flag_bits_are_ignored_like_js() -> None:
    frame = v025.wrap_room_frame(TOKEN, P + h("0000 f1 ff 6869"))
    assert Decoder().feed(frame) == [Received(TOKEN, "chat", 0, "hi")]


def test_endless_chunk_stream_hits_action_cap() -> None:
    dec = Decoder(max_action_bytes=100_000, max_buffered_bytes=10**6)
    chunk = v025.wrap_room_frame(TOKEN, P + h("0000 00 01") + bytes(16348))  # never isLast
    with pytest.raises(FramingError):
        for _ in range(1000):
            dec.feed(chunk)
            assert dec.buffered_bytes <= 100_000
    assert dec.buffered_bytes == 0


def test_too_many_unfinished_actions() -> None:
    dec = Decoder(max_pending=8)
    for nonce in range(8):
        dec.feed(v025.wrap_room_frame(TOKEN, P + nonce.to_bytes(2, "big") + h("00 01 61")))
    with pytest.raises(FramingError):
        dec.feed(v025.wrap_room_frame(TOKEN, P + h("0008 00 01 61")))
    assert dec.pending_count == 8


def test_total_buffered_bytes_cap() -> None:
    dec = Decoder(max_action_bytes=40_000, max_pending=100, max_buffered_bytes=50_000)
    with pytest.raises(FramingError):
        for nonce in range(100):
            dec.feed(v025.wrap_room_frame(TOKEN, P + nonce.to_bytes(2, "big") + h("00 01") + bytes(16348)))
            assert dec.buffered_bytes <= 50_000


def test_single_oversized_message_rejected() -> None:
    dec = Decoder(max_action_bytes=1000)
    with pytest.raises(FramingError):
        dec.feed(v025.wrap_room_frame(TOKEN, P + h("0000 01 ff") + bytes(1001)))


def test_forget_room_releases_partial_actions() -> None:
    dec = Decoder()
    other = crypto.room_token(APP, "r2")
    dec.feed(v025.encode_action(TOKEN, "chat", "a" * 20000, nonce=0)[0])
    dec.feed(v025.encode_action(other, "chat", "b" * 20000, nonce=0)[0])
    assert dec.forget_room(TOKEN) == 1
    assert dec.pending_count == 1
    dec.reset()
    assert (dec.pending_count, dec.buffered_bytes) == (0, 0)


def test_invalid_json_payload_raises_payload_error_and_decoder_survives() -> None:
    dec = Decoder()
    with pytest.raises(PayloadError):
        dec.feed(v025.wrap_room_frame(TOKEN, P + h("0000 09 ff") + b"{nope"))
    with pytest.raises(PayloadError):
        dec.feed(v025.wrap_room_frame(TOKEN, P + h("0001 0f ff") + b"{nope"))
    assert dec.feed(v025.encode_action(TOKEN, "chat", "ok", nonce=2)[0]) == [Received(TOKEN, "chat", 2, "ok")]
    assert issubclass(PayloadError, SignalingError) and not issubclass(PayloadError, FramingError)


def test_empty_json_payload_is_a_payload_error() -> None:
    # JS sends "" with isJson for e.g. a function payload; JSON.parse("") throws on the receiver.
    with pytest.raises(PayloadError):
        Decoder().feed(v025.wrap_room_frame(TOKEN, P + h("0000 09 ff")))


# --- admission (§7) -------------------------------------------------------------------------------

CHALLENGE = "ChallengeChallengeChallengeChalleng1"
PW_RESPONSE = "83f02c6ef85d186708cdbba6667a696eacae8e22c207c8624d258fd3d31aba1d"  # §10


def test_handshake_initiator_is_smaller_id() -> None:
    assert v025.is_handshake_initiator("RRRR", "ZZZZ")
    assert not v025.is_handshake_initiator("ZZZZ", "RRRR")
    assert v025.is_handshake_initiator("Z", "a")  # ASCII order: A-Z before a-z


def test_pw_challenge_payload_bytes_match_js() -> None:
    payload = v025.pw_challenge(CHALLENGE)
    assert to_json(payload) == b'{"__trystero_pw":"challenge","c":"ChallengeChallengeChallengeChalleng1"}'
    fresh = v025.pw_challenge()
    assert len(fresh["c"]) == v025.CHALLENGE_LENGTH == 36


def test_password_exchange_with_spec_vector() -> None:
    challenge = v025.parse_pw_challenge(v025.pw_challenge(CHALLENGE))
    response = v025.pw_response(challenge, "s3cret", APP, ROOM)
    assert response == {"__trystero_pw": "response", "h": PW_RESPONSE}
    assert to_json(response) == b'{"__trystero_pw":"response","h":"' + PW_RESPONSE.encode() + b'"}'
    v025.check_pw_response(response, CHALLENGE, "s3cret", APP, ROOM)  # no exception


def test_wrong_password_fails_handshake() -> None:
    response = v025.pw_response(CHALLENGE, "wrong", APP, ROOM)
    with pytest.raises(HandshakeError):
        v025.check_pw_response(response, CHALLENGE, "s3cret", APP, ROOM)


@pytest.mark.parametrize(
    "payload",
    [
        None,
        "",
        [],
        {"__trystero_pw": "response"},
        {"__trystero_pw": "challenge", "h": PW_RESPONSE},
        {"__trystero_pw": "response", "h": 5},
    ],
)
def test_malformed_response_fails_handshake(payload: object) -> None:
    with pytest.raises(HandshakeError):
        v025.check_pw_response(payload, CHALLENGE, "s3cret", APP, ROOM)


@pytest.mark.parametrize(
    "payload", [None, {}, {"__trystero_pw": "challenge"}, {"__trystero_pw": "response", "c": "x"}, ["c"]]
)
def test_malformed_challenge_fails_handshake(payload: object) -> None:
    with pytest.raises(HandshakeError):
        v025.parse_pw_challenge(payload)
