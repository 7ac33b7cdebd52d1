"""Admin token, per-client rate limit and browser security headers.

The checks run in the app's one request middleware (``rest/middleware.py``), not a middleware of their own:
each middleware layer costs every request a coroutine frame, and for a plain GET all this module
adds is a method check and a path prefix check.

Policy, in order, for requests the router matched:
1. POST routes: a token bucket per client (``rate_limit_per_second``, ``rate_limit_burst``) -> 429.
2. Mutating methods (POST, PUT, PATCH, DELETE) when ``admin_token`` is set -> 401 without a bearer
   token, 403 with a wrong one; except the task submission routes in ``OPEN_POST_ROUTES`` unless
   ``queue_requires_token``. Failed attempts also take a token from the client's bucket, so guessing
   the admin token is rate limited on every method.
3. Pages and static files (everything outside ``/api/`` except the API docs) get CSP and friends;
   the browser app's own files (``[server] static_dir``) only ``nosniff``.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import time
from collections.abc import Callable, Mapping

from aiohttp import web

from p2pdiff.config import ServerConfig
from p2pdiff.rest import appfiles
from p2pdiff.rest.api import error_response
from signaling.bounded import LruDict, TokenBucket

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Task submission: open by default (browsers post tasks), token-protected by queue_requires_token.
OPEN_POST_ROUTES = frozenset({"/api/queue", "/api/queue/{room_id}"})
# Clients we keep a bucket for; past this the least recently seen client's bucket is dropped (it
# comes back full, which only ever favours that client, and needs this many others in between).
MAX_CLIENTS = 10_000
REALM = 'Bearer realm="p2pdiff"'

# Only our own origin: same-origin scripts, styles and fetches (no inline script or style attribute
# markup; the dashboard and the vendored Swagger UI both run under it), data: images (Swagger's
# icons), no plugins, no framing (frame-ancestors; X-Frame-Options for older browsers).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# The browser app's files get no CSP: the app loads Trystero from a CDN, model weights and relays from
# other origins, all of which its deployer chooses, and a policy that guessed wrong would break it
# silently. Its files are served with the right types, so nosniff costs it nothing.
APP_FILE_HEADERS = {"X-Content-Type-Options": "nosniff"}


def token_required(queue_requires_token: bool, method: str, route: str) -> bool:
    """Whether ``method`` on the route template ``route`` needs the admin token (once one is set)."""
    if method not in MUTATING_METHODS:
        return False
    return not (method == "POST" and route in OPEN_POST_ROUTES and not queue_requires_token)


class RateLimiter:
    """Token buckets keyed by client, bounded to ``max_clients`` with least-recently-used eviction."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: LruDict[str, TokenBucket] = LruDict(max_clients)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Take one token: 0.0 when allowed, else the seconds until the next token."""
        bucket = self._buckets.touch(key)
        if bucket is None:
            bucket = self._buckets.setdefault(key, self._new_bucket)
        return 0.0 if bucket.take() else bucket.retry_after

    def _new_bucket(self) -> TokenBucket:
        return TokenBucket(self.rate, self.burst, self.clock)


def client_key(request: web.BaseRequest, proxy_header: str) -> str:
    """Who is asking: the trusted proxy's header if configured, else the peer address.

    For X-Forwarded-For the last entry is the one our proxy appended; earlier ones are whatever the
    client sent. IPv6 clients are keyed by /64, the block one subscriber usually controls.
    """
    address = None
    if proxy_header:
        value = request.headers.get(proxy_header)
        if value:
            address = value.rsplit(",", 1)[-1].strip()
    address = (address or request.remote or "unknown")[:64]
    if ":" not in address:
        return address  # IPv4 (or a name): the address itself
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))


class Guard:
    """Token and rate limit checks with their counters (exported as metrics)."""

    def __init__(self, server: ServerConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.token = server.admin_token.encode()
        self.queue_requires_token = server.queue_requires_token
        self.proxy_header = server.trusted_proxy_header
        self.limiter = (
            RateLimiter(server.rate_limit_per_second, server.rate_limit_burst, clock=clock)
            if server.rate_limit_per_second > 0
            else None
        )
        self.rate_limited = 0
        self.auth_failures = 0

    def metrics(self) -> dict[str, tuple[str, int]]:
        return {
            "rate_limited": ("Requests answered 429 by the per-client rate limit", self.rate_limited),
            "auth_failures": (
                "Requests refused 401/403 for a missing or wrong admin token",
                self.auth_failures,
            ),
        }

    def page_headers(self, path: str) -> Mapping[str, str] | None:
        """The headers for what browsers render at ``path`` (a route template or raw path); None for
        the JSON API."""
        if appfiles.owns(self.server, path):
            return APP_FILE_HEADERS
        return PAGE_HEADERS if is_page(path) else None

    def needs_token(self, method: str, route: str) -> bool:
        return bool(self.token) and token_required(self.queue_requires_token, method, route)

    def _limited(self, request: web.Request) -> web.Response | None:
        if self.limiter is None:
            return None
        wait = self.limiter.take(client_key(request, self.proxy_header))
        if not wait:
            return None
        self.rate_limited += 1
        response = error_response(429, "rate_limited", "too many requests from this client; slow down")
        response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return response

    def _authorize(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            if hmac.compare_digest(credentials.strip().encode(), self.token):
                return None
            response = error_response(403, "forbidden", "the admin token is not valid")
        else:
            response = error_response(
                401, "unauthorized", "this route needs an admin token: Authorization: Bearer <token>"
            )
            response.headers["WWW-Authenticate"] = REALM
        self.auth_failures += 1
        # A failed attempt costs the client a token too: guessing is throttled on every method.
        # (Responses are mappings, empty ones falsy: compare with None, never use `or`.)
        limited = self._limited(request)
        return response if limited is None else limited

    def refuse(self, request: web.Request) -> web.Response | None:
        """For a mutating request (the caller checked ``MUTATING_METHODS``): the refusal, or None."""
        match_info = request.match_info
        if match_info.http_exception is not None:  # 404/405: let the router answer
            return None
        method = request.method
        if method == "POST" and (limited := self._limited(request)) is not None:
            return limited
        route = match_info.route.resource.canonical  # type: ignore[union-attr]
        if self.needs_token(method, route):
            return self._authorize(request)
        return None


def is_page(raw_path: str) -> bool:
    """Dashboard, static files and API docs: what a browser renders (everything but the JSON API)."""
    return not raw_path.startswith("/api/") or raw_path.startswith("/api/docs")
