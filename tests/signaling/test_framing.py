"""Shared chunking, JS value codec and bounded reassembly (signaling.framing).

The layout tests use the spec's 0.22 vectors (trystero-wire.md §9.11) to show the shared code also
serves the 15-byte header; the 0.25 vectors are in test_wire_v025.py.
"""

from __future__ import annotations

import pytest

from signaling.errors import FramingError
from signaling.framing import (
    FLAG_BINARY,
    FLAG_JSON,
    FLAG_LAST,
    FLAG_META,
    NO_METADATA,
    Assembled,
    ChunkLayout,
    Reassembler,
    decode_payload,
    decode_text,
    encode_payload,
    encode_text,
    from_json,
    progress_byte,
    to_json,
)

# --- progress ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "total", "expected"),
    [
        (0, 1, 0xFF),
        (0, 2, 0x80),  # 127.5 rounds up, like Math.round (spec §10: meta chunk "80")
        (1, 2, 0xFF),
        (0, 3, 0x55),  # spec §10: 40000-byte string
        (1, 3, 0xAA),
        (2, 3, 0xFF),
        (0, 4, 0x40),  # 63.75 (checked against trystero@0.25.4 in Node)
        (1, 4, 0x80),
        (2, 4, 0xBF),  # 191.25
    ],
)
def test_progress_byte(index: int, total: int, expected: int) -> None:
    assert progress_byte(index, total) == expected


# --- text and JSON, checked against Node's TextEncoder/TextDecoder/JSON.stringify ----------------


def test_encode_text_replaces_lone_surrogates_and_joins_pairs() -> None:
    # Node: TextEncoder().encode("a\ud83d\ude00b\ud800") == 61 f09f9880 62 efbfbd
    assert encode_text("a\ud83d\ude00b\ud800").hex() == "61f09f988062efbfbd"
    assert encode_text("\U0001f600") == "\U0001f600".encode()


def test_decode_text_matches_text_decoder() -> None:
    # Node: TextDecoder drops one leading BOM and replaces each maximal invalid subpart.
    assert decode_text(bytes.fromhex("efbbbfefbbbf41")) == "\ufeffA"
    bad = bytes.fromhex("e28278f09fffeda080c0af7a")
    assert decode_text(bad) == "\ufffdx" + "\ufffd" * 7 + "z"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, "1"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (1e16, "10000000000000000"),
        (-0.0, "0"),
        (float("nan"), "null"),
        (float("inf"), "null"),
        (0.1, "0.1"),
        (1e-7, "1e-7"),
        (1.5e-7, "1.5e-7"),
        (123e-20, "1.23e-18"),
        (2.0**53 + 2, "9007199254740994"),
        (2.0**60, "1152921504606847000"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (0.000001, "0.000001"),
        (-2.5, "-2.5"),
        (2**60, "1152921504606846976"),  # Python ints stay exact
        (2**70, "1180591620717411303424"),  # beyond orjson's native range
        (True, "true"),
        (None, "null"),
    ],
)
def test_to_json_numbers_like_json_stringify(value: object, expected: str) -> None:
    assert to_json(value) == expected.encode()


def test_to_json_key_order_like_js_objects() -> None:
    # Node: JSON.stringify({b:1,"2":2,a:3,"1":4,"01":5,"4294967295":6,"4294967294":7})
    value = {"b": 1, "2": 2, "a": 3, "1": 4, "01": 5, "4294967295": 6, "4294967294": 7}
    assert to_json(value) == b'{"1":4,"2":2,"4294967294":7,"b":1,"a":3,"01":5,"4294967295":6}'


def test_to_json_strings_like_json_stringify() -> None:
    # Node: non-ASCII and U+2028 raw, control chars \u00XX lowercase, DEL and '/' raw.
    value = '\x00\x1f\x7f\u2028\u00e9\U0001f600"\\/\b\f\n\r\t'
    expected = '"\\u0000\\u001f\x7f\u2028\u00e9\U0001f600\\"\\\\/\\b\\f\\n\\r\\t"'
    assert to_json(value) == expected.encode()


def test_to_json_escapes_lone_surrogates_and_keeps_pairs() -> None:
    # Node: JSON.stringify(["a\ud800", "\udc00", "\ud83d\ude00"])
    assert to_json(["a\ud800", "\udc00", "\ud83d\ude00"]) == '["a\\ud800","\\udc00","\U0001f600"]'.encode()


def test_to_json_nested_and_compact() -> None:
    assert to_json({"a": [1, {"b": None}], "c": (True, 1.5)}) == b'{"a":[1,{"b":null}],"c":[true,1.5]}'


@pytest.mark.parametrize("bad", [{1: "x"}, {"a": b"bytes"}, {1, 2}, object()])
def test_to_json_rejects_non_json_types(bad: object) -> None:
    with pytest.raises(TypeError):
        to_json(bad)


def test_from_json_like_json_parse() -> None:
    assert from_json(b'{"a":[1,2.5,"\xc3\xa9"]}') == {"a": [1, 2.5, "é"]}
    assert from_json(b'"\\ud800"') == "\ud800"  # orjson refuses it, JSON.parse accepts it
    assert from_json(b"123456789012345678901234567890") == 1.2345678901234568e29  # a JS double
    assert from_json(b"\xef\xbb\xbf[1]") == [1]  # TextDecoder dropped the BOM first


@pytest.mark.parametrize("bad", [b"", b"NaN", b"Infinity", b"{'a':1}", b"[1,]", b"\xff"])
def test_from_json_rejects_what_json_parse_rejects(bad: bytes) -> None:
    with pytest.raises(ValueError):
        from_json(bad)


@pytest.mark.parametrize(
    ("value", "data", "flags"),
    [
        ("hi", b"hi", 0),
        ("", b"", 0),
        (b"\x01\x02", b"\x01\x02", FLAG_BINARY | FLAG_JSON),
        (bytearray(b"\x01"), b"\x01", FLAG_BINARY | FLAG_JSON),
        (memoryview(b"\x03"), b"\x03", FLAG_BINARY | FLAG_JSON),
        ({"a": 1}, b'{"a":1}', FLAG_JSON),
        ([1, "x"], b'[1,"x"]', FLAG_JSON),
        (5, b"5", FLAG_JSON),
        (None, b"null", FLAG_JSON),
        (False, b"false", FLAG_JSON),
    ],
)
def test_encode_payload_kind_flags(value: object, data: bytes, flags: int) -> None:
    assert encode_payload(value) == (data, flags)
    decoded = decode_payload(data, flags)
    assert decoded == (bytes(value) if isinstance(value, bytearray | memoryview) else value)


def test_decode_payload_binary_wins_over_json() -> None:
    assert decode_payload(b"not json", FLAG_BINARY | FLAG_JSON) == b"not json"


# --- ChunkLayout with the 0.22 header (spec §9.7/§9.11 vectors) -----------------------------------

V022 = ChunkLayout(type_size=12, nonce_size=1)
T_CHAT = "636861740000000000000000"


def _hex(chunks: list[bytes]) -> list[str]:
    return [c.hex() for c in chunks]


def test_layout_sizes() -> None:
    assert (V022.header_size, V022.payload_size, V022.nonce_modulus) == (15, 16369, 256)
    v025 = ChunkLayout(type_size=32, nonce_size=2)
    assert (v025.header_size, v025.payload_size, v025.nonce_modulus) == (36, 16348, 65536)


def test_layout_022_vectors() -> None:
    assert _hex(V022.encode("chat", "hi", nonce=0)) == [T_CHAT + "0001ff6869"]
    assert _hex(V022.encode("chat", {"a": 1}, nonce=1)) == [T_CHAT + "0109ff7b2261223a317d"]
    assert _hex(V022.encode("chat", b"\x01\x02\x03", nonce=2, metadata={"name": "f"})) == [
        T_CHAT + "020e807b226e616d65223a2266227d",
        T_CHAT + "020dff010203",
    ]
    empty = V022.encode("chat", "", nonce=3)
    assert _hex(empty) == [T_CHAT + "0301ff"]
    assert len(empty[0]) == 15
    assert _hex(V022.encode("chat", b"", nonce=5, metadata={"m": 1})) == [T_CHAT + "050fff7b226d223a317d"]
    assert _hex(V022.encode("chat", 5, nonce=7)) == [T_CHAT + "0709ff35"]


def test_layout_022_multi_chunk_vector() -> None:
    chunks = V022.encode("chat", "x" * 40000, nonce=4)
    assert [len(c) for c in chunks] == [16384, 16384, 7277]
    assert [c[12:15].hex() for c in chunks] == ["040055", "0400aa", "0401ff"]


def test_layout_022_exact_fit_vector() -> None:
    chunks = V022.encode("chat", bytes(16369), nonce=6)
    assert len(chunks) == 1
    assert len(chunks[0]) == 16384
    assert chunks[0][:15].hex() == T_CHAT + "060dff"


def test_layout_022_internal_action_vectors() -> None:
    assert _hex(V022.encode("@_ping", "", nonce=0)) == ["405f70696e67000000000000" + "0001ff"]
    assert _hex(V022.encode("@_leave", "", nonce=0)) == ["405f6c656176650000000000" + "0001ff"]
    assert _hex(V022.encode("@_stream", {"name": "cam"}, nonce=0)) == [
        "405f73747265616d00000000" + "0009ff" + "7b226e616d65223a2263616d227d"
    ]


def test_layout_name_limits() -> None:
    assert len(V022.name_field("capabilities")) == 12
    with pytest.raises(ValueError):
        V022.name_field("capabilities!")
    with pytest.raises(ValueError):
        V022.name_field("")
    with pytest.raises(ValueError):
        V022.name_field("ééééééé")  # 7 chars, 14 bytes


@pytest.mark.parametrize("nonce", [-1, 256])
def test_layout_nonce_out_of_range(nonce: int) -> None:
    with pytest.raises(ValueError):
        V022.encode("chat", "", nonce=nonce)


def test_layout_parse_round_trip() -> None:
    chunk = V022.encode("chat", b"\x01\x02\x03", nonce=2, metadata={"name": "f"})[1]
    header, payload = V022.parse(chunk)
    assert (header.action, header.nonce, header.flags, header.progress) == ("chat", 2, 0x0D, 0xFF)
    assert header.is_last and header.is_binary and header.is_json and not header.is_meta
    assert payload == b"\x01\x02\x03"


def test_layout_parse_removes_every_nul() -> None:
    header, _ = V022.parse(b"c\x00h\x00at\x00\x00\x00\x00\x00\x00" + b"\x00\x01\xff")
    assert header.action == "chat"


def test_layout_parse_truncated_header() -> None:
    with pytest.raises(FramingError):
        V022.parse(bytes.fromhex(T_CHAT + "00"))


def test_layout_parse_empty_name() -> None:
    with pytest.raises(FramingError):
        V022.parse(bytes(12) + b"\x00\x01\xff")


# --- Reassembler ---------------------------------------------------------------------------------


def _reassembler(
    max_message_bytes: int = 1000, max_pending: int = 4, max_buffered_bytes: int = 2000
) -> Reassembler[tuple[str, int]]:
    return Reassembler(
        max_message_bytes=max_message_bytes, max_pending=max_pending, max_buffered_bytes=max_buffered_bytes
    )


def test_single_chunk_is_returned_without_buffering() -> None:
    r = _reassembler()
    assert r.add(("a", 0), b"hello", last=True) == Assembled(b"hello")
    assert r.pending_count == 0
    assert r.buffered_bytes == 0


def test_chunks_concatenate_in_arrival_order() -> None:
    r = _reassembler()
    assert r.add(("a", 0), b"he", last=False) is None
    assert r.add(("a", 0), b"ll", last=False) is None
    assert r.buffered_bytes == 4
    assert r.add(("a", 0), b"o", last=True) == Assembled(b"hello")
    assert (r.pending_count, r.buffered_bytes) == (0, 0)


def test_interleaved_keys_assemble_independently() -> None:
    r = _reassembler()
    r.add(("a", 0), b"A1", last=False)
    r.add(("a", 1), b"B1", last=False)
    r.add(("b", 0), b"C1", last=False)
    assert r.add(("a", 1), b"B2", last=True) == Assembled(b"B1B2")
    assert r.add(("a", 0), b"A2", last=True) == Assembled(b"A1A2")
    assert r.add(("b", 0), b"C2", last=True) == Assembled(b"C1C2")


def test_duplicates_cannot_be_detected_without_a_chunk_index() -> None:
    # Neither wire has a chunk index: a repeated chunk is appended, exactly as JS would.
    r = _reassembler()
    r.add(("a", 0), b"x", last=False)
    r.add(("a", 0), b"x", last=False)
    assert r.add(("a", 0), b"y", last=True) == Assembled(b"xxy")


def test_metadata_chunk_sets_metadata() -> None:
    r = _reassembler()
    assert r.add(("a", 0), b'{"m":1}', last=False, meta={"m": 1}) is None
    assert r.metadata(("a", 0)) == {"m": 1}
    assert r.buffered_bytes == 7  # meta bytes count towards the caps
    assert r.add(("a", 0), b"data", last=True) == Assembled(b"data", {"m": 1})
    assert r.metadata(("a", 0)) is NO_METADATA


def test_metadata_only_message() -> None:
    r = _reassembler(max_pending=1)
    r.add(("a", 0), b"x", last=False)  # at the pending cap: a complete message still fits
    assert r.add(("a", 1), b"null", last=True, meta=None) == Assembled(b"", None)
    assert r.pending_count == 1


def test_endless_stream_without_last_chunk_hits_message_cap() -> None:
    r = _reassembler(max_message_bytes=1000, max_buffered_bytes=10_000)
    with pytest.raises(FramingError):
        for _ in range(10_000):
            r.add(("a", 0), b"x" * 64, last=False)
            assert r.buffered_bytes <= 1000
    assert (r.pending_count, r.buffered_bytes) == (0, 0)  # partial state released


def test_complete_message_over_cap_is_rejected() -> None:
    r = _reassembler(max_message_bytes=10)
    with pytest.raises(FramingError):
        r.add(("a", 0), b"x" * 11, last=True)
    r.add(("a", 1), b"x" * 6, last=False)
    with pytest.raises(FramingError):
        r.add(("a", 1), b"x" * 5, last=True)
    assert r.pending_count == 0


def test_pending_count_cap() -> None:
    r = _reassembler(max_pending=3)
    for nonce in range(3):
        r.add(("a", nonce), b"x", last=False)
    r.add(("a", 0), b"x", last=False)  # an existing message may still grow
    with pytest.raises(FramingError):
        r.add(("a", 3), b"x", last=False)
    assert r.pending_count == 3
    assert r.add(("a", 4), b"done", last=True) == Assembled(b"done")  # no buffering needed


def test_total_buffered_cap() -> None:
    r = _reassembler(max_message_bytes=1000, max_pending=10, max_buffered_bytes=2000)
    for nonce in range(2):
        r.add(("a", nonce), b"x" * 900, last=False)
    with pytest.raises(FramingError):
        r.add(("a", 2), b"x" * 300, last=False)
    assert r.buffered_bytes == 1800


def test_memory_stays_bounded_under_many_small_and_empty_chunks() -> None:
    r = _reassembler(max_message_bytes=10**6, max_pending=4, max_buffered_bytes=5000)
    for _ in range(100_000):
        r.add(("a", 0), b"", last=False)  # empty chunks must not grow any list
    assert r.buffered_bytes == 0
    with pytest.raises(FramingError):
        for i in range(100_000):
            r.add(("a", i % 4), b"y", last=False)
            assert r.buffered_bytes <= 5000


def test_discard_and_clear() -> None:
    r = _reassembler()
    r.add(("room1", 0), b"aa", last=False)
    r.add(("room2", 0), b"bbb", last=False)
    assert r.discard(lambda key: key[0] == "room1") == 1
    assert (r.pending_count, r.buffered_bytes) == (1, 3)
    r.clear()
    assert (r.pending_count, r.buffered_bytes) == (0, 0)


def test_caps_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Reassembler(max_message_bytes=0, max_pending=1, max_buffered_bytes=1)


def test_flag_bits() -> None:
    assert (FLAG_LAST, FLAG_META, FLAG_BINARY, FLAG_JSON) == (1, 2, 4, 8)
