"""Replay: events of some patterns since a stream id or a time, in order, across the seam.

Redis holds the hot window; with an archive store, what was trimmed from a stream is read
from PostgreSQL instead, with no gap and no duplicate at the seam even while events keep
arriving and the streams keep being trimmed: for each chunk read from a stream, anything
between the last event yielded and that chunk which the stream no longer holds is taken
from the archive first (entries are trimmed only after they were archived).
"""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from redis.asyncio import Redis

from bus.entry_id import EntryId
from bus.errors import WireFormatError
from bus.event import Event
from bus.keys import Keys

if TYPE_CHECKING:
    from bus.archive.store import ArchiveStore
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


_MAX_SEQ = 2**63 - 1  # PostgreSQL bigint; Redis sequences never get near it


def _just_before(entry_id: str) -> str | None:
    """The greatest id below ``entry_id`` (an exclusive lower bound), None below ``-``."""
    if entry_id == "-":
        return None
    ms, seq = EntryId.parse(entry_id)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{_MAX_SEQ}" if ms > 0 else None


def _just_after(entry_id: str) -> str | None:
    """The least id above ``entry_id`` (an exclusive upper bound), None above ``+``."""
    if entry_id == "+":
        return None
    ms, seq = EntryId.parse(entry_id)
    return f"{ms}-{seq + 1}" if seq < _MAX_SEQ else f"{ms + 1}-0"


async def _read(
    redis: Redis, stream: str, start: str, end: str, *, chunk: int, store: ArchiveStore | None
) -> AsyncIterator[Event]:
    """One stream's events from ``start`` to ``end`` (inclusive), archive first where trimmed."""
    position = _just_before(start)  # last id yielded (exclusive bound of the next read)
    limit = _just_after(end)
    while True:
        lower = f"({position}" if position is not None else "-"
        rows: Any = await redis.xrange(stream, lower, end, count=chunk)
        if store is not None:
            head: Any = await redis.xrange(stream, "-", "+", count=1)  # after the read: see a trim
            first = EntryId.parse(head[0][0]) if head else None
            if first is None or position is None or EntryId.parse(position) < first:
                before = rows[0][0] if rows else limit
                archived = await store.entries(stream, after=position, before=before, limit=chunk)
                if archived:
                    for event in archived:
                        yield event
                    position = archived[-1].entry_id
                    continue  # read the stream again from there
        for entry_id, fields in rows:
            try:
                yield decode(fields, stream, entry_id)
            except WireFormatError as exc:
                log.warning(
                    "skipping malformed entry", stream=stream, entry_id=entry_id, reason=exc.reason
                )
        if len(rows) < chunk:
            return
        position = rows[-1][0]


async def replay(  # noqa: PLR0917 - internal; BusClient.replay is the public face
    redis: Redis,
    keys: Keys,
    router: Router,
    patterns: Iterable[str],
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    chunk: int = 500,
    store: ArchiveStore | None = None,
) -> AsyncIterator[Event]:
    """Yield matching events from the streams, oldest first across streams.

    ``since``/``until`` are inclusive stream ids (``1700000000000-0``) or times. Entries that
    do not decode are skipped with a warning (the consumers dead-letter them). With
    ``store``, events trimmed from Redis come from the archive.
    """
    compiled = [Pattern(p) for p in patterns]
    streams = sorted({keys.stream(s) for p in compiled for s in router.streams_for(p)})
    start, end = stream_id_at(since, "-"), stream_id_at(until, "+")
    iterators = {
        s: _read(redis, s, start, end, chunk=chunk, store=store).__aiter__() for s in streams
    }
    # Heads of the streams, ordered by the entry's millisecond, then by event id (UUIDv7,
    # monotonic per publisher) so events of one publisher keep their order across streams.
    heap: list[tuple[int, str, str, Event]] = []

    async def advance(stream: str) -> None:
        async for event in iterators[stream]:
            if any(p.matches(event.type) for p in compiled):
                entry_id = event.entry_id or "0-0"
                heapq.heappush(heap, (EntryId.parse(entry_id)[0], event.id, stream, event))
                return

    for stream in streams:
        await advance(stream)
    while heap:
        _, _, stream, event = heapq.heappop(heap)
        await advance(stream)
        yield event
