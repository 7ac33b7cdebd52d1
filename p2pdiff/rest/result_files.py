"""``GET /api/queue/{room}/{task}/result``: the stored result image of a task, as a file.

The files and the references to them are :mod:`p2pdiff.tasks.results`'; this is only the HTTP
answer, with headers that keep a peer's bytes from ever running as anything but an image.
"""

from __future__ import annotations

from aiohttp import web

from p2pdiff.appkeys import QUEUE
from p2pdiff.errors import NotFound
from p2pdiff.tasks import validate
from p2pdiff.tasks.images import IMAGE_EXTENSIONS
from p2pdiff.tasks.results import RESULTS, task_image


async def get_result(request: web.Request) -> web.StreamResponse:
    room_id = validate.room_id(request.match_info["room_id"])
    task = request.app[QUEUE].get_task(room_id, request.match_info["task_id"])
    image = task_image(task.result)
    if image is None:
        raise NotFound(f"task '{task.id}' has no stored result image", code="result_not_found")
    path = request.app[RESULTS].resolve(image.path)
    if path is None or not path.is_file():
        raise NotFound(f"the result file of task '{task.id}' is gone", code="result_missing")
    return web.FileResponse(
        path,
        headers={
            "Content-Type": image.content_type,
            "Content-Disposition": f'inline; filename="{task.id}.{IMAGE_EXTENSIONS[image.content_type]}"',
            "X-Content-Type-Options": "nosniff",
            # An image may be replaced (the task requeued and run again): revalidate each time.
            "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/queue/{room_id}/{task_id}/result", get_result)
