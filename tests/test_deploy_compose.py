"""deploy/compose.yaml (README "Running several nodes"), checked without docker: the services a
cluster needs, secrets only from files, and node environments that p2pdiff's config accepts."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2pdiff.config import ENV_PREFIX, SECRETS, load_config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
NODES = ("node-a", "node-b")
# What each node's entrypoint puts into the environment from /run/secrets (never written in the YAML).
SECRET_ENV = {"P2PDIFF_STORE_PASSWORD": "pg_password", "P2PDIFF_SERVER_ADMIN_TOKEN": "admin_token"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping (KEY: value)"
    return {str(k): str(v) for k, v in env.items()}


def test_services_of_a_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"postgres", *NODES, "proxy"}
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "healthcheck" in postgres
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    for name in NODES:
        node = services[name]
        build = node["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == REPO / "Dockerfile"
        assert node["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert set(services["proxy"]["depends_on"]) == set(NODES)


def test_no_secret_is_written_in_the_file(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in _environment(service).items():
            if re.search(r"PASSWORD|TOKEN|SECRET", key):
                assert key.endswith("_FILE") and value.startswith("/run/secrets/"), (name, key)
            parsed = urllib.parse.urlsplit(value)
            assert parsed.scheme == "" or parsed.password is None, (name, key)
    for secret in compose["secrets"].values():
        assert set(secret) == {"file"}, "secrets come from files next to the compose file"
    # The files themselves are never committed.
    assert "secrets/" in (DEPLOY / ".gitignore").read_text().split()


def test_nodes_environment_is_valid_config(compose: dict[str, Any], tmp_path: Path) -> None:
    """Every P2PDIFF_ name is a config key (load_config refuses others), the store is the shared
    PostgreSQL, the secrets reach the environment from the mounted files, node ids differ."""
    empty = tmp_path / "config.toml"
    empty.write_text("")
    secret_env_keys = set(SECRET_ENV)
    assert {f"{ENV_PREFIX}{section}_{key}".upper() for section, key in SECRETS} >= secret_env_keys
    node_ids = set()
    for name in NODES:
        node = compose["services"][name]
        env = _environment(node)
        assert all(key.startswith(ENV_PREFIX) for key in env)
        assert not secret_env_keys & set(env)
        entrypoint = " ".join(node["entrypoint"])
        for key, secret in SECRET_ENV.items():
            assert f'{key}="$$(cat /run/secrets/{secret})"' in entrypoint, key
            assert secret in node["secrets"]
        # As the entrypoint leaves it: compose's "$$" is a "$", the secrets are filled in.
        config = load_config(empty, {**env, **{key: "from-the-secret-file" for key in SECRET_ENV}})
        assert config.store.backend == "postgresql"
        assert urllib.parse.urlsplit(config.store.url).hostname == "postgres"
        assert config.store.password == "from-the-secret-file"
        node_ids.add(config.cluster.node_id)
    assert len(node_ids) == len(NODES) and "" not in node_ids


def test_proxy_streams_events_and_reaches_both_nodes(compose: dict[str, Any]) -> None:
    proxy = compose["services"]["proxy"]
    mount = next(v for v in proxy["volumes"] if v.startswith("./nginx.conf:"))
    conf = (DEPLOY / mount.split(":")[0]).read_text()
    for name in NODES:
        assert re.search(rf"^\s*server {name}:3000\b", conf, re.MULTILINE), name
    events = conf[conf.index("location = /api/events") :]
    assert "proxy_buffering off;" in events
    assert re.search(r"proxy_read_timeout\s+(\d+h|\d{4,}s?);", events)
    assert "proxy_set_header Upgrade $http_upgrade;" in conf
    assert "proxy_set_header Connection $connection_upgrade;" in conf
    # What [server] trusted_proxy_header = "X-Forwarded-For" on the nodes expects.
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in conf
    assert _environment(compose["services"]["node-a"])["P2PDIFF_SERVER_TRUSTED_PROXY_HEADER"] == (
        "X-Forwarded-For"
    )
