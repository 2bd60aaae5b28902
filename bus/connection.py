"""Redis connections for the bus, from a URL, with bounded retries."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bus.settings import BusSettings


def connect(settings: BusSettings, client_name: str | None = None) -> Redis:
    """A client for ``settings.redis_url`` (``redis://``, ``rediss://`` TLS, ``unix://``).

    A command that meets a lost connection is retried ``connect_retries`` times with
    exponential backoff (capped at ``retry_cap``), then raises; it never hangs forever.
    """
    retry = Retry(
        ExponentialWithJitterBackoff(cap=settings.retry_cap, base=0.05),
        settings.connect_retries,
        (RedisConnectionError, RedisTimeoutError, BusyLoadingError),
    )
    return Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_connect_timeout=settings.connect_timeout,
        socket_timeout=settings.command_timeout,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError, BusyLoadingError],
        health_check_interval=30,
        client_name=client_name,
    )


def redact(url: str) -> str:
    """The URL with its password hidden, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
