"""The manager's own events (lifecycle, overload, failover, system), published in order.

Supervision must never wait on Redis: ``announce`` only queues; one task publishes, retrying
with backoff while Redis is away. The queue is bounded: past it the oldest events are
dropped with a warning (a manager cut off from Redis for long reports from its log).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping
from typing import Any

import structlog

from bus import BusClient
from bus.backoff import Backoff
from bus.connection import raise_swallowed_cancel
from bus.errors import BusError

log = structlog.get_logger("manager.announcer")
PUBLISHED_BY = "manager"


class Announcer:
    """Queues events for publishing from the manager's bus client."""

    def __init__(self, bus: BusClient, max_queued: int = 10_000) -> None:
        self._bus = bus
        self._queue: collections.deque[tuple[str, dict[str, Any], str | None]] = collections.deque()
        self._max = max_queued
        self._wakeup = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._backoff = Backoff(0.1, 5.0)
        #: Events published and dropped so far.
        self.published = 0
        self.dropped = 0

    def announce(self, type: str, data: Mapping[str, Any], *, source: str | None = None) -> None:
        """Queue an event; ``source`` is the bot it is about (else the manager)."""
        if len(self._queue) >= self._max:
            dropped = self._queue.popleft()
            self.dropped += 1
            log.warning("announcement queue full: dropped the oldest", type=dropped[0])
        self._queue.append((type, dict(data), source))
        self._empty.clear()
        self._wakeup.set()

    async def run(self) -> None:
        """Publish queued events in order until cancelled."""
        failures = 0
        while True:
            raise_swallowed_cancel()  # redis-py on 3.11 can drop a cancel mid-command
            if not self._queue:
                self._empty.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            type_, data, source = self._queue[0]
            try:
                event = self._bus.event(type_, data, source=source) if source else None
                if event is not None:
                    await self._bus.publish_many([event])
                else:
                    await self._bus.publish(type_, data)
            except BusError as exc:
                failures += 1
                if failures == 1:
                    log.warning("cannot publish the manager's events; retrying", error=str(exc))
                await asyncio.sleep(self._backoff.delay(failures))
                continue
            except Exception:
                log.exception("dropping an event the bus refused", type=type_, data=data)
            if failures:
                log.info("publishing the manager's events again", after_failures=failures)
                failures = 0
            self._queue.popleft()
            self.published += 1

    async def flush(self, timeout: float) -> bool:  # noqa: ASYNC109 - best effort on shutdown
        """Wait until everything queued is published; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def __repr__(self) -> str:
        return f"<Announcer queued={len(self._queue)} published={self.published}>"
