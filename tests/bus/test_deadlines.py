"""Handler timeouts from one watchdog: late calls are cancelled as TimeoutError, nothing else."""

from __future__ import annotations

import asyncio

import pytest

from bus.deadlines import Deadlines


async def test_a_call_past_its_timeout_is_cancelled_as_a_timeout() -> None:
    """A call still running past its timeout gets TimeoutError (within a tenth of the
    timeout, plus scheduling), and its limit says it expired."""
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadlines.limit(0.2) as limit:
            await asyncio.sleep(30)
    assert limit.expired()
    assert 0.2 <= loop.time() - started < 1.0


async def test_calls_within_their_timeout_and_without_one_run_to_the_end() -> None:
    """Many calls that finish in time, and one with no limit outliving the others'
    deadlines, are never cancelled."""
    deadlines = Deadlines()

    async def call(limit_s: float | None, seconds: float) -> bool:
        async with deadlines.limit(limit_s) as limit:
            await asyncio.sleep(seconds)
        return limit.expired()

    quick = [call(0.5, 0.01) for _ in range(100)]
    assert await asyncio.gather(call(None, 0.3), *quick) == [False] * 101


async def test_a_cancel_from_outside_stays_a_cancel() -> None:
    """A shutdown cancelling the task is not turned into a timeout."""
    deadlines = Deadlines()
    entered = asyncio.Event()

    async def call() -> None:
        async with deadlines.limit(10):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(call())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_timed_out_call_leaves_the_task_usable() -> None:
    """After a timeout the same task goes on (the next attempt of a retry) and can be
    timed out again: the cancellation was taken back."""
    deadlines = Deadlines()
    timeouts = 0
    for _ in range(2):
        try:
            async with deadlines.limit(0.05):
                await asyncio.sleep(30)
        except TimeoutError:
            timeouts += 1
    task = asyncio.current_task()
    assert task is not None
    assert (timeouts, task.cancelling()) == (2, 0)
    await asyncio.sleep(0)  # not cancelled
