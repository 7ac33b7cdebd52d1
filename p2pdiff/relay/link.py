"""One client of the relay, whatever protocol it speaks: where its frames go, and how much may wait.

Every link has a bounded outbox: :meth:`ClientLink.send` never blocks, never awaits, and never lets
more than ``outbox_bytes`` wait for the client. A frame that would pass the bound drops the link as
a slow reader instead; the hub's fan-out therefore costs a publisher the same whether a subscriber
reads or not.

:class:`WebSocketClientLink` writes the frames one loop turn gathered for a socket with one
``transport.write``: a fan-out burst costs one system call per subscriber instead of one per frame
(aiohttp's ``send_str`` writes each frame on its own, which made the send call most of the relay's
time under load). The frames are made by the ``websockets`` library's sans-I/O frame encoder
(unmasked, as a server sends them, with no extension: the socket is prepared with
``compress=False``), so no WebSocket framing is written here. What waits counts as the frames of
this turn plus the transport's unsent bytes, so the bound covers everything the process holds for
the client; aiohttp still writes its own control frames (pings, pongs, the close), always whole
frames, on the same loop.

:class:`LocalClientLink` is a client in this process (the helper): frames reach its callback
through ``loop.call_soon``, so a delivery never runs inside the publisher's call, under the same
bound.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

from aiohttp import WSCloseCode, web
from websockets.frames import Frame, Opcode

from p2pdiff.relay.metrics import RelayMetrics
from signaling.background import BackgroundTasks

__all__ = [
    "LOCAL_ADDRESS",
    "ClientLink",
    "LocalClientLink",
    "LocalConnection",
    "Session",
    "WebSocketClientLink",
    "text_frame",
]

log = logging.getLogger(__name__)

#: The address of in-process clients (exempt from the per-address limits and the idle check).
LOCAL_ADDRESS = "local"
# How long a closing socket gets to exchange close frames before its TCP connection is cut.
CLOSE_SECONDS = 2.0


def text_frame(text: str) -> bytes:
    """One unmasked, unfragmented WebSocket text frame, as a server sends it (RFC 6455 §5.2)."""
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=False)


class ClientLink(ABC):
    """One client connection (see the module docstring)."""

    def __init__(self, address: str, protocol: str, outbox_bytes: int, metrics: RelayMetrics) -> None:
        #: The client's address (``[server] trusted_proxy_header`` applied), or "local".
        self.address = address
        self.protocol = protocol
        self.closed = False
        #: Called once (soon, never inside :meth:`close`) when the link closes, for whichever reason.
        self.on_closed: Callable[[], None] | None = None
        self._outbox_limit = outbox_bytes
        self._metrics = metrics
        #: Loop time of the client's last frame (the idle check reads it).
        self.last_heard = asyncio.get_running_loop().time()

    @property
    @abstractmethod
    def backlog(self) -> int:
        """Bytes handed to :meth:`send` that the client has not taken yet (as far as we hold them)."""

    def send(self, frame: str) -> bool:
        """Queue ``frame`` for the client; False if the link is closed or was just dropped for it."""
        if self.closed:
            return False
        if self.backlog + len(frame) > self._outbox_limit:
            self.drop("slow_reader", WSCloseCode.POLICY_VIOLATION, "slow reader: too many frames unread")
            return False
        self._enqueue(frame)
        return True

    def drop(self, reason: str, code: int, text: str) -> None:
        """Close the link on the relay's initiative, counted under ``reason``."""
        if self.closed:
            return
        self._metrics.dropped[self.protocol, reason] += 1
        self.close(code, text)

    def close(self, code: int = WSCloseCode.OK, reason: str = "") -> None:
        """Stop sending (what waits is discarded) and close the connection. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._shut(code, reason)
        if self.on_closed is not None:
            asyncio.get_running_loop().call_soon(self.on_closed)

    @abstractmethod
    def _enqueue(self, frame: str) -> None:
        """Hand one frame on towards the client."""

    @abstractmethod
    def _shut(self, code: int, reason: str) -> None:
        """Close the underlying connection (without waiting for it)."""


class WebSocketClientLink(ClientLink):
    """A client on a prepared aiohttp WebSocket (``compress=False``), written once per loop turn."""

    def __init__(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        address: str,
        protocol: str,
        outbox_bytes: int,
        metrics: RelayMetrics,
        tasks: BackgroundTasks,
    ) -> None:
        super().__init__(address, protocol, outbox_bytes, metrics)
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("the client is gone")
        self._transport = transport
        self._ws = ws
        self._tasks = tasks
        self._loop = asyncio.get_running_loop()
        self._frames: list[bytes] = []
        self._frame_bytes = 0
        self._flush_handle: asyncio.Handle | None = None

    @property
    def backlog(self) -> int:
        return self._frame_bytes + self._transport.get_write_buffer_size()

    def _enqueue(self, frame: str) -> None:
        data = text_frame(frame)
        self._frames.append(data)
        self._frame_bytes += len(data)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        frames, self._frames, self._frame_bytes = self._frames, [], 0
        if self._transport.is_closing():  # the client went away; the reader sees it too
            self.close(WSCloseCode.ABNORMAL_CLOSURE)
            return
        self._transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def _shut(self, code: int, reason: str) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._frames, self._frame_bytes = [], 0
        self._tasks.spawn(self._close_socket(code, reason), "relay: closing %s", self.address)

    async def _close_socket(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                await self._ws.close(code=code, message=reason.encode()[:120])
            return
        except (TimeoutError, ConnectionError):
            pass
        # A client that reads nothing never takes the close frame, and a plain close of the
        # transport would hold its unsent bytes until it does.
        self._transport.abort()


class Session(Protocol):
    """A protocol session of one client: what a :class:`LocalConnection` feeds frames to."""

    def handle(self, text: str) -> None: ...

    def binary(self) -> None:
        """A binary frame from the client (every protocol of the relay speaks text)."""

    def end(self) -> None: ...


class LocalClientLink(ClientLink):
    """A client in this process: frames go to ``on_text`` via ``loop.call_soon``; ``on_lost`` is
    called once if the relay closes the link (a drop, a shutdown), not when the client closes it."""

    def __init__(
        self,
        on_text: Callable[[str], None],
        on_lost: Callable[[], None],
        protocol: str,
        outbox_bytes: int,
        metrics: RelayMetrics,
    ) -> None:
        super().__init__(LOCAL_ADDRESS, protocol, outbox_bytes, metrics)
        self._on_text = on_text
        self._on_lost: Callable[[], None] | None = on_lost
        self._loop = asyncio.get_running_loop()
        self._waiting = 0

    @property
    def backlog(self) -> int:
        return self._waiting

    def _enqueue(self, frame: str) -> None:
        self._waiting += len(frame)
        self._loop.call_soon(self._deliver, frame)

    def _deliver(self, frame: str) -> None:
        if self.closed:
            return
        self._waiting -= len(frame)
        try:
            self._on_text(frame)
        except Exception:  # the client's bug must not end the relay's turn
            log.exception("relay: the in-process client failed to take a frame")

    def _shut(self, code: int, reason: str) -> None:
        self._waiting = 0
        lost, self._on_lost = self._on_lost, None
        if lost is not None:
            self._loop.call_soon(lost)

    def close_by_client(self) -> None:
        """The client itself closes: it is not told it lost the link."""
        self._on_lost = None
        self.close()


class LocalConnection:
    """What :meth:`p2pdiff.relay.RelayServer.connect_local` returns: the client's end."""

    def __init__(self, link: LocalClientLink, session: Session) -> None:
        self._link = link
        self._session = session

    @property
    def closed(self) -> bool:
        return self._link.closed

    def receive(self, frame: str) -> None:
        """A frame from the client, handled at once (answers arrive later, via ``on_text``)."""
        if not self._link.closed:
            self._session.handle(frame)

    def close(self) -> None:
        self._link.close_by_client()
