"""A connection kept out of a client's pool for one hot loop's commands.

redis-py takes a connection out of the pool and puts it back for every command, with its
lock, its bookkeeping and its event hooks: on this project's bench machine about a fifth
of the CPU an XADD costs in the client. The commands sent once per event or per batch (a
publisher's XADD, the relay's XREAD and script, a consumer's XACK) go through a
:class:`HeldConnection` instead, which keeps one connection of the pool for them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from bus.connection import is_cluster


class ConnectionReleasedError(RedisError):
    """A command's next try after :meth:`HeldConnection.release` gave its connection up
    (not a connection error, which the retry policy would try again)."""


class HeldConnection:
    """Sends commands on one connection taken from ``redis``'s pool, kept between them.

    While that connection is busy (a handler publishing while another handler's publish
    waits for its reply), the command goes through ``redis`` as any other, so nothing
    waits for the held one. A failed try is retried as ``redis`` retries its commands
    (the same retry policy, the connection dropped and opened again between tries); a
    cancel or any other error drops the connection too, so no reply is ever read as
    another command's. On a cluster every command goes through ``redis``, which routes it
    to its node. :meth:`release` gives the connection back.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pool: Any = None if is_cluster(redis) else redis.connection_pool
        self._conn: Any = None
        self._busy = False
        self._releases = 0  # release() calls so far (one during a connect voids it)

    async def execute_command(self, *args: Any, retry: bool = True, **options: Any) -> Any:
        """Send one command and return its reply, parsed as ``redis`` parses it; ``retry``
        False: see :meth:`execute_once`."""
        if self._pool is None:
            return await self._redis.execute_command(*args, **options)  # type: ignore[no-untyped-call]
        if self._busy:
            if retry:
                return await self._redis.execute_command(*args, **options)  # type: ignore[no-untyped-call]
            return await execute_once(self._redis, *args, **options)
        self._busy = True
        conn = None
        try:
            conn = self._conn if self._conn is not None else await self._take()
            try:
                if not retry:
                    return await self._send(conn, args, options)
                return await conn.retry.call_with_retry(
                    lambda: self._send(conn, args, options), lambda _error: conn.disconnect()
                )
            except ResponseError:  # Redis answered: the connection is in step
                raise
            except BaseException:  # out of tries, cancelled, or a bug: start afresh
                await conn.disconnect(nowait=True)
                raise
        finally:
            self._busy = False
            if conn is not None and conn is not self._conn:  # released under this command
                await self._pool.release(conn)

    async def execute_once(self, *args: Any, **options: Any) -> Any:
        """:meth:`execute_command` without the retry policy: a lost connection raises at
        once, so the caller learns that a reply may have been lost with it (a blocking
        XREADGROUP's: Redis made its entries pending; an XADD's: the entry may be there)
        and decides what to send again. While the held connection is busy it goes on
        another of the pool (:func:`execute_once`); on a cluster it goes through ``redis``,
        retried as it retries."""
        return await self.execute_command(*args, retry=False, **options)

    async def connect(self) -> None:
        """Take the connection from the pool now, connected (as the first command would)."""
        if self._conn is None and self._pool is not None:
            conn = await self._take()
            if conn is not self._conn:  # released while it connected
                await self._pool.release(conn)

    async def _take(self) -> Any:
        """A connection from the pool, held unless :meth:`release` ran while it came."""
        releases = self._releases
        conn = await self._pool.get_connection()
        if releases == self._releases:
            self._conn = conn
        return conn

    async def _send(self, conn: Any, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        if conn is not self._conn:  # released between two tries: not ours to send on
            raise ConnectionReleasedError(f"{args[0]} not retried: the connection was released")
        await conn.send_command(*args)
        return await self._redis.parse_response(conn, args[0], **options)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        """EVALSHA on the held connection (see :func:`bus.lease.run_script`)."""
        return await self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    async def script_load(self, source: str) -> str:
        """SCRIPT LOAD, through the client (once per script and Redis restart)."""
        sha: str = await self._redis.script_load(source)
        return sha

    async def release(self) -> None:
        """Give the connection back to the pool (the next command takes one again).

        One a command is still on is dropped instead, and goes back when that command
        ends (which it then does at once, without another try), so the pool never lends
        it while a reply or a retry of that command may still come on it."""
        conn, self._conn = self._conn, None
        self._releases += 1
        if conn is not None and self._pool is not None:
            if self._busy:
                await conn.disconnect(nowait=True)
            else:
                await self._pool.release(conn)

    def __repr__(self) -> str:
        state = "cluster" if self._pool is None else "held" if self._conn else "none"
        return f"<HeldConnection {state}{' busy' if self._busy else ''}>"


async def execute_once(redis: Redis, *args: Any, **options: Any) -> Any:
    """One command on a connection of ``redis``'s pool, tried once (no retry policy), its
    reply parsed as ``redis`` parses it; on a cluster, through ``redis`` (retried)."""
    if is_cluster(redis):
        return await redis.execute_command(*args, **options)  # type: ignore[no-untyped-call]
    async with _pooled(redis) as conn:
        await conn.send_command(*args)
        return await redis.parse_response(conn, args[0], **options)


async def execute_many_once(redis: Redis, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """``commands`` sent at once on one connection of ``redis``'s pool (a pipeline, no
    transaction), tried once; their replies. An error reply is raised once all were read,
    the first one, as a pipeline raises. On a cluster: a pipeline of ``redis`` (retried)."""
    if is_cluster(redis):
        async with redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute())
    replies: list[Any] = []
    async with _pooled(redis) as conn:
        await conn.send_packed_command(conn.pack_commands(commands))
        for command in commands:
            try:
                replies.append(await redis.parse_response(conn, command[0]))
            except ResponseError as exc:
                replies.append(exc)
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply
    return replies


@asynccontextmanager
async def _pooled(redis: Redis) -> AsyncIterator[Any]:
    """A connection of ``redis``'s pool for one try: dropped if the try ends in anything
    but an answer (lost, cancelled, a bug), so no reply stays on it; given back after."""
    pool: Any = redis.connection_pool
    conn = await pool.get_connection()
    try:
        yield conn
    except ResponseError:  # Redis answered: the connection is in step
        raise
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)
