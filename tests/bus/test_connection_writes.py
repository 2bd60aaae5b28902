"""A command's write to a Redis that stops reading: bounded by the command timeout, and the
connection dropped after a timeout or a cancel, so no later reply is read as another
command's. The bus writes each command under ``asyncio.timeout`` (bus.connection); these are
the promises of redis-py's own write that it keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bus import BusClient
from bus.connection import connect
from bus.settings import BusSettings
from manager.embedded.redis_server import RedisServer

pytestmark = pytest.mark.redis

#: More than the kernel's socket buffers hold on the way to a Redis that does not read.
BIG = b"x" * (64 * 1024 * 1024)
TIMEOUT = 0.5


@contextlib.contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """SIGSTOP the Redis for the block: it accepts no byte more than the kernel buffers."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def settings(url: str, timeout: float = TIMEOUT) -> BusSettings:
    return BusSettings(
        redis_url=url,
        command_timeout=timeout,
        consumer={"block_ms": 100},
        connect_retries=1,
        retry_cap=0.1,
    )


async def test_a_write_redis_does_not_take_times_out_and_the_next_command_gets_its_own_reply(
    redis_server: RedisServer,
) -> None:
    client = connect(settings(redis_server.url))
    try:
        assert await client.ping()
        with frozen(redis_server):
            started = time.monotonic()
            with pytest.raises((RedisTimeoutError, RedisConnectionError)):
                await client.set("big", BIG)
            # One try and one retry, each bounded by the timeout, plus the backoff.
            assert time.monotonic() - started < 2 * TIMEOUT + 2.0
        assert await client.set("small", "1")
        assert await client.get("small") == "1"
        # Whether the SET ran is unknown, as for any command cut short (a closing socket
        # still sends what it holds): what must hold is that no reply goes astray.
    finally:
        await client.aclose()


async def test_a_write_cancelled_midway_drops_its_connection(redis_server: RedisServer) -> None:
    client = connect(settings(redis_server.url, timeout=30.0))
    try:
        assert await client.ping()  # the connection is open: the SET below is all writing
        with frozen(redis_server):
            writing = asyncio.ensure_future(client.set("big", BIG))
            # Wherever the cancel lands, the reply read next must be the next command's;
            # the wait makes it land mid-write (the write cannot finish while Redis is
            # stopped), and is not what the assertions depend on.
            done, _ = await asyncio.wait([writing], timeout=0.3)
            assert not done, "a 64 MiB write finished against a stopped Redis"
            writing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await writing
        assert await client.set("after", "2")
        assert await client.get("after") == "2"
    finally:
        await client.aclose()


async def test_a_bus_client_publishes_again_once_a_frozen_redis_resumes(
    redis_server: RedisServer,
) -> None:
    async with BusClient("writer", settings=settings(redis_server.url)) as bus:
        await bus.publish("test.job.work", {"n": 1})
        with frozen(redis_server), contextlib.suppress(Exception):
            await bus.redis.set("big", BIG)
        await bus.publish("test.job.work", {"n": 2})
        [stream] = [key async for key in bus.redis.scan_iter(_type="stream")]
        entries: Any = await bus.redis.xrange(stream)
        assert [fields["data"] for _, fields in entries] == ['{"n":1}', '{"n":2}']
