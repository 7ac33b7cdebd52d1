from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.server_process import ServerProcess


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("P2PDIFF_") and k != "PORT"}
    base["P2PDIFF_P2P_ENABLED"] = "false"  # nothing in these tests may reach a public relay
    return subprocess.run(
        args, cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=60
    )


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "p2pdiff"
    assert script.exists() or shutil.which("p2pdiff")


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[p2p]\npassword = "hunter2"\n[server]\nport = 4567\n')
    result = run([sys.executable, "-m", "p2pdiff", "--check-config"], tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["server"]["port"] == 4567
    assert data["p2p"]["password"] == "***"
    assert "hunter2" not in result.stdout
    assert (data["server"]["static_dir"], data["server"]["static_path"]) == ("", "/p2p/")


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ("[server]\nportt = 1\n", {}, "[server] portt: unknown key"),
        ("[queue]\nlease_seconds = 'long'\n", {}, "[queue] lease_seconds: expected a number"),
        ("[server\n", {}, "invalid TOML"),
        ("", {"P2PDIFF_STORE_PAHT": "x"}, "P2PDIFF_STORE_PAHT: no such config key"),
        ("", {"P2PDIFF_SERVER_STATIC_DIR": "web/p2p"}, "[server] static_dir: 'web/p2p': No such file"),
    ],
)
def test_bad_config_is_one_line_not_a_traceback(
    tmp_path: Path, toml: str, env: dict[str, str], needle: str
) -> None:
    (tmp_path / "config.toml").write_text(toml)
    result = run([sys.executable, "-m", "p2pdiff"], tmp_path, env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and lines[0].startswith("p2pdiff: config error:")


def test_config_flag_and_env_pick_the_file(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 4999\n")
    by_flag = run([sys.executable, "-m", "p2pdiff", "--config", str(other), "--check-config"], tmp_path)
    by_env = run(
        [sys.executable, "-m", "p2pdiff", "--check-config"], tmp_path, {"P2PDIFF_CONFIG": str(other)}
    )
    assert json.loads(by_flag.stdout)["server"]["port"] == 4999
    assert json.loads(by_env.stdout)["server"]["port"] == 4999
    missing = run([sys.executable, "-m", "p2pdiff", "--config", str(tmp_path / "nope.toml")], tmp_path)
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_unusable_store_path_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run(
        [sys.executable, "-m", "p2pdiff"],
        tmp_path,
        {"P2PDIFF_STORE_PATH": str(blocker / "db.sqlite3"), "PORT": "0"},
    )
    assert result.returncode == 1
    assert "store error" in result.stderr and "Traceback" not in result.stderr


def test_check_store_follows_the_store_url(tmp_path: Path) -> None:
    check_store = [sys.executable, "-m", "p2pdiff", "--check-store"]
    sqlite_url = f"sqlite:///{tmp_path}/from-url.sqlite3"  # four slashes: tmp_path is absolute
    result = run(check_store, tmp_path, {"P2PDIFF_STORE_URL": sqlite_url})
    assert result.returncode == 1
    assert f"no store at {tmp_path}/from-url.sqlite3" in result.stderr
    pg_url = "postgresql://app:pg-secret-word@db.example/queue"
    result = run(check_store, tmp_path, {"P2PDIFF_STORE_URL": pg_url})
    assert result.returncode == 2
    assert "checks SQLite stores; this one is postgresql://app:***@db.example/queue" in result.stderr
    assert "pg-secret-word" not in result.stdout + result.stderr


async def test_port_env_and_sigterm(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, env={"P2PDIFF_STORE_PATH": str(tmp_path / "db.sqlite3")})
    await server.start()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{server.port}/api/health") as resp,
    ):
        assert resp.status == 200
    assert await server.stop() == 0
