"""Byte-level wire formats of Trystero's data channel, one module per wire version.

- :mod:`signaling.wire.v025`: Trystero 0.23 to 0.25 (room/presence frames, 36-byte chunk header,
  ``@_hsready`` admission). Verified against ``trystero@0.25.4``.
- :mod:`signaling.wire.v022`: Trystero 0.22.0 (bare 15-byte-header chunks, no admission, one
  connection per room and peer), plus the signalling profile of that version.

Each module exposes the same shape: an encoder for outgoing actions, a per-peer ``Decoder`` with
``feed(message) -> list[Event]``, and the internal action names. Shared chunking and bounded
reassembly live in :mod:`signaling.framing`.
"""

from signaling.wire import v022, v025

__all__ = ["v022", "v025"]
