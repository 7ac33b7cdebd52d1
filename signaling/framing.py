"""Action chunking and reassembly shared by all Trystero wire versions. Pure and network-free.

Both wires (0.22: 15-byte header, 0.25: 36-byte header) cut one ``send()`` into chunks laid out as
``[action name, NUL-padded][nonce, big-endian][flags][progress][payload slice]``; only the field
widths differ. A version module describes its widths with a :class:`ChunkLayout` and gets
encoding, header parsing and a bounded :class:`Reassembler` from here.

JS-compatible value codec (what Trystero does with ``TextEncoder``/``JSON.stringify``)
    ``NO_METADATA``                     sentinel for "no metadata" (``None`` means JSON ``null``)
    ``FLAG_LAST, FLAG_META, FLAG_BINARY, FLAG_JSON``  chunk flag bits
    ``encode_payload(value) -> (bytes, flags)``  str → UTF-8 (0); bytes-like → raw (BINARY|JSON);
                                        anything else → ``to_json`` (JSON)
    ``decode_payload(data, flags) -> str | bytes | object``  inverse, by the last chunk's flags
    ``to_json(value) -> bytes``         byte-exact ``JSON.stringify`` for dict/list/tuple/str/int/
                                        float/bool/None
    ``from_json(data) -> object``       ``JSON.parse`` equivalent; raises ValueError
    ``encode_text(s) -> bytes`` / ``decode_text(b) -> str``  ``TextEncoder``/``TextDecoder``
    ``progress_byte(index, total) -> int``  JS ``Math.round((i+1)/N*255)``
Chunks
    ``ChunkLayout(type_size, nonce_size)``  ``.encode(action, payload, nonce=, metadata=) -> list[bytes]``,
                                        ``.parse(chunk) -> (ChunkHeader, bytes)``, ``.header_size``,
                                        ``.payload_size``, ``.nonce_modulus``
    ``ChunkHeader``                     parsed header: action, nonce, flags, progress (+ ``is_*``)
Reassembly
    ``Reassembler(max_message_bytes=, max_pending=, max_buffered_bytes=)``
                                        ``.add(key, part, last=, meta=) -> Assembled | None``,
                                        ``.metadata(key)``, ``.discard(pred)``, ``.clear()``
    ``Assembled``                       completed message: data bytes + metadata

Neither wire has a chunk index: chunks of one send are concatenated in arrival order, which relies
on the data channel being ordered and reliable (Trystero's default). Duplicates or reordering can
therefore not be detected here; they would corrupt the message exactly as they would in JS.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import orjson

from signaling.errors import FramingError

__all__ = [
    "FLAG_BINARY",
    "FLAG_JSON",
    "FLAG_LAST",
    "FLAG_META",
    "MAX_CHUNK_SIZE",
    "NO_METADATA",
    "Assembled",
    "ChunkHeader",
    "ChunkLayout",
    "NoMetadata",
    "Reassembler",
    "decode_payload",
    "decode_text",
    "encode_payload",
    "encode_text",
    "from_json",
    "progress_byte",
    "to_json",
]

FLAG_LAST: Final = 0x01
FLAG_META: Final = 0x02
FLAG_BINARY: Final = 0x04
FLAG_JSON: Final = 0x08

# Trystero sizes every chunk (header + payload) to 16 KiB, the safe SCTP message size for browsers.
MAX_CHUNK_SIZE: Final = 16 * 1024


class NoMetadata(enum.Enum):
    """Type of :data:`NO_METADATA`; JS distinguishes ``undefined`` metadata from ``null``."""

    NO_METADATA = enum.auto()

    def __repr__(self) -> str:
        return "NO_METADATA"


NO_METADATA: Final = NoMetadata.NO_METADATA


# --- text -----------------------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def _join_surrogate_pairs(s: str) -> str:
    # A Python str may hold a UTF-16 surrogate *pair* as two code points; JS sees one character.
    return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def encode_text(s: str) -> bytes:
    """UTF-8 like JS ``TextEncoder``: surrogate pairs joined, lone surrogates become U+FFFD."""
    try:
        return s.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", _join_surrogate_pairs(s)).encode()


def decode_text(data: bytes | bytearray | memoryview) -> str:
    """UTF-8 like JS ``TextDecoder``: invalid sequences become U+FFFD and one leading BOM is dropped."""
    return bytes(data).decode("utf-8", "replace").removeprefix("\ufeff")


# --- JSON -----------------------------------------------------------------------------------------

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # orjson's native integer range
_ARRAY_INDEX_LIMIT = 2**32 - 1


def _js_number(x: float) -> str:
    """JS ``Number.prototype.toString`` for a float (ECMA-262 Number::toString, radix 10)."""
    if math.isnan(x) or math.isinf(x):
        return "null"  # what JSON.stringify writes for non-finite numbers
    if x == 0:
        return "0"  # also for -0.0
    sign = "-" if x < 0 else ""
    # repr() yields the shortest round-tripping digits, the same digits JS chooses.
    mantissa, _, exp = repr(abs(x)).partition("e")
    int_part, _, frac = mantissa.partition(".")
    digits = int_part + frac
    n = len(int_part) + int(exp or 0)
    stripped = digits.lstrip("0")
    n -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        out = "0." + "0" * -n + digits
    else:
        e = n - 1
        out = digits[0] + (f".{digits[1:]}" if k > 1 else "") + ("e+" if e >= 0 else "e-") + str(abs(e))
    return sign + out


def _js_string_fragment(s: str) -> orjson.Fragment:
    # Only reached for strings with surrogates: JSON.stringify keeps pairs and escapes lone ones.
    text = json.dumps(_join_surrogate_pairs(s), ensure_ascii=False)
    text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return orjson.Fragment(text.encode())


def _is_array_index(key: str) -> bool:
    return key.isascii() and key.isdigit() and (key == "0" or key[0] != "0") and int(key) < _ARRAY_INDEX_LIMIT


def _js_key_order(keys: list[str]) -> list[str]:
    # JS objects list integer-like keys first (ascending), then the rest in insertion order.
    indices = sorted((k for k in keys if _is_array_index(k)), key=int)
    if not indices:
        return keys
    return indices + [k for k in keys if not _is_array_index(k)]


def _prepare(value: Any) -> Any:
    """Rewrite ``value`` so that orjson's output equals ``JSON.stringify``'s."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value if _SURROGATE.search(value) is None else _js_string_fragment(value)
    if isinstance(value, int):
        return value if _INT_MIN <= value <= _INT_MAX else orjson.Fragment(str(value).encode())
    if isinstance(value, float):
        return orjson.Fragment(_js_number(value).encode())
    if isinstance(value, Mapping):
        keys = list(value.keys())
        for k in keys:
            if not isinstance(k, str):
                raise TypeError(f"JSON object keys must be str, got {type(k).__name__}")
            if _SURROGATE.search(k):
                raise ValueError("JSON object key contains a lone surrogate")
        return {k: _prepare(value[k]) for k in _js_key_order(keys)}
    if isinstance(value, list | tuple):
        return [_prepare(v) for v in value]
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable for Trystero")


def to_json(value: Any) -> bytes:
    """Serialise like JS ``JSON.stringify``: compact, non-ASCII kept raw, JS number formatting
    (``1.0`` → ``1``, ``1e21`` → ``1e+21``, NaN → ``null``) and JS key order.

    Python ints are written exactly (JS would round beyond 2**53). Only JSON-native Python types
    are accepted; anything else raises TypeError (so does orjson past 254 nesting levels). A dict
    key holding a lone surrogate raises ValueError.
    """
    return orjson.dumps(_prepare(value))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON.parse does not accept {name}")


def from_json(data: bytes | str) -> Any:
    """Parse like JS ``JSON.parse`` (bytes are decoded like ``TextDecoder`` first). Raises ValueError."""
    text = data if isinstance(data, str) else decode_text(data)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses escaped lone surrogates ("\ud800") and very deep nesting; JSON.parse accepts both.
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"invalid JSON payload: {exc}") from exc


# --- payload values -------------------------------------------------------------------------------


def encode_payload(value: Any) -> tuple[bytes, int]:
    """Bytes and kind flags for a payload, as Trystero's ``send()`` chooses them.

    str → UTF-8, flags 0; bytes/bytearray/memoryview → raw, ``FLAG_BINARY | FLAG_JSON`` (JS sets
    both, the receiver tests binary first); any other value → ``to_json``, ``FLAG_JSON``.
    """
    if isinstance(value, str):
        return encode_text(value), 0
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), FLAG_BINARY | FLAG_JSON
    return to_json(value), FLAG_JSON


def decode_payload(data: bytes, flags: int) -> Any:
    """Inverse of :func:`encode_payload`: bytes if BINARY, else parsed JSON if JSON, else text.

    Raises ValueError if a JSON-flagged payload does not parse.
    """
    if flags & FLAG_BINARY:
        return data
    if flags & FLAG_JSON:
        return from_json(data)
    return decode_text(data)


def progress_byte(index: int, total: int) -> int:
    """Progress byte of chunk ``index`` (0-based, the meta chunk included) of ``total``."""
    x = (index + 1) / total * 255  # same float operations as JS, so ties round identically
    floor = math.floor(x)
    return floor + (1 if x - floor >= 0.5 else 0)  # Math.round: halves go up


# --- chunks ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """A parsed chunk header. ``action`` has every NUL removed, as JS does."""

    action: str
    nonce: int
    flags: int
    progress: int

    @property
    def is_last(self) -> bool:
        return bool(self.flags & FLAG_LAST)

    @property
    def is_meta(self) -> bool:
        return bool(self.flags & FLAG_META)

    @property
    def is_binary(self) -> bool:
        return bool(self.flags & FLAG_BINARY)

    @property
    def is_json(self) -> bool:
        return bool(self.flags & FLAG_JSON)


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    """Field widths of one wire version's chunk header: name, nonce, then flags and progress."""

    type_size: int
    nonce_size: int

    @property
    def header_size(self) -> int:
        return self.type_size + self.nonce_size + 2

    @property
    def payload_size(self) -> int:
        """Largest payload slice per chunk (JS cuts at 16 KiB minus the header)."""
        return MAX_CHUNK_SIZE - self.header_size

    @property
    def nonce_modulus(self) -> int:
        return 1 << (8 * self.nonce_size)

    def name_field(self, action: str) -> bytes:
        """The NUL-padded name field; ValueError if empty or too long (JS ``makeAction`` throws)."""
        raw = encode_text(action)
        if not raw:
            raise ValueError("action name must not be empty")
        if len(raw) > self.type_size:
            raise ValueError(f"action name {action!r} is {len(raw)} bytes, the limit is {self.type_size}")
        return raw.ljust(self.type_size, b"\0")

    def encode(self, action: str, payload: Any, *, nonce: int, metadata: Any = NO_METADATA) -> list[bytes]:
        """All chunks of one ``send()``, byte-identical to Trystero's.

        Metadata, if given, becomes an extra first chunk carrying its JSON, flagged META plus the
        payload's kind bits. An empty payload still yields one chunk.
        """
        if not 0 <= nonce < self.nonce_modulus:
            raise ValueError(f"nonce {nonce} out of range for a {self.nonce_size}-byte field")
        name = self.name_field(action)
        body, kind = encode_payload(payload)
        view = memoryview(body)
        size = self.payload_size
        pieces: list[bytes | memoryview] = [view[i : i + size] for i in range(0, len(body), size)]
        has_meta = metadata is not NO_METADATA
        if has_meta:
            pieces.insert(0, to_json(metadata))
        if not pieces:
            pieces.append(b"")
        total = len(pieces)
        nonce_bytes = nonce.to_bytes(self.nonce_size, "big")
        chunks = []
        for i, piece in enumerate(pieces):
            flags = kind | (FLAG_LAST if i == total - 1 else 0) | (FLAG_META if has_meta and i == 0 else 0)
            chunks.append(b"".join((name, nonce_bytes, bytes((flags, progress_byte(i, total))), piece)))
        return chunks

    def parse(self, chunk: bytes | memoryview) -> tuple[ChunkHeader, bytes]:
        """Split a chunk into header and payload. FramingError if truncated or the name is empty."""
        if len(chunk) < self.header_size:
            raise FramingError(f"chunk of {len(chunk)} bytes is shorter than its header ({self.header_size})")
        ts, ns = self.type_size, self.nonce_size
        action = decode_text(chunk[:ts]).replace("\0", "")
        if not action:
            raise FramingError("chunk has an empty action name")
        header = ChunkHeader(
            action=action,
            nonce=int.from_bytes(chunk[ts : ts + ns], "big"),
            flags=chunk[ts + ns],
            progress=chunk[ts + ns + 1],
        )
        return header, bytes(chunk[self.header_size :])


# --- reassembly -----------------------------------------------------------------------------------

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Assembled:
    """A completed message: concatenated data and the metadata of its meta chunk, if any."""

    data: bytes
    metadata: Any = NO_METADATA


@dataclass(slots=True)
class _Pending:
    data: bytearray  # one growing buffer, so many tiny chunks cannot cost more than their bytes
    size: int = 0  # data plus meta bytes held, the figure the caps are checked against
    metadata: Any = NO_METADATA


class Reassembler(Generic[K]):
    """Concatenates chunks per key (e.g. room token, action, nonce) in arrival order, bounded.

    Caps (a remote controls all of these, so each is enforced before memory is committed):

    - ``max_message_bytes``: data + metadata bytes of one message, in flight or complete;
    - ``max_pending``: number of unfinished messages;
    - ``max_buffered_bytes``: bytes held by all unfinished messages together.

    Passing a cap raises FramingError after discarding that message's partial state, so the
    buffers never exceed the caps; the caller is expected to drop the peer.
    """

    def __init__(self, *, max_message_bytes: int, max_pending: int, max_buffered_bytes: int) -> None:
        if min(max_message_bytes, max_pending, max_buffered_bytes) < 1:
            raise ValueError("reassembly caps must be positive")
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self.max_buffered_bytes = max_buffered_bytes
        self._pending: dict[K, _Pending] = {}
        self._buffered = 0

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def add(self, key: K, part: bytes, *, last: bool, meta: Any = NO_METADATA) -> Assembled | None:
        """Add one chunk's payload; return the message when ``last`` is set, else None.

        With ``meta`` given, the chunk is a meta chunk: ``meta`` (already decoded) replaces the
        message's metadata and ``part`` only counts towards the caps.
        """
        is_meta = meta is not NO_METADATA
        entry = self._pending.get(key)
        if entry is None:
            if last:  # single-chunk message: nothing to buffer
                self._check_message_size(len(part))
                return Assembled(b"", meta) if is_meta else Assembled(part)
            if len(self._pending) >= self.max_pending:
                raise FramingError(f"more than {self.max_pending} unfinished messages")
            entry = self._pending[key] = _Pending(bytearray())
        new_size = entry.size + len(part)
        if new_size > self.max_message_bytes:
            self._drop(key)
            raise self._too_large(new_size)
        if last:
            self._drop(key)
            if is_meta:
                return Assembled(bytes(entry.data), meta)
            entry.data += part
            return Assembled(bytes(entry.data), entry.metadata)
        if self._buffered + len(part) > self.max_buffered_bytes:
            self._drop(key)
            raise FramingError(f"more than {self.max_buffered_bytes} bytes buffered in unfinished messages")
        entry.size = new_size
        self._buffered += len(part)
        if is_meta:
            entry.metadata = meta
        else:
            entry.data += part
        return None

    def metadata(self, key: K) -> Any:
        """Metadata received so far for an unfinished message (NO_METADATA if none)."""
        entry = self._pending.get(key)
        return NO_METADATA if entry is None else entry.metadata

    def discard(self, predicate: Callable[[K], bool]) -> int:
        """Forget unfinished messages whose key matches (e.g. a room the peer left); return count."""
        doomed = [k for k in self._pending if predicate(k)]
        for k in doomed:
            self._drop(k)
        return len(doomed)

    def clear(self) -> None:
        self._pending.clear()
        self._buffered = 0

    def _drop(self, key: K) -> None:
        entry = self._pending.pop(key, None)
        if entry is not None:
            self._buffered -= entry.size

    def _check_message_size(self, size: int) -> None:
        if size > self.max_message_bytes:
            raise self._too_large(size)

    def _too_large(self, size: int) -> FramingError:
        return FramingError(f"message of {size}+ bytes exceeds the {self.max_message_bytes}-byte cap")
