"""Redis connections for the bus, from a URL, with bounded retries."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.connection import (
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bus.settings import BusSettings

try:
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
        try:
            packed: list[bytes] = self._packer.pack(*args)
        except UnicodeEncodeError:  # a name read from Redis that was not UTF-8: its bytes
            packed = self._packer.pack(*(_surrogate_bytes(a) for a in args))
        return packed


def _surrogate_bytes(arg: Any) -> Any:
    return arg.encode(errors="surrogateescape") if isinstance(arg, str) else arg


class _FastConnection(_HiredisPacking, Connection):
    pass


class _FastUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


class _FastSSLConnection(_HiredisPacking, SSLConnection):
    pass


_FAST: dict[type[Any], type[Any]] = {
    Connection: _FastConnection,
    UnixDomainSocketConnection: _FastUnixConnection,
    SSLConnection: _FastSSLConnection,
}


def connect(
    settings: BusSettings, client_name: str | None = None, *, url: str | None = None
) -> Redis:
    """A client for ``url`` or ``settings.redis_url`` (``redis://``, ``rediss://`` TLS,
    ``unix://``).

    A command that meets a lost connection is retried ``connect_retries`` times with
    exponential backoff (capped at ``retry_cap``), then raises; it never hangs forever.
    """
    retry = Retry(
        ExponentialWithJitterBackoff(cap=settings.retry_cap, base=0.05),
        settings.connect_retries,
        (RedisConnectionError, RedisTimeoutError, BusyLoadingError),
    )
    pool = ConnectionPool.from_url(
        url or settings.redis_url,
        decode_responses=True,
        # Any bytes can sit in a stream (redis-cli writes them): a reply that is not UTF-8
        # must not raise in the parser. Bad bytes come through as lone surrogates, which
        # bus.wire.is_text detects and raw_bytes turns back into the exact bytes.
        encoding_errors="surrogateescape",
        socket_connect_timeout=settings.connect_timeout,
        socket_timeout=settings.command_timeout,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError, BusyLoadingError],
        health_check_interval=30,
        client_name=client_name,
    )
    if HiredisRespSerializer is not None:
        pool.connection_class = _FAST.get(pool.connection_class, pool.connection_class)
    return Redis.from_pool(pool)


class Connections:
    """The Redis clients of one bus client: ``redis`` (a bot's own keys, its outbox),
    ``streams`` (its group and the backpressure flag) and ``replays`` (reading the streams),
    each its own pool when the settings name another URL (another Redis user) for it, else
    the one before. ``given``: one client for all three, which stays open at :meth:`aclose`.
    Lazy: no round trip until the first command."""

    def __init__(self, settings: BusSettings, client_name: str, given: Redis | None = None):
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

    def _open(self, settings: BusSettings, client_name: str, url: str) -> Redis:
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
    parts = urlsplit(head)
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
        head = urlunsplit(parts._replace(netloc=netloc))
    return head + sep + query


def _redact_option(option: str) -> str:
    name, sep, _ = option.partition("=")
    return f"{name}=***" if sep and "password" in unquote(name).lower() else option
