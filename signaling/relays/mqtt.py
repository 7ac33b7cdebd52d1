"""MQTT relay: paho-mqtt 2.x driven entirely by the caller's asyncio loop.

How the loop integration works
------------------------------
paho is used purely as an MQTT *protocol* engine. No ``loop_start()`` thread, no ``loop()``:

* paho's socket callbacks map onto the selector: ``on_socket_open`` -> ``loop.add_reader(fd,
  loop_read)``, ``on_socket_register_write`` / ``on_socket_unregister_write`` ->
  ``loop.add_writer`` / ``remove_writer(fd, loop_write)``, ``on_socket_close`` -> remove both.
  A ``call_later`` timer runs ``loop_misc()`` every second for keepalive pings and ping timeouts.
* paho's ``connect()`` would block the loop (``socket.create_connection``, TLS handshake,
  WebSocket upgrade, each up to the connect timeout). Instead this module opens the transport
  itself with non-blocking sockets on the loop (``loop.sock_connect``, a TLS handshake driven by
  readiness callbacks, an HTTP upgrade for ``ws(s)://``) and hands the finished socket to paho
  through ``Client._create_socket``, the one paho-internal hook we override (present in 2.1-2.2,
  checked at import). ``client.reconnect()`` then only queues the CONNECT packet. Running
  ``connect()`` in an executor was rejected: it creates threads (we promise none) and paho
  objects are not safe to touch from two threads while the loop keeps publishing.
* For ``ws://`` / ``wss://`` we use our own small WebSocket framing (``_WebSocketStream``)
  rather than paho's ``transport="websockets"``, whose wrapper performs a *blocking* upgrade and
  keeps decoded bytes in a private buffer a selector cannot see. Ours never blocks and reports
  buffered data through ``pending()`` (as ``ssl.SSLSocket`` does), so the read callback knows to
  keep reading although the fd is not readable.

The only thread that can appear is asyncio's default executor, for ``getaddrinfo`` when the
broker is given by host name (IP literals are connected directly).

Wire choices follow Trystero's MQTT strategy (mqtt.js 5 defaults, spec §3): MQTT 3.1.1, clean
session, keepalive 60 s, client id ``mqttjs_<8 hex>``, WebSocket subprotocol ``mqtt``, path from
the URL (``/`` if absent, as mqtt.js), subscriptions QoS 0, publishes QoS 0 with retain false.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from .base import DEFAULT_CONNECT_TIMEOUT, DEFAULT_QUEUE_LIMIT, GOODBYE_TIMEOUT_S, Backoff, Relay, redact_url

log = logging.getLogger(__name__)

if not callable(getattr(mqtt.Client, "_create_socket", None)):  # pragma: no cover - paho layout guard
    raise ImportError("signaling.relays.mqtt needs paho-mqtt 2.x (Client._create_socket hook not found)")

KEEPALIVE_S = 60  # mqtt.js default, which Trystero keeps
_MISC_INTERVAL_S = 1.0
# Bytes handed to paho since its outgoing queue last drained. Above this, publishes wait in our
# bounded queue instead of piling up in paho's unbounded one: only a stalled link gets there, as
# any same-tick burst of ordinary signaling stays far below it.
_HIGH_WATER_BYTES = 4 * 1024 * 1024
_READ_SIZE = 65536
# Reads per readiness event before yielding to other callbacks (only when data is buffered).
_MAX_READS_PER_EVENT = 64
_MAX_WS_HANDSHAKE = 16384
# An MQTT packet may be up to 256 MiB, but a signaling relay has no use for more than this; a
# larger frame is treated as a protocol error (the connection is dropped and re-established).
_MAX_WS_FRAME = 32 * 1024 * 1024

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
_SCHEME_ALIASES = {"tcp": "mqtt", "ssl": "mqtts", "tls": "mqtts"}


# ---------------------------------------------------------------------- URL -> settings


@dataclass(frozen=True)
class BrokerAddress:
    """Connection settings parsed from a broker URL."""

    scheme: str  # canonical: mqtt, mqtts, ws, wss
    host: str
    port: int
    path: str  # WebSocket request target ("" for plain MQTT)
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme in ("mqtts", "wss")

    @property
    def websocket(self) -> bool:
        return self.scheme in ("ws", "wss")


def parse_broker_url(url: str) -> BrokerAddress:
    """``ws://``, ``wss://``, ``mqtt://``, ``mqtts://`` (plus mqtt.js aliases ``tcp``, ``ssl``,
    ``tls``) with optional ``user:password@``. Raises ``ValueError`` for anything else."""
    parts = urllib.parse.urlsplit(url)
    scheme = _SCHEME_ALIASES.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"unsupported MQTT broker URL scheme {parts.scheme!r} in {redact_url(url)!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in MQTT broker URL {redact_url(url)!r}")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:  # out of range, or not a number; its message quotes what may be a password
        raise ValueError(f"bad port in MQTT broker URL {redact_url(url)!r}") from None
    path = ""
    if scheme in ("ws", "wss"):
        # mqtt.js sends the URL's path and query as they are, "/" when there is none.
        path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        if parts.query:
            path += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    username = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return BrokerAddress(scheme, host, port, path, username, password)


# ---------------------------------------------------------------------- non-blocking transport


async def _wait_fd(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, write: bool) -> None:
    fd = sock.fileno()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _send_all(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, ssl.SSLWantWriteError):
            await _wait_fd(loop, sock, write=True)
        except ssl.SSLWantReadError:
            await _wait_fd(loop, sock, write=False)
        else:
            view = view[sent:]


async def _recv_some(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    while True:
        try:
            return sock.recv(size)
        except (BlockingIOError, ssl.SSLWantReadError):
            await _wait_fd(loop, sock, write=False)
        except ssl.SSLWantWriteError:
            await _wait_fd(loop, sock, write=True)


async def _resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[tuple[Any, ...]]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        # Host names need getaddrinfo, which asyncio runs in its default executor.
        return await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    if ip.version == 4:
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))]


async def _connect_tcp(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    last_error: OSError | None = None
    for family, type_, proto, _, sockaddr in await _resolve(loop, host, port):
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            # Signaling messages are small and latency-bound: do not let Nagle hold them back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, sockaddr)
        except OSError as exc:
            sock.close()
            last_error = exc
        except BaseException:
            sock.close()
            raise
        else:
            return sock
    raise last_error or OSError(f"no address for {host}:{port}")


async def _start_tls(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, host: str, context: ssl.SSLContext
) -> ssl.SSLSocket:
    # wrap_socket() takes the fd over from ``sock``: from here on only ``tls`` can close it.
    tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                await _wait_fd(loop, tls, write=False)
            except ssl.SSLWantWriteError:
                await _wait_fd(loop, tls, write=True)
    except BaseException:
        tls.close()
        raise


_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def _host_header(address: BrokerAddress) -> str:
    host = f"[{address.host}]" if ":" in address.host else address.host
    default = 443 if address.tls else 80
    return host if address.port == default else f"{host}:{address.port}"


async def _websocket_upgrade(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, address: BrokerAddress
) -> bytes:
    """Perform the HTTP upgrade; returns bytes received after the response head."""
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    request = (
        f"GET {address.path} HTTP/1.1\r\n"
        f"Host: {_host_header(address)}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: mqtt\r\n"
        "\r\n"
    )
    await _send_all(loop, sock, request.encode("ascii"))
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        if len(buf) > _MAX_WS_HANDSHAKE:
            raise ConnectionError("WebSocket upgrade response too large")
        chunk = await _recv_some(loop, sock, 4096)
        if not chunk:
            raise ConnectionError("connection closed during the WebSocket upgrade")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = status_line.split(" ", 2)
    if len(status) < 2 or status[1] != "101":
        raise ConnectionError(f"WebSocket upgrade refused: {status_line!r}")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode("ascii")).digest()).decode("ascii")
    if headers.get("sec-websocket-accept") != accept:
        raise ConnectionError("WebSocket upgrade: bad Sec-WebSocket-Accept")
    upgraded = headers.get("upgrade", "").lower() == "websocket"
    if not upgraded or "upgrade" not in headers.get("connection", "").lower():
        raise ConnectionError("WebSocket upgrade: missing Upgrade/Connection headers")
    protocol = headers.get("sec-websocket-protocol")
    if protocol is not None and protocol.lower() != "mqtt":
        raise ConnectionError(f"WebSocket upgrade: server chose subprotocol {protocol!r}")
    return rest


def _xor_mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    # One big-integer XOR instead of a per-byte Python loop: fast for large frames too.
    stream = (key * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(len(data), "little")


def _encode_frame(opcode: int, payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    key = os.urandom(4)  # clients must mask every frame (RFC 6455 §5.3)
    return header + key + _xor_mask(payload, key)


def _decode_frame(buf: bytearray) -> tuple[int, bytes, int] | None:
    """(opcode, payload, bytes consumed) for the first complete frame in ``buf``, else None."""
    if len(buf) < 2:
        return None
    opcode = buf[0] & 0x0F
    masked = buf[1] & 0x80
    length = buf[1] & 0x7F
    pos = 2
    if length == 126:
        if len(buf) < 4:
            return None
        length, pos = int.from_bytes(buf[2:4], "big"), 4
    elif length == 127:
        if len(buf) < 10:
            return None
        length, pos = int.from_bytes(buf[2:10], "big"), 10
    if length > _MAX_WS_FRAME:
        raise ConnectionError(f"WebSocket frame of {length} bytes exceeds the {_MAX_WS_FRAME} byte cap")
    key = b""
    if masked:
        if len(buf) < pos + 4:
            return None
        key, pos = bytes(buf[pos : pos + 4]), pos + 4
    if len(buf) < pos + length:
        return None
    payload = bytes(buf[pos : pos + length])
    return opcode, (_xor_mask(payload, key) if masked else payload), pos + length


class _WebSocketStream:
    """Client end of an upgraded WebSocket, shaped like the socket paho expects.

    recv/send follow non-blocking socket semantics (BlockingIOError when nothing can be done,
    b"" at end of stream). ``send`` either takes the whole buffer or raises BlockingIOError,
    keeping the framed bytes, and finishes them when paho retries with the same data; paho drops
    a packet when send() returns 0, so partial counts are never reported.
    """

    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        self._sock = sock
        self._raw = bytearray(leftover)  # undecoded bytes from the socket
        self._payload = bytearray()  # decoded MQTT bytes not yet read by paho
        self._out = bytearray()  # framed bytes not yet written
        self._out_request: int | None = None  # size of the paho buffer framed into _out
        self._eof = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def pending(self) -> int:
        """Bytes paho can read without the fd becoming readable (plus 1 for a pending EOF)."""
        self._decode()
        tls_pending = self._sock.pending() if isinstance(self._sock, ssl.SSLSocket) else 0
        return len(self._payload) + tls_pending + (1 if self._eof else 0)

    def recv(self, size: int) -> bytes:
        self._try_flush()  # a queued pong or close reply rides along with reads
        if not self._payload and not self._eof:
            self._decode()
            if not self._payload and not self._eof:
                data = self._sock.recv(_READ_SIZE)  # BlockingIOError / SSLWant*: paho retries
                if data:
                    self._raw += data
                    self._decode()
                else:
                    self._eof = True
        if self._payload:
            chunk = bytes(self._payload[:size])
            del self._payload[:size]
            return chunk
        if self._eof:
            return b""
        raise BlockingIOError

    def send(self, data: bytes | bytearray) -> int:
        if self._out_request is None:
            self._out += _encode_frame(_OP_BINARY, bytes(data))
            self._out_request = len(data)
        self._flush()
        size, self._out_request = self._out_request, None
        return size

    def close(self) -> None:
        if not self._eof and not self._out:
            # Best effort only: closing must never wait on the peer (and never cut a frame).
            with contextlib.suppress(OSError):
                self._sock.send(_encode_frame(_OP_CLOSE, (1000).to_bytes(2, "big")))
        self._sock.close()

    def _flush(self) -> None:
        try:
            while self._out:
                sent = self._sock.send(self._out)
                del self._out[:sent]
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
            raise BlockingIOError from exc

    def _try_flush(self) -> None:
        if self._out and self._out_request is None:
            with contextlib.suppress(BlockingIOError):
                self._flush()

    def _decode(self) -> None:
        while not self._eof:
            frame = _decode_frame(self._raw)
            if frame is None:
                return
            opcode, payload, consumed = frame
            del self._raw[:consumed]
            if opcode in (_OP_BINARY, _OP_CONT, _OP_TEXT):
                self._payload += payload
            elif opcode == _OP_PING:
                self._out += _encode_frame(_OP_PONG, payload)
                self._try_flush()
            elif opcode == _OP_CLOSE:
                self._out += _encode_frame(_OP_CLOSE, payload[:2])
                self._try_flush()
                self._eof = True
                self._raw.clear()
            elif opcode != _OP_PONG:
                raise ConnectionError(f"unexpected WebSocket opcode {opcode:#x}")


# ---------------------------------------------------------------------- paho glue


class _PreparedSocketClient(mqtt.Client):
    """A paho client that takes an already connected socket instead of opening one itself."""

    _prepared_socket: Any = None

    def use_socket(self, sock: Any) -> None:
        self._prepared_socket = sock

    def discard_prepared_socket(self) -> None:
        sock, self._prepared_socket = self._prepared_socket, None
        if sock is not None:
            sock.close()

    def _create_socket(self) -> Any:  # overrides paho's blocking socket factory
        sock, self._prepared_socket = self._prepared_socket, None
        if sock is None:
            # Only reachable if paho tried to reconnect on its own, which we never ask it to.
            raise ConnectionError("no prepared socket for paho")
        return sock


def _has_pending(sock: Any) -> bool:
    pending = getattr(sock, "pending", None)
    return bool(pending is not None and pending())


def _validate_mqtt_topic(topic: str, *, is_filter: bool) -> None:
    if not isinstance(topic, str) or not topic:
        raise ValueError("MQTT topic must be a non-empty string")
    if "\0" in topic or len(topic.encode("utf-8")) > 65535:
        raise ValueError(f"invalid MQTT topic {topic!r}")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if not is_filter and ("+" in level or "#" in level):
            raise ValueError(f"wildcards are not allowed in a publish topic: {topic!r}")
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or i != len(levels) - 1)):
            raise ValueError(f"misplaced wildcard in topic filter {topic!r}")


class MqttRelay(Relay):
    """A Trystero-compatible MQTT connection (see the module docstring for the loop design)."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        keepalive: int = KEEPALIVE_S,
        ssl_context: ssl.SSLContext | None = None,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        backoff: Backoff | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        super().__init__(url, queue_limit=queue_limit, backoff=backoff, connect_timeout=connect_timeout)
        self.address = parse_broker_url(url)
        self.client_id = client_id or f"mqttjs_{secrets.token_hex(4)}"
        self._keepalive = keepalive
        self._ssl_context = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: _PreparedSocketClient | None = None
        self._fd: int | None = None
        self._misc_timer: asyncio.TimerHandle | None = None
        self._closed_event = asyncio.Event()
        self._closed_event.set()  # no socket yet
        self._connack: asyncio.Future[None] | None = None
        self._subacks: dict[int, asyncio.Future[None]] = {}
        self._bytes_since_drain = 0

    # -------------------------------------------------------------- transport hooks

    async def _open(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        address = self.address
        sock: Any = await _connect_tcp(loop, address.host, address.port)
        try:
            if address.tls:
                sock = await _start_tls(loop, sock, address.host, self._tls_context())
            if address.websocket:
                leftover = await _websocket_upgrade(loop, sock, address)
                sock = _WebSocketStream(sock, leftover)
        except BaseException:
            sock.close()
            raise
        client = self._client or self._make_client()
        self._connack = loop.create_future()
        self._bytes_since_drain = 0
        # connect_async() only records host/port (used in paho's log lines); no I/O happens.
        client.connect_async(address.host, address.port, self._keepalive)
        client.use_socket(sock)
        rc = client.reconnect()  # takes our socket, fires on_socket_open, queues CONNECT
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"paho could not queue CONNECT: {mqtt.error_string(rc)}")
        await self._connack

    def _request_subscribe(self, topics: list[str]) -> asyncio.Future[None]:
        assert self._loop is not None and self._client is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        rc, mid = self._client.subscribe([(topic, 0) for topic in topics])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            fut.set_exception(ConnectionError(f"subscribe failed: {mqtt.error_string(rc)}"))
        else:
            self._subacks[mid] = fut
        return fut

    def _request_unsubscribe(self, topic: str) -> None:
        if self._client is not None:
            self._client.unsubscribe(topic)

    def _send(self, topic: str, text: str) -> bool:
        if self._client is None:
            return False
        payload = text.encode("utf-8")
        info = self._client.publish(topic, payload, qos=0, retain=False)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        self._bytes_since_drain += len(payload)
        return True

    def _ready_to_send(self) -> bool:
        return self._bytes_since_drain < _HIGH_WATER_BYTES

    async def _wait_disconnected(self) -> None:
        await self._closed_event.wait()

    def _abort_connection(self) -> None:
        client = self._client
        if client is None:
            return
        client.discard_prepared_socket()
        if client.socket() is not None:
            # connect_async() is paho's public way to close the socket without sending
            # DISCONNECT (it fires on_socket_close, which unregisters the fd).
            client.connect_async(self.address.host, self.address.port, self._keepalive)

    async def _disconnect(self) -> None:
        client = self._client
        if client is None:
            return
        if client.socket() is not None and client.is_connected():
            # paho writes everything already queued, then DISCONNECT, then closes the socket.
            client.disconnect()
            try:
                async with asyncio.timeout(GOODBYE_TIMEOUT_S):
                    await self._closed_event.wait()
            except TimeoutError:
                log.info("%s: broker did not take DISCONNECT in time; closing anyway", self.name)
        self._abort_connection()

    # -------------------------------------------------------------- topic rules

    def _validate_topic(self, topic: str, *, is_filter: bool) -> None:
        _validate_mqtt_topic(topic, is_filter=is_filter)

    def _matches(self, topic: str) -> bool:
        if topic in self._topics:
            return True
        return any(("+" in sub or "#" in sub) and mqtt.topic_matches_sub(sub, topic) for sub in self._topics)

    # -------------------------------------------------------------- paho client and callbacks

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _make_client(self) -> _PreparedSocketClient:
        client = _PreparedSocketClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
            # Never let paho reconnect by itself (it would try to open a blocking socket).
            reconnect_on_failure=False,
        )
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        return client

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._fd = sock.fileno()
        self._closed_event.clear()
        self._loop.add_reader(self._fd, self._on_readable)
        self._misc_timer = self._loop.call_later(_MISC_INTERVAL_S, self._on_misc_timer)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
            self._fd = None
        if self._misc_timer is not None:
            self._misc_timer.cancel()
            self._misc_timer = None
        lost = ConnectionError("connection closed")
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(lost)
        for fut in self._subacks.values():
            if not fut.done():
                fut.set_exception(lost)
        self._subacks.clear()
        self._closed_event.set()

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        if self._fd is not None:
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        if self._fd is not None:
            self._loop.remove_writer(self._fd)
        # paho's outgoing queue is empty: hand it what waited in ours. Deferred, because we are
        # inside paho's write path here.
        self._bytes_since_drain = 0
        if self._queue:
            self._loop.call_soon(self._flush_queue)

    def _on_readable(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            for _ in range(_MAX_READS_PER_EVENT):
                if client.socket() is None:
                    return
                client.loop_read()
                sock = client.socket()
                if sock is None or not _has_pending(sock):
                    return
            # Still buffered (TLS or WebSocket): continue next iteration, after other callbacks.
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)
        except Exception:
            log.exception("%s: error while reading; dropping the connection", self.name)
            self._abort_connection()

    def _on_writable(self) -> None:
        client = self._client
        if client is None or client.socket() is None:
            return
        try:
            client.loop_write()
        except Exception:
            log.exception("%s: error while writing; dropping the connection", self.name)
            self._abort_connection()

    def _on_misc_timer(self) -> None:
        self._misc_timer = None
        client = self._client
        if client is None or client.socket() is None:
            return
        try:
            client.loop_misc()  # keepalive PINGREQ, and the ping timeout
        except Exception:
            log.exception("%s: error in keepalive handling; dropping the connection", self.name)
            self._abort_connection()
            return
        if client.socket() is not None and self._loop is not None:
            self._misc_timer = self._loop.call_later(_MISC_INTERVAL_S, self._on_misc_timer)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        fut = self._connack
        if fut is None or fut.done():
            return
        if reason_code.is_failure:
            fut.set_exception(ConnectionRefusedError(f"broker refused the connection: {reason_code}"))
        else:
            fut.set_result(None)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[Any], properties: Any
    ) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            # Nothing better to do than say so: waiting forever would stall the connection.
            log.error("%s: broker refused a subscription (mid %d): %s", self.name, mid, ", ".join(refused))
        fut = self._subacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("%s: ignored a message with a non-UTF-8 topic", self.name)
            return
        self._deliver(topic, message.payload)
