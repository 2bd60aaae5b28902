"""The connection the bus's hot loops keep (bus.held_connection): every command gets its
own reply, whatever happens to the one before it, on a real private Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from bus.connection import connect
from bus.held_connection import ConnectionReleasedError, HeldConnection
from bus.settings import BusSettings
from manager.embedded.redis_server import RedisServer
from tests.support import wait_until

pytestmark = pytest.mark.redis


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = connect(BusSettings(redis_url=redis_server.url))
    try:
        yield redis
    finally:
        await redis.aclose()


async def blocked_read(client: Redis, held: HeldConnection) -> asyncio.Future[Any]:
    """An XREAD on ``held`` of stream ``s``'s next entry, once Redis holds it blocked."""
    await client.xadd("s", {"n": "0"})
    reading = asyncio.ensure_future(
        held.execute_command("XREAD", "BLOCK", 10_000, "STREAMS", "s", "$")
    )

    await wait_until(lambda: blocked(client), what="the XREAD blocked in Redis")
    return reading


async def blocked(client: Redis) -> bool:
    """Whether Redis holds a client blocked (in a read)."""
    info: dict[str, int] = await client.info("clients")
    return int(info["blocked_clients"]) >= 1


async def test_concurrent_commands_each_get_their_own_reply(client: Redis) -> None:
    held = HeldConnection(client)
    replies = await asyncio.gather(*(held.execute_command("INCR", "n") for _ in range(50)))
    assert sorted(replies) == list(range(1, 51))
    # Mixed commands, concurrently: none reads another's reply.
    await client.set("word", "hello")
    mixed = await asyncio.gather(
        *(held.execute_command("GET", "word") if i % 2 else held.execute_command("PING")
          for i in range(20))
    )  # fmt: skip
    assert mixed == [True if i % 2 == 0 else "hello" for i in range(20)]


async def test_a_cancelled_blocking_read_leaves_no_reply_for_the_next_command(
    client: Redis,
) -> None:
    held = HeldConnection(client)
    # Cancel once Redis has the read blocked; the entry then added would be its reply.
    reading = await blocked_read(client, held)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    await client.xadd("s", {"n": "1"})
    await client.set("k", "mine")
    assert await held.execute_command("GET", "k") == "mine"


async def test_an_error_reply_keeps_the_connection_in_step(client: Redis) -> None:
    held = HeldConnection(client)
    first = await held.execute_command("CLIENT", "ID")
    await client.set("text", "x")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await held.execute_command("XADD", "text", "*", "a", "b")
    assert await held.execute_command("CLIENT", "ID") == first  # not reconnected
    assert await held.execute_command("GET", "text") == "x"


async def test_commands_go_on_after_redis_restarts(
    client: Redis, redis_server: RedisServer
) -> None:
    held = HeldConnection(client)
    assert await held.execute_command("PING")
    await redis_server.kill()
    await redis_server.start()
    # The held connection is dead: the retry policy opens a new one.
    assert await held.execute_command("SET", "after", "1")
    assert await held.execute_command("GET", "after") == "1"


async def test_a_command_sent_once_raises_where_the_policy_would_try_again(
    client: Redis,
) -> None:
    """``execute_once``: a connection Redis closed under a blocked read fails the read (the
    caller must learn a reply may be gone), and the next command opens a new one."""
    held = HeldConnection(client)
    held_id = await held.execute_command("CLIENT", "ID")
    await client.xadd("s", {"n": "0"})
    reading = asyncio.ensure_future(
        held.execute_once("XREAD", "BLOCK", 10_000, "STREAMS", "s", "$")
    )
    await wait_until(lambda: blocked(client), what="the XREAD blocked in Redis")
    await client.client_kill_filter(_id=held_id)
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(reading, timeout=5)
    second_id = await held.execute_command("CLIENT", "ID")
    assert second_id != held_id
    # Sent the usual way, the same read on a killed connection is tried again.
    reading = asyncio.ensure_future(
        held.execute_command("XREAD", "BLOCK", 10_000, "STREAMS", "s", "$")
    )
    await wait_until(lambda: blocked(client), what="the XREAD blocked in Redis")
    await client.client_kill_filter(_id=second_id)
    await wait_until(lambda: blocked(client), what="the XREAD tried again, blocked in Redis")
    await client.xadd("s", {"n": "1"})
    reply = await asyncio.wait_for(reading, timeout=5)
    assert reply[0][1][0][1] == {"n": "1"}


async def test_release_gives_the_connection_back_to_the_pool(client: Redis) -> None:
    held = HeldConnection(client)
    held_id = await held.execute_command("CLIENT", "ID")
    await held.release()
    # The pool has one connection: the one given back is the one the client uses now.
    assert await client.execute_command("CLIENT", "ID") == held_id  # type: ignore[no-untyped-call]


async def test_a_connection_released_under_a_blocked_read_is_not_lent_out_with_its_reply(
    client: Redis,
) -> None:
    held = HeldConnection(client)
    reading = await blocked_read(client, held)
    await held.release()  # a stop that gave up waiting for the read
    await client.xadd("s", {"n": "1"})  # what the blocked read would have answered
    await client.set("k", "mine")
    assert await client.get("k") == "mine"
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await reading


async def test_a_command_released_under_ends_without_another_try(client: Redis) -> None:
    """Its dropped connection is not tried again (the pool may lend that connection out
    once the command ends): the command fails at once, and Redis holds no read of it."""
    held = HeldConnection(client)
    reading = await blocked_read(client, held)
    await held.release()
    with pytest.raises(ConnectionReleasedError):
        await asyncio.wait_for(reading, 5)  # a retry would block again, for 10 s
    info: dict[str, int] = await client.info("clients")
    assert int(info["blocked_clients"]) == 0
