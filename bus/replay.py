"""Replay from Redis: events of some patterns since a stream id or a time, in order."""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any

import structlog
from redis.asyncio import Redis

from bus.errors import WireFormatError
from bus.event import Event
from bus.keys import Keys
from bus.patterns import Pattern
from bus.routing import Router
from bus.wire import decode

log = structlog.get_logger("bus.replay")


def stream_id_at(moment: datetime | str | None, default: str) -> str:
    """A stream id bound from a time (its millisecond) or an id given as is."""
    if moment is None:
        return default
    if isinstance(moment, datetime):
        seq = "0" if default == "-" else "18446744073709551615"
        return f"{int(moment.timestamp() * 1000)}-{seq}"
    return moment


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def _read(
    redis: Redis, stream: str, start: str, end: str, chunk: int
) -> AsyncIterator[tuple[str, dict[str, str]]]:
    while True:
        rows: Any = await redis.xrange(stream, start, end, count=chunk)
        for row in rows:
            yield row
        if len(rows) < chunk:
            return
        start = f"({rows[-1][0]}"


async def replay(  # noqa: PLR0917 - internal; BusClient.replay is the public face
    redis: Redis,
    keys: Keys,
    router: Router,
    patterns: Iterable[str],
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    chunk: int = 500,
) -> AsyncIterator[Event]:
    """Yield matching events from the streams, oldest first across streams.

    ``since``/``until`` are inclusive stream ids (``1700000000000-0``) or times. Entries that
    do not decode are skipped with a warning (the consumers dead-letter them).
    """
    compiled = [Pattern(p) for p in patterns]
    streams = sorted({keys.stream(s) for p in compiled for s in router.streams_for(p)})
    start, end = stream_id_at(since, "-"), stream_id_at(until, "+")
    iterators = {s: _read(redis, s, start, end, chunk).__aiter__() for s in streams}
    # Heads of the streams, ordered by the entry's millisecond, then by event id (UUIDv7,
    # monotonic per publisher) so events of one publisher keep their order across streams.
    heap: list[tuple[int, str, str, Event]] = []

    async def advance(stream: str) -> None:
        async for entry_id, fields in iterators[stream]:
            try:
                event = decode(fields, stream, entry_id)
            except WireFormatError as exc:
                log.warning(
                    "skipping malformed entry", stream=stream, entry_id=entry_id, reason=exc.reason
                )
                continue
            if any(p.matches(event.type) for p in compiled):
                heapq.heappush(heap, (_order(entry_id)[0], event.id, stream, event))
                return

    for stream in streams:
        await advance(stream)
    while heap:
        _, _, stream, event = heapq.heappop(heap)
        await advance(stream)
        yield event
