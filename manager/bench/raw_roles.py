"""The baseline: the bench workload with bare redis-py (hiredis parser), no bus.

Same layout as the bus phase (one stream, one group, M consumers, same batch and pacing),
one connection per producer and per consumer. Entries are flat ``seq``/``producer``/``t``
fields; a consumer reads up to ``read_size`` entries (XREADGROUP COUNT BLOCK), "handles" them
(records the latency) and XACKs them in one command.

Relayed (``--relay-baseline``), the producers write to an outbox instead, and :func:`relay`
(in the parent, as the bus's relay runs in the manager) moves its entries to the stream the
least a relay can: a blocking XREAD, then one script that appends them and trims them off.
That is the floor of the bus's own path (outbox, relay, stream) on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisError

from bus.connection import sentinel_primary
from bus.deployment import parse_redis_url
from manager.bench.options import CONSUMER_BOT, RAW_GROUP, WorkerSpec, raw_outbox, raw_stream
from manager.bench.recording import Recorder
from manager.bench.workers import Send

#: What a failed XADD raises.
SEND_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)
_BLOCK_MS = 100  # BLOCK returns as soon as an entry arrives; this only bounds the stop time
#: KEYS: the outbox, the stream. Moves up to 500 entries; returns how many.
_MOVE = """
local rows = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 500)
for _, row in ipairs(rows) do redis.call('XADD', KEYS[2], '*', unpack(row[2])) end
if #rows > 0 then
  local last = rows[#rows][1]
  redis.call('XTRIM', KEYS[1], 'MINID', last)
  redis.call('XDEL', KEYS[1], last)
end
return #rows
"""


def _client(url: str) -> Redis:
    """One connection of plain redis-py (the primary's, for a Sentinel URL: a pool; for a
    cluster, redis-py's own cluster client with its defaults)."""
    target = parse_redis_url(url)
    if target.kind == "sentinel":
        return sentinel_primary(target)
    if target.kind == "cluster":
        nodes = [ClusterNode(host, port) for host, port in target.seeds]
        options = {k: v for k, v in target.connection_options().items() if k != "db"}
        return cast(Redis, RedisCluster(startup_nodes=nodes, **options))
    return Redis.from_url(url, single_connection_client=True)


@contextlib.asynccontextmanager
async def consumers(spec: WorkerSpec, recorder: Recorder) -> AsyncIterator[None]:
    """Run bare XREADGROUP / XACK loops, one connection each, until the block exits."""
    if not spec.roles.consumers:
        yield
        return
    stopping = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(_client(spec.url)) for _ in spec.roles.consumers]
        for client in clients:
            await client.ping()
        async with asyncio.TaskGroup() as tg:
            for i, client in zip(spec.roles.consumers, clients, strict=True):
                loop = _consume(client, spec, f"{CONSUMER_BOT}-{i}", recorder, stopping)
                tg.create_task(loop)
            try:
                yield
            finally:
                stopping.set()


async def _consume(
    redis: Redis, spec: WorkerSpec, name: str, recorder: Recorder, stopping: asyncio.Event
) -> None:
    stream, count, record = raw_stream(spec.namespace), spec.options.read_size, recorder.record
    while not stopping.is_set():
        response: Any = await redis.xreadgroup(
            RAW_GROUP, name, {stream: ">"}, count=count, block=_BLOCK_MS
        )
        for _, entries in response or ():
            ids = []
            for entry_id, fields in entries:
                now = time.time()
                record(int(fields[b"producer"]), int(fields[b"seq"]), float(fields[b"t"]), now)
                ids.append(entry_id)
            await redis.xack(stream, RAW_GROUP, *ids)


@contextlib.asynccontextmanager
async def relay(url: str, namespace: str) -> AsyncIterator[None]:
    """Move the relayed baseline's outbox to its stream until the block exits."""
    outbox, stream = raw_outbox(namespace), raw_stream(namespace)

    async def run(redis: Redis) -> None:
        sha = await redis.script_load(_MOVE)
        while True:
            if await redis.xread({outbox: "0-0"}, count=1, block=_BLOCK_MS):
                await redis.evalsha(sha, 2, outbox, stream)

    async with _client(url) as redis:
        task = asyncio.create_task(run(redis))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def producers(spec: WorkerSpec) -> AsyncIterator[list[tuple[int, Send]]]:
    """Bare redis-py clients of this worker's producers, as send functions (writing to the
    outbox when the baseline is relayed)."""
    stream = raw_outbox(spec.namespace) if spec.outbox else raw_stream(spec.namespace)
    batch = spec.options.batch_size
    async with contextlib.AsyncExitStack() as stack:
        sends: list[tuple[int, Send]] = []
        for index in spec.roles.producers:
            client = await stack.enter_async_context(_client(spec.url))
            await client.ping()
            sends.append((index, _send(client, stream, index, batch)))
        yield sends


def _send(redis: Redis, stream: str, producer: int, batch: int) -> Send:
    if batch == 1:

        def one(seq: int, t: float) -> Awaitable[Any]:
            return redis.xadd(stream, {"seq": seq, "producer": producer, "t": t})

        return one

    async def many(seq: int, t: float) -> Any:
        async with redis.pipeline(transaction=False) as pipe:
            for s in range(seq, seq + batch):
                pipe.xadd(stream, {"seq": s, "producer": producer, "t": t})
            return await pipe.execute()

    return many
