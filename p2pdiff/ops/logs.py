"""Logging: one JSON object per line (or plain text), the request id of the current request on each record.

The request id lives in a contextvar. aiohttp runs every request in its own task (a copy of the
connection's context), so a value set by the request middleware is seen by everything that request
logs, including the access log line written after the handler, and never leaks into the next request.

Two guards sit on the one handler: :class:`RepeatFilter` lets an identical warning or error through
once per window and counts the rest (a connection flood makes asyncio log every refused accept), and
:class:`RedactingFormatter` masks the config's secrets in every line, whoever wrote it.
"""

from __future__ import annotations

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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "-")
        if request_id != "-":
            data["request_id"] = request_id
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
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


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
        alternatives = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        return text if self._pattern is None else self._pattern.sub("***", text)


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


def setup_logging(level: str, fmt: str, stream: IO[str] | None = None, secrets: Iterable[str] = ()) -> None:
    """Replace the root handlers with one that writes ``fmt`` ("json" or "text") lines to stderr,
    repeated warnings summarised (:class:`RepeatFilter`) and ``secrets`` masked."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RepeatFilter(handler.handle))
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(RedactingFormatter(formatter, secrets))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def repeat_filters() -> list[RepeatFilter]:
    """The repeat filters on the root logger's handlers (none unless setup_logging ran)."""
    return [f for h in logging.getLogger().handlers for f in h.filters if isinstance(f, RepeatFilter)]


class AccessLogger(AbstractAccessLogger):
    """One record per request with the fields as ``extra`` (so JSON logs get them as keys).

    Never logs headers or bodies: ``Authorization`` carries the admin token.
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        duration_ms = round(time * 1000, 3)
        path = request.rel_url.raw_path  # without the query string: keep the line short and bounded
        self.logger.info(
            "%s %s %d %.1fms",
            request.method,
            path,
            response.status,
            duration_ms,
            extra={
                "http": {
                    "method": request.method,
                    "path": path,
                    "status": response.status,
                    "duration_ms": duration_ms,
                    "bytes": response.body_length,
                    "remote": request.remote,
                    "user_agent": request.headers.get("User-Agent", "")[:200],
                }
            },
        )

    @property
    def enabled(self) -> bool:
        # aiohttp asks once per connection; with the level above info it skips the call entirely.
        return self.logger.isEnabledFor(logging.INFO)
