"""``GET /api/queue/{room}/{task}/result``: the stored result image of a task, as a file.

The files and the references to them are :mod:`p2pdiff.tasks.results`'; this is only the HTTP
answer, with headers that keep a peer's bytes from ever running as anything but an image.

The ETag is the image's SHA-256 (its name), not the file's time: with several nodes behind one
proxy, each has its own copy, and a browser revalidating on another node still gets its 304,
answered from the task's reference alone, without reading the image.
"""

from __future__ import annotations

import asyncio

import asyncpg
from aiohttp import web

from p2pdiff.appkeys import QUEUE
from p2pdiff.errors import NotFound, Unavailable
from p2pdiff.tasks import validate
from p2pdiff.tasks.images import IMAGE_EXTENSIONS
from p2pdiff.tasks.results import RESULTS, task_image

# Sent in pieces of this size: a request holds no more of a file than this at once.
CHUNK_BYTES = 256 * 1024
# How long a browser may wait for an image the database is slow to give.
RETRY_AFTER_SECONDS = 2.0


async def get_result(request: web.Request) -> web.StreamResponse:
    room_id = validate.room_id(request.match_info["room_id"])
    queue = request.app[QUEUE]
    await queue.sync()  # several nodes: a result another node attached just now is here too
    task = queue.get_task(room_id, request.match_info["task_id"])
    image = task_image(task.result)
    if image is None:
        raise NotFound(f"task '{task.id}' has no stored result image", code="result_not_found")
    etag = f'"{image.sha256}"'
    headers = {
        "ETag": etag,
        "X-Content-Type-Options": "nosniff",
        # An image may be replaced (the task requeued and run again): revalidate each time.
        "Cache-Control": "no-cache",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    }
    if etag in request.headers.get("If-None-Match", "").replace(" ", "").split(","):
        return web.Response(status=304, headers=headers)
    try:
        path = await request.app[RESULTS].find(image)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise Unavailable(
            f"the result image of task '{task.id}' cannot be read now: {exc}",
            code="store_unavailable",
            retry_after=RETRY_AFTER_SECONDS,
        ) from None
    if path is None:
        raise NotFound(f"the result file of task '{task.id}' is gone", code="result_missing")
    try:
        # File reads off the event loop, as aiohttp's FileResponse does them (a disk may be slow).
        file = await asyncio.to_thread(open, path, "rb")
    except OSError:  # removed meanwhile (by hand: gc keeps what a task references)
        raise NotFound(f"the result file of task '{task.id}' is gone", code="result_missing") from None
    try:
        response = web.StreamResponse(headers=headers)
        response.content_type = image.content_type
        response.content_length = image.size
        ext = IMAGE_EXTENSIONS[image.content_type]
        response.headers["Content-Disposition"] = f'inline; filename="{task.id}.{ext}"'
        await response.prepare(request)
        if request.method != "HEAD":
            while piece := await asyncio.to_thread(file.read, CHUNK_BYTES):
                await response.write(piece)
        await response.write_eof()
        return response
    finally:
        file.close()


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/queue/{room_id}/{task_id}/result", get_result)
