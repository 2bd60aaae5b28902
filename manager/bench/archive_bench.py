"""``multibot bench-archive``: the archive's speed, lag, disk use and replay speed.

On a private Redis and a private PostgreSQL in a temporary directory it measures:

- throughput: a backlog of ``events`` entries is archived by the archiver (events/s into
  PostgreSQL at its batch size);
- lag: events published at ``rate``/s for ``duration`` seconds; the delay from each event's
  publish time to its row being stored (p50/p95/p99/max, from PostgreSQL's own clock);
- disk: bytes per million events (table, indexes, TOAST);
- replay: events/s replayed from PostgreSQL (after the streams were trimmed to nothing) and
  from Redis (all still in the stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from bus import BusClient
from bus.archive.store import ArchiveStore
from bus.keys import Keys
from bus.settings import BusSettings
from manager.announcer import Announcer
from manager.archive.archiver import Archiver
from manager.archive.link import ArchiveLink
from manager.archive.trimmer import Trimmer
from manager.config import ArchiveSettings
from manager.embedded.postgres_server import PostgresServer
from manager.embedded.redis_server import RedisServer

_DELAYS = """
SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY d) AS p, max(d) AS max
FROM (SELECT extract(epoch FROM stored_at - created_at)::float8 AS d
      FROM event_index WHERE type = $1) t
"""  # $1: the event type of the lag phase. Returns the percentiles and the max, in seconds.
_PAYLOAD = {"user_id": 12345, "bot_id": "greeter", "text": "hello there, how are you today?"}


@contextlib.asynccontextmanager
async def _servers() -> AsyncIterator[tuple[str, str]]:
    work = Path(tempfile.mkdtemp(prefix="multibot-bench-archive-"))
    os.chmod(work, 0o711)  # as root the private PostgreSQL runs as another user
    redis = RedisServer(work / "redis", appendfsync="no")
    postgres = PostgresServer(work / "postgres")
    try:
        await redis.start()
        await postgres.start(timeout=120)
        yield redis.url, postgres.dsn
    finally:
        await postgres.stop()
        await redis.stop()
        shutil.rmtree(work, ignore_errors=True)


async def _until(check: Callable[[], Any], timeout: float = 600) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("the archive did not catch up in time")
        await asyncio.sleep(0.05)


async def _throughput(bus: BusClient, link: ArchiveLink, settings: ArchiveSettings, n: int) -> Any:
    for start in range(0, n, 1000):
        await bus.publish_many([("bench.backlog.added", _PAYLOAD)] * min(1000, n - start))
    archiver = Archiver(bus.redis, bus.keys, settings, link.get)
    started = time.monotonic()
    task = asyncio.create_task(archiver.run())

    async def done() -> bool:  # its own counter: polling count(*) would load PostgreSQL
        return archiver.stats["archived"] >= n

    await _until(done)
    seconds = time.monotonic() - started
    return task, {"events": n, "seconds": round(seconds, 2), "events_per_s": round(n / seconds)}


async def _lag(bus: BusClient, store: ArchiveStore, rate: float, duration: float) -> Any:
    total = int(rate * duration)
    started = time.monotonic()
    for n in range(total):
        await bus.publish("bench.lag.measured", _PAYLOAD)
        ahead = started + (n + 1) / rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)
    async with store._connection() as conn:

        async def stored() -> bool:
            count = await conn.fetchval(
                "SELECT count(*) FROM event_heads h JOIN event_kinds k ON k.id = h.kind_id "
                "WHERE k.type = 'bench.lag.measured'"
            )
            return bool(count >= total)

        await _until(stored)
        row = await conn.fetchrow(_DELAYS, "bench.lag.measured")
    p50, p95, p99 = (round(v * 1000, 1) for v in row["p"])
    return {"rate": rate, "events": total, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
            "max_ms": round(row["max"] * 1000, 1)}  # fmt: skip


async def _replay_speed(bus: BusClient, store: ArchiveStore | None) -> dict[str, Any]:
    started = time.monotonic()
    count = 0
    async for _ in bus.replay("bench.#", archive=store):
        count += 1
    seconds = time.monotonic() - started
    return {"events": count, "events_per_s": round(count / seconds)}


async def run_archive_bench(
    events: int, rate: float, duration: float, echo: Callable[[str], None], batch: int = 2000
) -> dict[str, Any]:
    """Measure; the results as a JSON-able dict."""
    settings = ArchiveSettings(hot_window=0, trim_interval=0.2, batch_size=batch)
    async with _servers() as (redis_url, dsn):
        keys = Keys()
        link = ArchiveLink(dsn, keys)
        async with BusClient("bench", settings=BusSettings(redis_url=redis_url)) as bus:
            store = await link.get()
            echo(f"archiving a backlog of {events} events ...")
            archiver, throughput = await _throughput(bus, link, settings, events)
            echo(f"replaying {events} events from Redis ...")
            from_redis = await _replay_speed(bus, None)
            echo(f"{rate:g} events/s for {duration:g}s, measuring the archive delay ...")
            backlog_size = await store.size_bytes()
            lag = await _lag(bus, store, rate, duration)
            count = await store.count()
            size = await store.size_bytes()
            echo("trimming the streams to nothing, then replaying from PostgreSQL ...")
            trimmer = Trimmer(bus.redis, keys, settings, Announcer(bus))
            await trimmer.trim_all(now_ms=int(time.time() * 1000) + 1000)
            stream = keys.stream("bot")
            left = await bus.redis.xlen(stream)
            from_archive = await _replay_speed(bus, store)
            archiver.cancel()
            await asyncio.gather(archiver, return_exceptions=True)
            await link.close()
    return {
        "archiver": {**throughput, "batch_size": settings.batch_size},
        "archive_delay_at_rate": lag,
        "disk_bytes_per_million": round(size / count * 1_000_000) if count else None,
        # What the events published at the steady rate added (blocks filled as the archiver
        # fills them then, not from batches of a backlog).
        "disk_bytes_per_event_at_rate": round((size - backlog_size) / lag["events"], 1),
        "archived_events": count,
        "replay_from_redis": from_redis,
        "replay_from_postgres": {**from_archive, "left_in_redis": left},
    }
