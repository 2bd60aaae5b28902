"""Requests per second per token: a token bucket for each caller."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """``rate`` requests per second per key, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._buckets: dict[str, _Bucket] = {}

    def take(
        self,
        key: str,
        *,
        rate: float | None = None,
        burst: int | None = None,
        now: float | None = None,
    ) -> float:
        """Take one request for ``key`` (at its own ``rate`` and ``burst`` if given): 0 if
        allowed, else the seconds until one is."""
        rate = self._rate if rate is None else rate
        ceiling = self._burst if burst is None else float(burst)
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(ceiling, now)
        bucket.tokens = min(ceiling, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate

    @staticmethod
    def retry_after(wait: float) -> str:
        """The ``Retry-After`` header value (whole seconds, at least 1)."""
        return str(max(1, math.ceil(wait)))
