"""Runs a benchmark: a Redis to run against, the worker processes of each phase, the results.

One run is: the idle-client probe, the bus phase, then (unless disabled) the bare redis-py
baseline phase with the same layout, all in a fresh namespace ``bench-<random>`` that is
deleted at the end. Each phase spawns its workers, waits until all are ready, gives them
one wall-clock start time, waits for the producers to finish, lets the consumers drain
(until done or stalled), then stops them and collects their results.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bus.connection import connect, redact
from bus.fanout import Fanout
from bus.groups import ensure_group
from bus.keys import Keys, group_name
from bus.outbox import OutboxRelay
from bus.routing import DEFAULT_STREAM, Router
from bus.settings import BusSettings
from manager.bench.child import ENTRY
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
from manager.bench.recording import Tally, WorkerResult, receive
from manager.bench.report import BenchReport, PhaseResult, summarize
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
_SPAWN_TIMEOUT = 60.0  # a spawned worker imports the bus and connects; 2 busy cores are slow
_STOP_TIMEOUT = 30.0
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
            idle_rss = await _idle_rss(url, namespace)
            if options.bot_user:
                durable = options.publish_replicas > 0
                router = Router(ROUTES, DEFAULT_STREAM, bench_partitions(options))
                async with _as_bots(admin, url, namespace, router, durable=durable) as urls:
                    bus = await _phase("bus", options, urls, namespace)
            else:
                bus = await _phase("bus", options, _Urls(url, url), namespace)
            await _delete_namespace(admin, namespace)  # the baseline starts on an empty Redis
            baseline = None
            if options.baseline:
                await ensure_group(admin, raw_stream(namespace), RAW_GROUP, "$")
                baseline = await _phase("raw", options, _Urls(url, url), namespace)
        finally:
            await _delete_namespace(admin, namespace)
            await admin.aclose()
    return BenchReport(
        options=options,
        bus=bus,
        baseline=baseline,
        idle_client_rss_mb=idle_rss,
        redis_version=str(server.get("redis_version", "?")),
        private_redis=options.redis_url is None,
    )


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


@contextlib.asynccontextmanager
async def _as_bots(
    admin: Redis, url: str, namespace: str, router: Router, *, durable: bool = False
) -> AsyncIterator[_Urls]:
    """Run the bus phase as the manager runs bots: the consumers and the producers each
    with a bot's ACL users, the consumers' group subscribed by the manager's side (a bot's
    user may not) and read in its inbox, the producers publishing through their outbox, and
    a relay and a fanout moving the events, in this process as in the manager's."""
    keys = Keys(namespace)
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
    relay = OutboxRelay(admin, keys, router, lambda: [PRODUCER_BOT])
    moving = [asyncio.create_task(relay.run()), asyncio.create_task(fanout.run())]
    try:
        yield _Urls(urls[0], urls[2], True, consumers_streams=urls[1], producers_streams=urls[3])
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


@dataclass(slots=True)
class _Child:
    """A child process and the parent's end of its connection."""

    label: str
    process: asyncio.subprocess.Process
    conn: Connection

    async def expect(self, kind: str, timeout: float) -> Any:  # noqa: ASYNC109 - a deadline
        """The payload of the child's next message, which must be ``kind``."""
        try:
            got, payload = await asyncio.wait_for(receive(self.conn), timeout)
        except TimeoutError:
            raise BenchError(f"{self.label} sent no {kind!r} within {timeout:.0f} s") from None
        except (EOFError, OSError):
            raise BenchError(
                f"{self.label} closed its connection before sending {kind!r}: see its log on stderr"
            ) from None
        if got == "error":
            raise BenchError(f"bench child failed: {payload}")
        if got != kind:
            raise BenchError(f"{self.label} sent {got!r} where {kind!r} was due")
        return payload

    def send(self, kind: str, payload: Any = None) -> None:
        """Send the child a message; a child that is gone is an error of the run."""
        try:
            self.conn.send((kind, payload))
        except OSError:
            raise self._gone(kind) from None

    def check_alive(self) -> None:
        """Raise if the child exited: it only exits after sending its result."""
        if self.process.returncode is not None:
            raise self._gone("the drain")

    def _gone(self, during: str) -> BenchError:
        code = self.process.returncode
        return BenchError(
            f"{self.label} exited{'' if code is None else f' with code {code}'} before "
            f"{during}: see its log on stderr"
        )

    async def close(self) -> None:
        """Wait for the process to exit (bounded), then kill it."""
        self.conn.close()
        try:
            await asyncio.wait_for(self.process.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            log.warning("bench child did not exit; killing it", child=self.label)
            self.process.kill()
            await self.process.wait()


async def _spawn(job: WorkerSpec | IdleSpec, progress_fd: int | None = None) -> _Child:
    """Start a fresh interpreter running ``job`` (see :mod:`manager.bench.child`)."""
    parent_sock, child_sock = socket.socketpair()
    with parent_sock, child_sock:
        fds = [child_sock.fileno()] + ([] if progress_fd is None else [progress_fd])
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ENTRY, *map(str, fds),
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            stdout=2,  # our stdout may carry the --json line: the child's goes to fd 2
            # A Ctrl-C reaches only us; we close the connections and the children end.
            start_new_session=True,
        )  # fmt: skip
        conn = Connection(parent_sock.detach())
    child = _Child(job.label, process, conn)
    child.send("job", job)
    return child


async def _all(children: list[_Child], kind: str, timeout: float) -> list[Any]:  # noqa: ASYNC109
    """Every child's next message, which must be ``kind``; on the first failure, stop waiting
    for the others (their readers must be gone before the connections are closed)."""
    waits = [asyncio.ensure_future(c.expect(kind, timeout)) for c in children]
    try:
        return list(await asyncio.gather(*waits))
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def _phase(mode: Mode, options: BenchOptions, urls: _Urls, namespace: str) -> PhaseResult:
    """Run one phase (bus or baseline) and summarize it."""
    layout = options.layout()
    children: list[_Child] = []
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
                    )
                    children.append(await _spawn(spec, file.fileno()))
                results, drain_s = await _run_phase(children, options, progress)
            finally:
                progress.release()
                await asyncio.gather(*(c.close() for c in children))
    return summarize(results, options, drain_s)


async def _run_phase(
    children: list[_Child], options: BenchOptions, progress: Sequence[int]
) -> tuple[list[WorkerResult], float]:
    """Drive the children through one phase; return their results and the drain time."""
    await _all(children, "ready", _SPAWN_TIMEOUT)
    t0 = time.time() + _START_LEAD
    for child in children:
        child.send("go", t0)
    run_time = _START_LEAD + options.warmup + options.duration
    tallies: list[Tally] = await _all(children, "published", run_time + _SPAWN_TIMEOUT)
    confirmed = sum(sum(t.attempted.values()) - len(t.failed) for t in tallies)
    drained, drain_s = await _drain(progress, confirmed, options.drain, children)
    if not drained:
        log.warning("bench drain gave up", expected=confirmed, seen=sum(progress))
    for child in children:
        child.send("stop")
    results: list[WorkerResult] = await _all(children, "result", _STOP_TIMEOUT)
    return results, drain_s


async def _drain(
    progress: Sequence[int], expected: int, stall: float, children: Sequence[_Child] = ()
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
    child = await _spawn(IdleSpec(url, namespace))
    try:
        rss: float = await child.expect("result", _SPAWN_TIMEOUT)
    finally:
        await child.close()
    return rss
