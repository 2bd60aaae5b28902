"""Run-once markers of idempotent handlers: one run per event (id and source) per group and
handler.

The marker is ``"running:<stream>:<entry id>"`` while a handler runs (it expires like the
visibility timeout) and ``"done"`` once it succeeded (kept for ``idempotent_ttl``). A
marker running for the *same* entry means an earlier delivery died mid-handler, so it runs
again; one for another entry (the same event published twice) is a duplicate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bus.backoff import REDIS_RETRY
from bus.event import Event
from bus.keys import Keys
from bus.redis_errors import UNAVAILABLE


class RunOnce:
    """The markers of one group. Each step waits while Redis is unreachable (as a dead
    letter's write does: a marker given up on would leave its entry pending for the
    visibility timeout) and returns None (logged) when Redis refused it, so the caller can
    leave the entry pending instead of guessing."""

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

        async def claim() -> bool:
            if await self._redis.set(key, mine, nx=True, px=self._visibility_ms):
                return True
            state = await self._redis.get(key)
            if state == mine or state is None:  # this delivery's own (a try whose reply
                await self._redis.set(key, mine, px=self._visibility_ms)  # was lost)
                return True
            return False

        return await self._step("claim", handler, entry_id, claim)

    async def mark_done(self, handler: str, event: Event, entry_id: str, ttl: float) -> bool | None:
        """Remember for ``ttl`` seconds that the handler ran on this event."""
        key = self._keys.idempotency(self._group, handler, event.id, event.source)

        async def mark() -> bool:
            await self._redis.set(key, "done", px=int(ttl * 1000))
            return True

        return await self._step("mark", handler, entry_id, mark)

    async def forget(self, handler: str, event: Event, entry_id: str) -> bool | None:
        """Drop the marker (the handler failed for good: a retried dead letter runs again)."""
        key = self._keys.idempotency(self._group, handler, event.id, event.source)

        async def forget() -> bool:
            await self._redis.delete(key)
            return True

        return await self._step("forget", handler, entry_id, forget)

    async def _step(
        self, step: str, handler: str, entry_id: str, call: Callable[[], Awaitable[bool]]
    ) -> bool | None:
        """``call`` (idempotent), tried again while Redis is unreachable; None once Redis
        refused it (an error reply)."""
        waits = REDIS_RETRY.waits()
        waiting = False
        while True:
            try:
                result = await call()
            except UNAVAILABLE as exc:
                if not waiting:
                    waiting = True
                    self._report(self._log.warning, "run-once marker waits for Redis",
                                 step, handler, entry_id, exc)  # fmt: skip
            except RedisError as exc:
                self._report(
                    self._log.error, "run-once marker failed", step, handler, entry_id, exc
                )
                return None
            else:
                if waiting:
                    self._log.info("run-once marker written again", step=step, entry_id=entry_id)
                return result
            await asyncio.sleep(next(waits))

    @staticmethod
    def _report(  # noqa: PLR0917 - a log line's parts
        log: Callable[..., None], event: str, step: str, handler: str, entry_id: str,
        exc: BaseException,
    ) -> None:  # fmt: skip
        log(
            event,
            step=step,
            handler=handler,
            entry_id=entry_id,
            error=f"{type(exc).__name__}: {exc}",
        )

    def __repr__(self) -> str:
        return f"<RunOnce group={self._group}>"
