"""Asyncio driver for the real Trystero test peers (trystero_peer.mjs, browser_peer.mjs).

    async with JsPeer.start(kind="node", wire="0.25") as p:
        await p.join("r1", app_id="app", relay_urls=["ws://127.0.0.1:PORT"])
        await p.make_action("r1", "chat")
        other = (await p.wait_for("peer-join", lambda e: e["room"] == "r1"))["peer"]
        await p.send("r1", "chat", {"hi": 1}, target=other)
        ev = await p.wait_for("action", lambda e: e["name"] == "chat")

Control protocol (one JSON object per line; the peer writes diagnostics to stderr only).
Commands on stdin, each with an optional ``req`` that is echoed in its reply:

    join        {room, appId, relayUrls: [ws://127.0.0.1:...], password?,
                 strategy?: mqtt|torrent|nostr|ws-relay (0.25 only),
                 trickleIce?}                                   -> joined {room, strategy, selfId}
    leave       {room}                                          -> left {room}
    makeAction  {room, name}                                    -> action-made {room, name}
    send        {room, action, kind?: json|text|binary, value? | size + seed?, meta?,
                 target?: peerId | [peerId]}                    -> sent {room, action, kind, len|bytes,
                                                                   sha256, to, missing, ms}
    ping        {room, peer, timeout?: ms}                      -> rtt {room, peer, ms}
    peers       {room}                                          -> peers {room, peers}
    selfId      {}                                              -> self {selfId}
    hold        {match, count?: 1}                              -> holding {match, count}
                (browser peer only, relay_gate.mjs) hold every message the relays deliver until
                ``count`` of them contain ``match``, then hand them all to Trystero back to back;
                that moment is the unsolicited ``released`` event
    quit        {}                                              -> bye {}, then the process exits

A failed command replies ``error {req, cmd, message}`` instead. Binary ``value`` is base64;
``size`` + ``seed`` send pattern_bytes / pattern_text (below). ``kind`` defaults to binary with
``size``, text for a string value, json otherwise (Trystero picks the wire encoding from the JS
type, so a json string still goes as text). Received data is reported only for actions the
receiver registered with makeAction (0.25 queues the rest until then; 0.22 drops it); send
registers the action on the sending side. ``send`` to all peers uses the room's active
peers; ``missing`` lists targets that were not active (Trystero silently skips them).
``sent`` means Trystero handed every chunk to the data channel, not that it arrived.
Sends and pings run concurrently with later commands; wait for ``sent`` to order them.

Unsolicited events:

    ready      {selfId, kind: node|browser, wire, ...}   first line, once the peer takes commands
    peer-join  {room, peer, ms}                          ms = since the join command
    peer-leave {room, peer}
    action     {room, name, peer, kind, meta?, ...}      text/json: len (UTF-8 bytes of the text or of
                                                         JSON.stringify), sha256, value if len <= 64 KiB
                                                         (else truncated: true); binary: bytes, sha256,
                                                         b64 if bytes <= 64 KiB. Big meta: metaLen +
                                                         metaSha256 instead of meta.
    join-error {room, error, peer}                       Trystero's onJoinError
    released   {held, matched}                           a ``hold`` ended: messages held, how many matched
    error      {message}                                 unhandled errors inside the peer

Every event carries ``ts`` (the peer's Date.now(), same clock as ours on one machine); the
driver adds ``_seq``, its position in this peer's event stream.
"""

# Timeouts are parameters on purpose (ASYNC109): on expiry they raise JsPeerError carrying the
# peer's recent events and stderr, which a bare asyncio.timeout around the call would lose.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

INTEROP_DIR = Path(__file__).resolve().parent
SCRIPTS = {"node": "trystero_peer.mjs", "browser": "browser_peer.mjs"}
Event = dict[str, Any]
Predicate = Callable[[Event], bool]

_UNSET: Any = object()


def _opt(x: Any) -> Any:
    return _UNSET if x is None else x


_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_BLOCK = 65536  # bytes per pattern block (16384 little-endian words)


# ---- deterministic payloads: the same generators as peer_core.mjs ----


def _xorshift_block(seed: int) -> int:
    x = ((seed ^ _GOLDEN) & _M32) or 1
    words = []
    for _ in range(_BLOCK // 4):
        x ^= (x << 13) & _M32
        x ^= x >> 17
        x ^= (x << 5) & _M32
        words.append(x)
    return int.from_bytes(struct.pack(f"<{len(words)}I", *words), "little")


def pattern_bytes(size: int, seed: int = 1) -> bytes:
    """The bytes a JS peer sends for ``send(kind="binary", size=size, seed=seed)``."""
    base = _xorshift_block(seed & _M32)
    blocks = []
    for k in range(-(-size // _BLOCK)):
        # block k = base block with every 32-bit word XORed with k * golden (one big-int XOR)
        mask = int.from_bytes(((k * _GOLDEN) & _M32).to_bytes(4, "little") * (_BLOCK // 4), "little")
        blocks.append((base ^ mask).to_bytes(_BLOCK, "little"))
    return b"".join(blocks)[:size]


_TEXT_TABLE = bytes(97 + b % 26 for b in range(256))


def pattern_text(size: int, seed: int = 1) -> str:
    """The text a JS peer sends for ``send(kind="text", size=size, seed=seed)``."""
    return pattern_bytes(size, seed).translate(_TEXT_TABLE).decode("ascii")


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def js_json(value: Any) -> str:
    """JSON.stringify's output for plain values (what a json ``action`` event's sha256 covers)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def action_bytes(ev: Event) -> bytes:
    """Payload of a binary ``action`` event (only events of <= 64 KiB carry it)."""
    return base64.b64decode(ev["b64"])


def loopback_only_problem() -> str | None:
    """Why Chromium must not run here, or None if the only network interface is ``lo``."""
    # if_nameindex asks the kernel for this process's namespace (/sys/class/net may still
    # show the host's interfaces, since sysfs is not remounted by unshare -n)
    ifaces = sorted(name for _, name in socket.if_nameindex())
    if ifaces != ["lo"]:
        return (
            f"network interfaces {ifaces}: the Chromium peer must run in a loopback-only network "
            "namespace, e.g. unshare -n -- bash -c 'ip link set lo up; .venv/bin/pytest tests/interop'"
        )
    return None


def _pids_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (here: a unique temp dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(entry))
    return pids


class JsPeerError(RuntimeError):
    pass


class JsPeer:
    """One running test peer process. Create it with ``JsPeer.start`` (context manager) or
    ``await JsPeer.launch(...)`` + ``await peer.close()``."""

    def __init__(self, proc: asyncio.subprocess.Process, kind: str, wire: str, name: str, history: int):
        self.proc = proc
        self.kind = kind
        self.wire = wire
        self.name = name
        self.self_id: str = ""
        self.ready: Event = {}
        self._history: deque[Event] = deque(maxlen=history)
        self._stderr: deque[str] = deque(maxlen=400)
        self._seq = 0
        self._reqs = itertools.count(1)
        self._changed = asyncio.Condition()
        self._stdout_done = False
        self._tmp: str | None = None
        self._tasks = [
            asyncio.create_task(self._read_stdout(), name=f"{name}-stdout"),
            asyncio.create_task(self._read_stderr(), name=f"{name}-stderr"),
        ]

    # ---- lifecycle ----

    @classmethod
    async def launch(
        cls,
        kind: str = "node",
        wire: str = "0.25",
        *,
        name: str | None = None,
        args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        ready_timeout: float | None = None,
        history: int = 2000,
    ) -> JsPeer:
        """Start the peer and wait for its ``ready`` event. ``args``: extra script options,
        e.g. ``["--media", "1"]`` for the browser peer (see the script headers)."""
        if kind not in SCRIPTS:
            raise ValueError(f"kind must be one of {sorted(SCRIPTS)}")
        if kind == "browser" and (problem := loopback_only_problem()):
            raise JsPeerError(problem)
        name = name or kind
        # the browser peer's Chromium profile goes here; close() removes it even after a kill
        tmp = tempfile.mkdtemp(prefix="jspeer-") if kind == "browser" else None
        proc = await asyncio.create_subprocess_exec(
            "node",
            SCRIPTS[kind],
            "--wire",
            wire,
            "--name",
            name,
            *(["--tmp", tmp] if tmp else []),
            *args,
            cwd=INTEROP_DIR,
            env={**os.environ, **(env or {})},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=4 << 20,  # an event line can carry up to 64 KiB of (escaped) value
            # own process group, so close() can kill it with its helpers (esbuild). Chromium is
            # not in it (playwright detaches it) but exits by itself when its control pipe closes.
            start_new_session=True,
        )
        peer = cls(proc, kind, wire, name, history)
        peer._tmp = tmp
        try:
            peer.ready = await peer.wait_for(
                "ready", timeout=ready_timeout or (60 if kind == "browser" else 20)
            )
        except BaseException:
            await peer.close(timeout=2)
            raise
        peer.self_id = peer.ready["selfId"]
        return peer

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, kind: str = "node", wire: str = "0.25", **kwargs: Any) -> AsyncIterator[JsPeer]:
        peer = await cls.launch(kind, wire, **kwargs)
        try:
            yield peer
        except BaseException as e:
            # pytest prints exception notes: the peer's stderr ends up in the failure report
            # (unless the error came from wait_for and already carries it)
            if isinstance(e, Exception) and f"--- JsPeer {peer.name} (" not in str(e):
                e.add_note(peer.describe())
            raise
        finally:
            await peer.close()

    async def close(self, timeout: float = 5.0) -> int | None:
        """quit, then SIGKILL the process group if it has not exited within ``timeout``."""
        if self.proc.returncode is None and self.proc.stdin and not self.proc.stdin.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self.proc.stdin.write(b'{"cmd":"quit"}\n')
                self.proc.stdin.close()  # EOF also means quit
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self._stderr.append(f"[jspeer] no exit {timeout}s after quit: killing")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tmp:
            # A killed browser_peer.mjs leaves Chromium behind (playwright starts it in its own
            # process group) and that Chromium rewrites its profile on the way out. Find it by
            # our unique profile path, kill it, and only then remove the directory.
            for _ in range(50):
                pids = _pids_mentioning(self._tmp)
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                await asyncio.sleep(0.1)
            shutil.rmtree(self._tmp, ignore_errors=True)
        return self.proc.returncode

    # ---- events ----

    async def _read_stdout(self) -> None:
        assert self.proc.stdout
        try:
            while line := await self.proc.stdout.readline():
                try:
                    ev = json.loads(line)
                except ValueError:
                    self._stderr.append(f"[stdout, not JSON] {line[:300]!r}")
                    continue
                ev["_seq"] = self._seq
                self._seq += 1
                self._history.append(ev)
                async with self._changed:
                    self._changed.notify_all()
        finally:
            self._stdout_done = True
            async with self._changed:
                self._changed.notify_all()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr
        async for line in self.proc.stderr:
            self._stderr.append(line.decode(errors="replace").rstrip())

    def mark(self) -> int:
        """Cursor for ``wait_for(since=...)``: only events that arrive after this call."""
        return self._seq

    def events(self, type_: str | None = None) -> list[Event]:
        return [e for e in self._history if type_ is None or e["type"] == type_]

    def stderr_tail(self, n: int = 60) -> str:
        return "\n".join(list(self._stderr)[-n:])

    def describe(self) -> str:
        last = [{k: v for k, v in e.items() if k not in ("value", "b64")} for e in list(self._history)[-15:]]
        return (
            f"--- JsPeer {self.name} ({self.kind}, wire {self.wire}, pid {self.proc.pid}, "
            f"exit {self.proc.returncode}) last events:\n"
            + "\n".join(json.dumps(e)[:400] for e in last)
            + f"\n--- stderr tail:\n{self.stderr_tail()}"
        )

    async def wait_for(
        self,
        type_: str | tuple[str, ...] | None,
        predicate: Predicate | None = None,
        timeout: float = 30.0,
        *,
        since: int = 0,
    ) -> Event:
        """First event (from the kept history on, or from ``since``) of that type matching
        ``predicate``. Raises JsPeerError on timeout or if the peer exits first."""
        types = (type_,) if isinstance(type_, str) else type_

        def match(e: Event) -> bool:
            return (types is None or e["type"] in types) and (predicate is None or predicate(e))

        next_seq = since
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    while not self._stdout_done:
                        for e in self._history:
                            if e["_seq"] >= next_seq and match(e):
                                return e
                        next_seq = max(next_seq, self._seq)
                        await self._changed.wait()
                # stdout closed: the process is exiting (its exit code goes into the report)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            raise JsPeerError(f"{self.name}: no {type_} event within {timeout}s\n{self.describe()}") from None
        raise JsPeerError(f"{self.name} exited while waiting for {type_}\n{self.describe()}")

    # ---- commands ----

    async def request(
        self, cmd: str, fields: dict[str, Any] | None = None, *, timeout: float = 30.0
    ) -> Event:
        """Send one command and return its reply event (raise JsPeerError on an ``error`` reply).
        Fields left unset (``_UNSET``) are not sent; None is sent as JSON null."""
        req = next(self._reqs)
        since = self.mark()
        body = {k: v for k, v in (fields or {}).items() if v is not _UNSET}
        line = json.dumps({"cmd": cmd, "req": req, **body})
        assert self.proc.stdin
        if self.proc.stdin.is_closing():
            raise JsPeerError(f"{self.name}: stdin closed, cannot send {cmd}")
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        ev = await self.wait_for(None, lambda e: e.get("req") == req, timeout, since=since)
        if ev["type"] == "error":
            raise JsPeerError(f"{self.name}: {cmd} failed: {ev['message']}")
        return ev

    async def join(
        self,
        room: str,
        *,
        app_id: str,
        relay_urls: list[str],
        password: str | None = None,
        strategy: str | None = None,
        trickle_ice: bool | None = None,
    ) -> Event:
        """Join (returns at once; wait for ``peer-join`` to see others)."""
        return await self.request(
            "join",
            {
                "room": room,
                "appId": app_id,
                "relayUrls": list(relay_urls),
                "password": _opt(password),
                "strategy": _opt(strategy),
                "trickleIce": _opt(trickle_ice),
            },
        )

    async def leave(self, room: str) -> Event:
        return await self.request("leave", {"room": room})

    async def make_action(self, room: str, name: str) -> Event:
        return await self.request("makeAction", {"room": room, "name": name})

    async def send(
        self,
        room: str,
        action: str,
        value: Any = _UNSET,
        *,
        kind: str | None = None,
        size: int | None = None,
        seed: int | None = None,
        meta: Any = _UNSET,
        target: str | list[str] | None = None,
        timeout: float = 120.0,
    ) -> Event:
        """Send and wait for ``sent``. ``bytes`` values go as binary; ``size`` (+ ``seed``) sends
        pattern_bytes (or pattern_text with kind="text")."""
        if isinstance(value, bytes | bytearray | memoryview):
            kind = kind or "binary"
            value = base64.b64encode(value).decode()
        return await self.request(
            "send",
            {
                "room": room,
                "action": action,
                "value": value,
                "meta": meta,
                "kind": _opt(kind),
                "size": _opt(size),
                "seed": _opt(seed),
                "target": _opt(target),
            },
            timeout=timeout,
        )

    async def ping(self, room: str, peer: str, timeout: float = 10.0) -> float:
        ev = await self.request(
            "ping", {"room": room, "peer": peer, "timeout": int(timeout * 1000)}, timeout=timeout + 5
        )
        return ev["ms"]

    async def peers(self, room: str) -> list[str]:
        return (await self.request("peers", {"room": room}))["peers"]

    # ---- the published app's behaviour (app_peer.mjs) ----

    async def behave_like_app(self, room: str, capabilities: dict[str, Any], *, step_ms: int = 50) -> None:
        """From now on act in ``room`` as the published app does: its six actions, capabilities
        to each joining peer, and (with ``hasGPU``) every `task` worked through one at a time with
        one `progress` per step up to 1.0 and nothing else (``app-progress`` / ``app-done``
        events). Call it right after ``join``, as the app registers its actions at once."""
        await self.request("behaveLikeApp", {"room": room, "capabilities": capabilities, "stepMs": step_ms})

    async def submit_task(
        self,
        room: str,
        prompt: str,
        *,
        api: str | None = None,
        options: dict[str, Any] | None = None,
        negative_prompt: str | None = None,
        post_first: bool = False,
        post_delay_ms: int | None = None,
    ) -> Event:
        """A task made on the page: the app's `queue` broadcast (id, prompt, status, createdBy,
        createdAt only) and, with ``api``, its POST of the full task to ``api``/api/queue without
        a room ~10 ms later (``post_first``: the POST first). Returns ``submitted`` {taskId,
        postStatus, postBody}."""
        return await self.request(
            "submitTask",
            {
                "room": room,
                "prompt": prompt,
                "api": _opt(api),
                "options": _opt(options),
                "negativePrompt": _opt(negative_prompt),
                "postFirst": post_first,
                "postDelayMs": _opt(post_delay_ms),
            },
        )

    async def get_self_id(self) -> str:
        return (await self.request("selfId"))["selfId"]

    async def hold(self, match: str, count: int = 1) -> None:
        """Browser peer: hold relay messages until ``count`` contain ``match``, then deliver them
        together (returns at once; wait for the ``released`` event)."""
        await self.request("hold", {"match": match, "count": count})

    # ---- conveniences for common waits ----

    async def wait_peer_join(
        self, room: str, peer: str | None = None, timeout: float = 30.0, since: int = 0
    ) -> Event:
        return await self.wait_for(
            "peer-join", lambda e: e["room"] == room and peer in (None, e["peer"]), timeout, since=since
        )

    async def wait_peer_leave(
        self, room: str, peer: str | None = None, timeout: float = 30.0, since: int = 0
    ) -> Event:
        return await self.wait_for(
            "peer-leave", lambda e: e["room"] == room and peer in (None, e["peer"]), timeout, since=since
        )

    async def wait_action(
        self,
        room: str,
        name: str,
        *,
        peer: str | None = None,
        predicate: Predicate | None = None,
        timeout: float = 30.0,
        since: int = 0,
    ) -> Event:
        def match(e: Event) -> bool:
            return (
                e["room"] == room
                and e["name"] == name
                and peer in (None, e["peer"])
                and (predicate is None or predicate(e))
            )

        return await self.wait_for("action", match, timeout, since=since)


if __name__ == "__main__":  # quick manual check: python jspeer.py SIZE SEED -> sha256
    print(sha256_hex(pattern_bytes(int(sys.argv[1]), int(sys.argv[2]))))


MEET_ATTEMPTS = 3


async def meet(
    a: JsPeer,
    b: JsPeer,
    room: str,
    url: str,
    app_id: str = "p2pdiff-jspeers",
    *,
    b_url: str | None = None,
    strategy: str | None = None,
    timeout: float = 60.0,
) -> None:
    """Both join ``room`` with a "data" action and wait until each sees the other; ``a`` signals
    through ``url``, ``b`` through ``b_url`` (default: the same). ``timeout`` per attempt: longer
    than the ~24 s after which a failed connection is reported, so a failure is seen as one.

    node-datachannel now and then fails ICE between two JS peers on loopback ("could not connect
    to peer ... after exchanging SDP", ~20 s in), and Trystero tries again only at a later
    announce. No code of ours is in that connection, and an app would rejoin: so do we, up to
    MEET_ATTEMPTS times. What the tests check comes after the meeting."""
    urls = {a.name: url, b.name: b_url or url}
    for _ in range(MEET_ATTEMPTS):
        since = {p.name: p.mark() for p in (a, b)}
        for p in (a, b):
            await p.join(room, app_id=app_id, relay_urls=[urls[p.name]], strategy=strategy)
            await p.make_action(room, "data")
        if await _met(a, b, room, since, timeout):
            return
        for p in (a, b):
            await p.leave(room)
    raise AssertionError(f"{a.name} and {b.name} did not meet in {MEET_ATTEMPTS} attempts")


async def _met(a: JsPeer, b: JsPeer, room: str, since: dict[str, int], timeout: float) -> bool:
    """Whether both see each other join; False as soon as either reports a join-error for the
    other (the side that gives up first is either one)."""
    waits = [
        asyncio.ensure_future(_sees(a, b, room, since[a.name], timeout)),
        asyncio.ensure_future(_sees(b, a, room, since[b.name], timeout)),
    ]
    try:
        for outcome in asyncio.as_completed(waits):
            if not await outcome:
                return False
        return True
    finally:
        for wait in waits:
            wait.cancel()


async def _sees(p: JsPeer, other: JsPeer, room: str, since: int, timeout: float) -> bool:
    """True on ``p``'s peer-join of ``other``, False on its join-error for ``other``."""
    ev = await p.wait_for(
        ("peer-join", "join-error"),
        lambda e: e.get("room") == room and e.get("peer") == other.self_id,
        timeout=timeout,
        since=since,
    )
    return ev["type"] == "peer-join"
