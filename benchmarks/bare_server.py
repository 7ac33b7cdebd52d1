"""The baseline: a bare aiohttp app whose one handler returns a fixed JSON document.

The document is the exact body p2pdiff served for the same 100-task room (so both write the same bytes);
no middlewares, no store, no validation: the ceiling our GET /api/queue/{room} is compared with.
Usage: python -m benchmarks.bare_server PORT BODY_FILE
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web


def main() -> None:
    body = Path(sys.argv[2]).read_bytes()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/queue/{room_id}", handler)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
