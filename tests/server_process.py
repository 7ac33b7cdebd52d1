"""Run the real server as a subprocess (for restart, kill and CLI tests)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Runs the server as ``python -m p2pdiff`` does, under an open-file limit set first (a connection
# flood then reaches it with a few hundred connections).
_LIMITED_LAUNCHER = (
    "import resource, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, ({}, {})); "
    "runpy.run_module('p2pdiff', run_name='__main__')"
)


def app_helper_env(relay_url: str, app_id: str, rooms: Iterable[str]) -> dict[str, str]:
    """Environment for a server whose helper sits in ``rooms`` as the published app needs it:
    nostr on a local relay, wire 0.22, dispatch on, ICE on loopback only."""
    return {
        "P2PDIFF_P2P_ENABLED": "true",
        "P2PDIFF_P2P_STRATEGY": "nostr",
        "P2PDIFF_P2P_RELAY_URLS": relay_url,
        "P2PDIFF_P2P_APP_ID": app_id,
        "P2PDIFF_P2P_ICE_SERVERS": "",
        "P2PDIFF_P2P_ICE_HOST_ADDRESSES": "127.0.0.1",
        "P2PDIFF_P2P_WIRE": "0.22",
        "P2PDIFF_P2P_DISPATCH": "true",
        "P2PDIFF_P2P_ROOMS": ",".join(rooms),
    }


class ServerProcess:
    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        args: list[str] | None = None,
        *,
        nofile: tuple[int, int] | None = None,
    ) -> None:
        """``nofile``: the (soft, hard) open-file limit the server starts with."""
        self.workdir = workdir
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("P2PDIFF_")},
            "PORT": str(self.port),
            "P2PDIFF_SERVER_HOST": "127.0.0.1",
            # No default public relays from tests: P2P tests pass local relay URLs explicitly.
            "P2PDIFF_P2P_ENABLED": "false",
            # Tests and benchmarks load the server from one address; rate limit tests set their own.
            "P2PDIFF_SERVER_RATE_LIMIT_PER_SECOND": "0",
            **(env or {}),
        }
        self.args = args or []
        self.entry = ["-m", "p2pdiff"] if nofile is None else ["-c", _LIMITED_LAUNCHER.format(*nofile)]
        self.proc: asyncio.subprocess.Process | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self, wait_seconds: float = 20) -> None:
        log = (self.workdir / "server.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.entry,
            *self.args,
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = asyncio.get_running_loop().time() + wait_seconds
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
                try:
                    async with session.get(f"{self.url}/api/health") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"server did not start: {self.log()}")
                await asyncio.sleep(0.05)

    async def __aenter__(self) -> ServerProcess:
        try:
            await self.start()
        except BaseException:
            await self._reap()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._reap()  # a test that failed half-way must not leave its server running

    async def _reap(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.kill()

    def log(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode or 0
