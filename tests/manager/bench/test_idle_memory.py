"""The pieces of ``bench-manager``'s side-by-side memory figure: the config with the idle bot,
the bare worker (bare indeed, and reading), and the sampling."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from redis.asyncio import Redis

from bots.runtime.entry import load_main
from manager.bench import idle_bot
from manager.bench.idle_memory import (
    IDLE_BOT,
    IdleMemory,
    bare_stream,
    bare_worker,
    weigh,
    write_config,
)
from manager.config import load_config
from tests.support import redis_client, wait_until


class TestConfig:
    def test_the_default_config_plus_the_idle_bot(self, tmp_path: Path) -> None:
        """The written config is valid, keeps the example bots and adds the idle bot."""
        settings = load_config(write_config(tmp_path))
        bots = {bot.id: bot for bot in settings.bots}
        assert {"greeter", "matcher", "shared-users", IDLE_BOT} <= set(bots)
        assert bots[IDLE_BOT].entry == "manager.bench.idle_bot:main"
        assert [s.pattern for s in bots[IDLE_BOT].subscriptions] == [idle_bot.PATTERN]

    def test_the_idle_bot_is_an_entry_point(self) -> None:
        """The runtime can load the idle bot as it loads any bot."""
        main = load_main("manager.bench.idle_bot:main")
        assert main is idle_bot.main
        assert inspect.iscoroutinefunction(main)


class TestBareWorker:
    def test_imports_only_redis_py_and_uvloop(self) -> None:
        """Beyond the standard library, the bare worker loads redis-py, uvloop and hiredis."""
        script = "import sys, manager.bench.bare_worker; print('\\n'.join(sys.modules))"
        done = subprocess.run(
            [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=60
        )
        tops = {name.split(".")[0] for name in done.stdout.split()}
        ours = {name for name in done.stdout.split() if name.split(".")[0] == "manager"}
        assert ours == {"manager", "manager.bench", "manager.bench.bare_worker"}
        assert not tops & {"bus", "bots", "structlog", "pydantic", "orjson", "psutil"}
        assert {"redis", "uvloop"} <= tops

    @pytest.mark.redis
    @pytest.mark.one_redis
    async def test_reads_its_group_then_is_gone_with_its_stream(self, redis_url: str) -> None:
        """Running, it is a live process reading its group; afterwards nothing is left."""
        namespace = f"bench-{uuid.uuid4().hex[:8]}"
        stream = bare_stream(namespace)
        async with redis_client(redis_url, decode_responses=True) as redis:
            async with bare_worker(redis_url, namespace) as pid:
                assert psutil.Process(pid).is_running()
                await wait_until(lambda: _reading(redis), what="the worker reading")
            assert not psutil.pid_exists(pid) or _zombie(pid)
            assert await redis.exists(stream) == 0


async def _reading(redis: Redis) -> bool:
    """Whether the bare worker's connection is blocked in XREADGROUP."""
    clients: list[dict[str, Any]] = await redis.client_list()
    return any(
        c["name"] == "multibot-bench-bare" and c["cmd"] == "xreadgroup" and "b" in c["flags"]
        for c in clients
    )


def _zombie(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


class TestWeigh:
    async def test_medians_of_both_and_their_ratio(self) -> None:
        """Both processes are sampled; the figures and their ratio go into the JSON line."""
        other = await asyncio.create_subprocess_exec(sys.executable, "-c", "input()",
                                                     stdin=asyncio.subprocess.PIPE)  # fmt: skip
        try:
            memory = await weigh(os.getpid(), other.pid)
        finally:
            other.kill()
            await other.wait()
        assert memory.bot_rss > memory.bare_rss > 0  # pytest itself weighs more than `input()`
        assert memory.ratio == memory.bot_rss / memory.bare_rss
        assert memory.as_json() == {
            "idle_bot_rss_bytes": memory.bot_rss,
            "bare_worker_rss_bytes": memory.bare_rss,
            "idle_bot_to_bare_ratio": round(memory.ratio, 3),
        }

    def test_ratio_is_rounded_in_the_json(self) -> None:
        """The ratio is reported to three decimals."""
        assert IdleMemory(bot_rss=1089, bare_rss=1000).as_json()["idle_bot_to_bare_ratio"] == 1.089
