"""Servers in this process: a relay client reaches them without a socket.

A program that hosts a signaling server itself (p2pdiff hosts a nostr relay) and is also a client
of it (its helper joins rooms whose relay is that server) registers the server here under the URLs
clients name it by. :func:`make_link` then gives a client of such a URL a :class:`LocalLink`
instead of a :class:`~signaling.relays.base.WebSocketLink`: the same text frames, handed over in
memory. The owner (a nostr relay client, a tracker client) cannot tell the difference, and needs
none: it connects, reconnects, backs off and bounds its outbox exactly as over a socket.

What "like a socket" means here:

* ``open`` asks the registered server for a connection (:meth:`LocalServer.connect_local`); no
  server registered under the URL (any more), or one that refuses, fails the attempt with
  ``ConnectionRefusedError``, and the owner retries with its usual backoff.
* Frames cross in both directions through ``loop.call_soon``, never inside the caller's call: a
  server answering within ``receive`` does not re-enter its client, nor a client answering within
  ``on_text`` its server, just as with a socket in between.
* The server closing the connection (idle, a slow reader, its own shutdown) reaches the owner as
  ``on_lost`` after the frames sent before it; a frame over ``max_msg_size`` drops the connection
  as aiohttp does.
* Bounds: the owner bounds the outbox by ``backlog`` as it does over a socket; the server bounds
  what it sends (it drops a client it cannot deliver to); the inbox, which only holds what arrived
  since the last pump, is bounded by ``inbox_chars`` all the same, and overflowing it drops the
  connection.

URLs are normalised (:func:`normalise_url`) before they are looked up, so ``ws://Host:80/nostr/``
names the same server as ``ws://host/nostr``. The registry is process-wide; one URL belongs to
one server at a time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import Protocol

from .base import _READ_YIELD_EVERY, Link, WebSocketLink, describe, redact_url

__all__ = [
    "LocalConnection",
    "LocalLink",
    "LocalServer",
    "lookup",
    "make_link",
    "normalise_url",
    "register",
    "unregister",
]

log = logging.getLogger(__name__)

_DEFAULT_PORTS = {"ws": 80, "wss": 443, "http": 80, "https": 443}
# What may wait between two pumps: far more than one loop iteration of any real server's traffic.
DEFAULT_INBOX_CHARS = 8 * 1024 * 1024


class LocalConnection(Protocol):
    """The server's side of one in-process client."""

    def receive(self, frame: str) -> None:
        """One text frame from the client. Never raises."""

    def close(self) -> None:
        """The client hangs up. Idempotent, never raises; ``on_lost`` is not called for it."""


class LocalServer(Protocol):
    """A server that takes in-process clients."""

    def connect_local(self, on_text: Callable[[str], None], on_lost: Callable[[], None]) -> LocalConnection:
        """A new client connection: the server sends it frames with ``on_text`` and hangs up with
        ``on_lost``. Raises ``ConnectionError`` when it takes no more clients (full, stopping)."""
        ...


_servers: dict[str, LocalServer] = {}


def normalise_url(url: str) -> str:
    """``url`` as a registry key: scheme and host in lower case, no default port, no user info,
    no trailing slash, no fragment. Raises ``ValueError`` for a URL without a usable host or port."""
    parts = urllib.parse.urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = parts.hostname  # lower case, IPv6 brackets removed
    if not host:
        raise ValueError(f"no host in {url!r}")
    port = parts.port
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc += f":{port}"
    return urllib.parse.urlunsplit((scheme, netloc, parts.path.rstrip("/"), parts.query, ""))


def register(url: str, server: LocalServer) -> None:
    """Clients of ``url`` made from now on reach ``server`` in process. Raises ``ValueError`` if
    another server holds the URL."""
    key = normalise_url(url)
    held = _servers.get(key)
    if held is not None and held is not server:
        raise ValueError(f"{key} is already served in this process by {held!r}")
    _servers[key] = server


def unregister(url: str, server: LocalServer) -> None:
    """``server`` no longer takes clients under ``url`` (another server's registration stays)."""
    key = normalise_url(url)
    if _servers.get(key) is server:
        del _servers[key]


def lookup(url: str) -> LocalServer | None:
    """The server registered under ``url``, if any."""
    try:
        return _servers.get(normalise_url(url))
    except ValueError:  # not a URL anything could be registered under
        return None


class LocalLink(Link):
    """A :class:`~signaling.relays.base.Link` to the server registered under its URL (see the
    module docstring). One pump, scheduled with ``call_soon`` whenever there is work, hands the
    outbox to the server and the inbox to the owner (yielding every ``_READ_YIELD_EVERY`` frames),
    then reports a loss."""

    def __init__(
        self,
        url: str,
        *,
        peer: str,
        logger: logging.Logger,
        max_msg_size: int,
        on_text: Callable[[str], None],
        on_lost: Callable[[], None],
        on_drained: Callable[[], None] | None = None,
        inbox_chars: int = DEFAULT_INBOX_CHARS,
    ) -> None:
        super().__init__(url, logger=logger)
        self._peer = peer
        self._max_msg_size = max_msg_size
        self._inbox_limit = inbox_chars
        self._on_text = on_text
        self._on_lost = on_lost
        # Called whenever the outbox runs empty; frames it sends are handed over before going idle.
        self._on_drained = on_drained
        self._conn: LocalConnection | None = None
        # Identifies the open connection to its callbacks: those of a dropped one find it changed.
        self._token: object | None = None
        self._inbox: deque[str] = deque()
        self._inbox_chars = 0
        self._lost = False  # the server hung up (or failed); the owner hears it after the inbox
        self._lost_told = False  # the owner heard it (once: it may drop the link later)
        self._pump_handle: asyncio.Handle | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def open(self) -> None:
        server = lookup(self._url)
        if server is None:
            raise ConnectionRefusedError(f"no {self._peer} in this process at {self._name} (any more)")
        token = object()
        self._token = token
        self._lost = self._lost_told = False
        self._inbox.clear()
        self._inbox_chars = 0
        try:
            conn = server.connect_local(
                functools.partial(self._received, token), functools.partial(self._hung_up, token)
            )
        except BaseException:
            self._token = None
            raise
        self._conn = conn
        self._connection_opened()
        if self._inbox or self._lost:  # the server spoke (or hung up) while it took us in
            self._schedule_pump()

    def _wake_writer(self) -> None:
        self._schedule_pump()

    def drop(self) -> bool:
        conn, self._conn = self._conn, None
        self._token = None
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None
        self._inbox.clear()
        self._inbox_chars = 0
        self._connection_dropped()
        if conn is not None and not self._lost:
            try:
                conn.close()
            except Exception:
                self._log.exception("%s: the %s failed to close our connection", self._name, self._peer)
        return conn is not None

    async def release(self) -> None:
        """Nothing closes in the background: ``drop`` hung up at once."""

    # ------------------------------------------------------------------ the server's callbacks

    def _received(self, token: object, frame: str) -> None:
        if token is not self._token or self._lost:
            return
        self._inbox.append(frame)
        self._inbox_chars += len(frame)
        if self._inbox_chars > self._inbox_limit:
            self._log.info(
                "%s: more than %d characters from the %s waiting; dropping the connection",
                self._name,
                self._inbox_limit,
                self._peer,
            )
            self._hang_up()
            return
        self._schedule_pump()

    def _hung_up(self, token: object) -> None:
        if token is not self._token or self._lost:
            return
        self._log.info("%s: connection closed by the %s", self._name, self._peer)
        self._lost = True
        self._schedule_pump()

    # ------------------------------------------------------------------ internals

    def _hang_up(self) -> None:
        """We end the connection (the server misbehaved): the server hears ``close``, the owner
        ``on_lost`` after what arrived before."""
        conn = self._conn
        self._lost = True
        self._inbox.clear()
        self._inbox_chars = 0
        if conn is not None:
            try:
                conn.close()
            except Exception:
                self._log.exception("%s: the %s failed to close our connection", self._name, self._peer)
        self._schedule_pump()

    def _schedule_pump(self) -> None:
        if self._pump_handle is None and self._conn is not None:
            self._pump_handle = asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_handle = None
        conn = self._conn
        if conn is None:
            return
        self._write(conn)
        handled = 0
        while self._inbox and self._conn is conn:
            frame = self._inbox.popleft()
            self._inbox_chars -= len(frame)
            if len(frame) > self._max_msg_size and len(frame.encode()) > self._max_msg_size:
                self._log.info(
                    "%s: a frame from the %s over %d bytes; dropping the connection",
                    self._name,
                    self._peer,
                    self._max_msg_size,
                )
                self._hang_up()
                break
            try:
                self._on_text(frame)
            except Exception:
                self._log.exception("%s: reader failed; dropping the connection", self._name)
                self._hang_up()
                break
            handled += 1
            if handled == _READ_YIELD_EVERY:  # a flooding server must not starve the loop
                self._schedule_pump()
                return
        if self._lost and self._conn is conn and not self._lost_told:
            self._lost_told = True
            self._on_lost()

    def _write(self, conn: LocalConnection) -> None:
        """Hand the outbox to the server (to nobody once it hung up), then report it idle."""
        while True:
            while self._outbox and self._conn is conn:
                frame = self._take()
                if self._lost:
                    continue  # a socket the server closed takes no more frames either
                try:
                    conn.receive(frame)
                except Exception as exc:
                    self._log.info("%s: send failed: %s", self._name, describe(exc))
                    self._hang_up()
            if self._on_drained is not None and self._conn is conn and not self._lost:
                self._on_drained()
                if self._outbox:
                    continue
            break
        if self._conn is conn:
            self._idle.set()


def make_link(
    url: str,
    *,
    label: str,
    peer: str,
    logger: logging.Logger,
    heartbeat: float | None,
    max_msg_size: int,
    ssl_context: ssl.SSLContext | None,
    on_text: Callable[[str], None],
    on_binary: Callable[[], None],
    on_lost: Callable[[], None],
    on_drained: Callable[[], None] | None = None,
) -> Link:
    """The link for a client of ``url``: a :class:`LocalLink` when a server in this process is
    registered under it (no socket, so no heartbeat, TLS or binary frames), else a
    :class:`~signaling.relays.base.WebSocketLink` with these settings. Decided once, when the
    client is made: register the server before its clients are."""
    if lookup(url) is not None:
        logger.info("%s: the %s is in this process; connecting without a socket", redact_url(url), peer)
        return LocalLink(
            url,
            peer=peer,
            logger=logger,
            max_msg_size=max_msg_size,
            on_text=on_text,
            on_lost=on_lost,
            on_drained=on_drained,
        )
    return WebSocketLink(
        url,
        label=label,
        peer=peer,
        logger=logger,
        heartbeat=heartbeat,
        max_msg_size=max_msg_size,
        ssl_context=ssl_context,
        on_text=on_text,
        on_binary=on_binary,
        on_lost=on_lost,
        on_drained=on_drained,
    )
