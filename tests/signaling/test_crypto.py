"""Conformance of signaling.crypto with the spec's 0.25.4 vectors (trystero-wire.md §1, §7, §10)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from signaling import crypto
from signaling.errors import DecryptError, SignalingError

APP = "harness-app"
ROOM = "r1"
PEER = "AbCdEfGhIjKlMnOpQrSt"
IV = bytes(range(16))

# §10 vectors
ROOT_SHA1_HEX = "bbc6cd1d0b4b9351bc60c173aee74009c90958db"
ROOT_TOPIC = "575i5ptb234329582o5d374u6f1s95l92g63"
SELF_TOPIC = "4b5c5cg353n6y2d4g6f2g672t3h6l496f1c6b49"
INFO_HASH = "2j432q6wtm54z4742363"
ROOM_TOKEN = "fe369a14485b28120013d1b266b4aeb80c82ac55732f727f4bb3997224cb0f5c"
KEY_NO_PASSWORD = "9a07615bca6a38def48546caa641d9dba4618b1c57e850c14eb6d11dee5969ec"
KEY_S3CRET = "662d7da264d52da372206cc024fd4d455b0b03da2c0c92603a9e7e2eb4fdbbb3"
SEALED_NO_PASSWORD = "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15$AiHPHWSHia2ffxoTLPmPQeKsivlwHDTmoPdihbw6"
SEALED_S3CRET = "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15$VSWoWhJbfM2lJ54/JOuPwtSwse3nqVtL5uR9Gp9d"
CHALLENGE = "ChallengeChallengeChallengeChalleng1"
PW_RESPONSE = "83f02c6ef85d186708cdbba6667a696eacae8e22c207c8624d258fd3d31aba1d"
NOSTR_PUBKEY = "79265425389962a3d30b62ecbce6c4a047416081aeda71e058da2776f63661a8"
NOSTR_EVENT_ID = "2098357496247e5811d03278010807516f2c9d7833e0da45cef558486043097b"


# --- topics -------------------------------------------------------------------------------------


def test_root_topic_input_string_is_trystero_app_room() -> None:
    assert hashlib.sha1(f"Trystero@{APP}@{ROOM}".encode()).hexdigest() == ROOT_SHA1_HEX


def test_root_topic_vector() -> None:
    topic = crypto.root_topic(APP, ROOM)
    assert topic == ROOT_TOPIC
    assert len(topic) == 36


def test_sha1_base36_is_unpadded_per_byte() -> None:
    # The root hash has bytes < 36 (e.g. 0x0b -> "b", 0x09 -> "9"), so padding would change it.
    digest = bytes.fromhex(ROOT_SHA1_HEX)
    assert any(b < 36 for b in digest)
    assert crypto.sha1_base36(f"Trystero@{APP}@{ROOM}") == ROOT_TOPIC


def test_self_topic_vector() -> None:
    assert crypto.self_topic(APP, ROOM, PEER) == SELF_TOPIC


def test_torrent_info_hash_hashes_the_hashed_root_topic() -> None:
    assert crypto.torrent_info_hash(crypto.root_topic(APP, ROOM)) == INFO_HASH
    assert len(INFO_HASH) == 20


def test_nostr_kinds() -> None:
    assert crypto.nostr_kind(ROOT_TOPIC) == 22507
    assert crypto.nostr_kind(SELF_TOPIC) == 22877


def test_nostr_kind_counts_utf16_code_units() -> None:
    # U+1F600 is two UTF-16 units, 0xD83D + 0xDE00, as JS charCodeAt sees it.
    assert crypto.nostr_kind("\U0001f600") == (0xD83D + 0xDE00) % 10_000 + 20_000


def test_nostr_event_id_vector() -> None:
    event_id = crypto.nostr_event_id(
        NOSTR_PUBKEY, 1700000000, 22507, [["x", ROOT_TOPIC]], f'{{"peerId":"{PEER}"}}'
    )
    assert event_id == NOSTR_EVENT_ID


def test_room_token_vector() -> None:
    assert crypto.room_token(APP, ROOM) == ROOM_TOKEN


# --- keys and sealing ---------------------------------------------------------------------------


@pytest.mark.parametrize("password", [None, ""])
def test_key_without_password(password: str | None) -> None:
    assert crypto.derive_key(password, APP, ROOM).hex() == KEY_NO_PASSWORD


def test_key_with_password() -> None:
    assert crypto.derive_key("s3cret", APP, ROOM).hex() == KEY_S3CRET


@pytest.mark.parametrize(("password", "sealed"), [(None, SEALED_NO_PASSWORD), ("s3cret", SEALED_S3CRET)])
def test_encrypt_with_fixed_iv_vector(password: str | None, sealed: str) -> None:
    key = crypto.derive_key(password, APP, ROOM)
    assert crypto.encrypt(key, "hello trystero", iv=IV) == sealed


@pytest.mark.parametrize(("password", "sealed"), [(None, SEALED_NO_PASSWORD), ("s3cret", SEALED_S3CRET)])
def test_decrypt_vector(password: str | None, sealed: str) -> None:
    assert crypto.decrypt(crypto.derive_key(password, APP, ROOM), sealed) == "hello trystero"


def test_decrypt_with_wrong_password_raises_decrypt_error() -> None:
    with pytest.raises(DecryptError):
        crypto.decrypt(crypto.derive_key("wrong", APP, ROOM), SEALED_S3CRET)
    with pytest.raises(DecryptError):
        crypto.decrypt(crypto.derive_key(None, APP, ROOM), SEALED_S3CRET)


def test_decrypt_with_other_room_raises() -> None:
    with pytest.raises(DecryptError):
        crypto.decrypt(crypto.derive_key(None, APP, "r2"), SEALED_NO_PASSWORD)


def test_random_iv_round_trip_and_format() -> None:
    key = crypto.derive_key("pw", APP, ROOM)
    sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\na=candidate:1 1 UDP 1 10.0.0.1 9 typ host\r\n"
    a, b = crypto.encrypt(key, sdp), crypto.encrypt(key, sdp)
    assert a != b  # fresh IV each time
    iv_text, _, body = a.partition("$")
    iv = bytes(int(x) for x in iv_text.split(","))
    assert len(iv) == 16
    raw = base64.b64decode(body, validate=True)
    assert len(raw) == len(sdp.encode()) + 16  # ciphertext + 128-bit tag, no AAD
    assert crypto.decrypt(key, a) == sdp
    assert crypto.decrypt(key, b) == sdp


def test_encrypt_rejects_non_16_byte_iv() -> None:
    with pytest.raises(ValueError):
        crypto.encrypt(crypto.derive_key(None, APP, ROOM), "x", iv=bytes(12))


def test_decrypt_ignores_extra_dollar_parts_like_js() -> None:
    key = crypto.derive_key(None, APP, ROOM)
    assert crypto.decrypt(key, SEALED_NO_PASSWORD + "$junk") == "hello trystero"


@pytest.mark.parametrize(
    "sealed",
    [
        "",
        "no separator",
        "$" + SEALED_NO_PASSWORD.split("$")[1],  # empty IV
        "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,256$" + SEALED_NO_PASSWORD.split("$")[1],
        "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,-1$" + SEALED_NO_PASSWORD.split("$")[1],
        "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,x$" + SEALED_NO_PASSWORD.split("$")[1],
        "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15$!!notbase64!!",
        "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15$AiHPHWSHia2ffxoTLPmPQeKsivlwHDTmoPdihbw6é",
        "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15$AiHPHWSHia2ffxoTLPmPQeKsivlwHDTmoPdihbw",  # unpadded
        "é,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15$AiHPHWSHia2ffxoTLPmPQeKsivlwHDTmoPdihbw6",
        "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15$",
        "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15$AiHPHWSHia2ffxoTLPmPQeKs",  # truncated tag
        "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14$" + SEALED_NO_PASSWORD.split("$")[1],  # IV of 15
    ],
)
def test_decrypt_garbage_raises_decrypt_error(sealed: str) -> None:
    with pytest.raises(DecryptError):
        crypto.decrypt(crypto.derive_key(None, APP, ROOM), sealed)


def test_decrypt_error_is_a_signaling_error() -> None:
    assert issubclass(DecryptError, SignalingError)


def test_decrypt_decodes_like_text_decoder() -> None:
    key = crypto.derive_key(None, APP, ROOM)
    raw = AESGCM(key).encrypt(IV, b"\xef\xbb\xbfhi\xff", None)
    sealed = ",".join(map(str, IV)) + "$" + base64.b64encode(raw).decode()
    assert crypto.decrypt(key, sealed) == "hi\ufffd"


def test_ice_candidate_json_round_trip() -> None:
    key = crypto.derive_key(None, APP, ROOM)
    cand = '{"candidate":"candidate:1 1 udp 1 10.0.0.1 9 typ host","sdpMid":"0","sdpMLineIndex":0}'
    assert crypto.decrypt(key, crypto.encrypt(key, cand)) == cand


# --- ids and password handshake ------------------------------------------------------------------


def test_gen_id_alphabet_and_length() -> None:
    assert len(crypto.ID_CHARSET) == 62
    for n in (12, 20, 36, 64):
        ident = crypto.gen_id(n)
        assert len(ident) == n
        assert set(ident) <= set(crypto.ID_CHARSET)


def test_password_response_vector() -> None:
    assert crypto.password_response(CHALLENGE, "s3cret", APP, ROOM) == PW_RESPONSE


def test_verify_password_response() -> None:
    assert crypto.verify_password_response(PW_RESPONSE, CHALLENGE, "s3cret", APP, ROOM)
    assert not crypto.verify_password_response(PW_RESPONSE, CHALLENGE, "other", APP, ROOM)
    assert not crypto.verify_password_response(PW_RESPONSE.upper(), CHALLENGE, "s3cret", APP, ROOM)
    assert not crypto.verify_password_response("é", CHALLENGE, "s3cret", APP, ROOM)
