"""An idle bot against a bare worker, side by side in one ``multibot bench-manager`` run.

The idle bot (:mod:`manager.bench.idle_bot`: one subscription, no models) is added to the
config the measured manager runs, which runs it like any bot: its runtime process, its own
Redis users, its inbox. The bare worker (:mod:`manager.bench.bare_worker`) is Python with
redis-py's asyncio client and uvloop, connected to the same Redis and blocked on
``XREADGROUP``, as the bot's consumer is, with the environment a bot gets. Both idle in the
same run; their RSS is sampled at the same moments, and the ratio is the bot's overhead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from redis.exceptions import RedisError

from bus.connection import connect
from bus.groups import ensure_group
from bus.settings import BusSettings
from manager.config import DEFAULT_CONFIG_PATH, load_config
from manager.daemon.provision import bot_environment
from manager.embedded.child_process import OsUser, child_setup
from manager.errors import ManagerError

#: The idle bot's id in the measured config.
IDLE_BOT = "bench-idle"
_IDLE_BOT_CONFIG = f"""

# Added by multibot bench-manager: the idle bot it weighs against a bare worker.
[[bots]]
id = "{IDLE_BOT}"
entry = "manager.bench.idle_bot:main"
subscriptions = [{{ pattern = "bench.idle.ping" }}]
"""
#: The bare worker's consumer group.
BARE_GROUP = "bench-bare"
#: Seconds the bare worker may take to connect.
BARE_START_TIMEOUT = 30.0
#: RSS samples of each process, taken together, a fifth of a second apart.
SAMPLES = 5


def write_config(work: Path, base: Path = DEFAULT_CONFIG_PATH) -> Path:
    """Write ``work/multibot.toml``: ``base`` plus the idle bot; validated (a
    :class:`~manager.config.ConfigError` says what is wrong)."""
    path = work / "multibot.toml"
    path.write_text(base.read_text() + _IDLE_BOT_CONFIG)
    load_config(path)
    return path


def bare_stream(namespace: str) -> str:
    """The bare worker's stream key (outside the bus's stream keys: the manager ignores it)."""
    return f"{namespace}:bench:bare-worker"


@contextlib.asynccontextmanager
async def bare_worker(url: str, namespace: str) -> AsyncIterator[int]:
    """Run a bare worker on the Redis at ``url`` (a user that may create its group); its
    pid once it is connected. On exit it is killed and its stream deleted."""
    stream = bare_stream(namespace)
    admin = connect(BusSettings(redis_url=url), "multibot-bench")
    process: asyncio.subprocess.Process | None = None
    try:
        await ensure_group(admin, stream, BARE_GROUP, "$")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "manager.bench.bare_worker", stream, BARE_GROUP,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=bot_environment(os.environ, OsUser.current(), {}),
            preexec_fn=child_setup(),  # it dies with the bench
        )  # fmt: skip
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(url.encode() + b"\n")
        await process.stdin.drain()
        try:
            line = await asyncio.wait_for(process.stdout.readline(), BARE_START_TIMEOUT)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            raise ManagerError(f"the bare worker did not start (exit code {process.returncode})")
        yield process.pid
    finally:
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        with contextlib.suppress(RedisError, OSError):
            await admin.delete(stream)
        await admin.aclose()


@dataclass(frozen=True, slots=True)
class IdleMemory:
    """The idle bot's RSS next to the bare worker's, each the median of its samples."""

    bot_rss: int
    bare_rss: int

    @property
    def ratio(self) -> float:
        """The bot's RSS over the bare worker's."""
        return self.bot_rss / self.bare_rss

    def as_json(self) -> dict[str, Any]:
        """The figures for ``bench-manager --json``."""
        return {
            "idle_bot_rss_bytes": self.bot_rss,
            "bare_worker_rss_bytes": self.bare_rss,
            "idle_bot_to_bare_ratio": round(self.ratio, 3),
        }


async def weigh(bot_pid: int, bare_pid: int) -> IdleMemory:
    """Sample both processes' RSS together :data:`SAMPLES` times; the medians."""
    bot, bare = psutil.Process(bot_pid), psutil.Process(bare_pid)
    samples: list[tuple[int, int]] = []
    for n in range(SAMPLES):
        if n:
            await asyncio.sleep(0.2)
        samples.append((bot.memory_info().rss, bare.memory_info().rss))
    return IdleMemory(_median([s[0] for s in samples]), _median([s[1] for s in samples]))


def _median(values: Sequence[int]) -> int:
    return int(statistics.median(values))
