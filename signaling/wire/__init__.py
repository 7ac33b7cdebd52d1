"""Byte-level wire formats of Trystero's data channel, one module per wire version.

- :mod:`signaling.wire.v025`: Trystero 0.23 to 0.25 (room/presence frames, 36-byte chunk header,
  ``@_hsready`` admission). Verified against ``trystero@0.25.4``.
- :mod:`signaling.wire.v022`: Trystero 0.22.0 (bare 15-byte-header chunks, no admission, one
  connection per room and peer), plus the signalling profile of that version.

Each module exposes the same shape: an encoder for outgoing actions, a per-peer ``Decoder`` with
``feed(message) -> list[Event]``, and the internal action names; its ``WIRE``
(:class:`~signaling.wire.interface.Wire`) is that shape as one typed value, which is all the
session and the room use. Shared chunking and bounded reassembly live in :mod:`signaling.framing`.

:data:`WIRES` is the one list of wire versions: a new wire is a module here and an entry there.
"""

from collections.abc import Mapping
from typing import Final

from signaling.wire import v022, v025
from signaling.wire.interface import Wire

__all__ = ["WIRES", "WIRE_VERSIONS", "Wire", "v022", "v025", "wire_for"]

#: Wire version -> wire, newest first (the first is the default).
WIRES: Final[Mapping[str, Wire]] = {wire.version: wire for wire in (v025.WIRE, v022.WIRE)}
WIRE_VERSIONS: Final = tuple(WIRES)


def wire_for(version: str) -> Wire:
    """The wire of a Trystero wire version name (ValueError if unknown)."""
    try:
        return WIRES[version]
    except KeyError:
        raise ValueError(f"unsupported wire {version!r} (known: {', '.join(WIRES)})") from None
