"""The room relay p2pdiff hosts: browsers of the app (and the helper) meet on this server instead
of public Nostr relays (issue 15; the protocol as Trystero uses it: docs/nostr-relay.md).

Layout
    ``RelayServer`` (here)  builds the rest from ``[relay]``, serves WebSocket clients at
                            ``[relay] path``, owns their lifecycle, connects in-process clients
    ``nip01``               pure NIP-01: client frames, event checks, filters
    ``nostr_hub``           subscriptions indexed by topic, fan-out, dedupe by event id
    ``nostr_endpoint``      one client's Nostr session: its REQs, its event rate, the answers
    ``ws_relay``            Trystero's own relay protocol at ``[relay] ws_relay_path``: topic hub,
                            session, frame parser (no answers: refusals are only counted)
    ``link``                one client whatever its protocol: bounded outbox, WebSocket or in-process
    ``limits``              ``[relay]``'s limits and the per-address connection book
    ``bus``                 the other nodes of a cluster (``LocalBus``: none)
    ``metrics``             ``p2pdiff_relay_*`` in /metrics

A client is a :class:`~p2pdiff.relay.link.ClientLink` plus a protocol session. Everything a client
can make the relay hold is capped: connections (in all and per address, ``[server]
trusted_proxy_header`` applied), subscriptions, filters and their values, events per second, event
and message size, and the frames waiting for it (a slow reader is dropped, never buffered without
bound). A socket that sends nothing for ``idle_seconds`` is closed; aiohttp's heartbeat finds dead
TCP paths. Each refusal is answered the NIP-01 way and counted.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from p2pdiff.config import RelayConfig
from p2pdiff.relay.bus import LocalBus, RelayBus
from p2pdiff.relay.limits import HEARTBEAT_SECONDS, READ_YIELD_EVERY, ConnectionBook
from p2pdiff.relay.link import (
    LOCAL_ADDRESS,
    ClientLink,
    LocalClientLink,
    LocalConnection,
    Session,
    WebSocketClientLink,
)
from p2pdiff.relay.metrics import RelayMetrics
from p2pdiff.relay.nostr_endpoint import NostrSession, relay_information
from p2pdiff.relay.nostr_hub import NOSTR, NostrHub
from p2pdiff.relay.ws_relay import WS_RELAY, WsRelayHub, WsRelaySession
from p2pdiff.rest.security import client_key
from signaling.background import BackgroundTasks, every

__all__ = ["RELAY", "LocalEndpoint", "RelayServer"]

log = logging.getLogger(__name__)

NIP11_TYPE = "application/nostr+json"
# The idle check runs this many times per idle_seconds: a silent socket is closed within 1.25x.
IDLE_CHECKS_PER_PERIOD = 4
# How long open sockets get to take the server's going-away close frame at shutdown.
SHUTDOWN_CLOSE_SECONDS = 1.0


class RelayServer:
    """The relay of one app (see the package docstring)."""

    def __init__(self, config: RelayConfig, *, proxy_header: str = "", bus: RelayBus | None = None) -> None:
        self.config = config
        self.limits = config  # what one client may hold and do: [relay] itself
        self.metrics = RelayMetrics()
        self.book = ConnectionBook(self.limits)
        self.bus = bus if bus is not None else LocalBus()
        self.nostr = NostrHub(self.metrics, self.bus)
        self.ws_relay = WsRelayHub(self.metrics, self.bus)
        self.tasks = BackgroundTasks(log)
        self._proxy_header = proxy_header
        self._links: dict[str, dict[ClientLink, None]] = {}
        self.add_protocol(NOSTR)
        if config.ws_relay_path:
            self.add_protocol(WS_RELAY)
        self.bus.on_remote = self._on_remote

    def add_protocol(self, protocol: str) -> None:
        """Count ``protocol``'s connections in /metrics."""
        links = self._links.setdefault(protocol, {})
        self.metrics.connections[protocol] = links.__len__

    def local_urls(self, port: int, protocol: str = NOSTR) -> list[str]:
        """The URLs that name this relay's endpoint of ``protocol``: ``public_urls`` (those whose
        path is ``ws_relay_path`` name the ws-relay endpoint, the others the Nostr one) and this
        server's own."""
        path = self.config.ws_relay_path if protocol == WS_RELAY else self.config.path
        if not path:
            return []
        public = [
            url
            for url in self.config.public_urls
            if (urllib.parse.urlsplit(url).path.rstrip("/") == self.config.ws_relay_path)
            == (protocol == WS_RELAY)
        ]
        return [*public, f"ws://127.0.0.1:{port}{path}", f"ws://localhost:{port}{path}"]

    def endpoint(self, protocol: str) -> LocalEndpoint:
        """The endpoint of ``protocol`` for in-process clients (a ``signaling.relays.local``
        server): what the in-process registry holds under :meth:`local_urls`."""
        return LocalEndpoint(self, protocol)

    # -------------------------------------------------------------- wiring

    def add_routes(self, app: web.Application) -> None:
        """The endpoints at ``[relay] path`` and ``ws_relay_path``; sockets close (going away) when
        the app shuts down."""
        app.router.add_get(self.config.path, self._nostr_handler)
        if self.config.ws_relay_path:
            app.router.add_get(self.config.ws_relay_path, self._ws_relay_handler)
        app.on_shutdown.append(self._on_shutdown)

    @property
    def ctx(self) -> Callable[[web.Application], AsyncIterator[None]]:
        """The cleanup context: the bus and the idle check run while the app does; at its end every
        client, in-process ones too, is closed. Place it before the helper's (it stops after)."""
        return self._ctx

    async def _ctx(self, app: web.Application) -> AsyncIterator[None]:
        await self.bus.start()
        period = self.limits.idle_seconds / IDLE_CHECKS_PER_PERIOD
        sweeper = self.tasks.spawn(every(period, self._close_idle, "relay: idle check", logger=log), "idle")
        yield
        sweeper.cancel()
        self._close_all(WSCloseCode.GOING_AWAY, "server shutting down")
        await self.tasks.wait(SHUTDOWN_CLOSE_SECONDS)
        await self.tasks.close()
        await self.bus.close()

    async def _on_shutdown(self, app: web.Application) -> None:
        # Before aiohttp waits for handlers: an open socket would hold the shutdown to its timeout.
        # In-process clients stay until the cleanup: the helper says goodbye through them first.
        self._close_all(WSCloseCode.GOING_AWAY, "server shutting down", sockets_only=True)

    def _close_all(self, code: int, reason: str, *, sockets_only: bool = False) -> None:
        for links in self._links.values():
            for link in list(links):
                if not (sockets_only and link.address == LOCAL_ADDRESS):
                    link.close(code, reason)

    def _close_idle(self) -> None:
        deadline = asyncio.get_running_loop().time() - self.limits.idle_seconds
        for links in self._links.values():
            for link in [lk for lk in links if lk.last_heard < deadline and lk.address != LOCAL_ADDRESS]:
                link.drop("idle", WSCloseCode.GOING_AWAY, "idle")

    def _on_remote(self, channel: str, text: str) -> None:
        if channel == NOSTR:
            self.nostr.on_remote(text)
        elif channel == WS_RELAY:
            self.ws_relay.on_remote(text)

    # -------------------------------------------------------------- clients

    def connect_local(
        self, on_text: Callable[[str], None], on_lost: Callable[[], None], protocol: str = NOSTR
    ) -> LocalConnection:
        """An in-process client (the helper) of ``protocol``: like any socket, without the
        per-address limits.

        ``on_text(frame)`` gets the relay's frames (never inside a call of ``receive``); ``on_lost()``
        is called once if the relay drops the connection (a slow reader, a shutdown).
        """
        link = LocalClientLink(on_text, on_lost, protocol, self.limits.outbox_bytes, self.metrics)
        session = self._session(link)
        self._track(link, session)
        return LocalConnection(link, session)

    def _session(self, link: ClientLink) -> Session:
        """A new session of ``link.protocol`` for ``link``."""
        if link.protocol == WS_RELAY:
            return WsRelaySession(self.ws_relay, link, self.limits, self.metrics)
        return NostrSession(self.nostr, link, self.limits, self.metrics)

    def _track(self, link: ClientLink, session: Session) -> None:
        links = self._links[link.protocol]
        links[link] = None

        def closed() -> None:
            session.end()
            links.pop(link, None)

        link.on_closed = closed

    async def _nostr_handler(self, request: web.Request) -> web.StreamResponse:
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            if NIP11_TYPE in request.headers.get("Accept", ""):
                return web.json_response(
                    relay_information(self.limits),
                    content_type=NIP11_TYPE,
                    headers={"Access-Control-Allow-Origin": "*"},
                )
            return web.Response(status=426, text="a Nostr relay: connect with a WebSocket\n")
        return await self.serve_websocket(request, NOSTR, refusal_frame=_notice)

    async def _ws_relay_handler(self, request: web.Request) -> web.StreamResponse:
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            return web.Response(status=426, text="a Trystero ws-relay: connect with a WebSocket\n")
        return await self.serve_websocket(request, WS_RELAY)

    async def serve_websocket(
        self,
        request: web.Request,
        protocol: str,
        *,
        refusal_frame: Callable[[str], str] | None = None,
    ) -> web.StreamResponse:
        """Serve one WebSocket client of ``protocol`` until it or the relay closes the socket.
        A client refused for the connection limits gets ``refusal_frame(why)`` first, if the
        protocol has a way to say it (ws-relay has none)."""
        address = client_key(request, self._proxy_header)
        ws = web.WebSocketResponse(
            heartbeat=HEARTBEAT_SECONDS, max_msg_size=self.limits.max_message_bytes, compress=False
        )
        await ws.prepare(request)
        refusal = self.book.admit(address)
        if refusal is not None:
            reason, text = refusal
            self.metrics.refused[protocol, reason] += 1
            if refusal_frame is not None:
                await ws.send_str(refusal_frame(text))
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too many connections")
            return ws
        try:
            link = WebSocketClientLink(
                request, ws, address, protocol, self.limits.outbox_bytes, self.metrics, self.tasks
            )
        except ConnectionResetError:  # gone between the upgrade and here
            self.book.release(address)
            return ws
        session = self._session(link)
        self._track(link, session)
        try:
            await self._read(ws, link, session)
        finally:
            link.close()
            self.book.release(address)
        return ws

    async def _read(self, ws: web.WebSocketResponse, link: ClientLink, session: Session) -> None:
        loop = asyncio.get_running_loop()
        frames = 0
        async for message in ws:  # ends on a close frame or a lost connection
            if link.closed:
                return
            link.last_heard = loop.time()
            if message.type is WSMsgType.TEXT:
                session.handle(message.data)
            elif message.type is WSMsgType.BINARY:
                session.binary()
            elif message.type is WSMsgType.ERROR:  # aiohttp closed the socket already
                too_large = getattr(message.data, "code", None) == WSCloseCode.MESSAGE_TOO_BIG
                self.metrics.dropped[link.protocol, "too_large" if too_large else "protocol_error"] += 1
                return
            frames += 1
            if frames % READ_YIELD_EVERY == 0:
                await asyncio.sleep(0)


class LocalEndpoint:
    """One protocol's endpoint of a :class:`RelayServer`, for in-process clients."""

    def __init__(self, relay: RelayServer, protocol: str) -> None:
        self.relay = relay
        self.protocol = protocol

    def connect_local(self, on_text: Callable[[str], None], on_lost: Callable[[], None]) -> LocalConnection:
        return self.relay.connect_local(on_text, on_lost, self.protocol)


def _notice(text: str) -> str:
    return orjson.dumps(["NOTICE", text]).decode()


RELAY = web.AppKey("relay", RelayServer)
