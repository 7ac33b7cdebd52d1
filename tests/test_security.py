from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from p2pdiff.config import Config, ConfigError, load_config, redacted
from p2pdiff.rest.security import CSP, MAX_CLIENTS, RateLimiter
from tests.conftest import ClientFactory

TOKEN = "s3cret-admin-token-0123456789"
PASSWORD = "p2p-room-password-xyz"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def assert_error(data: dict[str, Any], code: str) -> None:
    assert data["success"] is False and data["error"]["code"] == code and data["error"]["message"]


@pytest.fixture
def token_config(config: Config) -> Config:
    config.server.admin_token = TOKEN
    return config


async def _task(client: TestClient, room: str = "r", tid: str = "t1") -> None:
    resp = await client.post(f"/api/queue/{room}", json={"id": tid, "prompt": "x"})
    assert resp.status == 201, await resp.text()


# -- admin token --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PATCH", "/api/queue/r/t1", {"action": "claim", "worker": "w"}),
        ("DELETE", "/api/queue/r/t1", None),
        ("POST", "/api/join/lobby", None),
        ("DELETE", "/api/join/lobby", None),
    ],
)
async def test_mutating_routes_need_the_token(
    make_client: ClientFactory, token_config: Config, method: str, path: str, body: Any
) -> None:
    client = await make_client(token_config)
    await _task(client)
    resp = await client.request(method, path, json=body)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(await resp.json(), "unauthorized")
    for header in (f"Bearer {TOKEN}x", "Bearer wrong", f"Bearer {TOKEN[:-1]}"):
        resp = await client.request(method, path, json=body, headers={"Authorization": header})
        assert resp.status == 403, header
        assert_error(await resp.json(), "forbidden")
    # Not a bearer token at all: 401, like none.
    resp = await client.request(method, path, json=body, headers={"Authorization": f"Basic {TOKEN}"})
    assert resp.status == 401
    if path == "/api/join/lobby" and method == "DELETE":
        await client.post("/api/join/lobby", headers=BEARER)
    resp = await client.request(method, path, json=body, headers=BEARER)
    assert resp.status < 300, await resp.text()


async def test_reads_and_task_submission_stay_open(make_client: ClientFactory, token_config: Config) -> None:
    client = await make_client(token_config)
    await _task(client)
    assert (await client.post("/api/queue", json={"prompt": "y"})).status == 201
    for path in (
        "/api/health",
        "/api/stats",
        "/api/queue/r",
        "/api/queue/r/t1",
        "/metrics",
        "/api/openapi.json",
    ):
        assert (await client.get(path)).status == 200, path


async def test_queue_requires_token_when_configured(make_client: ClientFactory, token_config: Config) -> None:
    token_config.server.queue_requires_token = True
    client = await make_client(token_config)
    for path in ("/api/queue", "/api/queue/r"):
        resp = await client.post(path, json={"prompt": "x"})
        assert resp.status == 401
        resp = await client.post(path, json={"prompt": "x"}, headers=BEARER)
        assert resp.status == 201


async def test_without_a_token_everything_is_open(client: TestClient) -> None:
    await _task(client)
    resp = await client.patch("/api/queue/r/t1", json={"action": "claim", "worker": "w"})
    assert resp.status == 200


async def test_unknown_routes_are_404_not_401(make_client: ClientFactory, token_config: Config) -> None:
    client = await make_client(token_config)
    assert (await client.post("/api/nothing")).status == 404
    assert (await client.put("/api/queue/r/t1")).status == 405


def test_token_rules_in_config(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="admin_token: must be at least 16") as err:
        load_config(empty, environ={"P2PDIFF_SERVER_ADMIN_TOKEN": "short-secret"})
    assert "short-secret" not in str(err.value)  # the message never echoes the token
    with pytest.raises(ConfigError, match="queue_requires_token: needs"):
        load_config(empty, environ={"P2PDIFF_SERVER_QUEUE_REQUIRES_TOKEN": "1"})
    config = load_config(
        empty, environ={"P2PDIFF_SERVER_ADMIN_TOKEN": TOKEN, "P2PDIFF_SERVER_LOG_FORMAT": "text"}
    )
    assert config.server.admin_token == TOKEN and config.server.log_format == "text"
    with pytest.raises(ConfigError, match="log_format"):
        load_config(empty, environ={"P2PDIFF_SERVER_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="rate_limit_burst"):
        load_config(empty, environ={"P2PDIFF_SERVER_RATE_LIMIT_BURST": "0"})


# -- rate limit ---------------------------------------------------------------------------------


def test_token_bucket_refills_and_is_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 3, max_clients=100, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # per client
    now[0] += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    now[0] += 100  # refills up to the burst, no further
    assert [limiter.take("a") for _ in range(4)][-1] > 0
    for i in range(1000):
        limiter.take(f"client{i}")
    assert len(limiter) == 100  # least recently seen clients dropped
    assert MAX_CLIENTS >= 1000


async def test_post_routes_are_rate_limited_per_client(make_client: ClientFactory, config: Config) -> None:
    config.server.rate_limit_per_second = 0.5
    config.server.rate_limit_burst = 3
    client = await make_client(config)
    for i in range(3):
        assert (await client.post("/api/queue/r", json={"prompt": f"p{i}"})).status == 201
    resp = await client.post("/api/queue/r", json={"prompt": "over"})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "2"
    assert_error(await resp.json(), "rate_limited")
    assert (await client.post("/api/join/x")).status == 429  # every POST route shares the bucket
    assert (await client.get("/api/queue/r")).status == 200  # reads are not limited
    metrics = await (await client.get("/metrics")).text()
    assert "p2pdiff_rate_limited_total 2.0" in metrics


async def test_trusted_proxy_header_keys_the_buckets(make_client: ClientFactory, config: Config) -> None:
    config.server.rate_limit_per_second = 0.1
    config.server.rate_limit_burst = 1
    config.server.trusted_proxy_header = "X-Forwarded-For"
    client = await make_client(config)

    async def post(forwarded: str) -> int:
        headers = {"X-Forwarded-For": forwarded}
        return (await client.post("/api/queue/r", json={"prompt": "x"}, headers=headers)).status

    assert await post("203.0.113.1") == 201
    assert await post("203.0.113.1") == 429
    assert await post("203.0.113.2") == 201
    # Only the last hop (what our proxy appended) counts; a client cannot pick its own key.
    assert await post("198.51.100.9, 203.0.113.1") == 429
    assert await post("2001:db8::1") == 201
    assert await post("2001:db8::2") == 429  # one IPv6 /64, one bucket


async def test_failed_auth_attempts_are_rate_limited(
    make_client: ClientFactory, token_config: Config
) -> None:
    token_config.server.rate_limit_per_second = 0.1
    token_config.server.rate_limit_burst = 3
    client = await make_client(token_config)
    statuses = []
    for _ in range(5):
        resp = await client.delete("/api/queue/r/t1", headers={"Authorization": "Bearer guess-guess-guess"})
        statuses.append(resp.status)
    assert statuses == [403, 403, 403, 429, 429]
    metrics = await (await client.get("/metrics")).text()
    assert "p2pdiff_auth_failures_total 5.0" in metrics


# -- headers ------------------------------------------------------------------------------------


async def test_pages_get_security_headers_and_the_api_does_not_need_them(client: TestClient) -> None:
    for path in ("/", "/api/docs", "/api/docs/init.js", "/static/app.js"):
        resp = await client.get(path)
        assert resp.status == 200, path
        assert resp.headers["Content-Security-Policy"] == CSP
        assert "frame-ancestors 'none'" in CSP and "default-src 'self'" in CSP
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert resp.headers["X-Frame-Options"] == "DENY"
    resp = await client.get("/api/health")
    assert "Content-Security-Policy" not in resp.headers


async def test_cors_preflight_allows_the_authorization_header(
    make_client: ClientFactory, config: Config
) -> None:
    config.server.cors_origins = ["https://app.example"]
    config.server.admin_token = TOKEN
    client = await make_client(config)
    resp = await client.options(
        "/api/queue/r/t1",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert resp.status == 204
    assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()
    assert "PATCH" in resp.headers["Access-Control-Allow-Methods"]
    # A refusal still carries CORS headers, so the page can read the 401.
    resp = await client.patch("/api/queue/r/t1", json={}, headers={"Origin": "https://app.example"})
    assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]


# -- secrets never leave the process ------------------------------------------------------------


def test_redacted_masks_every_secret(config: Config) -> None:
    config.server.admin_token = TOKEN
    config.p2p.password = PASSWORD
    config.p2p.relay_urls = ["mqtts://user:relaypass@broker.example:8883/mqtt", "wss://relay.example"]
    text = json.dumps(redacted(config))
    for secret in (TOKEN, PASSWORD, "relaypass"):
        assert secret not in text
    data = redacted(config)
    assert data["server"]["admin_token"] == "***" and data["p2p"]["password"] == "***"
    assert data["p2p"]["relay_urls"] == ["mqtts://user:***@broker.example:8883/mqtt", "wss://relay.example"]


def test_check_config_masks_the_admin_token(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        f'[server]\nadmin_token = "{TOKEN}"\n[p2p]\npassword = "{PASSWORD}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PDIFF_")}
    result = subprocess.run(
        [sys.executable, "-m", "p2pdiff", "--check-config"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr and PASSWORD not in result.stdout + result.stderr
    assert json.loads(result.stdout)["server"]["admin_token"] == "***"
