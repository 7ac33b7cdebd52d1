"""Schemathesis against the real server (a subprocess on 127.0.0.1) and its own OpenAPI document.

Every documented operation gets up to ``FUZZ_EXAMPLES`` generated requests, valid and invalid; each
answer must be documented (status, content type, headers, body schema) and none may be a 5xx. The
server runs with an admin token (sent with every request, so the mutating routes are exercised) and
no rate limit (so POSTs are not all answered 429).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from p2pdiff.app import create_app
from p2pdiff.config import Config
from p2pdiff.rest import openapi
from tests.server_process import free_port

TOKEN = "fuzz-admin-token-0123456789abcdef"
# Per operation; bounded so the whole run stays well under 90 s on the 2-core CI machine.
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]
# Streams until the client hangs up: a request/response fuzzer cannot check it (tests/test_events.py does).
NOT_FUZZED = ["/api/events"]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir: Path = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("P2PDIFF_") and k != "PORT"},
        "P2PDIFF_SERVER_HOST": "127.0.0.1",
        "P2PDIFF_SERVER_PORT": str(port),
        "P2PDIFF_SERVER_ADMIN_TOKEN": TOKEN,
        "P2PDIFF_SERVER_RATE_LIMIT_PER_SECOND": "0",
        "P2PDIFF_SERVER_LOG_LEVEL": "warning",
        "P2PDIFF_STORE_PATH": str(workdir / "fuzz.sqlite3"),
        "P2PDIFF_STORE_SYNCHRONOUS": "normal",  # thousands of commits; durability is tested elsewhere
        "P2PDIFF_P2P_ENABLED": "false",
    }
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "p2pdiff"], cwd=workdir, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(f"{url}/api/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, (workdir / "server.log").read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        served = requests.get(f"{url}/api/openapi.json", timeout=5).json()
        assert served == DOCUMENT, "the fuzzed document must be the one the server serves"
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _document() -> dict[str, Any]:
    """The document of an app configured like the fuzzed server (checked equal to what it serves)."""
    config = Config()
    config.server.admin_token = TOKEN
    config.server.rate_limit_per_second = 0
    config.p2p.enabled = False
    return openapi.build(create_app(config))


# Loaded at import from the app itself (schemathesis' lazy fixture loader does not run on pytest 9).
DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT).exclude(path=NOT_FUZZED)
# Deterministic: CI runs the same examples every time (a failure reproduces); more with FUZZ_EXAMPLES.
# No example database: nothing written to the work tree.
schema.config.generation.update(
    max_examples=FUZZ_EXAMPLES, modes=["positive", "negative"], deterministic=True, database="none"
)


# (operation, status) -> count over the whole run, checked by the last test: the fuzz must have
# reached the handlers, not only bounced off validation.
SEEN: Counter[tuple[str, int]] = Counter()


@schema.parametrize()
def test_api_matches_its_openapi_document(case: Any, fuzz_server: str) -> None:
    response = case.call_and_validate(
        base_url=fuzz_server, headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS
    )
    SEEN[(f"{case.method} {case.path}", response.status_code)] += 1


def test_the_fuzz_reached_every_operation_and_the_server_is_still_healthy(fuzz_server: str) -> None:
    # Runs after the fuzz (same module, file order): whatever it sent, the server answers and is consistent.
    if not SEEN:
        pytest.fail("the fuzz test did not run (deselected?): nothing to check")
    operations = {op for op, _ in SEEN}
    expected = {
        f"{method.upper()} {path}"
        for path, methods in DOCUMENT["paths"].items()
        if path not in NOT_FUZZED
        for method in methods
    }
    # Negative cases also use methods a path does not have (answered 405), hence "<=".
    assert expected <= operations
    print(f"\nfuzz: {sum(SEEN.values())} requests, {len(expected)} operations (+ wrong methods)")
    for op in sorted(expected):
        statuses = {status: count for (o, status), count in sorted(SEEN.items()) if o == op}
        print(f"  {op}: {statuses}")
    assert SEEN[("POST /api/queue/{room_id}", 201)] > 0
    assert SEEN[("POST /api/queue", 201)] > 0
    assert SEEN[("POST /api/join/{room_id}", 202)] > 0
    assert requests.get(f"{fuzz_server}/api/health", timeout=5).json()["status"] == "ok"
    stats = requests.get(f"{fuzz_server}/api/stats", timeout=5).json()
    assert stats["totalQueued"] == stats["tasksByStatus"]["pending"]
