from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pdiff.config import ConfigError, load_config, redacted


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_without_file(tmp_path: Path) -> None:
    cfg = load_config(None, environ={"P2PDIFF_CONFIG": str(write(tmp_path, ""))})
    assert cfg.server.port == 3000
    assert cfg.server.cors_origins == ["*"]
    assert cfg.store.path == "./data/p2pdiff.sqlite3"
    assert cfg.queue.lease_seconds == 120
    assert cfg.p2p.app_id == "p2p-webgpu-diffusion-v1"


def test_file_values_and_types(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
port = 4000
cors_origins = ["https://a.example", "https://b.example"]
[queue]
lease_seconds = 5
[p2p]
relay_urls = ["ws://127.0.0.1:1"]
rooms = ["r1", "r2"]
""",
    )
    cfg = load_config(path, environ={})
    assert cfg.server.port == 4000
    assert cfg.server.cors_origins == ["https://a.example", "https://b.example"]
    assert cfg.queue.lease_seconds == 5.0 and isinstance(cfg.queue.lease_seconds, float)
    assert cfg.p2p.rooms == ["r1", "r2"]


def test_project_config_file_loads() -> None:
    cfg = load_config(Path(__file__).parent.parent / "config.toml", environ={})
    assert cfg.server.port == 3000


def test_env_overrides_every_kind(tmp_path: Path) -> None:
    env = {
        "P2PDIFF_SERVER_PORT": "5000",
        "P2PDIFF_P2P_RELAY_URLS": "ws://127.0.0.1:1, mqtt://127.0.0.1:2",
        "P2PDIFF_STORE_PATH": "/tmp/x.sqlite3",
        "P2PDIFF_QUEUE_LEASE_SECONDS": "2.5",
        "P2PDIFF_SERVER_ACCESS_LOG": "false",
        "P2PDIFF_P2P_PASSWORD": "s3cret",
    }
    cfg = load_config(write(tmp_path, "[server]\nport = 4000\n"), environ=env)
    assert cfg.server.port == 5000
    assert cfg.p2p.relay_urls == ["ws://127.0.0.1:1", "mqtt://127.0.0.1:2"]
    assert cfg.store.path == "/tmp/x.sqlite3"
    assert cfg.queue.lease_seconds == 2.5
    assert cfg.server.access_log is False
    assert redacted(cfg)["p2p"]["password"] == "***"


def test_port_alias_and_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 4000\n")
    assert load_config(path, environ={"PORT": "4100"}).server.port == 4100
    assert load_config(path, environ={"PORT": "4100", "P2PDIFF_SERVER_PORT": "4200"}).server.port == 4200


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 4321\n")
    assert load_config(None, environ={"P2PDIFF_CONFIG": str(path)}).server.port == 4321


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("[server]\nprot = 1\n", {}, "[server] prot: unknown key"),
        ("[sever]\nport = 1\n", {}, "unknown section [sever]"),
        ('[server]\nport = "x"\n', {}, "[server] port: expected an integer"),
        ("[server]\nport = true\n", {}, "[server] port: expected an integer"),
        ("[server]\ncors_origins = 3\n", {}, "[server] cors_origins: expected a list"),
        ("[p2p]\nrooms = [1]\n", {}, "[p2p] rooms[0]: expected a string"),
        ("[p2p]\nrooms = ['bad room']\n", {}, "[p2p] rooms[0]: must be 1..128"),
        ("[server\nport = 1\n", {}, "invalid TOML"),
        ("[queue]\nlease_seconds = 0\n", {}, "[queue] lease_seconds: must be > 0"),
        ("[store]\nsynchronous = 'off'\n", {}, "[store] synchronous: 'off' is not one of"),
        ("[server]\nport = 70000\n", {}, "[server] port: 70000 is not a TCP port"),
        ("", {"PORT": "abc"}, "environment PORT: expected an integer"),
        ("", {"P2PDIFF_SERVER_PROT": "1"}, "environment P2PDIFF_SERVER_PROT: no such config key"),
        ("", {"P2PDIFF_SERVER_ACCESS_LOG": "maybe"}, "P2PDIFF_SERVER_ACCESS_LOG: expected true or false"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ=env)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message.strip()


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", environ={})


# -- [store] url --------------------------------------------------------------------------------


def test_store_defaults_to_sqlite_at_path(tmp_path: Path) -> None:
    store = load_config(write(tmp_path, ""), environ={}).store
    assert store.url == ""
    assert store.backend == "sqlite"
    assert store.sqlite_path == "./data/p2pdiff.sqlite3"
    assert store.display_url == "sqlite:///./data/p2pdiff.sqlite3"


def test_store_path_alone_still_names_the_file(tmp_path: Path) -> None:
    store = load_config(write(tmp_path, '[store]\npath = "/var/lib/p2pdiff/db.sqlite3"\n'), environ={}).store
    assert (store.backend, store.sqlite_path) == ("sqlite", "/var/lib/p2pdiff/db.sqlite3")


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///data/db.sqlite3", "data/db.sqlite3"),
        ("sqlite:////var/lib/p2pdiff/db.sqlite3", "/var/lib/p2pdiff/db.sqlite3"),
        ("SQLite:///./db.sqlite3", "./db.sqlite3"),
    ],
)
def test_sqlite_url_wins_over_path(tmp_path: Path, url: str, path: str) -> None:
    text = f'[store]\nurl = "{url}"\npath = "/ignored/when/url/is/set.sqlite3"\n'
    store = load_config(write(tmp_path, text), environ={}).store
    assert (store.backend, store.sqlite_path, store.display_url) == ("sqlite", path, url)


def test_postgresql_url(tmp_path: Path) -> None:
    url = "postgresql://p2pdiff@db.example:6543/queue?sslmode=require"
    store = load_config(write(tmp_path, f'[store]\nurl = "{url}"\n'), environ={}).store
    assert store.backend == "postgresql"
    assert store.dsn() == store.display_url == url
    with pytest.raises(ConfigError, match="no SQLite file"):
        store.sqlite_path  # noqa: B018 - the property raises


def test_postgres_scheme_alias_ipv6_host_and_default_port(tmp_path: Path) -> None:
    store = load_config(write(tmp_path, '[store]\nurl = "postgres://app@[::1]/q"\n'), environ={}).store
    assert store.backend == "postgresql"
    assert store.dsn() == "postgres://app@[::1]/q"


def test_postgresql_password_from_the_url(tmp_path: Path) -> None:
    url = "postgresql://app:s3cr%40t%2Fpw@db.example/queue"
    cfg = load_config(write(tmp_path, f'[store]\nurl = "{url}"\n'), environ={})
    assert cfg.store.dsn() == url
    assert cfg.store.display_url == redacted(cfg)["store"]["url"] == "postgresql://app:***@db.example/queue"


def test_postgresql_password_from_the_environment(tmp_path: Path) -> None:
    env = {
        "P2PDIFF_STORE_URL": "postgresql://app@db.example:5432/queue",
        "P2PDIFF_STORE_PASSWORD": "pa ss/w@rd:%?#é",
    }
    cfg = load_config(write(tmp_path, ""), environ=env)
    # Percent-encoded into the DSN, so the driver reads back exactly the password.
    assert cfg.store.dsn() == "postgresql://app:pa%20ss%2Fw%40rd%3A%25%3F%23%C3%A9@db.example:5432/queue"
    assert cfg.store.display_url == "postgresql://app:***@db.example:5432/queue"
    assert redacted(cfg)["store"]["password"] == "***"


def test_a_sqlite_store_has_no_dsn(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no PostgreSQL DSN"):
        load_config(write(tmp_path, ""), environ={}).store.dsn()


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ('url = "mysql://app@db/queue"', {}, "[store] url: unknown scheme 'mysql'"),
        ('url = "db.example/queue"', {}, "[store] url: not a URL"),
        ('url = "postgresql://app@db.example"', {}, "[store] url: missing the database name"),
        ('url = "postgresql://app@db.example/"', {}, "[store] url: missing the database name"),
        ('url = "postgresql://app@db.example/a/b"', {}, "[store] url: the database name is one path segment"),
        ('url = "postgresql://db.example/queue"', {}, "[store] url: missing the user name"),
        ('url = "postgresql://app@/queue"', {}, "[store] url: missing the host"),
        ('url = "postgresql://app@db:99999/queue"', {}, "[store] url: the port is not a number"),
        ('url = "postgresql://app@db:five/queue"', {}, "[store] url: the port is not a number"),
        ('url = "postgresql://app@db:0/queue"', {}, "[store] url: the port is not a number"),
        ('url = "postgresql://app@db/queue#x"', {}, "[store] url: a PostgreSQL URL has no #fragment"),
        ('url = "postgresql://app@db/queue?sslmode"', {}, "[store] url: the ?options are not key=value"),
        ('url = "postgresql://app@db/q?password=x"', {}, "not as an option"),
        ('url = "postgresql://app:a/b@db/queue"', {}, "[store] url: cannot be read: percent-encode"),
        ('url = "postgresql://app:a@b@db/queue"', {}, "[store] url: cannot be read: percent-encode"),
        ('url = "sqlite://host/db.sqlite3"', {}, "[store] url: a sqlite URL is sqlite:///PATH"),
        ('url = "sqlite:///"', {}, "[store] url: names no file"),
        ('path = ""', {}, "[store] path: is empty"),
        ('url = "postgresql://app:x@db/queue"', {"P2PDIFF_STORE_PASSWORD": "y"}, "give it in one place"),
        ("", {"P2PDIFF_STORE_PASSWORD": "pw"}, "[store] password: only a postgresql store"),
        ("url = 5", {}, "[store] url: expected a string"),
    ],
)
def test_bad_store_url_names_the_problem(tmp_path: Path, text: str, env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"[store]\n{text}\n"), environ=env)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message.strip()


def test_cluster_section_names_the_node_and_its_lease(tmp_path: Path) -> None:
    env = {"P2PDIFF_CLUSTER_NODE_ID": "eu-1", "P2PDIFF_CLUSTER_LEASE_SECONDS": "30"}
    cfg = load_config(write(tmp_path, "[cluster]\nnode_id = 'x'\n"), environ=env)
    assert (cfg.cluster.node_name(), cfg.cluster.lease_seconds) == ("eu-1", 30.0)
    default = load_config(write(tmp_path, ""), environ={}).cluster.node_name()
    assert default.endswith(f"-{os.getpid()}")  # unique per process when not named
    for text, message in [
        ("node_id = 'a b'", r"\[cluster\] node_id: at most 64 letters"),
        ("node_id = '" + "n" * 65 + "'", r"\[cluster\] node_id"),
        ("lease_seconds = 0.5", r"\[cluster\] lease_seconds: must be from 1 to 3600"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, f"[cluster]\n{text}\n"), environ={})


def test_ws_relay_strategy_needs_its_relays_and_wire_0_25(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, '[p2p]\nstrategy = "ws-relay"\nrelay_urls = ["wss://relay.example/ws-relay"]\n'),
        environ={},
    )
    assert (cfg.p2p.strategy, cfg.p2p.relay_urls) == ("ws-relay", ["wss://relay.example/ws-relay"])
    for text, message in [
        ('strategy = "ws-relay"', r'\[p2p\] relay_urls: strategy .ws-relay. has no public relays.*"wss://'),
        (
            'strategy = "ws-relay"\nrelay_urls = ["ws://h/"]\nwire = "0.22"',
            r"\[p2p\] wire: .* supports 0\.25, not 0\.22",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, f"[p2p]\n{text}\n"), environ={})
    # The helper is off: nothing joins, so nothing needs a relay.
    off = load_config(write(tmp_path, '[p2p]\nenabled = false\nstrategy = "ws-relay"\n'), environ={})
    assert off.p2p.relay_urls == []
