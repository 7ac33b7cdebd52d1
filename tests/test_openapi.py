from __future__ import annotations

import gzip
import re
from typing import Any

from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from p2pdiff.app import create_app
from p2pdiff.config import Config
from p2pdiff.rest import openapi
from tests.conftest import ClientFactory

TOKEN = "test-admin-token-0123456789"


async def test_document_is_valid_openapi_3_1(client: TestClient) -> None:
    resp = await client.get("/api/openapi.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema, including bad $refs


def test_every_registered_route_is_documented(config: Config) -> None:
    # Iterates the app's real routes: a route someone adds without documenting it fails here.
    app = create_app(config)
    doc = openapi.build(app)
    registered = openapi.registered_operations(app)
    documented = {(method, path) for path, methods in doc["paths"].items() for method in methods}
    missing = sorted(f"{m.upper()} {p}" for m, p in registered - documented)
    assert not missing, f"routes missing from p2pdiff/rest/openapi.py PATHS: {missing}"
    assert documented == registered
    # And PATHS describes no route that no longer exists.
    stale = {(m, p) for p, ms in openapi.PATHS.items() for m in ms} - registered
    assert not stale, f"PATHS entries without a route: {sorted(stale)}"


def test_head_routes_are_covered_by_get(config: Config) -> None:
    app = create_app(config)
    heads = {r.resource.canonical for r in app.router.routes() if r.method == "HEAD" and r.resource}
    gets = {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource}
    assert heads <= gets


def _op(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return doc["paths"][path][method]


def test_document_follows_the_security_config(config: Config) -> None:
    open_doc = openapi.build(create_app(config))
    for method, path in [("patch", "/api/queue/{room_id}/{task_id}"), ("post", "/api/join/{room_id}")]:
        assert "security" not in _op(open_doc, method, path)
        assert "401" not in _op(open_doc, method, path)["responses"]
    assert "429" in _op(open_doc, "post", "/api/queue")["responses"]  # the default rate limit is on

    config.server.admin_token = TOKEN
    config.server.rate_limit_per_second = 0
    doc = openapi.build(create_app(config))
    for method, path in [
        ("patch", "/api/queue/{room_id}/{task_id}"),
        ("delete", "/api/queue/{room_id}/{task_id}"),
        ("post", "/api/join/{room_id}"),
        ("delete", "/api/join/{room_id}"),
    ]:
        op = _op(doc, method, path)
        assert op["security"] == [{"adminToken": []}]
        assert {"401", "403"} <= set(op["responses"])
        assert "WWW-Authenticate" in op["responses"]["401"]["headers"]
    post = _op(doc, "post", "/api/queue/{room_id}")
    assert "security" not in post and "429" not in post["responses"]
    assert "security" not in _op(doc, "get", "/api/queue/{room_id}")

    config.server.queue_requires_token = True
    doc = openapi.build(create_app(config))
    assert _op(doc, "post", "/api/queue")["security"] == [{"adminToken": []}]


def test_schemas_mirror_the_validation_rules() -> None:
    new_task = openapi.SCHEMAS["NewTask"]["properties"]
    from p2pdiff.tasks import validate as rules

    assert new_task["prompt"]["maxLength"] == rules.MAX_PROMPT_CHARS
    assert re.fullmatch(new_task["id"]["anyOf"][0]["pattern"].strip("^$"), "task_1_ab:c.d-e")
    update = openapi.SCHEMAS["TaskUpdate"]["properties"]
    assert update["action"]["enum"] == list(rules.PATCH_ACTIONS)
    assert openapi.LIMIT_QUERY["schema"]["maximum"] == rules.MAX_LIMIT


def test_errors_document_the_shape() -> None:
    error = openapi.SCHEMAS["Error"]
    assert error["required"] == ["error", "success"]
    assert error["properties"]["error"]["required"] == ["code", "message"]


async def test_docs_page_is_served_from_vendored_files(client: TestClient) -> None:
    resp = await client.get("/api/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    # Nothing from another origin: every src/href is relative.
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(not re.match(r"^[a-z]+:|^//", ref) for ref in refs), refs
    assert "Content-Security-Policy" in resp.headers
    for ref in refs:
        if ref.startswith("docs/"):
            asset = await client.get(f"/api/{ref}", headers={"Accept-Encoding": "identity"})
            assert asset.status == 200, ref
            assert asset.content_type in ("text/javascript", "text/css")
    init = await (await client.get("/api/docs/init.js")).text()
    assert "validatorUrl: null" in init and "openapi.json" in init
    bundle = await client.get("/api/docs/swagger-ui-bundle.js", headers={"Accept-Encoding": "gzip"})
    assert bundle.headers["Content-Encoding"] == "gzip"  # aiohttp's client decodes it for us
    body = await bundle.read()
    assert len(body) > 1_000_000 and b"SwaggerUIBundle" in body
    etag = bundle.headers["ETag"]
    again = await client.get("/api/docs/swagger-ui-bundle.js", headers={"If-None-Match": etag})
    assert again.status == 304
    missing = await client.get("/api/docs/../../config.toml")
    assert missing.status == 404
    assert (await client.get("/api/docs/nope.js")).status == 404


async def test_vendored_assets_compress_to_the_same_bytes() -> None:
    asset = openapi._asset("swagger-ui.css")
    assert gzip.decompress(await asset.compress()) == asset.body


async def test_document_is_built_once(make_client: ClientFactory, config: Config) -> None:
    client = await make_client(config)
    first = await (await client.get("/api/openapi.json")).read()
    second = await (await client.get("/api/openapi.json")).read()
    assert first == second
