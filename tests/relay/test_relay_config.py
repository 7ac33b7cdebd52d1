"""``[relay]``: defaults, file and environment, one-line errors, --check-config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pdiff.__main__ import main
from p2pdiff.config import MIN_RELAY_FILTER_VALUES, RelayConfig, load_config


def test_defaults_are_off_and_fit_trystero() -> None:
    relay = load_config("config.toml", environ={}).relay
    assert relay == RelayConfig()  # config.toml documents the built-in defaults
    assert not relay.enabled and relay.path == "/nostr"
    assert relay.max_filter_values >= MIN_RELAY_FILTER_VALUES


def test_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[relay]\nenabled = true\npath = "/relay"\npublic_urls = ["wss://example.org/relay"]\n')
    relay = load_config(path, environ={"P2PDIFF_RELAY_MAX_CONNECTIONS_PER_ADDRESS": "3"}).relay
    assert relay.enabled and relay.path == "/relay" and relay.public_urls == ["wss://example.org/relay"]
    assert relay.max_connections_per_address == 3
    env = {"P2PDIFF_RELAY_WS_RELAY_PATH": "", "P2PDIFF_RELAY_EVENTS_PER_SECOND": "2.5"}
    relay = load_config(path, environ=env).relay
    assert relay.ws_relay_path == "" and relay.events_per_second == 2.5


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("path = 'nostr'", "[relay] path: 'nostr' must start with '/'"),
        ("path = '/nostr/'", "[relay] path: '/nostr/' must start with '/'"),
        ("path = '/api/nostr'", "[relay] path: '/api/nostr' is under /api/"),
        ("path = '/metrics'", "[relay] path: '/metrics' is under /metrics/"),
        ("ws_relay_path = '/nostr'", "[relay] ws_relay_path: must differ from path"),
        ("max_connections = 0", "[relay] max_connections: must be > 0"),
        ("idle_seconds = -1", "[relay] idle_seconds: must be > 0"),
        ("max_filter_values = 100", "[relay] max_filter_values: must be >= 250"),
        (
            "max_values_per_connection = 999",
            "[relay] max_values_per_connection: must be >= max_filter_values",
        ),
        ("max_connections_per_address = 5000", "[relay] max_connections_per_address: must be <="),
        ("max_message_bytes = 1000", "[relay] max_message_bytes: must be >= max_event_bytes + 1024"),
        ("outbox_bytes = 1000", "[relay] outbox_bytes: must be >= max_message_bytes"),
        ("public_urls = ['https://x.org/n']", "[relay] public_urls[0]: 'https://x.org/n' is not a ws"),
        ("enabled = 'yes'", "[relay] enabled: expected true or false"),
    ],
)
def test_bad_values_fail_in_one_line(tmp_path: Path, toml: str, needle: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[relay]\n{toml}\n")
    with pytest.raises(Exception) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert needle in message and "\n" not in message, message


def test_path_under_the_app_files_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    server = f"[server]\nstatic_dir = '{tmp_path}'\nstatic_path = '/p2p/'\n"
    path.write_text(server + "[relay]\npath = '/p2p/nostr'\n")
    with pytest.raises(Exception, match=r"\[relay\] path: '/p2p/nostr' is under \[server\] static_path"):
        load_config(path, environ={})


def test_check_config_shows_the_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[relay]\nenabled = true\n")
    assert main(["--config", str(path), "--check-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["relay"]["enabled"] is True and shown["relay"]["path"] == "/nostr"
