"""Background tasks and periodic rounds (signaling.background)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging

import pytest

from signaling.background import BackgroundTasks, every
from tests.support import loop_errors_caught

LOGGER = "signaling.background"


async def test_a_task_is_held_until_done_and_its_result_kept() -> None:
    tasks = BackgroundTasks()
    release = asyncio.Event()

    async def work() -> int:
        await release.wait()
        return 7

    task = tasks.spawn(work(), "work", name="the work")
    del task
    gc.collect()  # only the set holds the task now
    assert len(tasks) == 1
    (held,) = asyncio.all_tasks() - {asyncio.current_task()}
    assert held.get_name() == "the work"
    release.set()
    await held
    assert held.result() == 7
    assert len(tasks) == 0


async def test_a_failure_is_logged_once_with_its_label_and_on_error_is_called(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = BackgroundTasks()
    errors: list[BaseException] = []

    async def boom() -> None:
        raise ValueError("bad")

    with loop_errors_caught() as loop_errors:
        task = tasks.spawn(boom(), "room %s: callback %r", "lobby", "cb", on_error=errors.append)
        await asyncio.wait([task])
        await asyncio.sleep(0)  # done callbacks run one loop step after the task ends
        del task
        gc.collect()
    records = [r for r in caplog.records if r.name == LOGGER]
    messages = [(r.levelno, r.getMessage()) for r in records]
    assert messages == [(logging.ERROR, "room lobby: callback 'cb' failed")]
    assert records[0].exc_info is not None and isinstance(records[0].exc_info[1], ValueError)
    assert [type(e) for e in errors] == [ValueError]
    assert loop_errors == []  # retrieved: no "Task exception was never retrieved" later
    assert len(tasks) == 0


async def test_a_cancelled_task_is_no_failure(caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks()
    errors: list[BaseException] = []
    task = tasks.spawn(asyncio.sleep(60), "sleep", on_error=errors.append)
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait([task])
    await asyncio.sleep(0)
    assert errors == []
    assert not [r for r in caplog.records if r.name == LOGGER]
    assert len(tasks) == 0


async def test_expected_failures_go_to_the_given_logger_and_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quiet")
    tasks = BackgroundTasks(logging.getLogger("quiet"), level=logging.DEBUG)

    async def boom() -> None:
        raise ConnectionError("closing")

    await asyncio.wait([tasks.spawn(boom(), "send")])
    await asyncio.sleep(0)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("quiet", logging.DEBUG, "send failed")
    ]


async def test_a_future_is_held_too() -> None:
    tasks = BackgroundTasks()
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    assert tasks.spawn(future, "future") is future
    assert len(tasks) == 1
    future.set_result("x")
    await asyncio.sleep(0)
    assert len(tasks) == 0


async def test_wait_lets_tasks_finish_and_close_cancels_them() -> None:
    tasks = BackgroundTasks()
    quick = tasks.spawn(asyncio.sleep(0.01, "done"), "quick")
    slow = tasks.spawn(asyncio.sleep(60), "slow")
    await tasks.wait(timeout=1)  # returns at the timeout: slow is still running, not cancelled
    assert quick.result() == "done"
    assert not slow.done()
    await tasks.close()
    assert slow.cancelled()
    assert len(tasks) == 0
    await tasks.close()  # nothing left: returns at once


async def test_every_runs_plain_and_async_work_after_each_interval() -> None:
    plain: list[float] = []
    coro: list[float] = []
    three = asyncio.Event()
    loop = asyncio.get_running_loop()

    def plain_work() -> None:
        plain.append(loop.time())

    async def async_work() -> None:
        coro.append(loop.time())
        if len(coro) == 3:
            three.set()

    start = loop.time()
    loops = BackgroundTasks()
    loops.spawn(every(0.05, plain_work, "plain"), "plain loop")
    loops.spawn(every(0.05, async_work, "async"), "async loop")
    await asyncio.sleep(0.01)
    assert plain == coro == []  # the first round waits one interval
    await three.wait()
    assert len(plain) >= 2
    # (the loop may run a timer up to its clock resolution early)
    assert plain[0] - start >= 0.049 and coro[0] - start >= 0.049
    assert all(b - a >= 0.049 for a, b in itertools.pairwise(coro))
    await loops.close()


async def test_a_failing_round_is_logged_and_the_next_one_runs(caplog: pytest.LogCaptureFixture) -> None:
    rounds: list[int] = []
    four = asyncio.Event()

    async def work() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 4:
            four.set()
        if len(rounds) <= 2:
            raise RuntimeError(f"round {len(rounds)}")

    task = asyncio.create_task(every(0.001, work, "room %s: rtt refresh", "lobby"))
    await four.wait()
    task.cancel()
    records = [r for r in caplog.records if r.name == LOGGER]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.ERROR, "room lobby: rtt refresh failed; will retry")
    ] * 2
    assert [str(r.exc_info[1]) for r in records if r.exc_info] == ["round 1", "round 2"]


async def test_expected_exceptions_are_not_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    rounds = 0
    three = asyncio.Event()

    def work() -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 3:
            three.set()
        raise ConnectionError("reported where it happened")

    task = asyncio.create_task(every(0.001, work, "sweep", expected=(ConnectionError,)))
    await three.wait()
    task.cancel()
    assert not [r for r in caplog.records if r.name == LOGGER]


async def test_every_stops_when_cancelled_even_mid_round() -> None:
    started = asyncio.Event()
    finished = False

    async def work() -> None:
        nonlocal finished
        started.set()
        await asyncio.sleep(60)
        finished = True

    task = asyncio.create_task(every(0.001, work, "slow"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not finished
