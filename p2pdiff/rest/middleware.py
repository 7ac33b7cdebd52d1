"""The app's one request middleware: CORS, request id, security checks and headers, the JSON error
shape, request metrics.

One middleware, not five, because every aiohttp middleware layer costs every request a wrapper and a
coroutine frame (the REST benchmark holds GET within 0.8x of a bare aiohttp handler). CORS headers
go on refusals (401/403/429) and errors too, so browsers can read them; CORS preflights are answered
first and have no request id.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_urldispatcher import AbstractResource

from p2pdiff.errors import AppError
from p2pdiff.ops.logs import REQUEST_ID
from p2pdiff.ops.metrics import UNMATCHED, HttpMetrics
from p2pdiff.ops.shutdown import Shutdown
from p2pdiff.rest.api import Cors, Handler, app_error_response, error_response, http_error_response
from p2pdiff.rest.security import MUTATING_METHODS, Guard

log = logging.getLogger(__name__)

HEADER = "X-Request-Id"
# A caller's (or a proxy's) id is kept when it is short and plain, so one id follows a request
# across systems; anything else is replaced, since it goes into every log line of the request.
_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Status recorded when the client went away before the answer (nginx's convention).
CLIENT_CLOSED = 499


def _id_source() -> Callable[[], str]:
    """Ids unique within this process and, thanks to the random prefix, across restarts."""
    prefix = secrets.token_hex(4) + "-"
    counter = itertools.count(1)
    return lambda: prefix + str(next(counter))


def request_middleware(http: HttpMetrics, guard: Guard, cors: Cors, shutdown: Shutdown) -> Middleware:
    new_id = _id_source()
    clock = time.perf_counter
    # Per route: (template for the metrics label, the security headers of what browsers render there).
    # Bounded: one entry per registered resource; requests the router did not match are worked out
    # each time.
    routes: dict[AbstractResource, tuple[str, Mapping[str, str] | None]] = {}

    def describe(request: web.Request) -> tuple[str, Mapping[str, str] | None]:
        resource = request.match_info.route.resource
        if resource is None:
            return UNMATCHED, guard.page_headers(request.raw_path)
        known = routes.get(resource)
        if known is None:
            known = routes[resource] = (resource.canonical, guard.page_headers(resource.canonical))
        return known

    @web.middleware
    async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        shutdown.track(request)  # so a shutdown can cut the connection if it is still busy
        method = request.method
        if method == "OPTIONS" and (preflight := cors.preflight(request)) is not None:
            return preflight
        start = clock()
        incoming = request.headers.get(HEADER)
        request_id = incoming if incoming is not None and _ACCEPTED_ID.fullmatch(incoming) else new_id()
        # Not reset afterwards on purpose: the request runs in its own task, and aiohttp writes the
        # access log line after this returns, still in that task, where it should carry the id.
        REQUEST_ID.set(request_id)
        route, page_headers = describe(request)
        status = 500
        try:
            # Errors are answered here, not in a wrapper of the handler: a coroutine less per request.
            try:
                response: web.StreamResponse | None = None
                if method in MUTATING_METHODS:
                    response = guard.refuse(request)
                if response is None:
                    response = await handler(request)
            except AppError as exc:
                response = app_error_response(exc)
            except web.HTTPException as exc:
                if exc.status < 400:  # redirects and the like pass, with the request id
                    status = exc.status
                    exc.headers[HEADER] = request_id
                    raise
                response = http_error_response(request, exc)
            except asyncio.CancelledError:
                status = CLIENT_CLOSED
                raise
            except Exception:
                log.exception("unhandled error in %s %s", method, request.path)
                response = error_response(500, "internal_error", "internal server error")
            status = response.status
            if not response.prepared:  # a stream (SSE) sent its headers already
                headers = response.headers
                headers[HEADER] = request_id
                cors.decorate(request, headers)
                if page_headers:
                    headers.update(page_headers)
            return response
        finally:
            http.observe(method, route, status, clock() - start)

    return request_middleware
