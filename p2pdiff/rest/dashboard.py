"""The dashboard: static files from ``p2pdiff/web/`` (plain HTML/CSS/JS, no build step), ``/`` is the page.

The page talks to the same REST API and ``/api/events`` stream as any other client.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from p2pdiff.errors import NotFound

WEB_DIR = Path(__file__).parent.parent / "web"
# Only these files are served: no directory walking, no path to escape the folder.
FILES = {
    path.name: path
    for path in WEB_DIR.iterdir()
    if path.is_file() and path.suffix in (".html", ".js", ".css", ".svg", ".png", ".ico")
}
# no-cache means "revalidate", which FileResponse answers with 304 by ETag: cheap, and an upgraded
# server's page is picked up at once instead of after a browser's heuristic cache lifetime.
HEADERS = {"Cache-Control": "no-cache"}


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(FILES["index.html"], headers=HEADERS)


async def static_file(request: web.Request) -> web.FileResponse:
    path = FILES.get(request.match_info["name"])
    if path is None:
        raise NotFound(f"no file {request.match_info['name']!r}")
    return web.FileResponse(path, headers=HEADERS)


def setup(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static_file)
