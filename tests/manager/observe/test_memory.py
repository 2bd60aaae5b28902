"""Tests for manager.observe.memory: measuring process trees and Redis, sizes, budget alerts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any, cast

import psutil
import pytest
from redis.asyncio import Redis

from manager.observe.memory import (
    MemoryAlert,
    MemoryBudget,
    MemorySample,
    format_size,
    parse_size,
    redis_used_memory,
    tree_rss,
)

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4
ALLOCATION = 50 * MiB

# A grandchild that fills ALLOCATION bytes (b"x" * n writes every page, so they are resident),
# says so, and holds them until its stdin (shared with its parent) closes.
GRANDCHILD = (
    f"import sys\nblock = b'x' * {ALLOCATION}\nprint('ready', flush=True)\nsys.stdin.read()\n"
)
# Its parent: reports the grandchild's pid once it is ready, then waits for stdin to close.
PARENT = (
    "import subprocess, sys\n"
    f"child = subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}], stdout=subprocess.PIPE)\n"
    "child.stdout.readline()\n"
    "print(child.pid, flush=True)\n"
    "sys.stdin.read()\n"
    "child.wait()\n"
)


@contextlib.asynccontextmanager
async def allocating_tree() -> AsyncIterator[tuple[int, int]]:
    """A running parent whose child holds ALLOCATION bytes: (parent pid, child pid)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        assert line, "the allocating process tree exited before it was ready"
        yield proc.pid, int(line)
    finally:
        proc.stdin.close()  # EOF to both: they exit
        try:
            await asyncio.wait_for(proc.wait(), timeout=10)
        except TimeoutError:  # stuck: kill the whole tree
            with contextlib.suppress(psutil.NoSuchProcess):
                for process in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


class TestTreeRss:
    async def test_counts_descendants(self) -> None:
        """A parent's tree RSS includes the memory its child allocated."""
        async with allocating_tree() as (parent, child):
            alone = psutil.Process(parent).memory_info().rss
            assert alone < ALLOCATION
            assert (tree_rss(child) or 0) > ALLOCATION
            assert (tree_rss(parent) or 0) > ALLOCATION + alone / 2

    async def test_vanished_pid_is_unknown(self) -> None:
        """A pid whose process has exited (and been reaped) has no measure: None, not 0."""
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        await asyncio.wait_for(proc.wait(), timeout=30)
        assert tree_rss(proc.pid) is None

    def test_zombie_descendant_counts_zero(self) -> None:
        """An exited but unreaped child neither breaks the walk nor adds memory."""
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        try:
            # Wait for the exit but leave the child unreaped (WNOWAIT): a zombie.
            os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)
            assert psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE
            assert tree_rss(zombie.pid) == 0
            assert (tree_rss(os.getpid()) or 0) > 0  # the walk over our children went through
        finally:
            zombie.wait()

    def test_own_process(self) -> None:
        """The test's own process tree has some memory."""
        assert (tree_rss(os.getpid()) or 0) > 0


class TestRedisUsedMemory:
    @pytest.mark.redis
    async def test_reports_used_memory(self, redis_url: str) -> None:
        """Redis reports a positive used_memory, which grows with data."""
        async with Redis.from_url(redis_url) as redis:
            before = await redis_used_memory(redis)
            assert before > 0
            await redis.set("big", b"x" * MiB)
            assert await redis_used_memory(redis) > before + MiB // 2


class TestParseSize:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("2GB", 2 * GiB),
            ("2G", 2 * GiB),
            ("2GiB", 2 * GiB),
            ("2gb", 2 * GiB),
            (" 2 GB ", 2 * GiB),
            ("512MiB", 512 * MiB),
            ("512M", 512 * MiB),
            ("512mb", 512 * MiB),
            ("100k", 100 * KiB),
            ("100KB", 100 * KiB),
            ("1.5G", 3 * GiB // 2),
            (".5K", 512),
            ("1T", TiB),
            ("1024", 1024),
            ("10B", 10),
            ("0", 0),
            (1024, 1024),
            (0, 0),
        ],
    )
    def test_valid(self, text: str | int, expected: int) -> None:
        """Sizes in bytes, or with binary K/M/G/T units in any spelling and case."""
        assert parse_size(text) == expected

    @pytest.mark.parametrize(
        "text", ["", "GB", "2XB", "2 G B", "2iB", "-1G", "1,5G", "two gigs", "2GBs", "0x10"]
    )
    def test_invalid_text(self, text: str) -> None:
        """Text that is not a size is rejected with a hint."""
        with pytest.raises(ValueError, match=r"use a number of bytes or a size like 512MB, 2GB"):
            parse_size(text)

    @pytest.mark.parametrize("value", [-1, True, 1.5, None])
    def test_invalid_values(self, value: object) -> None:
        """Negative numbers and non-int, non-text values are rejected."""
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(cast(Any, value))


class TestFormatSize:
    @pytest.mark.parametrize(
        ("n", "expected"),
        [
            (0, "0 B"),
            (512, "512 B"),
            (1023, "1023 B"),
            (1536, "1.5 KiB"),
            (MiB - 1, "1.0 MiB"),
            (3 * GiB // 2, "1.5 GiB"),
            (2 * GiB, "2.0 GiB"),
            (5 * TiB, "5.0 TiB"),
            (-2048, "-2.0 KiB"),
        ],
    )
    def test_format(self, n: int, expected: str) -> None:
        """Binary units with one decimal; bytes as a whole number."""
        assert format_size(n) == expected

    def test_round_trip(self) -> None:
        """What format_size writes, parse_size reads back."""
        assert parse_size(format_size(3 * GiB // 2)) == 3 * GiB // 2


class TestMemoryBudget:
    def test_sample_total(self) -> None:
        """The total adds manager, every bot and Redis."""
        assert MemorySample(manager=1, bots={"a": 2, "b": 3}, redis=4).total == 10

    def test_total_raises_once_and_clears_at_low(self) -> None:
        """The total alerts once on reaching 90% of the budget and once on falling to 80%."""
        budget = MemoryBudget(1000)
        seen = [
            budget.check(MemorySample(manager=used, redis=0))
            for used in (500, 900, 950, 1200, 850, 801, 800, 100)
        ]
        assert seen == [
            [],
            [MemoryAlert("total", "total", raised=True, value=900, limit=1000)],
            [],
            [],
            [],
            [],
            [MemoryAlert("total", "total", raised=False, value=800, limit=1000)],
            [],
        ]

    def test_custom_fractions(self) -> None:
        """high and low are fractions of the budget."""
        budget = MemoryBudget(1000, high=0.5, low=0.25)
        assert [a.raised for a in budget.check(MemorySample(manager=500))] == [True]
        assert budget.check(MemorySample(manager=300)) == []
        assert [a.raised for a in budget.check(MemorySample(manager=250))] == [False]

    def test_bot_over_its_own_limit(self) -> None:
        """A bot alerts at its limit and clears at 90% of it; unlimited bots never alert."""
        budget = MemoryBudget(10 * GiB, per_bot_limits={"greeter": 100 * MiB})
        over = MemorySample(manager=MiB, bots={"greeter": 100 * MiB, "free": 5 * GiB})
        assert budget.check(over) == [MemoryAlert("bot", "greeter", True, 100 * MiB, 100 * MiB)]
        assert budget.over == {"greeter"}
        assert budget.check(MemorySample(manager=MiB, bots={"greeter": 95 * MiB})) == []
        assert budget.check(MemorySample(manager=MiB, bots={})) == []  # absent: unchanged
        cleared = budget.check(MemorySample(manager=MiB, bots={"greeter": 90 * MiB}))
        assert cleared == [MemoryAlert("bot", "greeter", False, 90 * MiB, 100 * MiB)]
        assert budget.over == frozenset()

    def test_total_and_bot_in_one_sample(self) -> None:
        """One sample can raise the total and a bot; the total comes first."""
        budget = MemoryBudget(1000, per_bot_limits={"a": 100, "b": 500})
        alerts = budget.check(MemorySample(manager=100, bots={"b": 600, "a": 200}, redis=100))
        assert [(a.scope, a.key, a.value, a.limit) for a in alerts] == [
            ("total", "total", 1000, 1000),
            ("bot", "b", 600, 500),
            ("bot", "a", 200, 100),
        ]
        assert "total" in repr(budget) and "over=" in repr(budget)

    def test_alert_reads_well(self) -> None:
        """An alert's text says what, which way, how much and of what."""
        raised = MemoryAlert("total", "total", True, 9 * GiB // 5, 2 * GiB)
        assert str(raised) == "memory over its budget: 1.8 GiB of 2.0 GiB (90%)"
        cleared = MemoryAlert("bot", "greeter", False, 90 * MiB, 100 * MiB)
        assert str(cleared) == (
            "bot greeter memory back under its limit: 90.0 MiB of 100.0 MiB (90%)"
        )

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"total_bytes": 0}, "budget must be positive"),
            ({"total_bytes": 10, "high": 0.5, "low": 0.8}, "0 < low <= high <= 1"),
            ({"total_bytes": 10, "high": 1.5}, "0 < low <= high <= 1"),
            ({"total_bytes": 10, "per_bot_limits": {"a": 0}}, "bot a must be positive"),
        ],
    )
    def test_invalid_configuration(self, kwargs: dict[str, Any], message: str) -> None:
        """Budgets that cannot work are rejected with the reason."""
        with pytest.raises(ValueError, match=message):
            MemoryBudget(**kwargs)
