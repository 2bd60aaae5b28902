"""The one place that reads Redis error text."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: Errors that mean "Redis is not reachable right now": back off and try again.
UNAVAILABLE: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


def is_nogroup(exc: BaseException) -> bool:
    """The consumer group (or its stream) does not exist, or the stream was deleted while a
    read blocked on it (Redis 7 answers that read with UNBLOCKED instead of NOGROUP)."""
    return isinstance(exc, ResponseError) and str(exc).startswith(
        (
            "NOGROUP",
            "UNBLOCKED the stream key no longer exists",
            "The XGROUP subcommand requires the key to exist",  # XGROUP on no stream
        )
    )


def is_busygroup(exc: BaseException) -> bool:
    """The consumer group already exists."""
    return isinstance(exc, ResponseError) and str(exc).startswith("BUSYGROUP")


def is_oom(exc: BaseException) -> bool:
    """Redis refused a write because it is at ``maxmemory`` (policy ``noeviction``); redis-py
    raises OutOfMemoryError for it, a plain ResponseError "OOM ..." inside a pipeline."""
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, ResponseError) and str(exc).startswith("OOM")
    )
