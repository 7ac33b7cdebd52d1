"""Exception hierarchy of the ``signaling`` library.

Every error the library raises on bad *remote* input derives from :class:`SignalingError`,
so a caller can contain one misbehaving peer with a single ``except``:

- :class:`DecryptError`: a sealed SDP/candidate string is malformed or fails authentication
  (in practice: the remote used another password, appId or roomId).
- :class:`FramingError`: a data-channel message cannot be a valid frame, or reassembly passed
  one of its caps. The caller should drop the peer.
- :class:`PayloadError`: a complete action is flagged JSON but does not parse (JS drops just that
  message; the decoder stays usable, so log and carry on).
- :class:`HandshakeError`: a ``@_hsdata`` password message has the wrong shape or hash.

Errors of one connection derive from :class:`PeerError` (defined here, raised by
:mod:`signaling.peer`, so the signalling code can catch them without importing WebRTC).

Programming errors on the local side (e.g. an action name longer than the wire allows, a payload
that is not JSON-serialisable) raise ordinary ``ValueError``/``TypeError``.
"""

from __future__ import annotations


class SignalingError(Exception):
    """Base class for errors caused by what a remote peer sent."""


class DecryptError(SignalingError):
    """A sealed string could not be parsed or did not authenticate."""


class FramingError(SignalingError):
    """A data-channel message is malformed, or reassembly exceeded a cap."""


class PayloadError(SignalingError):
    """A completed action payload (or its metadata) is flagged JSON but is not valid JSON."""


class HandshakeError(SignalingError):
    """The session-admission handshake (password check) failed."""


class PeerError(Exception):
    """Base class for errors raised by :class:`~signaling.peer.Peer`."""


class InvalidDescription(PeerError, ValueError):
    """A remote SDP was unusable; the :class:`~signaling.peer.Peer` has been closed."""


class InvalidCandidate(PeerError, ValueError):
    """A remote candidate could not be parsed."""


class MessageTooLarge(PeerError, ValueError):
    """The message exceeds :attr:`~signaling.peer.Peer.max_message_size`."""


class ChannelNotOpen(PeerError, ConnectionError):
    """The data channel is not open (not yet, or no longer)."""
