"""The baseline: a bare aiohttp app whose one handler returns a fixed 100-task JSON document.

No middlewares, no store, no validation — the ceiling our GET /api/queue/{room} is compared with.
"""

from __future__ import annotations

import sys

import orjson
from aiohttp import web


def fixed_body(n: int = 100) -> bytes:
    tasks = [
        {
            "id": f"task_1732550000000_{i:06d}",
            "roomId": "bench",
            "type": "generate",
            "prompt": f"a lighthouse at dusk, variation {i}",
            "options": {"model": "prx-1024", "steps": 20, "width": 1024, "height": 1024},
            "status": "pending",
            "position": i + 1,
            "createdAt": 1732550000000 + i,
            "updatedAt": 1732550000000 + i,
            "claimedBy": None,
            "progress": 0.0,
        }
        for i in range(n)
    ]
    return orjson.dumps({"roomId": "bench", "queue": tasks, "stats": {"queueLength": n}})


def main() -> None:
    body = fixed_body()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/queue/{room_id}", handler)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
