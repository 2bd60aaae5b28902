"""Helpers for tests: wait on a condition, run a task or a bus client in the background."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar, cast

import redis
import redis.cluster
import redis.sentinel
from redis.asyncio import Redis

from bus import BusClient, BusConnectionError, BusDurabilityError, Event
from bus.connection import cluster_client, is_cluster, sentinel_primary
from bus.deployment import parse_redis_url

T = TypeVar("T")


def redis_client(url: str, **options: Any) -> Redis:
    """A plain redis-py client for any URL the bus takes (a Sentinel URL: its primary), with
    redis-py's defaults (bytes replies unless ``decode_responses=True``)."""
    target = parse_redis_url(url)
    if target.kind == "single":
        return Redis.from_url(url, **options)
    if target.kind == "cluster":
        return cluster_client(target, **options)
    return sentinel_primary(target, **options)


def sync_redis_client(url: str, **options: Any) -> redis.Redis:
    """:func:`redis_client`, synchronous (for setup and checks around a CLI command)."""
    target = parse_redis_url(url)
    if target.kind == "single":
        return redis.Redis.from_url(url, **options)
    node_options = {**target.connection_options(), **options}
    if target.kind == "cluster":
        node_options.pop("db", None)
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in target.seeds]  # type: ignore[no-untyped-call]
        return cast(redis.Redis, redis.cluster.RedisCluster(startup_nodes=nodes, **node_options))
    sentinel = redis.sentinel.Sentinel(target.sentinels, sentinel_kwargs=target.sentinel_options)
    return cast(redis.Redis, sentinel.master_for(target.service, **node_options))


async def config_set(redis: Redis, name: str, value: str | int) -> None:
    """CONFIG SET on the test's Redis: on a cluster, on every node (a fault such as
    ``maxmemory`` must reach the node that holds the keys)."""
    if is_cluster(redis):
        client: Any = redis
        await client.config_set(name, value, target_nodes="all")
    else:
        await redis.config_set(name, value)


async def entries(
    redis: Redis, key: str, start: str = "-", end: str = "+"
) -> list[tuple[str, dict[str, str]]]:
    """The entries of a stream (XRANGE), typed for tests."""
    rows: Any = await redis.xrange(key, start, end)
    return [(entry_id, dict(fields)) for entry_id, fields in rows]


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,  # noqa: ASYNC109 - a test deadline that fails with a message
    what: str = "",
) -> None:
    """Poll ``condition`` every 20 ms until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def in_background(work: Coroutine[Any, Any, T]) -> AsyncIterator[asyncio.Task[T]]:
    """Run ``work`` as a task while the block runs; then cancel it and wait for it to end
    (raising what ended it, if not the cancel)."""
    task = asyncio.create_task(work)
    try:
        yield task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


@asynccontextmanager
async def running(*clients: BusClient) -> AsyncIterator[None]:
    """Run the clients' consumers while the block runs; stop them (gracefully) after."""
    tasks = [asyncio.create_task(c.run()) for c in clients]
    try:
        for client, task in zip(clients, tasks, strict=True):
            ready = asyncio.create_task(client.wait_ready())
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                ready.cancel()
                task.result()  # raise what killed it
            await ready
        yield
    finally:
        for client in clients:
            await client.stop(timeout=5)
        await asyncio.gather(*tasks)


async def failover_under_load(
    producer: BusClient, consumer: BusClient, fail_over: Callable[[], Awaitable[None]]
) -> None:
    """The failover tests' load: ``producer`` publishes all along (a publish that raises
    is not confirmed: a publisher would publish it again) while ``consumer`` records what
    it gets; after 200 confirmed events ``fail_over`` kills a primary and waits for the
    promotion, then 200 more are confirmed. Every confirmed event must reach the
    consumer, none confirmed twice. Closes both clients."""

    got: set[str] = set()

    @consumer.subscribe("bench.event.*")
    async def handle(event: Event) -> None:
        got.add(event.id)

    confirmed: list[str] = []
    stop = asyncio.Event()

    async def publish_all_along() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                confirmed.append(await producer.publish("bench.event.sent", {"n": n}))
            except (BusConnectionError, BusDurabilityError):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.002)

    try:
        async with running(consumer):
            publisher = asyncio.create_task(publish_all_along())
            await wait_until(lambda: len(confirmed) >= 200, 20, "events before the kill")
            await fail_over()
            before = len(confirmed)
            await wait_until(
                lambda: len(confirmed) >= before + 200, 30, "publishing after the failover"
            )
            stop.set()
            await publisher
            await wait_until(
                lambda: set(confirmed) <= got, 30, "the consumer to get every confirmed one"
            )
    finally:
        stop.set()
        await producer.close()
        await consumer.close()
    assert set(confirmed) <= got
    assert len(set(confirmed)) == len(confirmed)


class ChildProc:
    """A helper process a test started (a consumer, an archiver), its stdout in ``out``
    and its stderr in ``log``; ``name`` says what it is in failure messages."""

    name = "process"

    def __init__(self, process: asyncio.subprocess.Process, out: Path, log: Path) -> None:
        self.process = process
        self.out = out
        self.log = log

    def log_tail(self, lines: int = 30) -> str:
        """The end of its log, for failure messages."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Fail the test, with its log, if the process has exited."""
        if self.process.returncode is not None:
            raise AssertionError(
                f"{self.name} exited ({self.process.returncode})\n{self.log_tail()}"
            )

    async def kill_while(
        self,
        holding: Callable[[], Awaitable[bool]],
        what: str,
        timeout: float = 10.0,  # noqa: ASYNC109 - a test deadline that fails with a message
    ) -> None:
        """SIGKILL it at a moment ``holding()`` is true. It is frozen (SIGSTOP) while
        looked at, so what it holds cannot change between the look and the kill."""

        async def frozen_holding() -> bool:
            self.check_alive()
            self.process.send_signal(signal.SIGSTOP)
            if await holding():
                return True
            self.process.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.005)
            return False

        await wait_until(frozen_holding, timeout, what)
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL the process and reap it (idempotent)."""
        if self.process.returncode is None:
            with suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
