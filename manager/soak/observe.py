"""Watching Redis through the soak: memory samples, and waiting until every group caught up.

Redis's own ``used_memory_peak`` starts again at each restart (and the soak restarts it),
so :class:`MemorySampler` reads ``INFO memory`` and ``CONFIG GET maxmemory`` every
:data:`SAMPLE_EVERY` seconds and keeps the samples. :func:`caught_up` is the end condition
of a run: no entry pending and none undelivered for the soak groups and the archiver on the
soak stream, and for the archiver on the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bus.keys import ARCHIVER_GROUP, FANOUT_GROUP, Keys
from manager.observe.lag import group_lags

log = structlog.get_logger("manager.soak")

SAMPLE_EVERY = 0.5  # seconds between memory samples
CATCH_UP_POLL = 0.5  # seconds between catch-up checks


@dataclass(frozen=True, slots=True)
class MemorySample:
    """One reading: wall time, ``used_memory`` and ``maxmemory`` (0: unlimited) in bytes."""

    at: float
    used: int
    maxmemory: int


@dataclass
class MemorySampler:
    """Samples Redis memory until cancelled; a failed reading (Redis down) is skipped."""

    redis: Redis
    samples: list[MemorySample] = field(default_factory=list)
    #: The ``maxmemory`` the soak set for a while (redis-oom), as (start, end, bytes).
    overrides: list[tuple[float, float, int]] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<MemorySampler samples={len(self.samples)}>"

    async def run(self) -> None:
        """Take a sample every :data:`SAMPLE_EVERY` seconds."""
        while True:
            try:
                info: Any = await self.redis.info("memory")
                config: Any = await self.redis.config_get("maxmemory")
            except (RedisError, OSError):
                pass
            else:
                used, limit = int(info["used_memory"]), int(config.get("maxmemory", 0))
                self.samples.append(MemorySample(time.time(), used, limit))
            await asyncio.sleep(SAMPLE_EVERY)

    def configured_maxmemory(self) -> int:
        """The ``maxmemory`` outside the soak's own overrides (the last such reading)."""
        for sample in reversed(self.samples):
            if not any(start <= sample.at <= end for start, end, _ in self.overrides):
                return sample.maxmemory
        return 0


async def group_backlog(
    redis: Redis, stream: str, groups: Sequence[str], keys: Keys | None = None
) -> dict[str, int]:
    """Per group of ``groups`` on ``stream`` (with ``keys``, also in their inboxes):
    entries pending plus entries not yet delivered (:func:`manager.observe.lag.group_lags`:
    Redis's own lag field goes wrong after restarts); a missing group counts as one, so it
    is never taken as caught up."""
    found = {g.group: g for g in await group_lags(redis, [stream], keys=keys)}
    backlog: dict[str, int] = {}
    for group in groups:
        row = found.get(group)
        backlog[group] = 1 if row is None else row.pending + (row.lag or 0)
    return backlog


async def caught_up(
    redis: Redis,
    stream: str,
    keys: Keys,
    groups: Sequence[str],
    timeout: float,  # noqa: ASYNC109
) -> dict[str, int]:
    """Wait until the fanout has copied everything on ``stream``, the soak groups (in their
    inboxes) and the archiver have handled it, and the archiver everything on the dead
    letters, at most ``timeout`` seconds; the backlog left (all zero when caught up). Redis
    errors while it restarts are waited through."""
    dlq = keys.dead_letters()
    deadline = time.monotonic() + timeout
    left: dict[str, int] = {}
    while True:
        try:
            wanted = [*groups, ARCHIVER_GROUP, FANOUT_GROUP]
            left = await group_backlog(redis, stream, wanted, keys)
            dlq_left = (
                await group_backlog(redis, dlq, [ARCHIVER_GROUP]) if await redis.exists(dlq) else {}
            )
            left.update({f"{g} (dead letters)": n for g, n in dlq_left.items()})
        except (RedisError, OSError) as exc:
            left = {"redis": 1}
            log.warning("soak: catch-up check failed; retrying", error=str(exc))
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        await asyncio.sleep(CATCH_UP_POLL)
