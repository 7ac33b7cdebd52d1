"""Secrets stay in the process: URL passwords masked the same way on both sides of the package line,
every log line scrubbed whoever wrote it, config errors that never quote a secret.

The whole server is checked surface by surface in tests/chaos/test_secrets_everywhere.py.
"""

from __future__ import annotations

import io
import logging
import string
import urllib.parse
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdiff.config import Config, ConfigError, load_config, mask_url, redacted, secret_values
from p2pdiff.ops.logs import JsonFormatter, RedactingFormatter
from signaling.relays.base import redact_url
from signaling.relays.mqtt import parse_broker_url
from signaling.relays.nostr import NostrRelay

SCHEMES = st.sampled_from(["ws", "wss", "mqtt", "mqtts", "http", "turn"])
# What a user name can hold in a URL without ending it.
USERS = st.text(string.ascii_letters + string.digits + "-._~%!$&'()*+,;=", max_size=12)
# Passwords as people write them into config files, broken URLs included: anything printable.
PASSWORDS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=24)
HOSTS = st.sampled_from(["127.0.0.1", "broker.example", "[::1]", "relay.example:8443"])
TAILS = st.sampled_from(["", "/", "/mqtt", "/path?x=1", "/a/b#frag"])


@settings(max_examples=500)
@given(scheme=SCHEMES, user=USERS, password=PASSWORDS, host=HOSTS, tail=TAILS, slashes=st.booleans())
def test_url_password_is_masked_and_nothing_else(
    scheme: str, user: str, password: str, host: str, tail: str, slashes: bool
) -> None:
    sep = "://" if slashes else ":"
    url = f"{scheme}{sep}{user}:{password}@{host}{tail}"
    masked = mask_url(url)
    assert masked == f"{scheme}{sep}{user}:***@{host}{tail}"
    # signaling keeps its own copy of the rule (it never imports p2pdiff): the two must agree.
    assert redact_url(url) == masked
    assert mask_url(masked) == masked


@settings(max_examples=300)
@given(url=st.text(max_size=60))
def test_masking_leaves_urls_without_a_password_alone(url: str) -> None:
    without_password = "@" not in url
    if without_password:
        assert mask_url(url) == url == redact_url(url)
    assert mask_url(url) == redact_url(url)


def test_relay_errors_and_names_carry_no_password() -> None:
    for make in (parse_broker_url, NostrRelay):
        with pytest.raises(ValueError) as bad_port:
            make("ws://user:pa/ss-MARKER@broker.example")  # the "/" breaks the URL at the password
        assert "MARKER" not in str(bad_port.value) and "pa/" not in str(bad_port.value)
        with pytest.raises(ValueError) as bad_scheme:
            make("ftp://user:MARKER-pass@broker.example")
        assert "MARKER" not in str(bad_scheme.value)


async def test_a_relay_shows_its_name_not_its_password() -> None:
    relay = NostrRelay("wss://user:MARKER-pass@relay.example/")
    assert relay.url == "wss://user:MARKER-pass@relay.example/"  # what it connects with
    assert relay.name == "wss://user:***@relay.example/"
    assert "MARKER" not in repr(relay)


# Secrets with quotes, backslashes, control and non-ASCII characters, which JSON and repr escape.
# A fixed prefix keeps them from occurring by chance in the rest of the line; "*" is left out so a
# mask next to a masked secret cannot spell one.
SECRETS = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="*"), min_size=1, max_size=20
).map(lambda tail: "K3y-" + tail)


@settings(max_examples=300, deadline=None)
@given(secret=SECRETS, fmt=st.sampled_from(["json", "text"]), where=st.sampled_from(["msg", "exc", "extra"]))
def test_log_lines_never_show_a_secret(secret: str, fmt: str, where: str) -> None:
    inner = JsonFormatter() if fmt == "json" else logging.Formatter("%(levelname)s %(message)s")
    formatter = RedactingFormatter(inner, [secret])
    record = logging.LogRecord("lib", logging.ERROR, __file__, 1, "connecting to %s", ("x",), None)
    if where == "msg":
        record.args = (f"wss://u:{secret}@h",)
    elif where == "exc":
        try:
            raise ConnectionError(f"cannot reach {secret!r}")
        except ConnectionError as exc:
            record.exc_info = (type(exc), exc, exc.__traceback__)
    else:
        record.detail = {"url": secret}
    line = formatter.format(record)
    assert secret not in line and repr(secret)[1:-1] not in line
    assert orjson.dumps(secret).decode()[1:-1] not in line
    assert "***" in line or (fmt == "text" and where == "extra")  # text lines do not show extras


def test_secret_values_cover_every_secret_key() -> None:
    config = Config()
    config.server.admin_token = "admin-token-0123456789"
    config.p2p.password = "room-password"
    config.p2p.relay_urls = ["wss://u:relay%2Fpass@h1", "wss://plain.example", "mqtt://u:abc@h2"]
    config.p2p.ice_servers = ["turn:u:turn-secret@h3:3478"]
    values = secret_values(config)
    assert set(values) == {
        "admin-token-0123456789",
        "room-password",
        "relay%2Fpass",
        "relay/pass",
        "turn-secret",
    }
    # "abc" is too short to scrub from every line (it would mangle words), but it is still masked
    # wherever a URL is shown.
    assert redacted(config)["p2p"]["relay_urls"][2] == "mqtt://u:***@h2"


@pytest.mark.parametrize(
    "toml",
    [
        'admin_token = ["MARKER-0123456789"]',
        "admin_token = 123456789123456789",
    ],
)
def test_a_wrongly_typed_secret_is_not_quoted_in_the_error(tmp_path: Path, toml: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[server]\n{toml}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert "MARKER" not in str(error.value) and "123456789" not in str(error.value)
    assert "admin_token" in str(error.value)


@given(secret=st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=8, max_size=16))
def test_a_relay_url_given_as_a_string_is_not_quoted_in_the_error(
    tmp_path_factory: pytest.TempPathFactory, secret: str
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "config.toml"
    path.write_text(f'[p2p]\nrelay_urls = "wss://user:{secret}@relay.example"\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert secret not in str(error.value) and urllib.parse.quote(secret) not in str(error.value)


def test_scrubbing_is_wired_into_setup_logging() -> None:
    from p2pdiff.ops.logs import setup_logging

    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("debug", "json", stream, secrets=["hunter2-secret"])
        logging.getLogger("some.library").debug("GET wss://u:hunter2-secret@h failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert "hunter2" not in stream.getvalue() and "wss://u:***@h" in stream.getvalue()


def test_store_passwords_are_secrets() -> None:
    from_url = Config()
    from_url.store.url = "postgresql://app:store%2Fpass@db.example/queue"
    assert set(secret_values(from_url)) == {"store%2Fpass", "store/pass"}
    assert redacted(from_url)["store"]["url"] == "postgresql://app:***@db.example/queue"
    from_env = Config()
    from_env.store.url = "postgresql://app@db.example/queue"
    from_env.store.password = "env-store-pass"
    assert secret_values(from_env) == ["env-store-pass"]
    assert redacted(from_env)["store"]["password"] == "***"
    assert from_env.store.display_url == "postgresql://app:***@db.example/queue"


@settings(max_examples=300, deadline=None)
@given(
    secret=SECRETS,
    form=st.sampled_from(["raw", "encoded", "env"]),
    tail=st.sampled_from(
        ["@db.example/queue", "@db.example:5432/queue?sslmode=require", "@db.example", "@/q"]
    ),
)
def test_a_store_password_shows_nowhere(
    tmp_path_factory: pytest.TempPathFactory, secret: str, form: str, tail: str
) -> None:
    """Well-formed or not, in the URL as written or percent-encoded or in P2PDIFF_STORE_PASSWORD: the
    password is in no config error, no display URL and no --check-config dump."""
    path = tmp_path_factory.mktemp("cfg") / "config.toml"
    environ = {}
    if form == "env":
        url = f"postgresql://app{tail}"
        environ["P2PDIFF_STORE_PASSWORD"] = secret
    else:
        password = secret if form == "raw" else urllib.parse.quote(secret, safe="")
        url = f"postgresql://app:{password}{tail}"
    path.write_text(f"[store]\nurl = {orjson.dumps(url).decode()}\n")
    forms = {
        secret,
        urllib.parse.quote(secret, safe=""),
        repr(secret)[1:-1],
        orjson.dumps(secret).decode()[1:-1],
    }
    try:
        config = load_config(path, environ=environ)
    except ConfigError as error:
        shown = [str(error)]
    else:
        shown = [config.store.display_url, orjson.dumps(redacted(config)).decode()]
    for text in shown:
        assert not any(secret_form in text for secret_form in forms), text


def test_check_config_masks_the_store_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from p2pdiff.__main__ import main

    path = tmp_path / "config.toml"
    path.write_text('[store]\nurl = "postgresql://app:url-store-secret@db.example/queue"\n')
    assert main(["--config", str(path), "--check-config"]) == 0
    dumped = capsys.readouterr().out
    assert "url-store-secret" not in dumped
    assert "postgresql://app:***@db.example/queue" in dumped
    monkeypatch.setenv("P2PDIFF_STORE_URL", "postgresql://app@db.example/queue")
    monkeypatch.setenv("P2PDIFF_STORE_PASSWORD", "env-store-secret")
    assert main(["--config", str(tmp_path / "empty.toml"), "--check-config"]) == 2  # no such file
    (tmp_path / "empty.toml").write_text("")
    assert main(["--config", str(tmp_path / "empty.toml"), "--check-config"]) == 0
    captured = capsys.readouterr()
    assert "env-store-secret" not in captured.out + captured.err
    assert '"password": "***"' in captured.out
