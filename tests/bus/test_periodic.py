"""Periodic rounds: a failed round is logged (once per outage) and never ends the loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import pytest
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from bus.periodic import REDIS_UNAVAILABLE, Outage, Periodic, every, forever

log = structlog.get_logger("tests.periodic")


class PostgresDown(ConnectionError):
    """Stands for a PostgreSQL outage: an OSError too, like Redis's."""


class Script:
    """A step that raises the next scripted error (None: works), then works for ever."""

    def __init__(self, *errors: Exception | None, until: int = 0) -> None:
        self._errors = list(errors)
        self._until = until
        self.calls = 0
        #: Set once the step has been called ``until`` times.
        self.done = asyncio.Event()

    async def __call__(self) -> None:
        self.calls += 1
        if self.calls >= self._until:
            self.done.set()
        error = self._errors.pop(0) if self._errors else None
        if error is not None:
            raise error


def rounds(
    step: Script, outages: Sequence[Outage] = (REDIS_UNAVAILABLE,), resumed: str | None = None
) -> Periodic:
    """Rounds of ``step`` with no wait between them."""
    return Periodic(step, 0.0, log=log, what="do the thing", outages=outages, resumed=resumed)


class TestRound:
    async def test_an_outage_is_logged_once_and_its_end_once(self) -> None:
        """Redis away for three rounds: one warning, then one info when a round works."""
        down = RedisConnectionError("refused")
        periodic = rounds(Script(down, down, down, None, None))
        with capture_logs() as logs:
            results = [await periodic.round() for _ in range(5)]
        assert results == [False, False, False, True, True]
        assert [(e["log_level"], e["event"]) for e in logs] == [
            ("warning", "cannot do the thing: Redis unavailable"),
            ("info", "can do the thing again"),
        ]
        assert logs[0]["error"] == "refused"
        assert logs[1]["after"] == "Redis unavailable"
        assert periodic.failing is None

    async def test_other_errors_are_logged_each_time_with_their_traceback(self) -> None:
        """An unexpected error is logged with log.exception every round it happens."""
        periodic = rounds(Script(RuntimeError("bug"), RuntimeError("bug")))
        with capture_logs() as logs:
            assert not await periodic.round()
            assert not await periodic.round()
        assert [(e["log_level"], e["event"]) for e in logs] == [
            ("error", "cannot do the thing; trying again next round"),
        ] * 2
        assert all(e["exc_info"] for e in logs)
        assert periodic.failing == "error"

    async def test_outages_are_matched_in_order(self) -> None:
        """The first outage whose errors match names it, so a narrower one goes first."""
        postgres = Outage((PostgresDown,), "PostgreSQL unavailable")
        periodic = rounds(
            Script(PostgresDown("gone"), RedisConnectionError("refused")),
            outages=(postgres, REDIS_UNAVAILABLE),
            resumed="working again",
        )
        with capture_logs() as logs:
            for _ in range(3):
                await periodic.round()
        assert [e["event"] for e in logs] == [
            "cannot do the thing: PostgreSQL unavailable",
            "cannot do the thing: Redis unavailable",
            "working again",
        ]


class TestRun:
    async def test_runs_until_cancelled_whatever_the_step_raises(self) -> None:
        """Failed rounds do not end the loop; only a cancel does."""
        step = Script(RedisConnectionError("refused"), RuntimeError("bug"), None, until=5)
        task = asyncio.create_task(every(0.0, step, log=log, what="do the thing"))
        with capture_logs():
            await step.done.wait()
            assert not task.done()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert task.cancelled()

    async def test_a_failed_round_waits_retry_instead_of_interval(self) -> None:
        """After a failed round the next comes after ``retry``, not ``interval``."""
        step = Script(RuntimeError("bug"), until=2)
        periodic = Periodic(step, 3600.0, log=log, what="do the thing", retry=0.0)
        task = asyncio.create_task(periodic.run())
        with capture_logs():
            await step.done.wait()  # the hour-long interval would time the test out
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


class TestForever:
    async def test_a_cancel_the_step_swallowed_still_ends_the_loop(self) -> None:
        """redis-py on Python 3.11 can drop a cancel that lands mid-command, and the call
        returns normally: the loop must still end (a stop once hung on the relay here)."""
        started = asyncio.Event()
        give_up = False

        async def swallowing_step() -> None:
            started.set()
            if give_up:
                raise asyncio.CancelledError  # the test's own way out, should the loop not end
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)  # as a command the cancel lands in

        task = asyncio.create_task(
            forever(swallowing_step, log=structlog.get_logger(), what="test", waiting="-")
        )
        await started.wait()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        give_up = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert done == {task}, "the loop ran on after its cancel was swallowed"
