"""Configuration: dataclasses filled from defaults, then a TOML file, then environment variables.

Precedence (last wins): built-in defaults < config file < ``PORT`` < ``P2PDIFF_<SECTION>_<KEY>``.
Every error is a :class:`ConfigError` whose message is one line naming the offending key, so the
command line can print it instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import stat
import tomllib
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from signaling import strategies
from signaling.wire import WIRE_VERSIONS

ENV_PREFIX = "P2PDIFF_"
# Environment variables with the prefix that are not config keys.
ENV_RESERVED = {"P2PDIFF_CONFIG"}
DEFAULT_CONFIG_PATH = "config.toml"


class ConfigError(Exception):
    """A config problem, described in one line that names the key."""


@dataclass(slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 3000
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    default_room: str = "default"
    log_level: str = "info"
    access_log: bool = True
    # "json": one JSON object per line (for journald/Docker log shippers); "text": for a terminal.
    log_format: str = "json"
    # When set, mutating routes need "Authorization: Bearer <token>". A secret: masked everywhere.
    admin_token: str = ""
    # POST /api/queue is open by default (browsers submit tasks); true makes it need the token too.
    queue_requires_token: bool = False
    # Token bucket per client on POST routes; 0 turns the limit off.
    rate_limit_per_second: float = 10.0
    rate_limit_burst: int = 60
    # Behind a reverse proxy, the header carrying the client address (e.g. "X-Forwarded-For" or
    # "X-Real-IP"). Empty = use the socket's peer address; set it only if every request comes through
    # the proxy, since clients can write the header themselves.
    trusted_proxy_header: str = ""
    # On SIGTERM: how long requests in flight get before they are cut. Handlers take milliseconds and
    # event streams end at once; what waits this long is an upload stuck mid-body (aiohttp reads
    # nothing more once shutdown began, so it can never finish).
    shutdown_timeout_seconds: float = 3.0
    # GET /api/events (Server-Sent Events): a comment this often keeps idle streams and proxies alive;
    # the newest sse_backlog events can be resumed (Last-Event-ID); a client more than
    # sse_client_buffer events behind is disconnected; at most sse_max_clients streams at once, and
    # sse_max_clients_per_address of them from one client address (trusted_proxy_header applies).
    sse_heartbeat_seconds: float = 15.0
    sse_backlog: int = 1000
    sse_client_buffer: int = 256
    sse_max_clients: int = 256
    sse_max_clients_per_address: int = 8
    # The browser app's own files (its web/p2p folder), served at static_path so the page, its
    # /api/health probe and its POSTs share this origin; empty = not served.
    static_dir: str = ""
    static_path: str = "/p2p/"


StoreBackend = Literal["sqlite", "postgresql"]


@dataclass(slots=True)
class StoreConfig:
    # Where the store lives: "sqlite:///PATH" (PATH as written after the three slashes, so
    # sqlite:///data/db.sqlite3 is relative and sqlite:////var/lib/p2pdiff/db.sqlite3 absolute) or
    # "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?libpq options, e.g. sslmode=require]".
    # Empty = "sqlite:///" + path. When set, url wins and path is not used.
    url: str = ""
    # The SQLite file when url is empty (the key from before url; existing configs keep working).
    path: str = "./data/p2pdiff.sqlite3"
    # The PostgreSQL password when the url has none, meant for P2PDIFF_STORE_PASSWORD (it keeps the
    # password out of config files). A secret: masked everywhere.
    password: str = ""
    # SQLite only: "full" fsyncs every group commit (survives power loss); "normal" survives a
    # process crash only.
    synchronous: str = "full"
    # Where result images from peers are stored; empty = "results/" next to the store file.
    results_dir: str = ""

    @property
    def backend(self) -> StoreBackend:
        return store_location(self).backend

    @property
    def sqlite_path(self) -> str:
        """The SQLite file (the url's path, else ``path``); a ConfigError for a PostgreSQL store."""
        location = store_location(self)
        if location.sqlite_path is None:
            raise ConfigError("[store] url: a postgresql store has no SQLite file")
        return location.sqlite_path

    def dsn(self) -> str:
        """The PostgreSQL URL with the password in it, for the driver only: never log or show it."""
        location = store_location(self)
        if location.dsn is None:
            raise ConfigError("[store] url: a sqlite store has no PostgreSQL DSN")
        return location.dsn

    @property
    def display_url(self) -> str:
        """The effective store URL with any password as ``***``, for logs and health."""
        return store_location(self).display_url


@dataclass(slots=True)
class QueueConfig:
    lease_seconds: float = 120.0
    retention_hours: float = 24.0
    sweep_interval_seconds: float = 3600.0


@dataclass(slots=True)
class P2PConfig:
    enabled: bool = True
    # Trystero strategy: "nostr" (the app's default; its public relays are picked per app id),
    # "mqtt", "torrent" or "ws-relay" (Trystero's self-hosted relay, wire 0.25 only). Empty
    # relay_urls = the strategy's public defaults for this app id; ws-relay has none, so it needs them.
    strategy: str = "nostr"
    app_id: str = "p2p-webgpu-diffusion-v1"
    relay_urls: list[str] = field(default_factory=list)
    password: str = ""
    ice_servers: list[str] = field(default_factory=list)
    # Addresses ICE may gather host candidates from; empty = every interface (aioice's default,
    # which skips loopback). Tests set ["127.0.0.1"].
    ice_host_addresses: list[str] = field(default_factory=list)
    rooms: list[str] = field(default_factory=list)
    # Hand pending tasks to GPU peers (the app's `task` action) in every room the helper joins;
    # POST /api/join/{room} with {"dispatch": true|false} sets it per room.
    dispatch: bool = False
    # Largest result image accepted from a peer (chunk bytes or a data: URL); over it the task fails.
    max_result_bytes: int = 16 * 1024 * 1024
    # The Trystero wire the helper speaks: "0.25" (Trystero 0.25.x) or "0.22" (the app's own).
    wire: str = WIRE_VERSIONS[0]


@dataclass(slots=True)
class ClusterConfig:
    """Several nodes on one PostgreSQL store (README "Running several nodes"); unused on SQLite."""

    # This node's name among the others (logs, /api/health, /metrics, who holds which room). Empty =
    # "<host name>-<process id>": unique, but new at every start. Two live nodes must not share one.
    node_id: str = ""
    # Each room's helper runs on one node, held by a lease it renews every third of this. A node
    # that dies (kill -9, a lost machine) loses its rooms to the other nodes within this time.
    lease_seconds: float = 15.0

    def node_name(self) -> str:
        return self.node_id or f"{socket.gethostname()}-{os.getpid()}"


@dataclass(slots=True)
class RelayConfig:
    """The room relay this server hosts (p2pdiff.relay); config.toml gives each limit's reason."""

    enabled: bool = False
    # Where browsers connect: the Nostr relay (NIP-01) and Trystero's ws-relay protocol ("" = off).
    path: str = "/nostr"
    ws_relay_path: str = "/ws-relay"
    # The URLs browsers use to reach this relay (e.g. "wss://your.host/nostr"): a [p2p] relay_urls
    # entry naming one of them is this server's own relay, which the helper joins in-process.
    public_urls: list[str] = field(default_factory=list)
    max_connections: int = 2048
    max_connections_per_address: int = 64
    max_subscriptions: int = 128
    max_filters: int = 10
    max_filter_values: int = 1000
    max_values_per_connection: int = 10_000
    events_per_second: float = 50.0
    events_burst: int = 500
    max_event_bytes: int = 128 * 1024
    max_message_bytes: int = 256 * 1024
    idle_seconds: float = 600.0
    outbox_bytes: int = 512 * 1024


@dataclass(slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    p2p: P2PConfig = field(default_factory=P2PConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)


_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("server", "log_level"): ("debug", "info", "warning", "error"),
    ("server", "log_format"): ("json", "text"),
    ("store", "synchronous"): ("full", "normal"),
    ("p2p", "strategy"): strategies.names(),
    ("p2p", "wire"): WIRE_VERSIONS,
}


def _sections(config: Config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _field_types(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(where: str, kind: Any, value: Any) -> Any:
    """Check a TOML value against the field's declared type."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {_describe(value)}")
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        return [_coerce(f"{where}[{i}]", item, v) for i, v in enumerate(value)]
    raise TypeError(f"unsupported config type {kind!r}")  # a programming error, not user input


def _parse_env(where: str, kind: Any, text: str) -> Any:
    """Turn an environment string into the field's type (lists are comma-separated)."""
    if typing.get_origin(kind) is list:
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {text!r}")
    if kind is int or kind is float:
        try:
            return kind(text.strip())
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise ConfigError(f"{where}: expected {noun}, got {text!r}") from None
    return text


def _apply(config: Config, section_name: str, key: str, value: Any, where: str, from_env: bool) -> None:
    section = _sections(config)[section_name]
    kind = _field_types(section)[key]
    try:
        value = _parse_env(where, kind, value) if from_env else _coerce(where, kind, value)
    except ConfigError:
        if (section_name, key) not in SECRETS + SECRET_URLS:
            raise
        # The usual message quotes the value, which for these keys may be a secret.
        expected = "a list of strings" if typing.get_origin(kind) is list else "a string"
        raise ConfigError(f"{where}: expected {expected} (value not shown: it may be secret)") from None
    setattr(section, key, value)


def _apply_file(config: Config, data: Mapping[str, Any], source: str) -> None:
    sections = _sections(config)
    for section_name, table in data.items():
        if section_name not in sections:
            known = ", ".join(f"[{s}]" for s in sections)
            raise ConfigError(f"{source}: unknown section [{section_name}] (known: {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section_name}] must be a table")
        fields = _field_types(sections[section_name])
        for key, value in table.items():
            where = f"{source}: [{section_name}] {key}"
            if key not in fields:
                raise ConfigError(f"{where}: unknown key (known: {', '.join(fields)})")
            _apply(config, section_name, key, value, where, from_env=False)


def _apply_env(config: Config, environ: Mapping[str, str]) -> None:
    if "PORT" in environ:
        _apply(config, "server", "port", environ["PORT"], "environment PORT", from_env=True)
    sections = _sections(config)
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section_name, _, key = rest.partition("_")
        if section_name not in sections or key not in _field_types(sections[section_name]):
            raise ConfigError(f"environment {name}: no such config key")
        _apply(config, section_name, key, text, f"environment {name}", from_env=True)


def _validate(config: Config) -> None:
    for (section_name, key), choices in _CHOICES.items():
        value = getattr(_sections(config)[section_name], key)
        if value not in choices:
            raise ConfigError(f"[{section_name}] {key}: {value!r} is not one of {', '.join(choices)}")
    if not 0 <= config.server.port <= 65535:
        raise ConfigError(f"[server] port: {config.server.port} is not a TCP port")
    if config.queue.lease_seconds <= 0:
        raise ConfigError("[queue] lease_seconds: must be > 0")
    if config.queue.retention_hours <= 0:
        raise ConfigError("[queue] retention_hours: must be > 0")
    if config.queue.sweep_interval_seconds <= 0:
        raise ConfigError("[queue] sweep_interval_seconds: must be > 0")
    if not 1 <= config.cluster.lease_seconds <= 3600:
        raise ConfigError("[cluster] lease_seconds: must be from 1 to 3600")
    if not re.fullmatch(r"[A-Za-z0-9._-]{0,64}", config.cluster.node_id):
        raise ConfigError("[cluster] node_id: at most 64 letters, digits, '.', '_' or '-'")
    strategy = strategies.get(config.p2p.strategy)
    if config.p2p.wire not in strategy.wires:
        wires = ", ".join(strategy.wires)
        raise ConfigError(f"[p2p] wire: strategy {strategy.name!r} supports {wires}, not {config.p2p.wire}")
    if config.p2p.enabled and not config.p2p.relay_urls and not strategy.default_relays(
        config.p2p.app_id, config.p2p.wire
    ):
        raise ConfigError(
            f"[p2p] relay_urls: strategy {strategy.name!r} has no public relays; list the ones the app uses, "
            'e.g. relay_urls = ["wss://your.host/ws-relay"]'
        )
    if not 0 < config.p2p.max_result_bytes <= MAX_RESULT_BYTES_LIMIT:
        raise ConfigError(f"[p2p] max_result_bytes: must be > 0 and <= {MAX_RESULT_BYTES_LIMIT}")
    for key in (
        "sse_heartbeat_seconds",
        "sse_backlog",
        "sse_client_buffer",
        "sse_max_clients",
        "sse_max_clients_per_address",
    ):
        if getattr(config.server, key) <= 0:
            raise ConfigError(f"[server] {key}: must be > 0")
    _validate_security(config)
    _validate_static(config.server)
    _validate_relay(config.relay, config.server)
    store_location(config.store)
    if not config.server.cors_origins:
        raise ConfigError('[server] cors_origins: must list at least one origin (use "*" for any)')
    # Imported here: validate.py needs nothing from config, and config needs only this one rule.
    from p2pdiff.tasks.validate import check_room_id

    for where, room in [("[server] default_room", config.server.default_room)] + [
        (f"[p2p] rooms[{i}]", r) for i, r in enumerate(config.p2p.rooms)
    ]:
        problem = check_room_id(room)
        if problem:
            raise ConfigError(f"{where}: {problem}")


MIN_ADMIN_TOKEN_CHARS = 16
# A Trystero message is reassembled in memory before the helper sees it; signaling drops a peer
# whose message passes 32 MiB, so a bigger cap could never be reached.
MAX_RESULT_BYTES_LIMIT = 32 * 1024 * 1024
_HEADER_NAME_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def _validate_security(config: Config) -> None:
    server = config.server
    token = server.admin_token
    # Never echo the token itself in these messages: they end up in logs and terminals.
    if token and (len(token) < MIN_ADMIN_TOKEN_CHARS or token != token.strip()):
        raise ConfigError(
            f"[server] admin_token: must be at least {MIN_ADMIN_TOKEN_CHARS} characters without "
            "surrounding spaces (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if server.queue_requires_token and not token:
        raise ConfigError("[server] queue_requires_token: needs [server] admin_token to be set")
    if server.rate_limit_per_second < 0:
        raise ConfigError("[server] rate_limit_per_second: must be >= 0 (0 turns the limit off)")
    if server.rate_limit_burst < 1:
        raise ConfigError("[server] rate_limit_burst: must be >= 1")
    if server.trusted_proxy_header and not _HEADER_NAME_RE.fullmatch(server.trusted_proxy_header):
        raise ConfigError("[server] trusted_proxy_header: not a valid HTTP header name")
    if not 0 < server.shutdown_timeout_seconds <= 60:
        raise ConfigError("[server] shutdown_timeout_seconds: must be > 0 and <= 60")


# Plain segments only: no dot segments, no percent-encoding, no "{" (aiohttp would read a variable).
_STATIC_PATH_RE = re.compile(r"(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+/")
# Where the server's own routes live, besides "/" itself (which static_path cannot be); a test checks
# that every route the app registers is under one of these.
RESERVED_PATHS = ("/api/", "/static/", "/metrics/")


def _validate_static(server: ServerConfig) -> None:
    path = server.static_path
    if not _STATIC_PATH_RE.fullmatch(path):
        raise ConfigError(
            f"[server] static_path: {_describe(path)} must start and end with '/' and name at least one "
            'plain segment (letters, digits, "._~-"; not starting with "."), e.g. "/p2p/"'
        )
    clash = next((root for root in RESERVED_PATHS if path.startswith(root)), None)
    if clash is not None:
        raise ConfigError(f"[server] static_path: {path!r} is under {clash}, the server's own routes")
    if not server.static_dir:
        return
    where = f"[server] static_dir: {server.static_dir!r}"  # in full: the operator needs the whole path
    try:
        mode = os.stat(server.static_dir).st_mode
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ConfigError(f"{where}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISDIR(mode):
        raise ConfigError(f"{where}: not a directory")
    if not os.access(server.static_dir, os.R_OK | os.X_OK):
        raise ConfigError(f"{where}: not readable by this user")


# Trystero 0.25 puts up to 250 topics into one REQ ("#x" values): fewer would refuse real browsers.
MIN_RELAY_FILTER_VALUES = 250
# Room around the largest event in a message: ["EVENT", ...] and a subscription id.
RELAY_ENVELOPE_BYTES = 1024
_WEBSOCKET_URL_RE = re.compile(r"wss?://[^\s/?#]+(/[^\s?#]*)?", re.IGNORECASE)


def _validate_relay(relay: RelayConfig, server: ServerConfig) -> None:
    for key in (
        "max_connections",
        "max_connections_per_address",
        "max_subscriptions",
        "max_filters",
        "events_per_second",
        "events_burst",
        "max_event_bytes",
        "idle_seconds",
        "outbox_bytes",
    ):
        if getattr(relay, key) <= 0:
            raise ConfigError(f"[relay] {key}: must be > 0")
    if relay.max_connections_per_address > relay.max_connections:
        raise ConfigError("[relay] max_connections_per_address: must be <= max_connections")
    if relay.max_filter_values < MIN_RELAY_FILTER_VALUES:
        raise ConfigError(
            f"[relay] max_filter_values: must be >= {MIN_RELAY_FILTER_VALUES} "
            "(Trystero 0.25 sends up to 250 topics in one subscription)"
        )
    if relay.max_values_per_connection < relay.max_filter_values:
        raise ConfigError("[relay] max_values_per_connection: must be >= max_filter_values")
    if relay.max_message_bytes < relay.max_event_bytes + RELAY_ENVELOPE_BYTES:
        raise ConfigError(
            f"[relay] max_message_bytes: must be >= max_event_bytes + {RELAY_ENVELOPE_BYTES} "
            "(a message carries one event and its envelope)"
        )
    if relay.outbox_bytes < relay.max_message_bytes:
        raise ConfigError("[relay] outbox_bytes: must be >= max_message_bytes (one event must fit)")
    _check_relay_path("path", relay.path, server)
    if relay.ws_relay_path:
        _check_relay_path("ws_relay_path", relay.ws_relay_path, server)
        if relay.ws_relay_path == relay.path:
            raise ConfigError("[relay] ws_relay_path: must differ from path")
    for i, url in enumerate(relay.public_urls):
        if not _WEBSOCKET_URL_RE.fullmatch(url):
            raise ConfigError(
                f"[relay] public_urls[{i}]: {_describe(url)} is not a ws:// or wss:// URL "
                '(e.g. "wss://your.host/nostr")'
            )


# One or more plain segments, no trailing slash: the relay is one WebSocket route.
_RELAY_PATH_RE = re.compile(r"(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+")


def _check_relay_path(key: str, path: str, server: ServerConfig) -> None:
    if not _RELAY_PATH_RE.fullmatch(path):
        raise ConfigError(
            f"[relay] {key}: {_describe(path)} must start with '/' and name plain segments (letters, "
            'digits, "._~-"; not starting with "."), no trailing slash, e.g. "/nostr"'
        )
    clash = next((root for root in RESERVED_PATHS if (path + "/").startswith(root)), None)
    if clash is not None:
        raise ConfigError(f"[relay] {key}: {path!r} is under {clash}, the server's own routes")
    if server.static_dir and (path + "/").startswith(server.static_path):
        raise ConfigError(f"[relay] {key}: {path!r} is under [server] static_path {server.static_path!r}")


SQLITE_URL_PREFIX = "sqlite:///"
_URL_SYNTAX = "sqlite:///PATH or postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
_URL_ENCODING_HINT = (
    "percent-encode '@', '/', '?', '#', '[', ']' and '%' in the user name and password "
    "(%40, %2F, %3F, %23, %5B, %5D, %25) or give the password in P2PDIFF_STORE_PASSWORD"
)


@dataclass(frozen=True, slots=True)
class StoreLocation:
    """What ``[store] url`` (or ``path``) names, checked (see :func:`store_location`)."""

    backend: StoreBackend
    # The URL with any password as "***": for logs and health.
    display_url: str
    sqlite_path: str | None = None
    # postgresql://... with the password (from the URL or [store] password) percent-encoded in it.
    dsn: str | None = None


def store_location(store: StoreConfig) -> StoreLocation:
    """Parse and check the store's URL: ``url``, else ``sqlite:///`` + ``path``.

    The ConfigError messages never quote the URL: a malformed one may hold a password where a
    parser (or the masking rule) would not look for it.
    """
    url = store.url or SQLITE_URL_PREFIX + store.path
    scheme, separator, _ = url.partition("://")
    if scheme.lower() == "sqlite":
        return _sqlite_location(store, url)
    if scheme.lower() in ("postgresql", "postgres") and separator:
        return _postgresql_location(store, url)
    if separator and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise ConfigError(f"[store] url: unknown scheme {scheme!r} (expected {_URL_SYNTAX})")
    raise ConfigError(f"[store] url: not a URL (expected {_URL_SYNTAX})")


def _sqlite_location(store: StoreConfig, url: str) -> StoreLocation:
    if store.password:
        raise ConfigError("[store] password: only a postgresql store has a password")
    if url[: len(SQLITE_URL_PREFIX)].lower() != SQLITE_URL_PREFIX:
        raise ConfigError("[store] url: a sqlite URL is sqlite:///PATH (three slashes, no host)")
    path = url[len(SQLITE_URL_PREFIX) :]
    if not path:
        raise ConfigError("[store] url: names no file" if store.url else "[store] path: is empty")
    return StoreLocation("sqlite", display_url=url, sqlite_path=path)


def _postgresql_location(store: StoreConfig, url: str) -> StoreLocation:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # an unbalanced "[" or "]" (IPv6 host brackets), wherever it is
        raise ConfigError(f"[store] url: cannot be read: {_URL_ENCODING_HINT}") from None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    # asyncpg splits the user info off at the first "@": a second one, or an "@" past a "/", "?" or
    # "#" that ended the host part early, means a password the driver would read differently.
    if "@" in userinfo or "@" in parts.path + parts.query + parts.fragment:
        raise ConfigError(f"[store] url: cannot be read: {_URL_ENCODING_HINT}")
    if parts.fragment:
        raise ConfigError("[store] url: a PostgreSQL URL has no #fragment")
    user, has_password, url_password = userinfo.partition(":")
    user = urllib.parse.unquote(user)
    if not user:
        raise ConfigError("[store] url: missing the user name (postgresql://USER@HOST/DATABASE)")
    try:
        port = parts.port  # None when absent; ValueError when not a number or past 65535
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError("[store] url: the port is not a number from 1 to 65535")
    if not parts.hostname:
        raise ConfigError("[store] url: missing the host (postgresql://USER@HOST/DATABASE)")
    database = urllib.parse.unquote(parts.path[1:])
    if not database:
        raise ConfigError("[store] url: missing the database name (postgresql://USER@HOST/DATABASE)")
    if "/" in database:
        raise ConfigError("[store] url: the database name is one path segment (percent-encode a '/')")
    try:
        options = urllib.parse.parse_qsl(parts.query, strict_parsing=True) if parts.query else []
    except ValueError:
        raise ConfigError("[store] url: the ?options are not key=value pairs joined by '&'") from None
    if any("password" in key.lower() for key, _ in options):
        raise ConfigError(
            "[store] url: give the password in the URL's user info or in P2PDIFF_STORE_PASSWORD, "
            "not as an option"
        )
    if has_password and store.password:
        raise ConfigError("[store] password: the url holds a password too; give it in one place")
    password = urllib.parse.unquote(url_password) if has_password else store.password
    quoted_user = urllib.parse.quote(user, safe="")
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    if not password:
        plain = f"{parts.scheme}://{quoted_user}@{hostport}{tail}"
        return StoreLocation("postgresql", display_url=plain, dsn=plain)
    return StoreLocation(
        "postgresql",
        display_url=f"{parts.scheme}://{quoted_user}:***@{hostport}{tail}",
        dsn=f"{parts.scheme}://{quoted_user}:{urllib.parse.quote(password, safe='')}@{hostport}{tail}",
    )


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build the config. ``path=None`` means ``P2PDIFF_CONFIG`` or ``./config.toml`` if it exists."""
    environ = os.environ if environ is None else environ
    config = Config()
    explicit = path is not None or "P2PDIFF_CONFIG" in environ
    chosen = Path(path if path is not None else environ.get("P2PDIFF_CONFIG", DEFAULT_CONFIG_PATH))
    if chosen.is_file():
        try:
            data = tomllib.loads(chosen.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{chosen}: invalid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{chosen}: cannot read: {exc}") from None
        _apply_file(config, data, str(chosen))
    elif explicit:
        raise ConfigError(f"{chosen}: config file not found")
    _apply_env(config, environ)
    _validate(config)
    return config


# Keys whose values never leave the process: masked by redacted(), never logged, never in /api/health.
SECRETS = (("server", "admin_token"), ("p2p", "password"), ("store", "password"))
# Keys holding URLs (one, or a list) that may carry a password (mqtt://user:secret@host): shown with
# it masked.
SECRET_URLS = (("p2p", "relay_urls"), ("p2p", "ice_servers"), ("store", "url"))
# scheme://user:password@ -> scheme://user:***@ (also "turn:user:password@", without slashes). The
# password runs to the last "@", further than a URL parser would take it: a password with a stray
# "/" or "@" breaks the URL, and must still not show. signaling.relays.base.redact_url is the same
# rule (signaling never imports p2pdiff); tests/test_secrets.py checks that the two agree.
_URL_PASSWORD_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:(?://)?[^:@/?#]*:)(.*)@(?=[^@]*$)", re.DOTALL)
# Shorter secrets are not scrubbed from log lines (see secret_values).
MIN_SCRUBBED_CHARS = 6


def redacted(config: Config) -> dict[str, Any]:
    """The config as a dict with secrets masked, for logs and --check-config."""
    data = dataclasses.asdict(config)
    for section, key in SECRETS:
        if data[section][key]:
            data[section][key] = "***"
    # Relay, TURN and store URLs may carry credentials (mqtt://user:secret@host).
    for section, key in SECRET_URLS:
        value = data[section][key]
        data[section][key] = mask_url(value) if isinstance(value, str) else [mask_url(url) for url in value]
    return data


def mask_url(url: str) -> str:
    """``url`` with the password in its user info replaced by ``***`` (scheme, user and host kept)."""
    return _URL_PASSWORD_RE.sub(r"\1***@", url)


def secret_values(config: Config) -> list[str]:
    """Every secret of ``config`` as it could appear in text, for the log's last line of defence.

    Nothing logs a secret on purpose; this catches what a library puts in a message or traceback
    (a relay URL in an exception). URL passwords count as written and percent-decoded. Values
    shorter than MIN_SCRUBBED_CHARS are left out: scrubbing every "abc" would mangle the log.
    """
    values = [getattr(_sections(config)[section], key) for section, key in SECRETS]
    for section, key in SECRET_URLS:
        value = getattr(_sections(config)[section], key)
        for url in [value] if isinstance(value, str) else value:
            match = _URL_PASSWORD_RE.match(url)
            if match:
                values += [match[2], urllib.parse.unquote(match[2])]
    return sorted({v for v in values if len(v) >= MIN_SCRUBBED_CHARS}, key=len, reverse=True)
