"""Logging: one JSON object per line (or plain text), the request id of the current request on each record.

The request id lives in a contextvar. aiohttp runs every request in its own task (a copy of the
connection's context), so a value set by the request middleware is seen by everything that request
logs, including the access log line written after the handler, and never leaks into the next request.

Two guards sit on the one handler: :class:`RepeatFilter` lets an identical warning or error through
once per window and counts the rest (a connection flood makes asyncio log every refused accept), and
:class:`RedactingFormatter` masks the config's secrets in every line, whoever wrote it.

The access log writes a line per request. Through the logging machinery (a LogRecord, the filters,
the formatter) a line costs about 12 µs, more than answering a cached GET; so with JSON lines
:class:`AccessLogger` writes the same line itself, straight to the one handler (:class:`LineHandler`),
secrets masked all the same.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import IO, Any

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

REQUEST_ID: ContextVar[str | None] = ContextVar("p2pdiff_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is emitted as a field.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime", "request_id"}
)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class RequestIdFilter(logging.Filter):
    """Stamps ``record.request_id`` from the contextvar (``-`` outside a request), for both formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


def _json_head(created: float, level: str, logger: str, msg: str, request_id: str | None) -> dict[str, Any]:
    """The fields every JSON line starts with, in this order."""
    data: dict[str, Any] = {"ts": _iso(created), "level": level, "logger": logger, "msg": msg}
    if request_id is not None:
        data["request_id"] = request_id
    return data


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", "-")
        data = _json_head(
            record.created,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            None if request_id == "-" else request_id,
        )
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in data:
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        # default=str: a stray object in ``extra`` must not cost us the log line.
        return orjson.dumps(data, default=str).decode()


def _iso(created: float) -> str:
    return _iso_ms(int(created * 1000))


@functools.lru_cache(maxsize=1)
def _iso_ms(ms: int) -> str:
    # strftime costs a microsecond; under load many lines share a millisecond.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


class RedactingFormatter(logging.Formatter):
    """Formats with ``inner``, then masks every secret in the line as ``***``.

    Nothing of ours logs a secret; this catches what a library puts into a message or a traceback
    (a relay URL with its password in an exception). A secret is matched as written and as it looks
    inside a JSON string or a Python repr (escaped quotes, backslashes, control characters).
    """

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self.inner = inner
        forms = {form for secret in secrets if secret for form in _escaped_forms(secret)}
        # Longest first, so a secret that contains another is masked whole.
        self._forms = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, self._forms))) if self._forms else None

    def format(self, record: logging.LogRecord) -> str:
        return self.mask(self.inner.format(record))

    def mask(self, text: str) -> str:
        # A substring test per form first: ten times cheaper than the regex on a line without any.
        for form in self._forms:
            if form in text:
                assert self._pattern is not None
                return self._pattern.sub("***", text)
        return text


def _escaped_forms(secret: str) -> set[str]:
    forms = {secret, repr(secret)[1:-1]}
    return forms | {orjson.dumps(form).decode()[1:-1] for form in forms}


# Repeats of one warning or error are counted for this long before the count is logged.
REPEAT_WINDOW_SECONDS = 10.0
# Kinds of record with an open window; past it the oldest window is closed early.
REPEAT_MAX_KINDS = 1000


@dataclass(slots=True)
class _Window:
    # What the summary needs of the first record; not the record itself, which may hold a traceback
    # and through it every local of the failed frames.
    first: tuple[str, int, str, int, str]  # logger, level, pathname, line, message
    start: float
    last: float
    repeats: int = 0


class RepeatFilter(logging.Filter):
    """Records at ``level`` or above: the first of a kind (logger, level, first line of the message
    template) passes, repeats within ``window`` seconds are dropped and counted; when the window has
    passed, one record says how many there were ("... (repeated N more times in S s)", field
    ``repeated``).

    Windows are closed on the next record of any kind and by :meth:`close_due` (the app calls it
    periodically, so a flood that stopped is still reported); :meth:`flush` closes them all.
    """

    def __init__(
        self,
        emit: Callable[[logging.LogRecord], object],
        *,
        level: int = logging.WARNING,
        window: float = REPEAT_WINDOW_SECONDS,
        max_kinds: int = REPEAT_MAX_KINDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.emit = emit
        self.level = level
        self.window = window
        self.max_kinds = max_kinds
        self.clock = clock
        # Insertion order is start order (a window is only ever added at the end), so the due ones
        # are always at the front. Bounded by max_kinds.
        self._windows: dict[tuple[str, int, str], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if hasattr(record, "repeated"):
            return True  # one of our summaries
        now = self.clock()
        self.close_due(now)
        if record.levelno < self.level:
            return True
        template = record.msg if isinstance(record.msg, str) else record.getMessage()
        # The first line only: asyncio's loop errors come formatted, with what differs between
        # repeats (a timer's due time, a socket) on the lines after it.
        key = (record.name, record.levelno, template.partition("\n")[0])
        window = self._windows.get(key)
        if window is not None:
            window.repeats += 1
            window.last = now
            return False
        first = (record.name, record.levelno, record.pathname, record.lineno, record.getMessage())
        self._windows[key] = _Window(first, now, now)
        if len(self._windows) > self.max_kinds:
            self._close(next(iter(self._windows)))
        return True

    def close_due(self, now: float | None = None) -> None:
        """Report and close the windows that have passed."""
        now = self.clock() if now is None else now
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if now - window.start < self.window:
                return
            self._close(key)

    def flush(self) -> None:
        """Report and close every window (at exit)."""
        while self._windows:
            self._close(next(iter(self._windows)))

    def _close(self, key: tuple[str, int, str]) -> None:
        window = self._windows.pop(key)
        if not window.repeats:
            return
        name, level, pathname, lineno, message = window.first
        seconds = max(1, math.ceil(window.last - window.start))
        summary = logging.LogRecord(
            name,
            level,
            pathname,
            lineno,
            "%s (repeated %d more times in %d s)",
            (message, window.repeats, seconds),
            None,
        )
        summary.repeated = window.repeats
        self.emit(summary)


class LineHandler(logging.StreamHandler[IO[str]]):
    """The handler :func:`setup_logging` installs: records as lines through ``formatter``, and lines
    written whole by :meth:`write_json` (the access log's), masked by the same formatter.

    Lines below WARNING wait until the event loop's current round is over and go out in one write
    (a busy round answers dozens of requests: one system call for all their access lines, not one
    each). A warning or error, and any line logged outside the event loop, goes out at once with
    everything before it, so a crash report is never held back.
    """

    def __init__(self, stream: IO[str], formatter: RedactingFormatter) -> None:
        super().__init__(stream)
        self.setFormatter(formatter)
        self.redacting = formatter
        self.json = isinstance(formatter.inner, JsonFormatter)
        assert self.lock is not None  # created by Handler.__init__
        self._mutex = self.lock
        self._pending: list[str] = []
        # The loop on which a flush of the pending lines is scheduled.
        self._flush_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._write(line, at_once=record.levelno >= logging.WARNING)

    def write_json(self, data: dict[str, Any]) -> None:
        """Write ``data`` as one JSON line, as :class:`JsonFormatter` would a record with these fields."""
        self._write(self.redacting.mask(orjson.dumps(data, default=str).decode()), at_once=False)

    def flush(self) -> None:
        with self._mutex:
            self._flush_on = None
            lines, self._pending = self._pending, []
            try:
                if lines:
                    self.stream.write(self.terminator.join(lines) + self.terminator)
                self.stream.flush()
            except Exception:  # as for a record: a failing stream must not fail the caller
                self.handleError(logging.makeLogRecord({"msg": lines[-1] if lines else ""}))

    def _write(self, line: str, *, at_once: bool) -> None:
        with self._mutex:
            self._pending.append(line)
            if at_once or not self._flush_later():
                self.flush()

    def _flush_later(self) -> bool:
        """Schedule a flush at the end of this loop round; False outside the event loop (another
        thread, or before and after the server), where the caller flushes now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self._flush_on is loop:
            return True
        if self._flush_on is not None:  # scheduled on a loop that has ended (tests run several)
            return False
        loop.call_soon(self.flush)
        self._flush_on = loop
        return True


def setup_logging(level: str, fmt: str, stream: IO[str] | None = None, secrets: Iterable[str] = ()) -> None:
    """Replace the root handlers with one that writes ``fmt`` ("json" or "text") lines to stderr,
    repeated warnings summarised (:class:`RepeatFilter`) and ``secrets`` masked."""
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler = LineHandler(stream or sys.stderr, RedactingFormatter(formatter, secrets))
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RepeatFilter(handler.handle))
    root = logging.getLogger()
    for old in root.handlers[:]:
        old.flush()  # a LineHandler may hold lines of this loop round
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def repeat_filters() -> list[RepeatFilter]:
    """The repeat filters on the root logger's handlers (none unless setup_logging ran)."""
    return [f for h in logging.getLogger().handlers for f in h.filters if isinstance(f, RepeatFilter)]


def _json_handler(logger: logging.Logger) -> LineHandler | None:
    """The handler ``logger``'s records go to when it is a JSON :class:`LineHandler` and the only one,
    with no filter of the logger's in between: lines may then be written to it directly."""
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        handlers.extend(current.handlers)
        current = current.parent if current.propagate else None
    if logger.filters or len(handlers) != 1:
        return None
    handler = handlers[0]
    if isinstance(handler, LineHandler) and handler.json and handler.level <= logging.INFO:
        return handler
    return None


def body_bytes(request: BaseRequest, response: StreamResponse) -> int:
    """The body bytes ``response`` sent: aiohttp's ``body_length`` counts the status line and headers
    too, and misses a file sent with sendfile() and a stream cut before its end."""
    if isinstance(response, CountedStreamResponse):
        return response.body_sent
    if not response.body_length:  # its end never went out: the client left first
        return 0
    if request.method == "HEAD" or response.status in (204, 304) or response.status < 200:
        return 0  # answers that have no body whatever their Content-Length says
    return response.content_length or 0


class CountedStreamResponse(StreamResponse):
    """A stream (no Content-Length) that counts what it writes, for the access log's ``bytes``."""

    body_sent = 0

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await super().write(data)
        self.body_sent += len(data)


class AccessLogger(AbstractAccessLogger):
    """One line per request with the fields under ``http``.

    Never logs headers or bodies: ``Authorization`` carries the admin token.
    """

    __slots__ = ("_direct",)

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        # aiohttp makes one per connection: the handler is looked up once for all its requests.
        self._direct = _json_handler(logger)

    def log(self, request: BaseRequest, response: StreamResponse, seconds: float) -> None:
        duration_ms = round(seconds * 1000, 3)
        method, status = request.method, response.status
        path = request.rel_url.raw_path  # without the query string: keep the line short and bounded
        fields = {
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": duration_ms,
            "bytes": body_bytes(request, response),
            "remote": request.remote,
            "user_agent": request.headers.get("User-Agent", "")[:200],
        }
        if self._direct is None:
            self.logger.info("%s %s %d %.1fms", method, path, status, duration_ms, extra={"http": fields})
            return
        msg = f"{method} {path} {status} {duration_ms:.1f}ms"
        data = _json_head(time.time(), "info", self.logger.name, msg, REQUEST_ID.get())
        data["http"] = fields
        self._direct.write_json(data)

    @property
    def enabled(self) -> bool:
        # aiohttp asks once per connection; with the level above info it skips the call entirely.
        return self.logger.isEnabledFor(logging.INFO)
