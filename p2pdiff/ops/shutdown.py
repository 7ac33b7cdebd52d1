"""Shutdown in bounded time: on SIGTERM the process is gone within ``shutdown_timeout_seconds`` + 1 s,
whatever clients do.

The schedule, from the moment the server stops listening (``on_shutdown``, right after the signal):

1. Requests in flight get ``shutdown_timeout_seconds``. Then every connection still open is cut
   (:meth:`Shutdown.cut`). aiohttp alone would not keep that bound: past the timeout it only fails
   the body reads of handlers still running, so a handler or response blocked writing to a client
   that reads nothing (a stalled event stream, a download) waits out the timeout a second time.
2. The helper leaves its rooms in what is left of ``LEAVE_SECONDS`` after that (goodbyes to a relay
   that does not answer are abandoned), then the store commits and closes.
3. A backstop for anything else (a thread stuck in ``getaddrinfo`` that the interpreter would join
   at exit, a bug): ``__main__`` arms :func:`arm_backstop`, which dumps every thread's stack and
   exits 1 once shutdown has taken ``shutdown_timeout_seconds`` + 1 s.

A ``201`` is unaffected by any of this: it is only sent once the task is committed.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import sys
import weakref
from collections.abc import AsyncIterator

from aiohttp import web

log = logging.getLogger(__name__)

# How long leaving the rooms may take after the requests' time is up: what keeps the whole shutdown
# within shutdown_timeout_seconds + 1 s, with room for closing the store and the interpreter's exit.
LEAVE_SECONDS = 0.5
# The promised bound past shutdown_timeout_seconds, enforced by the backstop.
BOUND_SECONDS = 1.0


class Shutdown:
    """The shutdown schedule of one app (see the module docstring)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        # The transport of every connection that carried a request. Weak: a closed connection's
        # transport is collected and drops out, so this holds the open ones only.
        self._connections: weakref.WeakSet[asyncio.Transport] = weakref.WeakSet()
        self._started: float | None = None
        self._cut_timer: asyncio.TimerHandle | None = None

    def track(self, request: web.BaseRequest) -> None:
        """Called by the request middleware for every request."""
        transport = request.transport
        if transport is not None:
            self._connections.add(transport)

    async def begin(self, app: web.Application) -> None:
        """``on_shutdown``: start the clock; cut what is still open when the requests' time is up."""
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        self._cut_timer = loop.call_later(self.grace, self.cut)

    def cut(self) -> int:
        """Abort every connection still open (``abort``: ``close`` would wait for a client that does
        not read). Returns how many were still busy."""
        busy = 0
        for transport in list(self._connections):
            if not transport.is_closing() or _unsent(transport):
                busy += 1
            transport.abort()
        if busy:
            log.warning("shutdown: cut %d connections still busy after %.1f s", busy, self.grace)
        return busy

    def leave_budget(self) -> float:
        """Seconds the helper may spend leaving its rooms from now."""
        if self._started is None:  # cleanup without a shutdown (a failed start-up)
            return self.grace + LEAVE_SECONDS
        return max(0.0, self._started + self.grace + LEAVE_SECONDS - asyncio.get_running_loop().time())

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        """A cleanup context, the app's last: once everything is closed the cut is not needed."""
        yield
        if self._cut_timer is not None:
            self._cut_timer.cancel()


def _unsent(transport: asyncio.BaseTransport) -> int:
    return transport.get_write_buffer_size() if isinstance(transport, asyncio.WriteTransport) else 0


def arm_backstop(grace: float) -> None:
    """From now, if the process still runs after ``grace`` + BOUND_SECONDS, write every thread's
    stack to stderr and exit 1. faulthandler's watchdog is a C thread: it fires even when the event
    loop or the main thread is stuck."""
    faulthandler.dump_traceback_later(grace + BOUND_SECONDS, exit=True, file=sys.stderr)
