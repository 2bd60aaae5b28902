"""Runs a benchmark: a Redis to run against, the worker processes of each phase, the results.

One run is: the idle-client probe, the bus phase, with ``deliveries`` the bus phase again
with delivery records on (copied into PostgreSQL), then (unless disabled) the bare redis-py
baseline phase with the same layout, all in a fresh namespace ``bench-<random>`` that is
emptied between phases and deleted at the end. Each phase spawns its workers, waits until
all are ready, gives them one wall-clock start time, waits for the producers to finish, lets
the consumers drain (until done or stalled), then stops them and collects their results.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import mmap
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bus.archive.store import ArchiveStore
from bus.connection import connect, redact
from bus.fanout import Fanout
from bus.groups import ensure_group
from bus.keys import Keys, group_name
from bus.outbox import OutboxRelay
from bus.routing import DEFAULT_STREAM, Router
from bus.settings import BusSettings
from manager.bench import raw_roles
from manager.bench.children import SPAWN_TIMEOUT, STOP_TIMEOUT, Child, expect_all, spawn
from manager.bench.copy_watch import CopyWatch
from manager.bench.database import bench_archive
from manager.bench.options import (
    CONSUMER_BOT,
    DRAIN_CAP_FACTOR,
    PRODUCER_BOT,
    RAW_GROUP,
    ROUTES,
    BenchError,
    BenchOptions,
    IdleSpec,
    Mode,
    WorkerSpec,
    bench_partitions,
    raw_stream,
)
from manager.bench.recording import Tally, WorkerResult
from manager.bench.report import BenchReport, PhaseResult, RecordsResult, summarize
from manager.daemon.redis_acl import (
    bot_redis_url,
    delete_bot_user,
    ensure_bot_user,
    generate_password,
    streams_username,
)
from manager.daemon.redis_replicas import replica_clients
from manager.embedded.redis_server import RedisServer

log = structlog.get_logger("manager.bench")

_START_LEAD = 0.1  # seconds between "go" and the producers' first send, so all start together
_DRAIN_POLL = 0.01


async def run_bench(options: BenchOptions) -> BenchReport:
    """Run the benchmark ``options`` describe and return its report.

    Without ``options.redis_url`` a private redis-server runs in a temporary directory for
    the duration of the run. Raises :class:`BenchError` when a worker fails.
    """
    async with _redis_url(options.redis_url) as url:
        namespace = f"bench-{secrets.token_hex(4)}"
        admin = connect(BusSettings(redis_url=url), "multibot-bench")
        try:
            server: dict[str, Any] = await admin.info("server")
        except (RedisError, OSError) as exc:
            await admin.aclose()
            raise BenchError(
                f"cannot reach Redis at {redact(url)} ({exc}): check --redis-url or "
                "MULTIBOT_REDIS_URL, or leave both unset to run a private redis-server"
            ) from exc
        try:
            records = None
            async with contextlib.AsyncExitStack() as stack:
                archive = None
                if options.deliveries:  # ready before the first phase: they run back to back
                    archive = await stack.enter_async_context(bench_archive(options.postgres_dsn))
                idle_rss = await _idle_rss(url, namespace)
                bus = await _bus_phase(admin, url, namespace, options)
                if archive is not None:
                    await _delete_namespace(admin, namespace)  # each phase on an empty Redis
                    records = await _records_phase(admin, url, namespace, options, archive)
            await _delete_namespace(admin, namespace)  # the baseline starts on an empty Redis
            baseline = relayed = None
            if options.baseline:
                await ensure_group(admin, raw_stream(namespace), RAW_GROUP, "$")
                baseline = await _phase("raw", options, _Urls(url, url), namespace)
            if options.relay_baseline:
                await _delete_namespace(admin, namespace)
                await ensure_group(admin, raw_stream(namespace), RAW_GROUP, "$")
                async with raw_roles.relay(url, namespace):
                    relayed = await _phase("raw", options, _Urls(url, url, True), namespace)
        finally:
            await _delete_namespace(admin, namespace)
            await admin.aclose()
    return BenchReport(
        options=options,
        bus=bus,
        baseline=baseline,
        relayed_baseline=relayed,
        records=records,
        idle_client_rss_mb=idle_rss,
        redis_version=str(server.get("redis_version", "?")),
        private_redis=options.redis_url is None,
    )


async def _bus_phase(admin: Redis, url: str, namespace: str, options: BenchOptions) -> PhaseResult:
    """Run the bus phase: as the manager's bots, or (not ``bot_user``) as the URL's user."""
    if not options.bot_user:
        return await _phase("bus", options, _Urls(url, url), namespace)
    async with _as_bots(admin, url, namespace, options) as urls:
        return await _phase("bus", options, urls, namespace)


async def _records_phase(
    admin: Redis, url: str, namespace: str, options: BenchOptions, archive: ArchiveStore
) -> RecordsResult:
    """Run the bus phase with delivery records on, copied into ``archive`` from here; then
    wait for the copy to finish (or stall) and measure it."""
    async with (
        _as_bots(admin, url, namespace, options, records=True) as urls,
        CopyWatch(admin, Keys(namespace), archive).running() as watch,
    ):
        phase = await _phase("bus", options, urls, namespace)
        copy = await watch.settle(phase.handled, phase.last_handled, options.drain)
    return RecordsResult(phase, copy)


@dataclass(frozen=True, slots=True)
class _Urls:
    """The Redis URLs of a phase's consumers and producers."""

    consumers: str
    producers: str
    #: Whether the bus clients publish through their outbox (as the manager's bots do).
    outbox: bool = False
    #: Their stream users' URLs (bots' second Redis users); None: the URLs above.
    consumers_streams: str | None = None
    producers_streams: str | None = None
    #: Whether the consumers write delivery records (through their outbox).
    delivery_records: bool = False


@contextlib.asynccontextmanager
async def _as_bots(
    admin: Redis, url: str, namespace: str, options: BenchOptions, *, records: bool = False
) -> AsyncIterator[_Urls]:
    """Run the bus phase as the manager runs bots: the consumers and the producers each
    with a bot's ACL users, the consumers' group subscribed by the manager's side (a bot's
    user may not) and read in its inbox, the producers publishing through their outbox, and
    a relay and a fanout moving the events, in this process as in the manager's. With
    ``records`` the consumers write delivery records to their outbox, relayed too."""
    keys = Keys(namespace)
    durable = options.publish_replicas > 0
    router = Router(ROUTES, DEFAULT_STREAM, bench_partitions(options))
    urls = []
    # As the manager does: the users on every node that may serve them (a replica, or
    # every node of a cluster), since Redis keeps ACL users per node.
    async with replica_clients(admin, url) as replicas:
        for bot in (CONSUMER_BOT, PRODUCER_BOT):
            password = generate_password()
            username = await ensure_bot_user(
                admin, keys, bot, password, durable=durable, replicas=replicas
            )
            urls.append(bot_redis_url(url, username, password))
            urls.append(bot_redis_url(url, streams_username(namespace, bot), password))
    streams = [keys.stream(s) for s in router.expand(ROUTES["bench"])]
    fanout = Fanout(admin, keys, lambda: streams)
    for stream in streams:
        await fanout.subscribe(stream, group_name(CONSUMER_BOT), "$")
    relayed = [PRODUCER_BOT, CONSUMER_BOT] if records else [PRODUCER_BOT]
    relay = OutboxRelay(admin, keys, router, lambda: relayed, fanout=fanout)
    gc.freeze()  # as the manager does once ready
    moving = [asyncio.create_task(relay.run())]
    if not relay.drives_fanout:
        moving.append(asyncio.create_task(fanout.run()))
    try:
        yield _Urls(urls[0], urls[2], True, consumers_streams=urls[1], producers_streams=urls[3],
                    delivery_records=records)  # fmt: skip
    finally:
        for task in moving:
            task.cancel()
        await asyncio.gather(*moving, return_exceptions=True)
        async with replica_clients(admin, url) as replicas:
            for bot in (CONSUMER_BOT, PRODUCER_BOT):
                await delete_bot_user(admin, keys, bot, replicas=replicas)


@contextlib.asynccontextmanager
async def _redis_url(url: str | None) -> AsyncIterator[str]:
    """``url``, or the URL of a private redis-server started for the run and stopped after."""
    if url is not None:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="multibot-bench-") as tmp:
        # Throwaway data: no AOF, whose rewrite (a fork once it passes 64 MB, i.e. a few
        # seconds flat out) would land in one phase at random and skew the comparison.
        server = RedisServer(Path(tmp) / "redis", extra_config={"appendonly": "no"})
        await server.start()
        try:
            yield server.url
        finally:
            await server.stop()


async def _delete_namespace(redis: Redis, namespace: str) -> None:
    """UNLINK every key of the bench namespace (SCAN, never KEYS: the server may be shared)."""
    batch: list[str] = []
    deleted = 0
    async for key in redis.scan_iter(match=f"{namespace}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += await redis.unlink(*batch)
            batch.clear()
    if batch:
        deleted += await redis.unlink(*batch)
    log.debug("bench namespace deleted", namespace=namespace, keys=deleted)


async def _phase(mode: Mode, options: BenchOptions, urls: _Urls, namespace: str) -> PhaseResult:
    """Run one phase (bus or baseline) and summarize it."""
    layout = options.layout()
    children: list[Child] = []
    with tempfile.TemporaryFile() as file:
        file.truncate(8 * len(layout))
        with mmap.mmap(file.fileno(), 0) as shared:
            progress = memoryview(shared).cast("q")
            try:
                for index, roles in enumerate(layout):
                    spec = WorkerSpec(
                        mode,
                        index,
                        roles,
                        options,
                        urls.consumers,
                        namespace,
                        producer_url=urls.producers,
                        outbox=urls.outbox,
                        streams_url=urls.consumers_streams,
                        producer_streams_url=urls.producers_streams,
                        delivery_records=urls.delivery_records,
                    )
                    children.append(await spawn(spec, file.fileno()))
                results, drain_s = await _run_phase(children, options, progress)
            finally:
                progress.release()
                await asyncio.gather(*(c.close() for c in children))
    return summarize(results, options, drain_s)


async def _run_phase(
    children: list[Child], options: BenchOptions, progress: Sequence[int]
) -> tuple[list[WorkerResult], float]:
    """Drive the children through one phase; return their results and the drain time."""
    await expect_all(children, "ready", SPAWN_TIMEOUT)
    t0 = time.time() + _START_LEAD
    for child in children:
        child.send("go", t0)
    run_time = _START_LEAD + options.warmup + options.duration
    tallies: list[Tally] = await expect_all(children, "published", run_time + SPAWN_TIMEOUT)
    confirmed = sum(sum(t.attempted.values()) - len(t.failed) for t in tallies)
    drained, drain_s = await _drain(progress, confirmed, options.drain, children)
    if not drained:
        log.warning("bench drain gave up", expected=confirmed, seen=sum(progress))
    for child in children:
        child.send("stop")
    results: list[WorkerResult] = await expect_all(children, "result", STOP_TIMEOUT)
    return results, drain_s


async def _drain(
    progress: Sequence[int], expected: int, stall: float, children: Sequence[Child] = ()
) -> tuple[bool, float]:
    """Wait until the consumers saw ``expected`` distinct events; return (done, seconds).

    Gives up once they made no progress for ``stall`` seconds, or after ``DRAIN_CAP_FACTOR``
    times that in all: a backlog still shrinking is late, not lost. Raises if one of
    ``children`` died. The counts live in memory shared with the workers; there is nothing
    to await on, so this polls every 10 ms (cheap, and only while the consumers catch up).
    """
    loop = asyncio.get_running_loop()
    start = last_progress = loop.time()
    seen = sum(progress)
    while seen < expected:
        for child in children:
            child.check_alive()
        now = loop.time()
        if now - last_progress >= stall or now - start >= stall * DRAIN_CAP_FACTOR:
            return False, now - start
        await asyncio.sleep(_DRAIN_POLL)
        if (current := sum(progress)) > seen:
            seen, last_progress = current, loop.time()
    return True, loop.time() - start


async def _idle_rss(url: str, namespace: str) -> float:
    """Peak RSS (MiB) of a process holding one connected, subscribed, idle bus client."""
    child = await spawn(IdleSpec(url, namespace))
    try:
        rss: float = await child.expect("result", SPAWN_TIMEOUT)
    finally:
        await child.close()
    return rss
