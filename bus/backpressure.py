"""Backpressure: publishers hold back while the manager says Redis is nearly full.

The manager's pressure watch (``manager/archive/pressure.py``) keeps the flag key ``<ns>:pressure``
set, with a short expiry, while Redis's used memory is above the high mark of its
``maxmemory``; its value says what holds the memory (the archive is not storing, a group is
behind). A publisher reads the flag at most every :data:`REFRESH` seconds, so the cost is
one GET per half second per client, not one per event. While the flag is up, ``publish``
waits, polling, up to ``backpressure_wait`` seconds, then raises
:class:`~bus.errors.BusBackpressureError`: nothing is written, and the caller decides
whether to retry, buffer or shed.

The flag expires on its own when the manager is gone, so a dead manager cannot stop every
publisher; Redis's own OOM refusal is then the last guard, reported as the same error.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bus.errors import BusBackpressureError
from bus.keys import Keys

log = structlog.get_logger("bus.backpressure")

#: Seconds a read of the flag is trusted.
REFRESH = 0.5
#: Seconds between reads of the flag while waiting for it to clear.
POLL = 0.1


class Backpressure:
    """The flag as one publisher sees it."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        wait: float,
        *,
        refresh: float = REFRESH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._key = keys.pressure()
        self._wait = wait
        self._refresh = refresh
        self._clock = clock
        self._checked_at = -math.inf
        self._reason: str | None = None
        self._denied = False

    async def admit(self, count: int = 1) -> None:
        """Return when ``count`` events may be written; raise BusBackpressureError when the
        flag stays up for the whole wait. Redis being unreachable propagates (the write
        that follows would fail the same way)."""
        if await self._read() is None:
            return
        deadline = self._clock() + self._wait
        while (remaining := deadline - self._clock()) > 0:
            await asyncio.sleep(min(POLL, remaining))
            if await self._read(fresh=True) is None:
                return
        reason = self._reason or "Redis is near its maxmemory"
        raise BusBackpressureError(
            f"could not publish {count} event(s): Redis is near its memory limit and the "
            f"manager asked publishers to hold back ({reason}); waited {self._wait:g}s. "
            "Nothing was written: publish again later. Operators: `multibot status` says "
            "what holds the memory (usually the archive's PostgreSQL, or a slow bot).",
            reason,
        )

    async def _read(self, *, fresh: bool = False) -> str | None:
        now = self._clock()
        if not fresh and now - self._checked_at < self._refresh:
            return self._reason
        try:
            value = await self._redis.get(self._key)
        except ResponseError as exc:  # e.g. NOPERM: a user made before the flag existed
            if not self._denied:
                log.warning("cannot read the backpressure flag: publishing without it",
                            key=self._key, error=str(exc))  # fmt: skip
            self._denied = True
            value = None
        self._checked_at = now
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        self._reason = None if value is None else str(value)
        return self._reason


def refused(exc: BaseException, count: int) -> BusBackpressureError:
    """The error for a write Redis itself refused at ``maxmemory``."""
    return BusBackpressureError(
        f"could not publish {count} event(s): Redis refused the write, it is at its maxmemory "
        f"({exc}). When several were sent, those before the refused one may be written. "
        "Publish again later; operators: `multibot status` says what holds the memory.",
        "redis at maxmemory",
    )
