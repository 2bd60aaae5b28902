"""Reclaiming: one consumer's claim on its slow entries, and its takeover of idle ones.

Redis counts an entry idle from its last delivery, however long the handler has been running.
Every quarter visibility timeout the ``Reclaimer`` re-claims (XCLAIM) the entries its consumer
has been handling that long, so no other consumer takes them over, and then takes over
(XAUTOCLAIM) entries idle past the visibility timeout on any consumer of the group: those of a
dead or stuck replica. It hands them to the consumer's reader, which dead-letters the ones
delivered too many times and dispatches the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any

from redis.asyncio import Redis

from bus.inflight import InFlight
from bus.plain_settings import AnyConsumerSettings

#: A stream entry as XREADGROUP and XAUTOCLAIM return it: (id, fields), fields None if deleted.
Entry = tuple[str, Mapping[str, str] | None]


class Reclaimer:
    """Keeps one consumer's long-running entries its own and takes over entries idle on others.

    ``run()`` loops until cancelled: it reclaims every quarter visibility timeout (at least
    every 0.2 s), or at once after ``wake()``. Redis calls go through ``with_redis`` (the
    consumer's retry wrapper); taken-over entries go to ``take``, and only while ``inflight``
    has room for more. ``inflight`` is only read.
    """

    def __init__(
        self,
        *,
        redis: Redis,
        group: str,
        consumer: str,
        streams: Sequence[str],
        settings: AnyConsumerSettings,
        inflight: InFlight,
        stats: dict[str, int],
        log: Any,
        take: Callable[[str, Sequence[Entry], Mapping[str, str]], Awaitable[None]],
        with_redis: Callable[..., Awaitable[Any]],
        track_owners: bool = False,
    ) -> None:
        """``track_owners``: find out whom each entry is taken from (one XPENDING more per
        takeover round) and pass it to ``take`` (entry id → consumer), for the delivery
        records."""
        self._track_owners = track_owners
        self._redis = redis
        self._group = group
        self._consumer = consumer
        self._streams = streams
        self._settings = settings
        self._inflight = inflight
        self._stats = stats
        self._log = log
        self._take = take
        self._with_redis = with_redis
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """Look for idle entries now instead of at the next tick (a replica just died)."""
        self._wakeup.set()

    async def run(self) -> None:
        """Reclaim at every tick or wakeup, until cancelled."""
        interval = max(0.2, self._settings.visibility_timeout / 4)
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), interval)
            self._wakeup.clear()
            await self._with_redis(self._reclaim)

    async def _reclaim(self) -> None:
        """Keep our long-running entries ours, and take over entries idle on others."""
        visibility_ms = int(self._settings.visibility_timeout * 1000)
        now = time.monotonic()
        for stream in self._streams:
            ours = self._inflight.held_longer_than(
                stream, self._settings.visibility_timeout / 4, now
            )
            if ours:
                ids: list[Any] = list(ours)
                await self._redis.xclaim(stream, self._group, self._consumer, 0, ids, justid=True)
            start = "0-0"
            while True:
                await self._inflight.wait_for_room()
                owners = await self._owners(stream, start, visibility_ms)
                response = await self._redis.xautoclaim(
                    stream, self._group, self._consumer, visibility_ms, start,
                    count=self._settings.read_count,
                )  # fmt: skip
                start, entries = response[0], response[1]
                if entries:
                    self._stats["reclaimed"] += len(entries)
                    self._log.warning("reclaimed idle entries", stream=stream, count=len(entries))
                    await self._take(stream, entries, owners)
                if start in ("0-0", b"0-0"):
                    break

    async def _owners(self, stream: str, start: str, idle_ms: int) -> dict[str, str]:
        """Who holds the entries the next XAUTOCLAIM from ``start`` may take: entry id →
        consumer. Empty unless owners are tracked.

        Asked with half the idle bound and four times the count, so that an entry turning
        idle enough between this look and the claim (a moment, longer on a loaded
        machine) is among them; the ones not claimed are ignored."""
        if not self._track_owners:
            return {}
        rows: Any = await self._redis.xpending_range(
            stream, self._group, start, "+", self._settings.read_count * 4, idle=idle_ms // 2
        )
        return {
            _text(row["message_id"]): _text(row["consumer"])
            for row in rows
            if _text(row["consumer"]) != self._consumer
        }

    def __repr__(self) -> str:
        return (
            f"<Reclaimer group={self._group} consumer={self._consumer} "
            f"streams={len(self._streams)} woken={self._wakeup.is_set()}>"
        )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
