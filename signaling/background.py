"""Work on the one event loop that nobody awaits: tasks started and left to run, and rounds repeated
every N seconds.

asyncio keeps only a weak reference to a task, so a task nobody holds may be garbage-collected before
it finishes; and the exception of a task nobody awaits surfaces, if ever, as "Task exception was never
retrieved" when it is collected, without saying what the task was for. :class:`BackgroundTasks` holds
each task until it is done and logs its failure once, saying what failed. :func:`every` repeats a round
of work and keeps going when one round fails.

Both take what to say as a logging format and its arguments (``"room %s: rtt refresh", room_id``), so
nothing is formatted unless something fails.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

__all__ = ["BackgroundTasks", "every"]


class BackgroundTasks:
    """Tasks started and not awaited, held until they are done.

    A task that raises (a cancellation is no failure) is logged once on ``logger`` at ``level`` as
    "<what> failed" with its traceback. Tasks whose failures are expected and harmless (a send on a
    transport that is closing) belong in a set with ``level=logging.DEBUG``.
    """

    def __init__(self, logger: logging.Logger = log, *, level: int = logging.ERROR) -> None:
        self._log = logger
        self._level = level
        self._tasks: set[asyncio.Future[Any]] = set()

    def spawn(
        self,
        work: Awaitable[T],
        what: str,
        *args: object,
        name: str | None = None,
        on_error: Callable[[BaseException], object] | None = None,
    ) -> asyncio.Future[T]:
        """Run ``work`` as a task (``name`` names it, for a coroutine). If it raises, log
        ``what % args`` + " failed", then call ``on_error(exception)``."""
        task: asyncio.Future[T]
        if inspect.iscoroutine(work):
            task = asyncio.get_running_loop().create_task(work, name=name)
        else:
            task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._done(done, what, args, on_error))
        return task

    def _done(
        self,
        task: asyncio.Future[Any],
        what: str,
        args: tuple[object, ...],
        on_error: Callable[[BaseException], object] | None,
    ) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self._log.log(self._level, what + " failed", *args, exc_info=exc)
        if on_error is not None:
            on_error(exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def cancel(self) -> None:
        """Cancel every task still running (they leave the set once they have ended)."""
        for task in list(self._tasks):
            task.cancel()

    # A parameter, not asyncio.timeout around the call (ASYNC109): at the limit this returns and
    # leaves the stragglers running, where an expiring asyncio.timeout would raise.
    async def wait(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the tasks running now have ended, at most ``timeout`` seconds."""
        if self._tasks:
            # asyncio.wait, unlike gather, neither raises their exceptions here nor cancels them
            # when the waiter itself is cancelled.
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def close(self) -> None:
        """Cancel every task still running and wait until they have ended."""
        self.cancel()
        await self.wait()


async def every(
    seconds: float,
    work: Callable[[], Awaitable[object] | None],
    what: str,
    *args: object,
    logger: logging.Logger = log,
    expected: tuple[type[Exception], ...] = (),
) -> NoReturn:
    """Call ``work()`` (a plain or a coroutine function) every ``seconds``, until cancelled.

    The first round runs after one interval, and each interval counts from the end of the round
    before, so a slow round never overlaps the next. A round that raises is logged on ``logger`` as
    "<what> failed; will retry" with its traceback, unless the exception is one of ``expected``
    (reported where it happened already), and the next round runs as planned.
    """
    while True:
        await asyncio.sleep(seconds)
        try:
            result = work()
            if result is not None:
                await result
        except expected:
            pass
        except Exception:
            logger.exception(what + " failed; will retry", *args)
