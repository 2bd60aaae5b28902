"""Run-once markers of idempotent handlers: one run per event (id and source) per group and
handler.

The marker is ``"running:<stream>:<entry id>"`` while a handler runs (it expires like the
visibility timeout) and ``"done"`` once it succeeded (kept for ``idempotent_ttl``). A
marker running for the *same* entry means an earlier delivery died mid-handler, so it runs
again; one for another entry (the same event published twice) is a duplicate.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bus.event import Event
from bus.keys import Keys


class RunOnce:
    """The markers of one group. Each step returns None (logged) when Redis failed it, so
    the caller can leave the entry pending instead of guessing."""

    def __init__(self, redis: Redis, keys: Keys, group: str, visibility_ms: int, log: Any) -> None:
        self._redis = redis
        self._keys = keys
        self._group = group
        self._visibility_ms = visibility_ms
        self._log = log

    async def claim(self, handler: str, event: Event, stream: str, entry_id: str) -> bool | None:
        """Whether this delivery may run the handler (False: a duplicate, already run)."""
        key = self._keys.idempotency(self._group, handler, event.id, event.source)
        mine = f"running:{stream}:{entry_id}"
        try:
            if await self._redis.set(key, mine, nx=True, px=self._visibility_ms):
                return True
            state = await self._redis.get(key)
            if state == mine or state is None:
                await self._redis.set(key, mine, px=self._visibility_ms)
                return True
        except (RedisError, OSError) as exc:
            self._failed("claim", handler, entry_id, exc)
            return None
        return False

    async def mark_done(self, handler: str, event: Event, entry_id: str, ttl: float) -> bool | None:
        """Remember for ``ttl`` seconds that the handler ran on this event."""
        key = self._keys.idempotency(self._group, handler, event.id, event.source)
        try:
            await self._redis.set(key, "done", px=int(ttl * 1000))
        except (RedisError, OSError) as exc:
            self._failed("mark", handler, entry_id, exc)
            return None
        return True

    async def forget(self, handler: str, event: Event, entry_id: str) -> bool | None:
        """Drop the marker (the handler failed for good: a retried dead letter runs again)."""
        key = self._keys.idempotency(self._group, handler, event.id, event.source)
        try:
            await self._redis.delete(key)
        except (RedisError, OSError) as exc:
            self._failed("forget", handler, entry_id, exc)
            return None
        return True

    def _failed(self, step: str, handler: str, entry_id: str, exc: BaseException) -> None:
        self._log.error(
            "run-once marker failed",
            step=step,
            handler=handler,
            entry_id=entry_id,
            error=f"{type(exc).__name__}: {exc}",
        )

    def __repr__(self) -> str:
        return f"<RunOnce group={self._group}>"
