"""The browser app's own files, served at ``[server] static_path`` from ``[server] static_dir``.

The app looks for its backend at ``/api/health`` on its own origin (after ``localhost:3000``) and then
POSTs there; served from a static host it finds no API and turns the backend off. Served from here,
the page and the API share one origin, as they did under the original Express server
(``express.static``). Off unless ``static_dir`` is set.

Files only. A directory answers its ``index.html`` (without the trailing slash: a redirect to it, so
the page's relative URLs resolve inside it) or 404: no listings. aiohttp hands the handler the
percent-decoded path, so ``%2e%2e`` arrives as ``..``: a path with an empty, dot or hidden segment
(``..``, ``.git``, ``//``) or a NUL is 404, and so is one whose symlinks lead out of the directory.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from aiohttp import web

from p2pdiff.config import ServerConfig
from p2pdiff.errors import NotFound

log = logging.getLogger(__name__)

INDEX = "index.html"
# Pages revalidate on every load (a cheap 304 by ETag), so a deploy shows at once. The app's scripts
# and styles have no content hash in their names, so they are cached for minutes, not for a year: a
# deploy reaches every browser within that, and a page load meanwhile costs no request per file.
PAGE_CACHE = "no-cache"
FILE_CACHE = "max-age=300"
# Not left to mimetypes, whose table partly comes from the host's /etc/mime.types: browsers refuse a
# module script or a WebAssembly stream served with another type. Charsets as express.static sends.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json; charset=utf-8",
    ".map": "application/json; charset=utf-8",
    ".webmanifest": "application/manifest+json; charset=utf-8",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}


def owns(server: ServerConfig, path: str) -> bool:
    """Whether ``path`` (a route template or a request path) is one of the app's files' routes."""
    prefix = server.static_path
    return bool(server.static_dir) and (path.startswith(prefix) or path == prefix[:-1])


def _slash_redirect(request: web.Request) -> web.HTTPMovedPermanently:
    url = request.rel_url
    location = url.with_path(url.path + "/")
    if request.query_string:  # the app may read its room from the query
        location = location.with_query(request.query_string)
    return web.HTTPMovedPermanently(location)


class AppFiles:
    def __init__(self, root: Path) -> None:
        self.root = root  # resolved: containment is checked against real paths

    def _lookup(self, path: Path) -> tuple[Path, int] | None:
        """``path`` with its symlinks resolved and its mode, if it exists inside the root."""
        try:
            real = path.resolve()
            if not real.is_relative_to(self.root):
                return None
            return real, real.stat().st_mode
        except (OSError, RuntimeError, ValueError):  # RuntimeError: a symlink loop (Python < 3.13)
            return None

    def _file(self, path: Path) -> Path | None:
        # Regular files only: a FIFO or device in the folder would hang or stream forever.
        found = self._lookup(path)
        return found[0] if found is not None and stat.S_ISREG(found[1]) else None

    async def serve(self, request: web.Request) -> web.StreamResponse:
        # Plain stat calls on the loop, as FileResponse's own are on local disk: microseconds.
        names = request.match_info["path"].split("/")
        wants_dir = names[-1] == ""  # ".../" asks for a directory's index
        if wants_dir:
            names.pop()
        if any(not name or name.startswith(".") or "\0" in name for name in names):
            raise NotFound("no such file")
        found = self._lookup(self.root.joinpath(*names))
        if found is None:
            raise NotFound("no such file")
        if stat.S_ISDIR(found[1]):
            path, name = self._file(found[0] / INDEX), INDEX
            if path is not None and not wants_dir:
                raise _slash_redirect(request)  # so the page's relative URLs resolve inside it
        else:
            path, name = (None, "") if wants_dir else (self._file(found[0]), names[-1])
        if path is None:
            raise NotFound("no such file")
        # By the name asked for, not the one a symlink leads to: that is what the page requested.
        suffix = Path(name).suffix.lower()
        headers = {"Cache-Control": PAGE_CACHE if suffix == ".html" else FILE_CACHE}
        content_type = CONTENT_TYPES.get(suffix)
        if content_type is not None:
            headers["Content-Type"] = content_type  # else FileResponse guesses from the file name
        # ETag, Last-Modified, 304, HEAD and Range come from FileResponse.
        return web.FileResponse(path, headers=headers)


async def _redirect_to_root(request: web.Request) -> web.StreamResponse:
    raise _slash_redirect(request)


def setup(app: web.Application, server: ServerConfig) -> None:
    """Register the routes when ``static_dir`` is set (config validation checked it is a directory)."""
    if not server.static_dir:
        return
    root = Path(server.static_dir).resolve(strict=True)
    files = AppFiles(root)
    prefix = server.static_path
    app.router.add_get(prefix[:-1], _redirect_to_root)
    app.router.add_get(prefix + "{path:.*}", files.serve)
    log.info("serving the app's files from %s at %s", root, prefix)
    if not (root / INDEX).is_file():
        log.warning("%s has no %s: %s is 404 (is static_dir the app's web/p2p folder?)", root, INDEX, prefix)
