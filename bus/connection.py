"""Redis connections for the bus, from a URL, with bounded retries."""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import (
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bus.deployment import RedisTarget, parse_redis_url, split_url
from bus.plain_settings import AnyBusSettings

try:
    from hiredis import pack_command as _pack
    from redis.connection import HiredisRespSerializer
except ImportError:  # pragma: no cover - hiredis is a dependency
    HiredisRespSerializer = None  # type: ignore[assignment, misc]

#: Its constructor is unannotated in some redis-py releases; typed here, called once.
_new_packer: Callable[[], Any] | None = HiredisRespSerializer


class _HiredisPacking:
    """Pack commands with hiredis's C packer (redis-py's asyncio client packs in Python).

    Packing an XADD of ten fields is most of a publish's CPU time in pure Python; the sync
    redis-py client already packs with hiredis, the asyncio one does not.
    """

    _packer: Any = _new_packer() if _new_packer is not None else None

    def pack_command(self, *args: Any) -> list[bytes]:
        # hiredis itself, without redis-py's pass over every argument: the common case.
        first = args[0]
        if isinstance(first, str):
            if " " in first:  # "CLIENT SETNAME" and the like: a word each
                args = (*first.split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [_pack(args)]
        except (TypeError, UnicodeEncodeError):  # a bytearray, or not UTF-8: see below
            pass
        try:
            packed: list[bytes] = self._packer.pack(*args)
        except UnicodeEncodeError:  # a name read from Redis that was not UTF-8: its bytes
            packed = self._packer.pack(*(_surrogate_bytes(a) for a in args))
        return packed


def _surrogate_bytes(arg: Any) -> Any:
    return arg.encode(errors="surrogateescape") if isinstance(arg, str) else arg


#: Whether ``asyncio.wait_for`` runs what it waits for in a Task of its own (before 3.12).
_WAIT_FOR_MAKES_A_TASK = sys.version_info < (3, 12)


class _WritesWithoutATask:
    """Bounds a command's write with ``asyncio.timeout`` instead of ``asyncio.wait_for``,
    and only where it can wait.

    redis-py bounds every write with ``wait_for``, which on Python 3.11 wraps the write in
    a Task of its own: two more turns of the event loop and a Task per command, on every
    XADD, XREADGROUP and XACK of the bus. A write the socket takes whole (the usual case:
    the transport keeps nothing back) cannot wait, so it needs no timer either; one that
    leaves bytes in the transport's buffer waits for them under the same timeout, with
    the same errors (and the connection dropped after any of them). A connection not yet
    open, or without a timeout, takes redis-py's own path, which opens it (through the
    sentinels, for a Sentinel set).
    """

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        conn: Any = self
        if not (conn.is_connected and conn.socket_timeout):
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        if check_health:
            await conn.check_health()
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            writer = conn._writer
            if writer is None or writer.transport.is_closing():  # as redis-py's own write
                raise RedisConnectionError("Connection closed by the server before write")
            writer.writelines(command)
            if writer.transport.get_write_buffer_size():  # the socket took only part of it
                async with asyncio.timeout(conn.socket_timeout):
                    await writer.drain()
            elif writer.transport.is_closing():  # the write failed (the transport closed)
                raise RedisConnectionError("Connection closed by the server while writing")
        except TimeoutError as exc:  # ours, or the OS's (ETIMEDOUT: then it has an errno)
            await conn.disconnect(nowait=True)
            if exc.errno is not None:
                raise RedisConnectionError(
                    f"Error {exc.errno} while writing to socket. {exc.strerror}."
                ) from exc
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await conn.disconnect(nowait=True)
            errno, message = ("UNKNOWN", exc.args[0]) if len(exc.args) == 1 else exc.args[:2]
            raise RedisConnectionError(
                f"Error {errno} while writing to socket. {message}."
            ) from exc
        except BaseException:  # a cancel mid-write: what was sent of it is unknown
            await conn.disconnect(nowait=True)
            raise


#: What the bus's connections mix in: the hiredis packer, and (where ``wait_for`` makes a
#: Task and redis-py writes through ``_send_packed_command``) the lean write.
_LEAN: tuple[type[Any], ...] = (
    (_HiredisPacking, _WritesWithoutATask)
    if _WAIT_FOR_MAKES_A_TASK and hasattr(Connection, "_send_packed_command")
    else (_HiredisPacking,)
)


def _lean(base: type[Any]) -> type[Any]:
    return type(f"_Lean{base.__name__.lstrip('_')}", (*_LEAN, base), {})


_FastConnection = _lean(Connection)
_FastUnixConnection = _lean(UnixDomainSocketConnection)
_FastSSLConnection = _lean(SSLConnection)


class _SentinelPool(SentinelConnectionPool):
    """Closes the connections to the sentinels with the pool (the client's ``aclose``);
    redis-py's leaves them open. A closed client that is used again reopens both."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        for client in self.sentinel_manager.sentinels:
            await client.connection_pool.disconnect()


class _AsksTheSentinels:
    """Reconnects a dropped connection through ``connect()``, which asks the sentinels where
    the primary is. redis-py's ``send_packed_command`` reconnects with
    ``connect_check_health``, which skips ``SentinelManagedConnection.connect`` and goes
    back to the address the connection had: after a failover, the demoted primary, which
    answers every write with READONLY, so the client never finds the new one."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        connection: Any = self
        if not connection.is_connected:
            await connection.connect()  # SentinelManagedConnection's, later in the MRO
        await super().send_packed_command(command, check_health)  # type: ignore[misc]


class _SentinelConnection(_AsksTheSentinels, SentinelManagedConnection):
    pass


class _SentinelSSLConnection(_AsksTheSentinels, SentinelManagedSSLConnection):
    pass


_FastSentinelConnection = _lean(_SentinelConnection)
_FastSentinelSSLConnection = _lean(_SentinelSSLConnection)


_FAST: dict[type[Any], type[Any]] = {
    Connection: _FastConnection,
    UnixDomainSocketConnection: _FastUnixConnection,
    SSLConnection: _FastSSLConnection,
    _SentinelConnection: _FastSentinelConnection,
    _SentinelSSLConnection: _FastSentinelSSLConnection,
}


def connect(
    settings: AnyBusSettings, client_name: str | None = None, *, url: str | None = None
) -> Redis:
    """A client for ``url`` or ``settings.redis_url``: one node (``redis://``, ``rediss://``
    TLS, ``unix://``) or the primary a Sentinel set names (``redis+sentinel://``, see
    :mod:`bus.deployment`), which it follows through a failover.

    A command that meets a lost connection is retried ``connect_retries`` times with
    exponential backoff (capped at ``retry_cap``), then raises; it never hangs forever.
    Raises :class:`~bus.deployment.RedisUrlError` for a URL it cannot use.
    """
    retry = Retry(
        ExponentialWithJitterBackoff(cap=settings.retry_cap, base=0.05),
        settings.connect_retries,
        (RedisConnectionError, RedisTimeoutError, BusyLoadingError),
    )
    options: dict[str, Any] = {
        "decode_responses": True,
        # Any bytes can sit in a stream (redis-cli writes them): a reply that is not UTF-8
        # must not raise in the parser. Bad bytes come through as lone surrogates, which
        # bus.wire.is_text detects and raw_bytes turns back into the exact bytes.
        "encoding_errors": "surrogateescape",
        "socket_connect_timeout": settings.connect_timeout,
        "socket_timeout": settings.command_timeout,
        "retry": retry,
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, BusyLoadingError],
        "health_check_interval": 30,
        "client_name": client_name,
    }
    target = parse_redis_url(url or settings.redis_url)
    if target.kind == "cluster":
        return cluster_client(target, **options)
    pool: ConnectionPool
    if target.kind == "sentinel":
        timeouts = {
            "socket_connect_timeout": settings.connect_timeout,
            "socket_timeout": settings.command_timeout,
        }
        pool = sentinel_primary(target, timeouts, **options).connection_pool
    else:
        pool = ConnectionPool.from_url(target.url, **options)
    if HiredisRespSerializer is not None:
        pool.connection_class = _FAST.get(pool.connection_class, pool.connection_class)
    return Redis.from_pool(pool)


def sentinel_primary(
    target: RedisTarget, sentinel_options: dict[str, Any] | None = None, **options: Any
) -> Redis:
    """A client of the primary the sentinels of ``target`` name, following it through a
    failover; ``options`` for the data nodes' connections (the URL's own win),
    ``sentinel_options`` for the sentinels'. Closing it closes both."""
    sentinel = Sentinel(
        target.sentinels,
        sentinel_kwargs={**(sentinel_options or {}), **target.sentinel_options},
    )
    node_options = {**options, **target.connection_options()}
    client: Redis = sentinel.master_for(
        target.service,
        connection_pool_class=_SentinelPool,
        connection_class=_SentinelSSLConnection if node_options.get("ssl") else _SentinelConnection,
        **node_options,
    )
    return client


def cluster_client(target: RedisTarget, **options: Any) -> Redis:
    """A Redis Cluster client from ``target``'s seed nodes; ``options`` for every node's
    connections (the URL's own win).

    Typed as :class:`~redis.asyncio.Redis`: redis-py's ``RedisCluster`` offers the same
    commands without being its subclass. Code that must differ on a cluster (a script or a
    read across hash slots) asks :func:`is_cluster`.
    """
    node_options = {**options, **target.connection_options()}
    node_options.pop("db", None)
    retry_on_error = node_options.pop("retry_on_error", None)
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.seeds],
        retry_on_error=retry_on_error,
        **node_options,
    )
    if HiredisRespSerializer is not None:
        _pack_with_hiredis(cluster)
    return cast(Redis, cluster)


def _pack_with_hiredis(cluster: RedisCluster) -> None:
    """Give every node's connections the hiredis packer (see :class:`_HiredisPacking`):
    redis-py's cluster client takes no connection class, so it is set where the client
    keeps it, for the nodes it knows and those it will learn."""
    manager: Any = cluster.nodes_manager
    for kwargs in (cluster.connection_kwargs, manager.connection_kwargs):
        kwargs["connection_class"] = _FAST.get(
            kwargs["connection_class"], kwargs["connection_class"]
        )
    for node in manager.startup_nodes.values():
        node.connection_class = _FAST.get(node.connection_class, node.connection_class)


#: What a cluster client takes as options: its ``connection_kwargs`` also hold what it
#: made itself (callbacks, the connection class, notification handlers), which it refuses.
_CLUSTER_OPTIONS = frozenset(inspect.signature(RedisCluster.__init__).parameters) - {
    "self",
    "host",
    "port",
    "startup_nodes",
    "retry",
    "maint_notifications_config",
}


def separate_client(redis: Redis) -> tuple[Redis, bool]:
    """A client of the same Redis whose response callbacks can be changed without changing
    ``redis``'s, and whether it is a new one to close: on one node a client on ``redis``'s
    own pool; on a cluster (whose nodes share their client's callbacks) a new cluster
    client with the same options, seeded with the nodes ``redis`` knows."""
    if not isinstance(redis, RedisCluster):
        return Redis(connection_pool=redis.connection_pool), False
    options = {k: v for k, v in redis.connection_kwargs.items() if k in _CLUSTER_OPTIONS}
    if issubclass(redis.connection_kwargs["connection_class"], SSLConnection):
        options["ssl"] = True
    known = redis.get_nodes() or redis.nodes_manager.startup_nodes.values()  # not yet met
    nodes = [ClusterNode(node.host, node.port) for node in known]
    twin = RedisCluster(startup_nodes=nodes, retry=redis.retry, **options)
    if HiredisRespSerializer is not None:
        _pack_with_hiredis(twin)
    return cast(Redis, twin), True


def is_cluster(redis: object) -> bool:
    """Whether ``redis`` is a Redis Cluster client (see :func:`cluster_client`)."""
    return isinstance(redis, RedisCluster)


class Connections:
    """The Redis clients of one bus client: ``redis`` (a bot's own keys, its outbox),
    ``streams`` (its group and the backpressure flag) and ``replays`` (reading the streams),
    each its own pool when the settings name another URL (another Redis user) for it, else
    the one before. ``given``: one client for all three, which stays open at :meth:`aclose`.
    Lazy: no round trip until the first command."""

    def __init__(self, settings: AnyBusSettings, client_name: str, given: Redis | None = None):
        self._owned: list[Redis] = []
        self.redis = given or self._open(settings, client_name, settings.redis_url)
        self.streams = self.redis
        self.replays = self.redis
        if given is None:
            if settings.streams_url is not None:
                self.streams = self._open(settings, client_name, settings.streams_url)
            self.replays = self.streams
            if settings.replay_url is not None:
                self.replays = self._open(settings, client_name, settings.replay_url)

    def _open(self, settings: AnyBusSettings, client_name: str, url: str) -> Redis:
        client = connect(settings, client_name, url=url)
        self._owned.append(client)
        return client

    async def aclose(self) -> None:
        """Close the pools this object opened."""
        for client in self._owned:
            await client.aclose()
        self._owned.clear()

    def __repr__(self) -> str:
        return f"<Connections pools={len(self._owned)}>"


def raise_swallowed_cancel() -> None:
    """Re-raise a cancel that redis-py swallowed.

    On Python 3.11 a cancel that lands while redis-py sends a command inside its timeout
    is lost and the command completes; a loop that relies on cancellation to stop would
    then run on. Call this after a Redis call in code that must stay cancellable.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def redact(url: str) -> str:
    """The URL with its secrets hidden, for logs and error messages: the password, and the
    value of any query option naming one (``?password=``, ``ssl_password=``)."""
    head, sep, query = url.partition("?")
    if sep:
        query = "&".join(_redact_option(option) for option in query.split("&"))
    parts = split_url(head)
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
        head = urlunsplit(parts._replace(netloc=netloc))
    return head + sep + query


def _redact_option(option: str) -> str:
    name, sep, _ = option.partition("=")
    return f"{name}=***" if sep and "password" in unquote(name).lower() else option
