"""The bus side of the benchmark: producers and consumers as :class:`~bus.BusClient` s.

Every producer is its own bot (``bench-producer-<i>``) with its own connection; the
consumers are instances 0..M-1 of one bot (``bench-consumer``), i.e. replicas sharing one
consumer group. Also the idle-client probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable

from redis.exceptions import RedisError

from bus import BusClient, BusError, Event
from bus.settings import BusSettings, ConsumerSettings
from manager.bench.options import (
    CONSUMER_BOT,
    EVENT_TYPE,
    PRODUCER_BOT,
    ROUTES,
    IdleSpec,
    WorkerSpec,
    bench_partitions,
)
from manager.bench.recording import Recorder, rss_mb
from manager.bench.workers import Send

#: What a failed publish raises (anything else is a bug and ends the worker).
SEND_ERRORS: tuple[type[Exception], ...] = (BusError, RedisError, OSError)
#: How long the idle client idles before its RSS is read.
IDLE_SECONDS = 1.0


def bench_settings(
    url: str,
    namespace: str,
    read_count: int,
    *,
    outbox: bool = False,
    streams_url: str | None = None,
    publish_replicas: int = 0,
    partitions: dict[str, int] | None = None,
    delivery_records: bool = False,
) -> BusSettings:
    """Settings of every bench client: the bench namespace and routes, reads of ``read_count``.
    As a bot run by the manager (``outbox``), its group is read in its inbox; with
    ``delivery_records`` its consumers report each delivery's outcome with their acks."""
    return BusSettings(
        redis_url=url,
        streams_url=streams_url,
        inboxes=outbox,
        namespace=namespace,
        routes=ROUTES,
        consumer=ConsumerSettings(read_count=read_count),
        outbox=outbox,
        publish_replicas=publish_replicas,
        partitions=partitions or {},
        delivery_records=delivery_records,
    )


@contextlib.asynccontextmanager
async def consumers(spec: WorkerSpec, recorder: Recorder) -> AsyncIterator[None]:
    """Run this worker's consumers (replicas of one bot) until the block exits."""
    if not spec.roles.consumers:
        yield
        return
    settings = bench_settings(
        spec.url,
        spec.namespace,
        spec.options.read_size,
        outbox=spec.outbox,
        streams_url=spec.streams_url,
        partitions=bench_partitions(spec.options),
        delivery_records=spec.delivery_records,
    )
    record = recorder.record

    async def handle(event: Event) -> None:
        now = time.time()
        data = event.data
        record(data["producer"], data["seq"], data["t"], now)

    clients = [BusClient(CONSUMER_BOT, settings=settings, instance=i) for i in spec.roles.consumers]
    try:
        async with asyncio.TaskGroup() as tg:
            for client in clients:
                client.subscribe(EVENT_TYPE, handle, name="record")
                tg.create_task(client.run())
            await asyncio.gather(*(c.wait_ready() for c in clients))
            try:
                yield
            finally:
                await asyncio.gather(*(c.stop(5.0) for c in clients))
    finally:
        for client in clients:
            await client.close()


@contextlib.asynccontextmanager
async def producers(spec: WorkerSpec) -> AsyncIterator[list[tuple[int, Send]]]:
    """Connected bus clients of this worker's producers, as send functions."""
    url = spec.producer_url or spec.url
    settings = bench_settings(
        url,
        spec.namespace,
        spec.options.read_size,
        outbox=spec.outbox,
        streams_url=spec.producer_streams_url,
        publish_replicas=spec.options.publish_replicas,
        partitions=bench_partitions(spec.options),
    )
    batch = spec.options.batch_size
    async with contextlib.AsyncExitStack() as stack:
        sends: list[tuple[int, Send]] = []
        for index in spec.roles.producers:
            # Replicas of one producer bot: one outbox, relayed as the manager relays a bot's.
            client = BusClient(PRODUCER_BOT, settings=settings, instance=index)
            await stack.enter_async_context(client)
            await client.redis.ping()  # open the connection before the clock starts
            sends.append((index, _send(client, index, batch)))
        yield sends


def _send(client: BusClient, producer: int, batch: int) -> Send:
    if batch == 1:

        def one(seq: int, t: float) -> Awaitable[str]:
            data = {"seq": seq, "producer": producer, "t": t}
            return client.publish(EVENT_TYPE, data, key=f"{producer}:{seq % 1024}")

        return one

    def many(seq: int, t: float) -> Awaitable[list[str]]:
        return client.publish_many(
            [
                client.event(
                    EVENT_TYPE,
                    {"seq": s, "producer": producer, "t": t},
                    key=f"{producer}:{s % 1024}",
                )
                for s in range(seq, seq + batch)
            ]
        )

    return many


async def idle(spec: IdleSpec) -> float:
    """Peak RSS (MiB) of this process once one subscribed bus client idled a while."""
    settings = bench_settings(spec.url, spec.namespace, ConsumerSettings().read_count)

    async def ignore(event: Event) -> None:
        """Never called: nobody publishes bench.idle.tick."""

    async with BusClient("bench-idle", settings=settings) as client:
        client.subscribe("bench.idle.tick", ignore)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(client.run())
            await client.wait_ready()
            await asyncio.sleep(IDLE_SECONDS)  # reads blocked, the background loops waiting
            peak = rss_mb()[0]
            await client.stop()
    return peak
