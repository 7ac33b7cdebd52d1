"""One aiortc ``RTCPeerConnection`` and its single data channel, used the way Trystero uses them.

Spec: ``docs/trystero-wire.md`` §2 (offer/answer/candidate messages), §6.1-6.2 (peer and channel),
§8 (pitfalls for an aiortc peer). This module knows nothing about relays, encryption or frames:
it takes and returns plain SDP strings and candidate objects, and moves bytes.

Roles
    ``Peer(initiator=True)`` creates the channel exactly as Trystero's offerer does:
    ``createDataChannel("data")`` with default options (ordered, reliable, ``negotiated=False``,
    id chosen by the stack and announced in-band with DCEP). ``Peer(initiator=False)`` takes
    whatever channel the remote opens (Trystero's answerer does the same), keeping only the first.

Non-trickle local candidates (how aiortc maps onto Trystero's trickle flow)
    aiortc does not trickle: ``setLocalDescription()`` returns only after ICE gathering has
    finished, so the SDP returned by :meth:`Peer.create_offer` / :meth:`Peer.accept_offer` already
    carries every local candidate plus ``a=end-of-candidates``. The strategy layer therefore sends
    that SDP as the ``offer``/``answer`` message and sends **no** ``candidate`` messages of its own.
    JS accepts this (it is what a Trystero torrent peer does, and what JS receives from any
    non-trickling stack). The other direction is unchanged: JS trickles its candidates (MQTT/nostr),
    which go to :meth:`Peer.add_remote_candidate`, buffered until the remote description is set.
    The price is latency: the SDP leaves only after gathering. Host-only gathering takes a few ms,
    but every STUN server that does not answer costs aioice's 5 s srflx timeout, which can blow
    Trystero 0.22's 4.8 s answer budget (spec §9.9). Use reachable STUN servers or none
    (``ice_servers=[]``, the default here).

Host addresses
    aioice gathers host candidates from every interface except 127.0.0.1 and has no per-connection
    option for that. :func:`restrict_host_addresses` (process-wide), :func:`host_addresses`
    (scoped context manager) and ``Peer(host_addresses=...)`` (per connection) choose the addresses
    instead; see :func:`restrict_host_addresses` for the hook and why it is built that way.

aiortc behaviours this module works around (each verified against node-datachannel)
    * ``setRemoteDescription`` accepts garbage and answers it with an SDP without m-lines, so
      remote SDP is checked first (:class:`InvalidDescription`).
    * ``iceServers=None`` means Google STUN to aiortc; we always pass an explicit list.
    * Once the remote SDP carries ``a=end-of-candidates``, aiortc silently ignores trickled
      candidates; :meth:`Peer.add_remote_candidate` reports them as not added.
    * aiortc advertises three DTLS fingerprints; we hand out sha-256 only, see
      :func:`_sha256_fingerprint_only` (a real connection failure with node-datachannel otherwise).
    * ``addIceCandidate`` before the remote description is dropped on the answerer (no SCTP
      transport yet), hence our own buffer.
    * aiortc's SCTP acknowledges every data packet; :mod:`signaling.sctp_ack` makes it delay
      acknowledgements as RFC 4960 and usrsctp do (a third of the CPU of a bulk receive).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aioice.ice
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceCandidate,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import SessionDescription, candidate_from_sdp

from signaling import sctp_ack
from signaling.errors import ChannelNotOpen, InvalidCandidate, InvalidDescription, MessageTooLarge, PeerError

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_CHANNEL_LABEL",
    "ChannelNotOpen",
    "InvalidCandidate",
    "InvalidDescription",
    "MessageTooLarge",
    "ParsedCandidate",
    "Peer",
    "PeerError",
    "get_host_address_restriction",
    "host_addresses",
    "ice_servers_from_config",
    "parse_candidate",
    "restrict_host_addresses",
]

#: Label Trystero's offerer gives its only channel (spec §6.2).
DATA_CHANNEL_LABEL: Final = "data"

#: Our own send limit. Trystero frames are at most 16451 bytes (spec §6.4) and every stack accepts
#: 65536 (RFC 8841's default when a=max-message-size is absent), so anything bigger is a bug in
#: the caller. Going near 262144 is dangerous: node-datachannel silently truncates oversize
#: messages instead of failing (harness pitfall 4).
DEFAULT_MAX_MESSAGE_SIZE: Final = 65536

#: Back-pressure watermarks for :meth:`Peer.send`: above HIGH it waits until aiortc's
#: bufferedAmount falls to LOW. aiortc's SCTP is pure Python; keeping ~1 MiB queued is enough to
#: keep it busy while bounding the memory a bulk sender can pin.
DEFAULT_BUFFER_HIGH: Final = 1 << 20
DEFAULT_BUFFER_LOW: Final = 256 << 10

#: Remote candidates held until the remote description is set. Eviction: when full, new
#: candidates are refused (the first ones are host candidates, the most useful on a LAN).
MAX_PENDING_CANDIDATES: Final = 64
#: Candidate strings remembered to drop relay duplicates (spec §2.1: JS sends on every relay).
#: Eviction: oldest first.
MAX_SEEN_CANDIDATES: Final = 256
#: Messages kept while no on_message handler is set. Eviction: oldest first.
MAX_EARLY_MESSAGES: Final = 256

# aiortc assumes this when the remote SDP has no a=max-message-size (RFC 8841 §6).
_REMOTE_DEFAULT_MAX_MESSAGE_SIZE: Final = 65536


# --------------------------------------------------------------------------- ICE host addresses

_UNSET: Final[Any] = object()
# Per-task override (Peer(host_addresses=...) and host_addresses()); _UNSET = use the process default.
_scoped_addresses: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "signaling_peer_host_addresses", default=_UNSET
)
_process_addresses: tuple[str, ...] | None = None
_active_scopes = 0


class _HostAddressesGetter(Protocol):
    """The signature of ``aioice.ice.get_host_addresses``, parameter names included."""

    def __call__(self, use_ipv4: bool, use_ipv6: bool) -> list[str]: ...


_original_get_host_addresses: _HostAddressesGetter | None = None


def _normalize_addresses(addrs: Iterable[str]) -> tuple[str, ...]:
    if isinstance(addrs, str):
        # A bare string would otherwise be split into characters.
        raise TypeError("host addresses must be a list of strings, not a string")
    out: list[str] = []
    for a in addrs:
        out.append(str(ipaddress.ip_address(a)))  # ValueError for anything that is not an IP
    return tuple(dict.fromkeys(out))


def _hooked_get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    addrs = _scoped_addresses.get()
    if addrs is _UNSET:
        addrs = _process_addresses
    if addrs is None:
        assert _original_get_host_addresses is not None
        return _original_get_host_addresses(use_ipv4, use_ipv6)
    # An address that is not on this machine is harmless: aioice logs the failed bind and skips it.
    return [
        a
        for a in addrs
        if (use_ipv4 and ipaddress.ip_address(a).version == 4)
        or (use_ipv6 and ipaddress.ip_address(a).version == 6)
    ]


def _install_hook() -> None:
    global _original_get_host_addresses
    if _original_get_host_addresses is None:
        _original_get_host_addresses = aioice.ice.get_host_addresses
        aioice.ice.get_host_addresses = _hooked_get_host_addresses


def _maybe_uninstall_hook() -> None:
    global _original_get_host_addresses
    if (
        _original_get_host_addresses is not None
        and _process_addresses is None
        and _active_scopes == 0
        # Leave a later patch by someone else (e.g. a test's mock.patch) alone.
        and aioice.ice.get_host_addresses is _hooked_get_host_addresses
    ):
        aioice.ice.get_host_addresses = _original_get_host_addresses
        _original_get_host_addresses = None


def restrict_host_addresses(addrs: Sequence[str] | None) -> tuple[str, ...] | None:
    """Set, process-wide, the host addresses aioice may gather ICE candidates from.

    ``addrs`` is a list of IP literals, e.g. ``["127.0.0.1"]`` (config ``ice_host_addresses``);
    ``[]`` gathers no host candidate at all; ``None`` restores aioice's own choice (all interfaces
    except loopback) and removes the hook. Returns the previous setting so callers can restore it.
    Affects connections that gather afterwards; per-connection and scoped settings
    (``Peer(host_addresses=...)``, :func:`host_addresses`) take precedence.

    Mechanism, and why: aioice 0.13 has no option for the addresses. ``Connection.gather_candidates``
    calls the module-level ``aioice.ice.get_host_addresses(use_ipv4, use_ipv6)``, looked up at call
    time, and that function is its only source of host addresses; the alternative hooks need aiortc
    privates (``RTCIceGatherer._connection``) and the name-mangled ``RTCPeerConnection`` SCTP
    transport. So the function is replaced once by a dispatcher that consults a ``ContextVar``
    (per task: the per-connection and scoped settings) and then this process default, and calls the
    original when neither is set, so unrestricted connections behave exactly as stock aioice.
    Gathering runs inside ``setLocalDescription()``; aiortc wraps it in ``asyncio.gather``, whose
    tasks copy the caller's context, so the per-task value reaches aioice.
    """
    global _process_addresses
    previous = _process_addresses
    _process_addresses = None if addrs is None else _normalize_addresses(addrs)
    if _process_addresses is None:
        _maybe_uninstall_hook()
    else:
        _install_hook()
    logger.debug("ICE host addresses (process-wide): %s", _process_addresses)
    return previous


def get_host_address_restriction() -> tuple[str, ...] | None:
    """The addresses aioice would gather from in the current context (``None`` = aioice's choice)."""
    addrs = _scoped_addresses.get()
    return _process_addresses if addrs is _UNSET else addrs


@contextlib.contextmanager
def host_addresses(addrs: Sequence[str] | None) -> Iterator[None]:
    """Scoped form of :func:`restrict_host_addresses`, for the current task (and tasks it starts).

    ``None`` inside the block means aioice's own choice, ignoring the process default.
    """
    global _active_scopes
    value = None if addrs is None else _normalize_addresses(addrs)
    _install_hook()
    _active_scopes += 1
    token = _scoped_addresses.set(value)
    try:
        yield
    finally:
        _scoped_addresses.reset(token)
        _active_scopes -= 1
        _maybe_uninstall_hook()


# --------------------------------------------------------------------------- ICE servers


IceServerLike = RTCIceServer | str | Mapping[str, Any]


def ice_servers_from_config(servers: Iterable[IceServerLike] | None) -> list[RTCIceServer]:
    """Convert config entries to aiortc's ``RTCIceServer`` list.

    Entries may be ``RTCIceServer``, a URL string, or a browser-style dict
    ``{"urls": str | [str], "username": ..., "credential": ...}`` (Trystero's ``turnConfig`` shape).
    ``None`` and ``[]`` both mean *no* STUN/TURN: we never fall back to aiortc's default Google STUN
    server, which aiortc uses when its ``iceServers`` is ``None``.
    """
    out: list[RTCIceServer] = []
    for s in servers or ():
        if isinstance(s, RTCIceServer):
            out.append(s)
        elif isinstance(s, str):
            out.append(RTCIceServer(urls=s))
        elif isinstance(s, Mapping):
            urls = s.get("urls")
            if not urls or not isinstance(urls, str | list):
                raise ValueError(f"ICE server entry without urls: {s!r}")
            out.append(RTCIceServer(urls=urls, username=s.get("username"), credential=s.get("credential")))
        else:
            raise TypeError(f"unsupported ICE server entry: {s!r}")
    urls = [u for s in out for u in ([s.urls] if isinstance(s.urls, str) else s.urls)]
    if sum(u.startswith("stun") for u in urls) > 1 or sum(u.startswith("turn") for u in urls) > 1:
        # aiortc's connection_kwargs() silently keeps only the first STUN and the first TURN URL.
        logger.info("aiortc uses only the first STUN and the first TURN server of %s", urls)
    return out


# --------------------------------------------------------------------------- remote candidates


@dataclass(frozen=True, slots=True)
class ParsedCandidate:
    """A remote candidate normalised from any of Trystero's message shapes.

    ``ice`` is ``None`` for end-of-candidates. ``key`` is the bare candidate attribute
    (``"<foundation> <component> ..."``), used to drop duplicates.
    """

    ice: RTCIceCandidate | None
    username_fragment: str | None = None
    key: str = ""

    @property
    def end_of_candidates(self) -> bool:
        return self.ice is None


def _strip_candidate_prefix(text: str) -> str:
    text = text.strip()
    # node-datachannel sends "a=candidate:...", browsers "candidate:..." (spec §2.1, §8.1).
    text = text.removeprefix("a=")
    return text.removeprefix("candidate:").strip()


def parse_candidate(candidate: Any) -> ParsedCandidate:
    """Parse a remote candidate as it comes out of a decrypted Trystero ``candidate`` message.

    Accepted shapes:

    * the init dict ``{"candidate": "candidate:...", "sdpMid": "0", "sdpMLineIndex": 0,
      "usernameFragment": "abcd"}`` (browsers) or with ``"a=candidate:..."`` and
      ``sdpMLineIndex: null`` (node-datachannel);
    * that dict as a JSON string (the decrypted plaintext, spec §2.1);
    * a bare candidate line, with or without ``a=`` / ``candidate:``;
    * an ``RTCIceCandidate``;
    * end-of-candidates: ``None``, an empty candidate string, or ``"a=end-of-candidates"``.

    Raises :class:`InvalidCandidate` for anything else.
    """
    if candidate is None:
        return ParsedCandidate(None)
    if isinstance(candidate, RTCIceCandidate):
        return ParsedCandidate(candidate, None, _candidate_key(candidate))
    mid: Any = None
    index: Any = None
    ufrag: Any = None
    if isinstance(candidate, str):
        stripped = candidate.strip()
        if stripped.startswith("{"):
            try:
                candidate = json.loads(stripped)
            except ValueError as e:
                raise InvalidCandidate(f"candidate JSON does not parse: {e}") from None
        else:
            candidate = {"candidate": stripped}
    if not isinstance(candidate, Mapping):
        raise InvalidCandidate(f"unsupported candidate shape: {type(candidate).__name__}")
    text = candidate.get("candidate")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise InvalidCandidate("candidate field is not a string")
    mid = candidate.get("sdpMid")
    index = candidate.get("sdpMLineIndex")
    ufrag = candidate.get("usernameFragment")
    if mid is not None and not isinstance(mid, str):
        raise InvalidCandidate("sdpMid is not a string")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
        raise InvalidCandidate("sdpMLineIndex is not a non-negative integer")
    if ufrag is not None and not isinstance(ufrag, str):
        raise InvalidCandidate("usernameFragment is not a string")

    bare = text.strip().removeprefix("a=")
    if bare in ("", "end-of-candidates"):
        return ParsedCandidate(None, ufrag or None)
    bare = _strip_candidate_prefix(bare)
    bits = bare.split()
    # aiortc's candidate_from_sdp only asserts, so check the shape ourselves (and survive -O).
    if len(bits) < 8 or bits[6] != "typ":
        raise InvalidCandidate(f"malformed candidate: {text!r}")
    try:
        ice = candidate_from_sdp(bare)
    except (ValueError, IndexError, AssertionError) as e:
        raise InvalidCandidate(f"malformed candidate: {text!r} ({e})") from None
    if mid is None and index is None:
        # A data-only Trystero SDP has a single m-line, so index 0 is the only sensible target.
        index = 0
    ice.sdpMid = mid
    ice.sdpMLineIndex = index
    return ParsedCandidate(ice, ufrag or None, " ".join(bits))


def _candidate_key(c: RTCIceCandidate) -> str:
    return f"{c.foundation} {c.component} {c.protocol} {c.priority} {c.ip} {c.port} typ {c.type}"


# --------------------------------------------------------------------------- SDP checks


@dataclass(frozen=True, slots=True)
class _RemoteInfo:
    ufrag: str | None
    max_message_size: int  # 0 = the remote accepts any size
    # aiortc ignores every trickled candidate once the remote SDP carried a=end-of-candidates.
    end_of_candidates: bool


def _check_remote_sdp(sdp: Any, kind: str) -> _RemoteInfo:
    """Reject SDP aiortc would accept silently (it answers garbage with an empty answer)."""
    if not isinstance(sdp, str) or not sdp.strip():
        raise InvalidDescription(f"{kind} SDP is empty or not a string")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as e:
        raise InvalidDescription(f"{kind} SDP does not parse: {type(e).__name__}: {e}") from None
    for media in parsed.media:
        if media.kind != "application" or "SCTP" not in media.profile:
            continue
        if media.port == 0:
            raise InvalidDescription(f"{kind} rejects the data channel (port 0)")
        if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
            raise InvalidDescription(f"{kind} SDP has no ICE ufrag/pwd")
        if media.dtls is None or not media.dtls.fingerprints:
            raise InvalidDescription(f"{kind} SDP has no DTLS fingerprint or setup role")
        mms = (
            media.sctpCapabilities.maxMessageSize
            if media.sctpCapabilities is not None
            else _REMOTE_DEFAULT_MAX_MESSAGE_SIZE
        )
        return _RemoteInfo(media.ice.usernameFragment, mms, media.ice_candidates_complete)
    raise InvalidDescription(f"{kind} SDP has no data channel (m=application ... SCTP) section")


def _sha256_fingerprint_only(sdp: str) -> str:
    """Drop the sha-384/sha-512 fingerprints aiortc adds after its sha-256 one.

    libdatachannel 0.24.5 (inside node-datachannel 0.33.4, Trystero's stack in Node) keeps only the
    *last* a=fingerprint line, and it stores a remote description only after handing it to its ICE
    agent. When it offers and we answer, our ICE checks reach it before our answer does; its ICE
    then connects inside setRemoteDescription(), the DTLS transport starts before the description is
    stored, keeps the default verifier algorithm (sha-256), and rejects our certificate because the
    description says sha-512 ("DTLS alert: unknown CA", about 1 in 4 answers on loopback).
    Browsers advertise sha-256 only, so we do the same; the verification itself comes a round trip
    later and normally finds the description stored (it can still lose that race under heavy CPU
    load). aiortc keeps its own copy of the description and still checks the remote's certificate
    with whatever algorithm the remote advertises.
    """
    lines = sdp.split("\r\n")
    if not any(line.startswith("a=fingerprint:sha-256 ") for line in lines):
        return sdp
    kept = [
        line
        for line in lines
        if not line.startswith("a=fingerprint:") or line.startswith("a=fingerprint:sha-256 ")
    ]
    return "\r\n".join(kept)


# --------------------------------------------------------------------------- Peer


MessageHandler = Callable[[bytes | str], None]


class Peer:
    """One ``RTCPeerConnection`` with one data channel, as Trystero builds it.

    Must be created inside a running event loop. Negotiation::

        offerer = Peer(initiator=True, host_addresses=["127.0.0.1"])
        offer_sdp = await offerer.create_offer()          # complete SDP, see module docstring
        answerer = Peer(initiator=False, host_addresses=["127.0.0.1"])
        answer_sdp = await answerer.accept_offer(offer_sdp)
        await offerer.accept_answer(answer_sdp)
        await offerer.add_remote_candidate(...)            # any time, also before accept_answer

    A remote SDP that is unusable raises :class:`InvalidDescription` and closes the peer (its
    sockets and tasks are released), since neither Trystero side can recover such a connection.

    Callbacks (constructor arguments or attributes; plain functions, called on the event loop;
    exceptions are logged, not propagated into aiortc):

    * ``on_open()`` once, when the data channel opens.
    * ``on_message(data)`` for each message: ``bytes`` for binary messages (what Trystero sends),
      ``str`` for text messages, passed through unconverted. Trystero drops text frames (a string
      is never a valid frame, spec §6.2); converting them to bytes would hide that and could make
      text look like a frame, so the wire layer sees the type and decides. Messages that arrive
      while no handler is set are kept (at most :data:`MAX_EARLY_MESSAGES`, oldest dropped) and
      delivered when one is assigned.
    * ``on_close()`` exactly once when the peer is finished for any reason: the channel closed,
      the connection ``failed``/``closed``, or :meth:`close` was called. :attr:`close_reason` says
      which. The ``RTCPeerConnection`` is then closed too (Trystero tears down on channel close).
      aiortc has no ``disconnected`` state; a silent remote is detected by aioice's consent checks
      (about 30 s), so owners should keep Trystero's own timers.
    """

    def __init__(
        self,
        initiator: bool,
        *,
        ice_servers: Iterable[IceServerLike] | None = None,
        host_addresses: Sequence[str] | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        buffer_high: int = DEFAULT_BUFFER_HIGH,
        buffer_low: int = DEFAULT_BUFFER_LOW,
        on_open: Callable[[], None] | None = None,
        on_message: MessageHandler | None = None,
        on_close: Callable[[], None] | None = None,
        name: str = "",
    ) -> None:
        if not 0 <= buffer_low < buffer_high:
            raise ValueError("need 0 <= buffer_low < buffer_high")
        if max_message_size <= 0:
            raise ValueError("max_message_size must be positive")
        self.initiator: Final = initiator
        self.name = name or hex(id(self))
        self.on_open = on_open
        self.on_close = on_close
        self._on_message = on_message
        self._host_addresses = None if host_addresses is None else _normalize_addresses(host_addresses)
        self._max_message_size = max_message_size
        self._buffer_high = buffer_high
        self._buffer_low = buffer_low

        sctp_ack.install()  # acknowledge every second packet, not each one (signaling.sctp_ack)
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=ice_servers_from_config(ice_servers)))
        self._pc.on("connectionstatechange", self._on_connection_state)
        self._channel: RTCDataChannel | None = None
        self._remote: _RemoteInfo | None = None
        self._offer_created = False
        self._negotiating = False
        self._pending_candidates: list[ParsedCandidate] = []
        self._seen_candidates: dict[str, None] = {}
        self._early_messages: deque[bytes | str] = deque(maxlen=MAX_EARLY_MESSAGES)
        self._opened = asyncio.Event()
        self._finished = asyncio.Event()
        self._low = asyncio.Event()
        self._close_reason: str | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._pc_closed = False

        if initiator:
            # Exactly Trystero's createDataChannel("data"): aiortc's defaults are the W3C ones.
            self._attach_channel(
                self._pc.createDataChannel(DATA_CHANNEL_LABEL, ordered=True, negotiated=False)
            )
        else:
            self._pc.on("datachannel", self._on_datachannel)

    # ------------------------------------------------------------------ state

    @property
    def connection_state(self) -> str:
        """aiortc's ``connectionState``: new, connecting, connected, failed or closed."""
        return self._pc.connectionState

    @property
    def ice_connection_state(self) -> str:
        return self._pc.iceConnectionState

    @property
    def channel_state(self) -> str:
        """``readyState`` of the data channel, or ``"none"`` before the answerer receives it."""
        return self._channel.readyState if self._channel is not None else "none"

    @property
    def is_open(self) -> bool:
        return self._channel is not None and self._channel.readyState == "open" and not self.closed

    @property
    def closed(self) -> bool:
        return self._finished.is_set()

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    @property
    def channel(self) -> RTCDataChannel | None:
        """The underlying aiortc channel, for diagnostics (label, id, ordered)."""
        return self._channel

    @property
    def max_message_size(self) -> int:
        """Largest message :meth:`send` accepts: ours, capped by the remote's a=max-message-size."""
        remote = self._remote.max_message_size if self._remote is not None else 0
        return min(self._max_message_size, remote) if remote else self._max_message_size

    @property
    def buffered_amount(self) -> int:
        return self._channel.bufferedAmount if self._channel is not None else 0

    @property
    def pending_candidate_count(self) -> int:
        return len(self._pending_candidates)

    def remote_candidates(self) -> list[RTCIceCandidate]:
        """Remote candidates ICE knows (from the SDP and from add_remote_candidate), for diagnostics."""
        sctp = self._pc.sctp
        if sctp is None:
            return []
        return sctp.transport.transport.getRemoteCandidates()

    def local_candidates(self) -> list[RTCIceCandidate]:
        """Local candidates gathered so far (all of them once create_offer/accept_offer returned)."""
        sctp = self._pc.sctp
        if sctp is None:
            return []
        return sctp.transport.transport.iceGatherer.getLocalCandidates()

    @property
    def local_description(self) -> str | None:
        d = self._pc.localDescription
        return _sha256_fingerprint_only(d.sdp) if d is not None else None

    @property
    def on_message(self) -> MessageHandler | None:
        return self._on_message

    @on_message.setter
    def on_message(self, handler: MessageHandler | None) -> None:
        self._on_message = handler
        while handler is not None and self._early_messages and self._on_message is handler:
            self._deliver(self._early_messages.popleft())

    async def wait_open(self) -> None:
        """Wait until the channel is open; raises :class:`ChannelNotOpen` if the peer finishes first.

        Has no timeout of its own: wrap it in ``asyncio.timeout()``.
        """
        if self._opened.is_set() and not self.closed:
            return
        opened = asyncio.ensure_future(self._opened.wait())
        finished = asyncio.ensure_future(self._finished.wait())
        try:
            await asyncio.wait({opened, finished}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
            finished.cancel()
        if self.closed or not self._opened.is_set():
            raise ChannelNotOpen(f"peer closed before the channel opened ({self._close_reason})")

    async def wait_closed(self) -> None:
        """Wait until the peer is finished and its connection released."""
        await self._finished.wait()
        if self._close_task is not None:
            await asyncio.shield(self._close_task)

    # ------------------------------------------------------------------ negotiation

    async def create_offer(self) -> str:
        """Create the offer and gather all local candidates; returns the complete offer SDP."""
        if not self.initiator:
            raise PeerError("create_offer() needs initiator=True")
        self._check_usable()
        if self._offer_created:
            raise PeerError("offer already created")
        self._offer_created = True
        try:
            with self._address_scope():
                await self._pc.setLocalDescription(await self._pc.createOffer())
        except BaseException:
            await self.close("offer failed")
            raise
        return _sha256_fingerprint_only(self._pc.localDescription.sdp)

    async def accept_offer(self, sdp: str) -> str:
        """Apply a remote offer and return the complete answer SDP (all candidates included)."""
        if self.initiator:
            raise PeerError("accept_offer() needs initiator=False")
        self._check_usable()
        if self._negotiating or self._remote is not None:
            raise PeerError("offer already accepted")
        self._negotiating = True
        try:
            await self._apply_remote(sdp, "offer")
            with self._address_scope():
                await self._pc.setLocalDescription(await self._pc.createAnswer())
        except InvalidDescription:
            raise
        except BaseException:
            await self.close("answer failed")
            raise
        finally:
            self._negotiating = False
        return _sha256_fingerprint_only(self._pc.localDescription.sdp)

    async def accept_answer(self, sdp: str) -> None:
        """Apply the remote answer to our offer."""
        if not self.initiator:
            raise PeerError("accept_answer() needs initiator=True")
        self._check_usable()
        if not self._offer_created or self._pc.localDescription is None:
            raise PeerError("accept_answer() before create_offer()")
        if self._negotiating or self._remote is not None:
            raise PeerError("answer already accepted")
        self._negotiating = True
        try:
            await self._apply_remote(sdp, "answer")
        finally:
            self._negotiating = False

    async def _apply_remote(self, sdp: str, kind: str) -> None:
        try:
            info = _check_remote_sdp(sdp, kind)
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        except InvalidDescription as e:
            await self.close(f"invalid remote {kind}")
            raise e from None
        except Exception as e:
            await self.close(f"invalid remote {kind}")
            raise InvalidDescription(f"remote {kind} rejected by aiortc: {type(e).__name__}: {e}") from e
        self._remote = info
        pending, self._pending_candidates = self._pending_candidates, []
        for c in pending:
            await self._add_parsed(c)

    @contextlib.contextmanager
    def _address_scope(self) -> Iterator[None]:
        if self._host_addresses is None:
            yield
        else:
            with host_addresses(self._host_addresses):
                yield

    def _check_usable(self) -> None:
        if self.closed:
            raise ChannelNotOpen(f"peer is closed ({self._close_reason})")

    # ------------------------------------------------------------------ remote candidates

    async def add_remote_candidate(self, candidate: Any) -> bool:
        """Add one remote candidate in any shape :func:`parse_candidate` accepts.

        Candidates that arrive before the remote description are buffered (spec §2.2: the answer
        and the first candidates come in either order), up to :data:`MAX_PENDING_CANDIDATES`.
        Duplicates (the same candidate over several relays) and candidates whose
        ``usernameFragment`` belongs to another ICE session are dropped. End-of-candidates is
        ignored: Trystero never sends it, and relays reorder, so honouring it could make aioice
        drop a real candidate arriving late by another relay; a silent failure is detected by the
        owner's timeout instead. Returns ``True`` if the candidate was added or buffered, ``False``
        if it was dropped. Malformed candidates are logged and dropped, never raised: they come
        from the network.
        """
        if self.closed:
            return False
        try:
            parsed = parse_candidate(candidate)
        except InvalidCandidate as e:
            logger.warning("peer %s: dropping remote candidate: %s", self.name, e)
            return False
        if parsed.end_of_candidates:
            logger.debug("peer %s: ignoring end-of-candidates", self.name)
            return False
        # The ufrag is part of the key: the same address may legitimately come back for a new ICE session.
        key = f"{parsed.username_fragment or ''} {parsed.key}"
        if key in self._seen_candidates:
            return False
        if self._remote is None:
            if len(self._pending_candidates) >= MAX_PENDING_CANDIDATES:
                logger.warning("peer %s: candidate buffer full, dropping %s", self.name, parsed.key)
                return False
            self._remember(key)
            self._pending_candidates.append(parsed)
            return True
        self._remember(key)
        return await self._add_parsed(parsed)

    def _remember(self, key: str) -> None:
        self._seen_candidates[key] = None
        while len(self._seen_candidates) > MAX_SEEN_CANDIDATES:
            del self._seen_candidates[next(iter(self._seen_candidates))]

    async def _add_parsed(self, parsed: ParsedCandidate) -> bool:
        assert self._remote is not None and parsed.ice is not None
        if parsed.username_fragment and self._remote.ufrag and parsed.username_fragment != self._remote.ufrag:
            logger.debug("peer %s: candidate for another ICE session dropped", self.name)
            return False
        if self.closed:
            return False
        if self._remote.end_of_candidates:
            # aiortc would accept the call and silently ignore the candidate; say so instead.
            logger.debug("peer %s: remote SDP ended its candidates, ignoring %s", self.name, parsed.key)
            return False
        try:
            await self._pc.addIceCandidate(parsed.ice)
        except Exception as e:
            logger.warning("peer %s: aiortc refused candidate %s: %s", self.name, parsed.key, e)
            return False
        logger.debug("peer %s: remote candidate %s", self.name, parsed.key)
        return True

    # ------------------------------------------------------------------ data

    def send_nowait(self, data: bytes | bytearray | memoryview) -> None:
        """Queue one binary message without waiting; for small control messages.

        Raises :class:`ChannelNotOpen`, :class:`MessageTooLarge` or ``TypeError`` (``str`` is
        refused: Trystero drops text frames, spec §8.5).
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"send() takes bytes, not {type(data).__name__}")
        ch = self._channel
        if ch is None or ch.readyState != "open" or self.closed:
            raise ChannelNotOpen(f"data channel is {self.channel_state}")
        payload = bytes(data)
        if len(payload) > self.max_message_size:
            raise MessageTooLarge(f"message of {len(payload)} bytes > limit {self.max_message_size}")
        ch.send(payload)

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send one binary message, first waiting for the send buffer to drain if it is full.

        Memory stays bounded by ``buffer_high`` plus one message however much a caller sends.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"send() takes bytes, not {type(data).__name__}")
        payload = bytes(data)  # no copy for bytes; gives len() in bytes for any memoryview
        if len(payload) > self.max_message_size:
            raise MessageTooLarge(f"message of {len(payload)} bytes > limit {self.max_message_size}")
        if self.buffered_amount + len(payload) > self._buffer_high:
            await self.drain()
        self.send_nowait(payload)

    async def drain(self) -> None:
        """Wait until aiortc's ``bufferedAmount`` is at most ``buffer_low``.

        Raises :class:`ChannelNotOpen` if the channel closes meanwhile. No timeout of its own.
        """
        while True:
            ch = self._channel
            if ch is None or ch.readyState != "open" or self.closed:
                raise ChannelNotOpen(f"data channel is {self.channel_state}")
            if ch.bufferedAmount <= self._buffer_low:
                return
            self._low.clear()
            await self._low.wait()

    # ------------------------------------------------------------------ closing

    async def close(self, reason: str = "closed locally") -> None:
        """Close the channel and the connection; idempotent. Fires ``on_close`` if not yet fired."""
        self._finish(reason)
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._close_task)

    async def _shutdown(self) -> None:
        ch = self._channel
        if ch is not None and ch.readyState not in ("closing", "closed"):
            ch.close()
        if not self._pc_closed:
            self._pc_closed = True
            await self._pc.close()
        self._pending_candidates.clear()
        self._early_messages.clear()

    def _finish(self, reason: str) -> None:
        if self._finished.is_set():
            return
        self._close_reason = reason
        self._finished.set()
        self._low.set()  # wake drain() so it raises
        logger.debug("peer %s: finished (%s)", self.name, reason)
        self._call(self.on_close)

    def _remote_gone(self, reason: str) -> None:
        # Called from aiortc's event emitters (sync): finish now, release the PC in a task.
        self._finish(reason)
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._shutdown())

    # ------------------------------------------------------------------ aiortc events

    def _on_connection_state(self) -> None:
        state = self._pc.connectionState
        logger.debug("peer %s: connection %s", self.name, state)
        if state in ("failed", "closed"):
            self._remote_gone(f"connection {state}")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if self._channel is not None:
            # Trystero tracks a single channel; a second one is not ours to serve.
            logger.warning("peer %s: ignoring extra data channel %r", self.name, channel.label)
            return
        if channel.label != DATA_CHANNEL_LABEL:
            logger.info(
                "peer %s: remote channel label %r (Trystero uses %r)",
                self.name,
                channel.label,
                DATA_CHANNEL_LABEL,
            )
        self._attach_channel(channel)

    def _attach_channel(self, channel: RTCDataChannel) -> None:
        self._channel = channel
        channel.bufferedAmountLowThreshold = self._buffer_low
        channel.on("open", self._on_channel_open)
        channel.on("message", self._deliver)
        channel.on("close", self._on_channel_close)
        channel.on("bufferedamountlow", self._low.set)
        if channel.readyState == "open":
            # aiortc emits "datachannel" after the channel is already open.
            self._on_channel_open()

    def _on_channel_open(self) -> None:
        if self._opened.is_set() or self.closed:
            return
        self._opened.set()
        channel = self._channel
        assert channel is not None  # this handler is registered by _attach_channel, which sets it
        logger.debug("peer %s: channel %r open (id %s)", self.name, channel.label, channel.id)
        self._call(self.on_open)

    def _on_channel_close(self) -> None:
        self._remote_gone("channel closed")

    def _deliver(self, data: bytes | str) -> None:
        handler = self._on_message
        if handler is None:
            if len(self._early_messages) == self._early_messages.maxlen:
                logger.warning("peer %s: no message handler, dropping oldest early message", self.name)
            self._early_messages.append(data)
            return
        self._call(handler, data)

    def _call(self, fn: Callable[..., Any] | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            # An exception here would unwind into aiortc's SCTP receive path.
            logger.exception("peer %s: callback %r failed", self.name, fn)

    def __repr__(self) -> str:
        role = "offerer" if self.initiator else "answerer"
        return f"<Peer {self.name} {role} conn={self.connection_state} channel={self.channel_state}>"
