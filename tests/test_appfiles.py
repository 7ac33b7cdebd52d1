"""The browser app's own files at ``[server] static_path`` (``p2pdiff/rest/appfiles.py``).

Hostile paths go over a raw socket, byte for byte as written: aiohttp's client would normalise or
re-encode them first.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from p2pdiff.app import create_app
from p2pdiff.config import RESERVED_PATHS, Config, ConfigError, load_config
from p2pdiff.rest import appfiles, openapi
from p2pdiff.rest.security import CSP
from tests.conftest import ClientFactory

SECRET = b"SECRET-OUTSIDE-THE-APP-DIR"
TOKEN = "appfiles-test-token-0123456789"
INDEX_HTML = b'<!doctype html><title>app</title><script type="module" src="app.js"></script>\n'
FILES = {
    "index.html": INDEX_HTML,
    "app.js": b"export const app = 1;\n",
    "lib/worker.mjs": b"export const worker = 2;\n",
    "style.css": b"body { margin: 0 }\n",
    "model.wasm": b"\0asm\1\0\0\0",
    "manifest.json": b'{"name": "app"}\n',
    "docs/index.html": b"<!doctype html><title>docs</title>\n",
    "assets/logo.svg": b'<svg xmlns="http://www.w3.org/2000/svg"/>\n',
    ".env": b"HIDDEN=1\n",
    ".git/config": b"[HIDDEN]\n",
}
TYPES = {
    "app.js": "text/javascript",
    "lib/worker.mjs": "text/javascript",
    "style.css": "text/css",
    "model.wasm": "application/wasm",
    "manifest.json": "application/json",
    "index.html": "text/html",
    "assets/logo.svg": "image/svg+xml",
}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The app's files as a deployer drops them, beside files that must never be served."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / "index.html").write_bytes(SECRET)
    root = tmp_path / "p2p"
    for name, body in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body)
    (root / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (root / "leakdir").symlink_to(outside)
    (root / "alias.js").symlink_to(root / "app.js")  # inside the folder: served
    (root / "loop").symlink_to(root / "loop")
    os.mkfifo(root / "pipe")
    return root


@pytest.fixture
async def app_client(make_client: ClientFactory, config: Config, site: Path) -> TestClient:
    config.server.static_dir = str(site)
    return await make_client(config)


def aimed_at(target: str, tmp_path: Path) -> str:
    """``target`` with ROOT replaced by the test's folder (that holds the secret), minus its first "/"."""
    return target.replace("ROOT", str(tmp_path).lstrip("/"))


async def raw_get(client: TestClient, target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request with ``target`` sent as written; (status, headers, body) of the answer."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        head = f"{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        writer.write(head.encode("utf-8", "surrogateescape"))
        data = await reader.read()
    finally:
        writer.close()
    header_block, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split(" ")[1]), headers, body


# -- config -----------------------------------------------------------------------------------------


def test_off_by_default_and_env_sets_it(tmp_path: Path, site: Path) -> None:
    cfg = Config()
    assert cfg.server.static_dir == "" and cfg.server.static_path == "/p2p/"
    empty = tmp_path / "c.toml"
    empty.write_text("")
    env = {"P2PDIFF_SERVER_STATIC_DIR": str(site), "P2PDIFF_SERVER_STATIC_PATH": "/app/v1/"}
    cfg = load_config(empty, environ=env)
    assert cfg.server.static_dir == str(site) and cfg.server.static_path == "/app/v1/"
    assert not any(appfiles.owns(Config().server, path) for path in ("/p2p/", "/p2p/{path}", "/p2p"))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("static_dir = '{missing}'", "static_dir: '{missing}': No such file or directory"),
        ("static_dir = '{file}'", "static_dir: '{file}': not a directory"),
        ('static_dir = "a\\u0000b"', "static_dir: 'a\\x00b': embedded null byte"),
        ("static_path = '/p2p'", "static_path: '/p2p' must start and end with '/'"),
        ("static_path = 'p2p/'", "static_path: 'p2p/' must start and end with '/'"),
        ("static_path = '/'", "static_path: '/' must start and end with '/'"),
        ("static_path = '/a/../b/'", "static_path: '/a/../b/' must start"),
        ("static_path = '/.git/'", "static_path: '/.git/' must start"),
        ("static_path = '/{{x}}/'", "static_path: '/{{x}}/' must start"),
        ("static_path = '/p%32p/'", "static_path: '/p%32p/' must start"),
        ("static_path = '/a//b/'", "static_path: '/a//b/' must start"),
        ("static_path = '/api/'", "static_path: '/api/' is under /api/"),
        ("static_path = '/api/p2p/'", "static_path: '/api/p2p/' is under /api/"),
        ("static_path = '/static/'", "static_path: '/static/' is under /static/"),
        ("static_path = '/metrics/'", "static_path: '/metrics/' is under /metrics/"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(tmp_path: Path, text: str, needle: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    names = {"missing": str(tmp_path / "nope"), "file": str(blocker)}
    path = tmp_path / "c.toml"
    path.write_text("[server]\n" + text.format(**names) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert needle.format(**names) in message and "\n" not in message
    assert message.startswith("[server] static_")


def test_good_paths_are_accepted(tmp_path: Path, site: Path) -> None:
    path = tmp_path / "c.toml"
    for good in ("/p2p/", "/app/v1.2/", "/apix/", "/metrics-app/", "/~me/"):
        path.write_text(f"[server]\nstatic_dir = '{site}'\nstatic_path = '{good}'\n")
        assert load_config(path, environ={}).server.static_path == good


def test_reserved_paths_cover_every_server_route(config: Config, site: Path) -> None:
    # RESERVED_PATHS keeps static_path off the server's routes: it must know all of them.
    config.server.static_dir = str(site)
    for route in create_app(config).router.routes():
        path = route.resource.canonical if route.resource else "/"
        if appfiles.owns(config.server, path):
            continue
        assert path == "/" or any(path.startswith(r) or path == r[:-1] for r in RESERVED_PATHS), path


def test_openapi_leaves_the_app_files_out(config: Config, site: Path) -> None:
    without = openapi.build(create_app(config))
    config.server.static_dir = str(site)
    app = create_app(config)
    assert openapi.build(app)["paths"] == without["paths"]
    assert not any(appfiles.owns(config.server, path) for _, path in openapi.registered_operations(app))


def test_missing_index_is_logged_at_start(
    config: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config.server.static_dir = str(tmp_path)
    with caplog.at_level(logging.INFO, logger="p2pdiff.rest.appfiles"):
        create_app(config)
    assert f"serving the app's files from {tmp_path.resolve()} at /p2p/" in caplog.text
    assert "has no index.html" in caplog.text


# -- serving ----------------------------------------------------------------------------------------


async def test_index_files_types_and_caching(app_client: TestClient) -> None:
    for url in ("/p2p/", "/p2p/index.html"):
        resp = await app_client.get(url)
        assert resp.status == 200, url
        assert await resp.read() == INDEX_HTML
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"  # a deploy shows on the next load
    for name, content_type in TYPES.items():
        resp = await app_client.get(f"/p2p/{name}")
        assert resp.status == 200, name
        assert resp.content_type == content_type, name
        assert await resp.read() == FILES[name]
        assert resp.headers["Cache-Control"] == ("no-cache" if name.endswith(".html") else "max-age=300")
        assert resp.headers["ETag"] and resp.headers["Last-Modified"]
    assert await (await app_client.get("/p2p/docs/")).read() == FILES["docs/index.html"]
    assert await (await app_client.get("/p2p/alias.js")).read() == FILES["app.js"]


async def test_app_files_get_nosniff_but_no_csp(app_client: TestClient) -> None:
    resp = await app_client.get("/p2p/")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "X-Request-Id" in resp.headers
    # The app loads Trystero and models from other origins: the dashboard's policy would stop it.
    for name in ("Content-Security-Policy", "X-Frame-Options", "Referrer-Policy"):
        assert name not in resp.headers
    dashboard = await app_client.get("/")
    assert dashboard.headers["Content-Security-Policy"] == CSP


async def test_revalidation_and_head(app_client: TestClient) -> None:
    first = await app_client.get("/p2p/app.js")
    etag, modified = first.headers["ETag"], first.headers["Last-Modified"]
    again = await app_client.get("/p2p/app.js", headers={"If-None-Match": etag})
    assert again.status == 304 and await again.read() == b""
    assert again.headers["ETag"] == etag and again.headers["Cache-Control"] == "max-age=300"
    since = await app_client.get("/p2p/app.js", headers={"If-Modified-Since": modified})
    assert since.status == 304
    stale = await app_client.get("/p2p/app.js", headers={"If-None-Match": '"other"'})
    assert stale.status == 200 and await stale.read() == FILES["app.js"]
    head = await app_client.head("/p2p/app.js")
    assert head.status == 200 and await head.read() == b""
    assert int(head.headers["Content-Length"]) == len(FILES["app.js"])
    assert head.content_type == "text/javascript" and head.headers["ETag"] == etag
    index_head = await app_client.head("/p2p/")
    assert index_head.status == 200 and index_head.headers["Cache-Control"] == "no-cache"


async def test_directories_redirect_to_their_index_and_never_list(app_client: TestClient) -> None:
    for url, location in [
        ("/p2p", "/p2p/"),
        ("/p2p?room=lobby", "/p2p/?room=lobby"),
        ("/p2p/docs", "/p2p/docs/"),
        ("/p2p/docs?x=1", "/p2p/docs/?x=1"),
    ]:
        resp = await app_client.get(url, allow_redirects=False)
        assert resp.status == 301, url
        assert resp.headers["Location"] == location
    for url in ("/p2p/assets/", "/p2p/assets", "/p2p/lib/", "/p2p/app.js/", "/p2p/nope.js", "/p2p/docs/x"):
        resp = await app_client.get(url, allow_redirects=False)
        assert resp.status == 404, url
        assert (await resp.json())["error"]["code"] == "not_found"
    assert (await app_client.post("/p2p/app.js")).status == 405


@pytest.mark.parametrize(
    "target",
    [
        "/p2p/../secret.txt",
        "/p2p/%2e%2e/secret.txt",
        "/p2p/%2E%2E/%2E%2E/p2p/secret.txt",
        "/p2p/..%2fsecret.txt",
        "/p2p/%2e%2e%2fsecret.txt",
        "/p2p/docs/../../secret.txt",
        "/p2p/./app.js",
        "/p2p//ROOT/secret.txt",
        "/p2p/%2FROOT/secret.txt",
        "/p2p/leak.txt",
        "/p2p/leakdir/secret.txt",
        "/p2p/leakdir/",
        "/p2p/leakdir",
        "/p2p/loop",
        "/p2p/pipe",
        "/p2p/.env",
        "/p2p/%2eenv",
        "/p2p/app.js%00.html",
        "/p2p/..\\secret.txt",
    ],
)
async def test_escapes_are_refused(app_client: TestClient, tmp_path: Path, target: str) -> None:
    status, _, body = await raw_get(app_client, aimed_at(target, tmp_path))
    assert status == 404, target
    assert SECRET not in body and b"HIDDEN" not in body


# Path segments that have led static file servers astray, and names in and around the folder (ROOT:
# the test's folder, which holds the secret). Most dangerous first: Hypothesis starts from there.
ESCAPES = st.sampled_from(
    [
        "..", "%2e%2e", "", ".", ".%2e", "%2e.", "%2E%2e", "%2e", "%2f", "%2F", "%5c", "\\", "%00",
        "%252e%252e", "%c0%ae%c0%ae", "..;", ";", "~", "*",
    ]
)  # fmt: skip
NAMES = st.sampled_from(
    [
        "leak.txt", "leakdir", ".env", ".git", "config", "secret.txt", "ROOT", "outside", "loop", "pipe",
        "index.html", "app.js", "docs", "assets", "lib", "p2p",
    ]
)  # fmt: skip
ANY_TEXT = st.text(st.characters(codec="utf-8"), max_size=12).map(lambda text: quote(text, safe="/%.~"))
PATHS = st.lists(st.one_of(NAMES, ESCAPES, ANY_TEXT), min_size=1, max_size=6).map("/".join)
SERVED = {body for name, body in FILES.items() if not name.startswith(".")}


# No deadline and no too_slow check: both time the machine, and a loaded CI machine is no bug. The
# one server (app_client) serves every example, which is what the fixture health check warns about.
@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=PATHS, method=st.sampled_from(["GET", "HEAD"]))
async def test_no_path_reaches_outside_or_breaks_the_server(
    app_client: TestClient, tmp_path: Path, path: str, method: str
) -> None:
    target = aimed_at("/p2p/" + path, tmp_path)
    status, headers, body = await raw_get(app_client, target, method)
    assert status in (200, 301, 400, 404), (target, status)
    assert SECRET not in body and b"HIDDEN" not in body
    if status == 200 and method == "GET":
        assert body in SERVED, target
    if status == 301:
        location = headers["Location"]
        assert location.startswith("/p2p/") and not location.startswith("//"), location


# -- next to the rest of the server -----------------------------------------------------------------


async def test_dashboard_api_and_metrics_keep_their_routes(app_client: TestClient) -> None:
    page = await app_client.get("/")
    assert page.status == 200 and "/static/app.js" in await page.text()
    assert (await app_client.get("/static/app.js")).status == 200
    health = await app_client.get("/api/health")
    assert health.status == 200 and (await health.json())["status"] == "ok"
    assert (await app_client.get("/api/docs")).status == 200
    await app_client.get("/p2p/app.js")
    await app_client.get("/p2p/lib/worker.mjs")
    metrics = await (await app_client.get("/metrics")).text()
    # One label for all the app's files: the route template, not each path.
    assert 'route="/p2p/{path}"' in metrics and "worker.mjs" not in metrics


async def test_page_and_api_share_one_origin(app_client: TestClient) -> None:
    session = app_client.session  # absolute URLs, as a browser resolves them
    page_url = app_client.make_url("/p2p/index.html")
    async with session.get(page_url) as page:
        assert page.status == 200
    # What the app's probe and its POSTs use: "/api/..." resolved against its own page.
    health_url = page_url.join(URL("/api/health"))
    assert health_url.origin() == page_url.origin()
    async with session.get(health_url) as health:
        assert (await health.json())["status"] == "ok"
    task = {"id": "from-the-app-1", "prompt": "a lighthouse", "roomId": "lobby"}
    async with session.post(page_url.join(URL("/api/queue")), json=task) as added:
        assert added.status == 201


async def test_reads_need_no_admin_token(make_client: ClientFactory, config: Config, site: Path) -> None:
    config.server.static_dir = str(site)
    config.server.admin_token = TOKEN
    client = await make_client(config)
    assert (await client.get("/p2p/")).status == 200
    assert (await client.head("/p2p/app.js")).status == 200
    assert (await client.delete("/p2p/app.js")).status == 405  # the router's answer, not 401


async def test_static_path_is_configurable(make_client: ClientFactory, config: Config, site: Path) -> None:
    config.server.static_dir = str(site)
    config.server.static_path = "/app/v1/"
    client = await make_client(config)
    assert await (await client.get("/app/v1/")).read() == INDEX_HTML
    assert (await client.get("/app/v1", allow_redirects=False)).headers["Location"] == "/app/v1/"
    assert (await client.get("/p2p/")).status == 404
