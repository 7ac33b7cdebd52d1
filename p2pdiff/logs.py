"""Logging: one JSON object per line (or plain text), the request id of the current request on each record.

The request id lives in a contextvar. aiohttp runs every request in its own task (a copy of the
connection's context), so a value set by the request middleware is seen by everything that request
logs, including the access log line written after the handler, and never leaks into the next request.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
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


def setup_logging(level: str, fmt: str, stream: IO[str] | None = None) -> None:
    """Replace the root handlers with one that writes ``fmt`` ("json" or "text") lines to stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


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
