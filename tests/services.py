"""Real servers for tests, as subprocesses bound to 127.0.0.1 only.

``Service`` is the generic part: free-port selection, start with a readiness check, stop/kill
that wait for the process to exit, and restart on the *same* ports (waiting until the old
listener is really gone, so a dying server cannot answer the readiness probe; see pitfall 3 of
the interop harness README). Subclasses provide the command line and any config files:
``Mosquitto`` (MQTT broker), ``NostrRelay`` (NIP-01 relay, PyPI ``nostr-relay``),
``P2pdiffRelay`` (p2pdiff's own relay: a p2pdiff server with ``[relay] enabled``), ``Tracker``
(WebTorrent tracker, npm ``bittorrent-tracker`` via ``tests/interop/tracker.mjs``) and
``PostgresServer`` (a throwaway PostgreSQL cluster, Debian's ``postgresql``). The lifecycle is
synchronous: start/stop take milliseconds to ~2 s and tests may call them directly from async
code; only ``PostgresServer``'s database helpers are coroutines (they talk to the server with
asyncpg).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self, TypeVar

import asyncpg

from tests.server_process import app_helper_env

LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    """A test service failed to start or stop."""


class ServiceNotInstalled(ServiceError):
    """The server binary is missing on this machine."""


def pick_free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Distinct ports the kernel considers free right now (all held open until all are chosen)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_bindable(host: str, port: int) -> bool:
    """Whether a server (which, like mosquitto, sets SO_REUSEADDR) could listen on the port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def find_executable(name: str, *extra_dirs: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


class Service:
    """A server subprocess on fixed loopback ports that survives restarts.

    Subclasses set ``name`` and ``port_names`` and implement ``command()``; ``prepare()`` writes
    config files before every start. Ports are picked on the first start and reused afterwards.
    """

    name = "service"
    port_names: tuple[str, ...] = ()
    host = LOOPBACK
    # If a start fails with one of these in the log and the ports were picked by us (not yet
    # used), another process took a port between picking and binding: pick again.
    port_clash_markers = ("Address already in use", "EADDRINUSE")
    # What stop() sends first (SIGKILL follows after its timeout).
    stop_signal = signal.SIGTERM

    def __init__(self, workdir: Path | str | None = None, *, startup_timeout: float = 10.0) -> None:
        self._own_workdir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.output_path = self.workdir / f"{self.name}.out"
        self._ports_fixed = False
        self._output: IO[bytes] | None = None

    # ---------------------------------------------------------------- subclass API

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write config files; called before every start."""

    def ready(self) -> bool:
        """Whether the service answers; by default every port accepts TCP connections."""
        return all(port_accepts(self.host, port) for port in self.ports.values())

    def process_cwd(self) -> Path:
        """The directory the server process starts in."""
        return self.workdir

    def environment(self) -> dict[str, str] | None:
        """The server process's environment (None: this process's own)."""
        return None

    def log_text(self) -> str:
        return self.output_path.read_text(errors="replace") if self.output_path.exists() else ""

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc is not None else None

    def allocate_ports(self) -> dict[str, int]:
        """Choose the ports now, without starting (e.g. to test clients against an absent server).
        Ports chosen this way are final: a clash at start is an error, not a silent re-pick."""
        if not self.ports:
            self.ports = dict(zip(self.port_names, pick_free_ports(len(self.port_names)), strict=True))
        self._ports_fixed = True
        return self.ports

    def start(self) -> None:
        if self.running:
            raise ServiceError(f"{self.name} is already running (pid {self.pid})")
        for _ in range(3):
            if not self.ports:
                self.ports = dict(zip(self.port_names, pick_free_ports(len(self.port_names)), strict=True))
            self._wait_ports_free()
            self.prepare()
            self._spawn()
            try:
                self._wait_ready()
            except _PortClash:
                if self._ports_fixed:
                    raise ServiceError(f"{self.name}: ports {self.ports} are taken: {self._tail()}") from None
                self.ports = {}  # lost a race for a freshly picked port: try other ports
                continue
            self._ports_fixed = True
            return
        raise ServiceError(f"{self.name}: could not get free ports after 3 tries")

    def stop(self, timeout: float = 5.0) -> None:
        """``stop_signal``, then SIGKILL after ``timeout``; returns once the process has exited."""
        if self.running and self.proc is not None:
            self.proc.send_signal(self.stop_signal)
            self.proc.send_signal(signal.SIGCONT)  # a paused process only sees the signal once resumed
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_output()

    def kill(self) -> None:
        """SIGKILL (the server gets no chance to say goodbye); returns once it has exited."""
        if self.running and self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self._close_output()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server, a half-open link)."""
        if self.running and self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running and self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop (if running) and start again on the same ports."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ---------------------------------------------------------------- internals

    def _spawn(self) -> None:
        self._close_output()
        self._output = open(self.output_path, "ab")  # noqa: SIM115 - kept open for the process's life
        self._output.write(f"--- start {datetime.datetime.now().isoformat()} ports {self.ports}\n".encode())
        self._output.flush()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.process_cwd(),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C aimed at pytest must not hit the server first
        )

    def _wait_ports_free(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(port_bindable(self.host, port) for port in self.ports.values()):
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name}: ports {self.ports} still in use after {timeout} s")
            time.sleep(0.02)

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                self._close_output()
                tail = self._tail()
                if any(marker in tail for marker in self.port_clash_markers):
                    raise _PortClash
                raise ServiceError(f"{self.name} exited with {self.proc.returncode} during start-up: {tail}")
            if self.ready():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise ServiceError(f"{self.name} not ready after {self.startup_timeout} s: {self._tail()}")
            time.sleep(0.02)

    def _tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None


class _PortClash(Exception):
    pass


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""

    ca_cert: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path, hosts: tuple[str, ...] = (LOOPBACK, "localhost")) -> TlsFiles:
    """Write a CA and a CA-signed server cert (EC P-256, one day) into ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pdiff test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key.chmod(0o600)
    return files


class Mosquitto(Service):
    """An anonymous mosquitto with a plain MQTT and a WebSocket listener on 127.0.0.1 (plus
    ``mqtts`` and ``wss`` listeners when ``tls`` is given)."""

    name = "mosquitto"
    search_dirs = ("/usr/sbin", "/usr/local/sbin")

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        tls: TlsFiles | None = None,
        executable: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        found = executable or find_executable("mosquitto", *self.search_dirs)
        if found is None:
            raise ServiceNotInstalled(
                "mosquitto is not installed (looked in PATH and /usr/sbin); "
                "install it with `apt-get install -y mosquitto`"
            )
        self.executable = found
        self.tls = tls
        self.port_names = ("tcp", "ws", "mqtts", "wss") if tls else ("tcp", "ws")
        super().__init__(workdir, startup_timeout=startup_timeout)
        self.config_path = self.workdir / "mosquitto.conf"

    @property
    def tcp_url(self) -> str:
        return f"mqtt://{self.host}:{self.ports['tcp']}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.ports['ws']}"

    @property
    def mqtts_url(self) -> str:
        return f"mqtts://{self.host}:{self.ports['mqtts']}"

    @property
    def wss_url(self) -> str:
        return f"wss://{self.host}:{self.ports['wss']}"

    def command(self) -> list[str]:
        return [self.executable, "-c", str(self.config_path)]

    def prepare(self) -> None:
        lines = [
            "# generated by tests/services.py - loopback only",
            "per_listener_settings false",
            "allow_anonymous true",
            "persistence false",
            "log_dest stderr",  # unbuffered, unlike stdout to a file
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # Debian's build drops to user 'mosquitto' when started as root; stay root so files in
            # the workdir stay readable.
            lines.append("user root")
        lines += self._listener("tcp", "mqtt")
        lines += self._listener("ws", "websockets")
        if self.tls:
            lines += self._listener("mqtts", "mqtt", tls=True)
            lines += self._listener("wss", "websockets", tls=True)
        self.config_path.write_text("\n".join(lines) + "\n")

    def _listener(self, port_name: str, protocol: str, *, tls: bool = False) -> list[str]:
        lines = ["", f"listener {self.ports[port_name]} {self.host}", f"protocol {protocol}"]
        if protocol == "websockets":
            lines.append("socket_domain ipv4")
        if tls:
            assert self.tls is not None
            lines += [f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
        return lines


class NostrRelay(Service):
    """A real NIP-01 relay on 127.0.0.1: PyPI ``nostr-relay`` 1.14 (falcon + uvicorn + SQLite),
    installed by the project's ``test`` extra.

    It relays ephemeral events (kinds 20000-29999) to live subscriptions matching ``kinds``,
    ``since`` and ``#x``, which is all Trystero uses. Unlike most public relays it also keeps
    them in SQLite until its garbage collector runs (300 s), so a later REQ whose ``since``
    covers them gets them replayed; the database is removed before every start, as a restarted
    relay has no ephemeral events.

    ``verify=False`` drops the signature/id validator, so events with bad signatures or ids are
    relayed like any other (to test that clients check them). ``rate_limits`` takes the relay's
    own syntax, e.g. ``{"ip": {"EVENT": "2/s"}}``; it then answers
    ``["OK",id,false,"rate-limited: slow down"]`` (and sleeps a little before answering).
    """

    name = "nostr-relay"
    port_names = ("ws",)
    database = "nostr.sqlite3"

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        verify: bool = True,
        rate_limits: dict[str, dict[str, str]] | None = None,
        max_event_size: int = 65536,
        executable: str | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        # The console script sits next to the interpreter running the tests (the project venv).
        found = executable or find_executable("nostr-relay", str(Path(sys.executable).parent))
        if found is None:
            raise ServiceNotInstalled(
                "nostr-relay is not installed; install the test extra: pip install -e '.[test]'"
            )
        self.executable = found
        self.verify = verify
        self.rate_limits = rate_limits
        self.max_event_size = max_event_size
        super().__init__(workdir, startup_timeout=startup_timeout)
        self.config_path = self.workdir / "nostr-relay.yaml"

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.ports['ws']}/"

    def command(self) -> list[str]:
        return [self.executable, "-c", str(self.config_path), "serve", "--use-uvicorn"]

    def prepare(self) -> None:
        (self.workdir / self.database).unlink(missing_ok=True)
        validators = ["nostr_relay.validators.is_not_too_large"]
        if self.verify:
            validators.append("nostr_relay.validators.is_signed")
        config: dict[str, Any] = {
            "DEBUG": False,
            "relay_name": "p2pdiff test relay",
            "max_event_size": self.max_event_size,
            "storage": {
                "sqlalchemy.url": f"sqlite+aiosqlite:///{self.database}",
                "validators": validators,
            },
            # run_with_uvicorn() hands this section to uvicorn.Config. A short graceful shutdown:
            # uvicorn otherwise waits for every open WebSocket before exiting on SIGTERM.
            "gunicorn": {
                "bind": f"{self.host}:{self.ports['ws']}",
                "log_level": "warning",
                "timeout_graceful_shutdown": 1,
            },
            "verification": {"nip05_verification": "disabled"},
            "authentication": {"enabled": False},
            "logging": {
                "version": 1,
                "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
                "handlers": {
                    "out": {
                        "class": "logging.StreamHandler",
                        "formatter": "plain",
                        "stream": "ext://sys.stderr",
                    }
                },
                "root": {"level": "INFO", "handlers": ["out"]},
            },
        }
        if self.rate_limits:
            config["rate_limits"] = self.rate_limits
        # JSON is YAML, so no YAML writer is needed here.
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")


class P2pdiffRelay(Service):
    """p2pdiff's own Nostr relay: ``python -m p2pdiff`` with ``[relay] enabled`` on 127.0.0.1,
    the relay at ``.url`` (``ws://127.0.0.1:PORT/nostr``, the shape of ``NostrRelay.url``, so a
    fixture can hand out either), its ws-relay endpoint at ``.ws_relay_url``, its REST API at
    ``.http_url``. The store is SQLite in the workdir and survives restarts; the relay keeps
    nothing, as the design says.

    The helper is off unless ``helper_app_id`` is given: then it is on for that app id, on
    this relay only (``[p2p] relay_urls`` = ``.url``, nostr, ICE on loopback, wire 0.22 and
    dispatch by default: tests.server_process.app_helper_env), in no room until one is joined
    over REST. ``env`` (``P2PDIFF_*`` settings) comes last and wins. ``stop()`` is SIGTERM, a
    graceful shutdown; ``kill()`` is a crash.
    """

    name = "p2pdiff-relay"
    port_names = ("http",)
    path = "/nostr"
    ws_relay_path = "/ws-relay"
    # aiohttp's bind error: "[Errno 98] error while attempting to bind ...: address already in use"
    port_clash_markers = (*Service.port_clash_markers, "address already in use")

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        helper_app_id: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.env = dict(env or {})
        self.helper_app_id = helper_app_id
        super().__init__(workdir, startup_timeout=startup_timeout)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.ports['http']}{self.path}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.ports['http']}"

    @property
    def ws_relay_url(self) -> str:
        """Its endpoint of Trystero's ws-relay protocol (``[relay] ws_relay_path``)."""
        return f"ws://{self.host}:{self.ports['http']}{self.ws_relay_path}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "p2pdiff"]

    def environment(self) -> dict[str, str]:
        settings = {
            "PORT": str(self.ports["http"]),
            "P2PDIFF_SERVER_HOST": self.host,
            # Tests load the server from one address (as tests.server_process.ServerProcess).
            "P2PDIFF_SERVER_RATE_LIMIT_PER_SECOND": "0",
            "P2PDIFF_RELAY_ENABLED": "true",
            "P2PDIFF_RELAY_PATH": self.path,
            "P2PDIFF_RELAY_WS_RELAY_PATH": self.ws_relay_path,
            "P2PDIFF_P2P_ENABLED": "false",
        }
        if self.helper_app_id is not None:
            settings |= app_helper_env(self.url, self.helper_app_id, rooms=())
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("P2PDIFF_")}
        return inherited | settings | self.env

    def ready(self) -> bool:
        # The port alone is not enough: a helper that is still starting is not serving yet.
        try:
            with urllib.request.urlopen(f"{self.http_url}/api/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


INTEROP_DIR = Path(__file__).resolve().parent / "interop"


class Tracker(Service):
    """A real WebTorrent tracker on 127.0.0.1: npm ``bittorrent-tracker`` 11.x (what Trystero's
    torrent peers were verified against), WebSocket only, launched by ``tests/interop/tracker.mjs``
    from the pinned ``tests/interop/node_modules`` (``npm ci`` there; the package.json override
    keeps npm from fetching a second node-datachannel, harness README pitfall 1).

    ``interval_ms`` is the server's ``interval`` option: WebSocket clients are told
    ``ceil(interval_ms / 5000)`` seconds (the default 600000 gives ``"interval":120``).
    ``log_frames=True`` records every frame clients send (:meth:`frames`), byte for byte.
    ``stop()`` closes client sockets with 1001 first (a graceful restart); ``kill()`` is a crash.
    A restarted tracker has empty swarms, as a real one.
    """

    name = "bittorrent-tracker"
    port_names = ("ws",)
    ready_marker = "TRACKER_READY "

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        interval_ms: int | None = None,
        log_frames: bool = False,
        node: str | None = None,
        startup_timeout: float = 15.0,
    ) -> None:
        found = node or shutil.which("node")
        if found is None:
            raise ServiceNotInstalled("node is not installed (the bittorrent-tracker service needs it)")
        if not (INTEROP_DIR / "node_modules" / "bittorrent-tracker").is_dir():
            raise ServiceNotInstalled(
                "bittorrent-tracker is not installed; run `npm ci` in tests/interop (or `make` its target)"
            )
        self.node = found
        self.interval_ms = interval_ms
        self.log_frames = log_frames
        super().__init__(workdir, startup_timeout=startup_timeout)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.ports['ws']}"

    def command(self) -> list[str]:
        cmd = [self.node, str(INTEROP_DIR / "tracker.mjs"), "--port", str(self.ports["ws"])]
        if self.interval_ms is not None:
            cmd += ["--interval", str(self.interval_ms)]
        if self.log_frames:
            cmd += ["--log-frames", "1"]
        return cmd

    def ready(self) -> bool:
        # The port alone is not enough: the marker must come from *this* run (the log is appended
        # to across restarts, each run after a "--- start" line written by _spawn).
        current_run = self.log_text().rpartition("--- start ")[2]
        return self.ready_marker in current_run and super().ready()

    def frames(self) -> list[str]:
        """Raw frames clients sent, oldest first, across restarts (needs ``log_frames=True``)."""
        prefix = "FRAME "
        return [line[len(prefix) :] for line in self.log_text().splitlines() if line.startswith(prefix)]

    def announces(self) -> list[dict[str, Any]]:
        """:meth:`frames` parsed (frames that are not JSON objects are skipped)."""
        parsed = []
        for frame in self.frames():
            try:
                value = json.loads(frame)
            except ValueError:
                continue
            if isinstance(value, dict):
                parsed.append(value)
        return parsed


def postgres_bin_dirs() -> list[str]:
    """Debian's PostgreSQL binary directories (off PATH), newest major version first."""
    dirs = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if path.parent.name.isdigit()]
    return [str(path) for path in sorted(dirs, key=lambda path: int(path.parent.name), reverse=True)]


class PostgresServer(Service):
    """A throwaway PostgreSQL cluster on 127.0.0.1: ``initdb`` (superuser ``p2pdiff``) on the
    first start, then ``postgres`` with fsync on, as in production. Restarts keep the data (a
    kill -9 test finds what was committed); ``cleanup()`` removes it. Clients are trusted, unless
    ``password`` is given: then TCP clients must present it (SCRAM), as against a real server.

    ``initdb`` and ``postgres`` refuse to run as uid 0. As root of the machine (CI) they run as
    Debian's ``postgres`` system user through ``setpriv``, which execs in place, so ``proc`` is
    the postmaster itself and ``kill()`` hits it. As root of a user namespace (scripts/netns.sh
    run by an ordinary user: uid 0 is that user, and no other uid exists there) they run in a
    nested user namespace where that same user is uid 1. The cluster lives in its own short temp
    dir, never in ``workdir``: the ``postgres`` user must reach it (pytest's tmp dirs are private
    to root) and the Unix socket path in it must stay under 108 bytes.

    ``create_database()`` / ``drop_database()`` give each test its own database.
    """

    name = "postgres"
    port_names = ("pg",)
    superuser = "p2pdiff"
    system_user = "postgres"
    # SIGINT is PostgreSQL's "fast" shutdown: clients are disconnected, then a clean checkpoint.
    # SIGTERM ("smart") would wait for every client (a test's leftover pool) to leave first.
    stop_signal = signal.SIGINT
    ready_marker = "database system is ready to accept connections"
    _database_name = re.compile(r"[a-z_][a-z0-9_]{0,62}")

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        bin_dir: str | None = None,
        password: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        initdb = find_executable("initdb", *([bin_dir] if bin_dir else postgres_bin_dirs()))
        if initdb is None:
            raise ServiceNotInstalled(
                "PostgreSQL is not installed (looked for initdb in PATH and /usr/lib/postgresql/*/bin); "
                "install it with `apt-get install -y postgresql`"
            )
        # postgres from the same installation as initdb (PATH may hold a symlink to one version).
        self.bin_dir = Path(initdb).resolve().parent
        self.initdb = str(self.bin_dir / "initdb")
        self.postgres = str(self.bin_dir / "postgres")
        self.password = password
        self._as_server_user = self._non_root_prefix()
        super().__init__(workdir, startup_timeout=startup_timeout)
        self.cluster_dir = Path(tempfile.mkdtemp(prefix="pgcluster-"))
        self.data_dir = self.cluster_dir / "data"
        self._give_to_server_user(self.cluster_dir)
        self._database_numbers = itertools.count(1)

    @property
    def port(self) -> int:
        return self.ports["pg"]

    def url(self, database: str = "postgres") -> str:
        """The superuser's URL (with the password, percent-encoded, if the server has one)."""
        user = self.superuser
        if self.password is not None:
            user += ":" + urllib.parse.quote(self.password, safe="")
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def command(self) -> list[str]:
        return [
            *self._as_server_user,
            self.postgres,
            f"-D{self.data_dir}",
            f"--listen_addresses={self.host}",
            f"--port={self.port}",
            f"--unix_socket_directories={self.cluster_dir}",
            "--fsync=on",
            # Recovery after a kill first flushes the whole data directory: one syncfs() of its
            # file system, not an fsync() per file (which took 4 of a 5 s restart here).
            "--recovery_init_sync_method=syncfs",
            "--shared_buffers=16MB",
            # Each test's app holds a pool, several with two or more nodes.
            "--max_connections=200",
        ]

    def process_cwd(self) -> Path:
        # One the server user can enter (postgres changes back to its start directory).
        return self.cluster_dir

    def prepare(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        command = [
            *self._as_server_user,
            self.initdb,
            f"--pgdata={self.data_dir}",
            f"--username={self.superuser}",
            "--no-locale",  # C messages: the ready marker is matched in the log
            "--encoding=UTF8",
            # initdb's closing fsync of the fresh cluster; the server itself keeps fsync on.
            "--no-sync",
        ]
        # A file, not /dev/stdin: the postgres user may not reopen a pipe root created.
        password_file = self.cluster_dir / "initdb-password"
        if self.password is None:
            command.append("--auth=trust")
        else:
            password_file.write_text(self.password + "\n")
            self._give_to_server_user(password_file)
            command += ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={password_file}"]
        try:
            result = subprocess.run(
                command,
                cwd=self.cluster_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            password_file.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ServiceError(f"initdb exited with {result.returncode}: {result.stdout}{result.stderr}")

    def ready(self) -> bool:
        # The marker must come from this run (the log is appended to across restarts).
        return self.ready_marker in self.log_text().rpartition("--- start ")[2]

    def kill(self) -> None:
        """SIGKILL to the postmaster and every process it started, as a crash of the machine would.

        Each backend is in a session of its own (PostgreSQL calls setsid() in every child), so a
        process-group kill misses them; a backend that has not yet noticed its postmaster's death
        still answers a query, and keeps the shared memory a restart then refuses to share."""
        if self.running and self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)  # no new backends while they are looked for
            for child in _child_pids(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
        self._close_output()

    def cleanup(self) -> None:
        super().cleanup()
        shutil.rmtree(self.cluster_dir, ignore_errors=True)

    async def create_database(self, name: str | None = None) -> str:
        """A new empty database (``test_N`` unless named); returns its URL."""
        name = name or f"test_{next(self._database_numbers)}"
        await self._execute(f'CREATE DATABASE "{self._checked(name)}"')
        return self.url(name)

    async def drop_database(self, name: str) -> None:
        """Drop it, disconnecting whatever still uses it (a test's leftover pool)."""
        await self._execute(f'DROP DATABASE IF EXISTS "{self._checked(name)}" WITH (FORCE)')

    async def _execute(self, statement: str) -> None:
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    def _checked(self, name: str) -> str:
        # Names go into SQL as identifiers; only plain lower-case ones, which need no escaping.
        if not self._database_name.fullmatch(name):
            raise ValueError(f"database name {name!r} is not [a-z_][a-z0-9_]* (at most 63 characters)")
        return name

    def _give_to_server_user(self, path: Path) -> None:
        if self._system_account is not None:
            os.chown(path, self._system_account.pw_uid, self._system_account.pw_gid)

    def _non_root_prefix(self) -> list[str]:
        """The command prefix that runs a PostgreSQL program as a uid other than 0 (and, as root
        of the machine, sets ``_system_account``: the user that must own the cluster)."""
        self._system_account: pwd.struct_passwd | None = None
        if os.geteuid() != 0:
            return []
        if not _initial_user_namespace():
            return ["unshare", "--user", "--map-user=1", "--map-group=1", "--"]
        try:
            self._system_account = pwd.getpwnam(self.system_user)
        except KeyError:
            raise ServiceNotInstalled(
                f"as root, PostgreSQL runs as the system user {self.system_user!r}, which is missing "
                "(Debian's postgresql package creates it)"
            ) from None
        return ["setpriv", f"--reuid={self.system_user}", f"--regid={self.system_user}", "--init-groups"]


def _child_pids(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def _initial_user_namespace() -> bool:
    """Whether this process is in the machine's own user namespace (every uid mapped to itself)."""
    try:
        return Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


S = TypeVar("S", bound=Service)


@contextlib.contextmanager
def running(service: S) -> Iterator[S]:
    """``with running(Mosquitto()) as broker:`` - start, and always clean up."""
    service.start()
    try:
        yield service
    finally:
        service.cleanup()


async def refuse_task_rows(conn: asyncpg.Connection, prompt: str = "boom") -> None:
    """Make a database refuse every task row with ``prompt`` (as a full disk or a constraint
    would refuse a commit): a trigger that raises."""
    await conn.execute(
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
        f"IF NEW.prompt = '{prompt}' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$ "
        "LANGUAGE plpgsql"
    )
    await conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON tasks FOR EACH ROW EXECUTE FUNCTION refuse()")
