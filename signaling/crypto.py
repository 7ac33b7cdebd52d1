"""Hashing and encryption primitives of Trystero 0.25 (spec §1, §5, §7). Pure and network-free.

Ids
    ``gen_id(n) -> str``                       random id over Trystero's 62-char alphabet
Topics (all hashes are sha1-base36 strings unless stated)
    ``sha1_base36(text) -> str``               SHA-1, each byte in base36 without padding, concatenated
    ``root_topic(app_id, room_id) -> str``     topic every peer of a room announces on
    ``self_topic(app_id, room_id, peer_id) -> str``  topic a peer receives signals on
    ``torrent_info_hash(topic) -> str``        20-char info_hash for a topic (pass ``root_topic(...)``)
    ``nostr_kind(topic) -> int``               ephemeral event kind 20000..29999 for a topic
    ``nostr_event_id(pubkey, created_at, kind, tags, content) -> str``  NIP-01 event id (hex)
Data-channel namespace
    ``room_token(app_id, room_id) -> str``     64 lower-hex chars used in room/presence frames
SDP / ICE candidate encryption (AES-256-GCM, 16-byte IV, no AAD)
    ``derive_key(password, app_id, room_id) -> bytes``  32-byte key; ``password=""`` is a valid key too
    ``encrypt(key, plaintext, iv=None) -> str``  ``"i0,…,i15$<base64(ct||tag)>"``
    ``decrypt(key, sealed) -> str``            raises :class:`~signaling.errors.DecryptError`
Password admission handshake (``@_hsdata``; message shapes live in ``signaling.wire.v025``)
    ``password_response(challenge, password, app_id, room_id) -> str``  hex SHA-256 answer
    ``verify_password_response(response, challenge, password, app_id, room_id) -> bool``

Strings are hashed as UTF-8 and appId/roomId are used byte-exactly (spec §8.8), so callers must not
normalise them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from signaling.errors import DecryptError

__all__ = [
    "ID_CHARSET",
    "IV_SIZE",
    "LIB_NAME",
    "decrypt",
    "derive_key",
    "encrypt",
    "gen_id",
    "nostr_event_id",
    "nostr_kind",
    "password_response",
    "room_token",
    "root_topic",
    "self_topic",
    "sha1_base36",
    "torrent_info_hash",
    "verify_password_response",
]

LIB_NAME = "Trystero"
ID_CHARSET = "0123456789AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVvWwXxYyZz"
IV_SIZE = 16  # Trystero uses 16 random bytes, not the usual 12
INFO_HASH_LENGTH = 20

_BASE36_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
# JS writes each IV byte with Array.join, so only plain decimals 0..255 can appear.
_IV_PART = re.compile(r"[0-9]{1,3}")


def gen_id(n: int) -> str:
    """Return ``n`` characters drawn from :data:`ID_CHARSET` (selfId: 20, offerId: 12, challenge: 36)."""
    # JS uses Math.random; we use a CSPRNG because ids double as unguessable challenges.
    return "".join(secrets.choice(ID_CHARSET) for _ in range(n))


# --- topics -------------------------------------------------------------------------------------


def _byte_base36(b: int) -> str:
    # Mirrors JS Number.prototype.toString(36): no zero-padding, so byte 0 is "0" and 35 is "z".
    hi, lo = divmod(b, 36)
    return (_BASE36_DIGITS[hi] if hi else "") + _BASE36_DIGITS[lo]


def sha1_base36(text: str) -> str:
    """Trystero's topic hash: SHA-1 of the UTF-8 text, each byte in unpadded base36, concatenated."""
    return "".join(_byte_base36(b) for b in hashlib.sha1(text.encode()).digest())


def _root_plaintext(app_id: str, room_id: str) -> str:
    return f"{LIB_NAME}@{app_id}@{room_id}"


def root_topic(app_id: str, room_id: str) -> str:
    """Hashed root topic of a room: ``sha1_base36("Trystero@<appId>@<roomId>")``."""
    return sha1_base36(_root_plaintext(app_id, room_id))


def self_topic(app_id: str, room_id: str, peer_id: str) -> str:
    """Hashed self topic of ``peer_id``: ``sha1_base36("Trystero@<appId>@<roomId>@<peerId>")``."""
    return sha1_base36(f"{_root_plaintext(app_id, room_id)}@{peer_id}")


def torrent_info_hash(topic: str) -> str:
    """Torrent info_hash for an already *hashed* topic: first 20 chars of ``sha1_base36(topic)``.

    The torrent strategy hashes the root topic a second time (checked against the §10 vector).
    """
    return sha1_base36(topic)[:INFO_HASH_LENGTH]


def nostr_kind(topic: str) -> int:
    """Nostr event kind for a topic: (sum of UTF-16 code units) mod 10000 + 20000."""
    units = topic.encode("utf-16-le", "surrogatepass")
    total = sum(int.from_bytes(units[i : i + 2], "little") for i in range(0, len(units), 2))
    return total % 10_000 + 20_000


def nostr_event_id(
    pubkey: str, created_at: int, kind: int, tags: Sequence[Sequence[str]], content: str
) -> str:
    """NIP-01 event id: hex SHA-256 of the compact JSON ``[0,pubkey,created_at,kind,tags,content]``.

    Only strings and integers occur, for which orjson's output equals JS ``JSON.stringify``
    (non-ASCII kept raw, control characters as ``\\u00XX``), so the id matches the JS peer's.
    """
    serial = orjson.dumps([0, pubkey, created_at, kind, [list(t) for t in tags], content])
    return hashlib.sha256(serial).hexdigest()


# --- data-channel namespace ---------------------------------------------------------------------


def room_token(app_id: str, room_id: str) -> str:
    """Room token (data-channel namespace): hex SHA-256 of ``"Trystero:<appId>:<roomId>"`` (colons)."""
    return hashlib.sha256(f"{LIB_NAME}:{app_id}:{room_id}".encode()).hexdigest()


# --- SDP encryption -----------------------------------------------------------------------------


def derive_key(password: str | None, app_id: str, room_id: str) -> bytes:
    """AES-256 key: raw SHA-256 of ``"<password>:<appId>:<roomId>"``; no password means ``""``.

    Password-less rooms are still encrypted, just with a key anyone knowing appId/roomId can derive.
    """
    return hashlib.sha256(f"{password or ''}:{app_id}:{room_id}".encode()).digest()


def encrypt(key: bytes, plaintext: str, iv: bytes | None = None) -> str:
    """Seal ``plaintext`` as Trystero does: ``"<iv bytes in decimal, comma-joined>$<base64(ct||tag)>"``.

    ``iv`` exists for test vectors only; leave it ``None`` in production so a fresh random IV is used.
    """
    if iv is None:
        iv = secrets.token_bytes(IV_SIZE)
    elif len(iv) != IV_SIZE:
        raise ValueError(f"Trystero uses a {IV_SIZE}-byte IV, got {len(iv)}")
    sealed = AESGCM(key).encrypt(iv, plaintext.encode(), None)
    return ",".join(str(b) for b in iv) + "$" + base64.b64encode(sealed).decode("ascii")


def _parse_iv(text: str) -> bytes:
    parts = text.split(",")
    if not all(_IV_PART.fullmatch(p) for p in parts):
        raise DecryptError("malformed IV in sealed string")
    values = [int(p) for p in parts]
    if any(v > 255 for v in values):
        raise DecryptError("IV byte out of range in sealed string")
    return bytes(values)


def decrypt(key: bytes, sealed: str) -> str:
    """Open a string produced by :func:`encrypt` (or by a JS peer). Any failure raises DecryptError.

    The plaintext is decoded like JS ``TextDecoder`` (invalid UTF-8 replaced, a leading BOM dropped)
    so a Python peer sees exactly the text a JS peer would.
    """
    # JS takes the first two '$'-separated parts and ignores the rest; do the same.
    iv_text, sep, rest = sealed.partition("$")
    if not sep:
        raise DecryptError("sealed string has no '$' separator")
    iv = _parse_iv(iv_text)
    try:
        ciphertext = base64.b64decode(rest.split("$", 1)[0], validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise DecryptError("sealed string has invalid base64") from exc
    try:
        plaintext = AESGCM(key).decrypt(iv, ciphertext, None)
    except InvalidTag as exc:
        raise DecryptError("authentication failed (wrong password, appId or roomId?)") from exc
    except ValueError as exc:  # e.g. an IV length AESGCM refuses
        raise DecryptError(f"cannot decrypt: {exc}") from exc
    return plaintext.decode("utf-8", "replace").removeprefix("\ufeff")


# --- password admission handshake ---------------------------------------------------------------


def password_response(challenge: str, password: str, app_id: str, room_id: str) -> str:
    """Answer to a password challenge: hex SHA-256 of ``"<c>:<password>:<appId>:<roomId>"``."""
    return hashlib.sha256(f"{challenge}:{password}:{app_id}:{room_id}".encode()).hexdigest()


def verify_password_response(response: str, challenge: str, password: str, app_id: str, room_id: str) -> bool:
    """True if ``response`` is the correct answer to our ``challenge`` (constant-time compare)."""
    expected = password_response(challenge, password, app_id, room_id)
    return hmac.compare_digest(response.encode(), expected.encode())
