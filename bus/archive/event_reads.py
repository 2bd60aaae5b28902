"""Reads of archived events across both layouts: blocks (schema 6) and, for the days
written before, the ``events`` table, merged in the order each read promises.

Whether the old layout still holds a day is checked at most once a minute; once retention
has dropped its last partition every read costs what the blocks alone cost.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from bus.archive import block_reads, legacy_reads, partitions
from bus.archive.block_reads import heads_sql
from bus.archive.dictionaries import Dictionaries
from bus.archive.kind_shares import KindShares
from bus.archive.names import Kinds
from bus.archive.queries import EventSelect
from bus.patterns import Pattern

Record = tuple[Any, ...]
_ID, _TYPE, _SOURCE, _CREATED, _STREAM, _MS, _SEQ = 0, 1, 2, 8, 9, 10, 11
_LEGACY_CHECK_S = 60.0


def _time_key(record: Record) -> tuple[datetime, str]:
    return record[_CREATED], record[_ID]


def _entry_key(record: Record) -> tuple[int, int]:
    return record[_MS], record[_SEQ]


async def _merge(
    first: AsyncIterator[list[Record]], second: AsyncIterator[list[Record]] | None
) -> AsyncGenerator[list[Record]]:
    """Batches of records of two sorted batch streams, in (created_at, id) order: the
    first's own batches while the second has nothing (the usual case: no old layout)."""
    streams = [s for s in (first, second) if s is not None]
    queues: list[list[Record]] = [[] for _ in streams]
    alive = [True] * len(streams)

    async def fill(n: int) -> None:
        while alive[n] and not queues[n]:
            try:
                queues[n] = list(reversed(await anext(streams[n])))
            except StopAsyncIteration:
                alive[n] = False

    while True:
        for n in range(len(streams)):
            await fill(n)
        ready = [n for n in range(len(streams)) if queues[n]]
        if not ready:
            return
        if len(ready) == 1 and not any(alive[n] for n in range(len(streams)) if n != ready[0]):
            yield list(reversed(queues[ready[0]]))  # the other is done: pass batches on
            queues[ready[0]] = []
            continue
        pick = min(ready, key=lambda n: _time_key(queues[n][-1]))
        yield [queues[pick].pop()]


class EventReads:
    """get, trace, query and entries over both layouts (records, streams by name)."""

    def __init__(self, kinds: Kinds, dicts: Dictionaries) -> None:
        self._dicts = dicts
        self._kinds = kinds
        self._shares = KindShares()
        self._legacy = True
        self._legacy_checked = -_LEGACY_CHECK_S

    async def legacy(self, conn: Any) -> bool:
        """Whether the old layout still holds a day."""
        if self._legacy and time.monotonic() - self._legacy_checked >= _LEGACY_CHECK_S:
            self._legacy = bool(await partitions.existing_days(conn, "events"))
            self._legacy_checked = time.monotonic()
        return self._legacy

    async def get(self, conn: Any, event_id: str) -> Record | None:
        found = await block_reads.get(conn, self._dicts, event_id)
        if found is None and await self.legacy(conn):
            found = await legacy_reads.get(conn, event_id)
        return found

    async def trace(self, conn: Any, correlation_id: str, limit: int) -> list[Record]:
        records = await block_reads.trace(conn, self._dicts, correlation_id)
        if await self.legacy(conn):
            records += await legacy_reads.trace(conn, correlation_id, limit)
        unique = {(r[_STREAM], r[_MS], r[_SEQ]): r for r in records}
        return sorted(unique.values(), key=_time_key)[:limit]

    async def query(
        self,
        conn: Any,
        *,
        types: Sequence[str],
        source: str | None,
        since: datetime | None,
        until: datetime | None,
        after: tuple[datetime, str] | None,
        chunk: int,
    ) -> AsyncGenerator[list[Record]]:
        """Every matching record after ``after``, in (created_at, id) order, in batches."""
        patterns = [Pattern(p) for p in types]
        while True:
            batches = self._query(conn, patterns, source, since, until, after, chunk)
            async with contextlib.aclosing(batches):
                try:
                    first = await anext(batches)
                except StopAsyncIteration:
                    return
                except block_reads.KindsChanged:
                    await self._kinds.refresh(conn)
                    continue
                yield first
                async for batch in batches:
                    yield batch
                return

    async def _query(  # noqa: PLR0917 - the query's conditions, passed on
        self,
        conn: Any,
        patterns: list[Pattern],
        source: str | None,
        since: datetime | None,
        until: datetime | None,
        after: tuple[datetime, str] | None,
        chunk: int,
    ) -> AsyncGenerator[list[Record]]:
        kind_ids: list[int] | None = None
        approximate = False
        kinds: int | None = None
        if patterns or source is not None:
            kind_ids, approximate = self._kinds.matching(patterns, source)
            kinds = self._kinds.known
            if len(kind_ids) > 1:
                await self._shares.refresh(conn, kinds)

        # The heads find exactly the kinds asked for, unless some were given OTHER (no
        # number left): then each record is checked.
        def keep(record: Record) -> bool:
            return (
                (not approximate or not patterns or any(p.matches(record[_TYPE]) for p in patterns))
                and (source is None or not approximate or record[_SOURCE] == source)
                and (after is None or _time_key(record) > after)
            )

        def select(bound: tuple[str, datetime] | None, limit: int) -> tuple[str, list[Any]]:
            # No kind matches: an empty choice still runs, to learn the count of kinds.
            by_time = kind_ids is not None and self._shares.by_time(kind_ids, limit)
            return heads_sql(
                kind_ids, since=since, until=until, bound=bound, limit=limit, by_time=by_time
            )

        start = after[0] if after is not None else None
        blocks = block_reads.scan(
            conn, self._dicts, select=select, start=start, keep=keep, chunk=chunk, kinds=kinds
        )
        legacy = None
        if await self.legacy(conn):
            where = EventSelect().types([p.text for p in patterns]).equals("source", source)
            legacy = self._legacy_pages(conn, where.time_range(since, until), after, chunk)
        async with contextlib.aclosing(_merge(blocks, legacy)) as merged:
            async for batch in merged:
                yield batch

    @staticmethod
    async def _legacy_pages(
        conn: Any, select: EventSelect, after: tuple[datetime, str] | None, chunk: int
    ) -> AsyncIterator[list[Record]]:
        while True:
            page = await legacy_reads.page(conn, select, after, chunk)
            yield page
            if len(page) < chunk:
                return
            after = _time_key(page[-1])

    async def entries(
        self,
        conn: Any,
        stream: str,
        *,
        after: str | None,
        before: str | None,
        types: Sequence[str],
        limit: int,
    ) -> list[Record]:
        patterns = [Pattern(p) for p in types]

        def keep(record: Record) -> bool:
            return not patterns or any(p.matches(record[_TYPE]) for p in patterns)

        records = await block_reads.entries(
            conn, self._dicts, stream, after=after, before=before, keep=keep, limit=limit
        )
        if await self.legacy(conn):
            records += await legacy_reads.entries(
                conn, stream, after=after, before=before, types=types, limit=limit
            )
            unique = {_entry_key(r): r for r in records}
            records = sorted(unique.values(), key=_entry_key)[:limit]
        return records

    async def count(self, conn: Any) -> int:
        # No parameters. Returns how many events the blocks hold.
        total = int(await conn.fetchval("SELECT coalesce(sum(n), 0) FROM event_blocks"))
        if await self.legacy(conn):
            total += await legacy_reads.count(conn)
        return total
