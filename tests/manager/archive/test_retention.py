"""Retention of the archive: day partitions made ahead, whole old partitions dropped.

Against a private PostgreSQL; ``today`` is given to ``maintain``, so no clock is involved.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import pytest

from bus.archive import ArchiveStore
from bus.event import Event
from bus.keys import Keys
from manager.archive.retention import cutoff_day, maintain
from manager.config import ArchiveSettings
from manager.embedded.postgres_server import PostgresServer

pytestmark = pytest.mark.postgres

KEYS = Keys()
DAY = date(2026, 3, 10)


def days(first: date, count: int) -> list[date]:
    """``count`` consecutive days from ``first``."""
    return [first + timedelta(days=n) for n in range(count)]


def noon(day: date) -> datetime:
    """Midday UTC of ``day``."""
    return datetime.combine(day, time(12), UTC)


async def store_events(store: ArchiveStore, day: date, n: int) -> list[str]:
    """Archive ``n`` events published on ``day``; their ids."""
    start = day.toordinal()  # any entry ids will do: the store keeps what it is given
    events = [
        Event(
            type="user.note.added", data={"n": i}, source="greeter", timestamp=noon(day)
        ).with_delivery(KEYS.stream("user"), f"{start}-{i}")
        for i in range(n)
    ]
    assert await store.insert_events(events) == n
    return [e.id for e in events]


async def event_ids(store: ArchiveStore, since: date, until: date) -> set[str]:
    """Ids of the events published from ``since`` (inclusive) to ``until`` (exclusive)."""
    since_at, until_at = (datetime.combine(d, time(), UTC) for d in (since, until))
    found: set[str] = set()
    cursor: str | None = None
    while True:
        page, cursor = await store.query(since=since_at, until=until_at, after=cursor)
        found |= {e.id for e in page}
        if cursor is None:
            return found


async def partition_oids(dsn: str) -> dict[str, int]:
    """Each partition of the event tables by name, with its table's oid."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT c.relname, c.oid FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent IN ('event_heads'::regclass, 'event_blocks'::regclass)"
        )
    finally:
        await conn.close()
    return {str(row["relname"]): int(row["oid"]) for row in rows}


class TestCutoffDay:
    def test_keeps_retention_days_before_today(self) -> None:
        """The oldest day kept is today minus retention_days."""
        assert cutoff_day(DAY, 7) == date(2026, 3, 3)
        assert cutoff_day(DAY, 1) == date(2026, 3, 9)

    def test_crosses_months_and_years(self) -> None:
        """The cutoff is calendar arithmetic across month and year ends."""
        assert cutoff_day(date(2026, 1, 2), 7) == date(2025, 12, 26)
        assert cutoff_day(date(2024, 3, 1), 1) == date(2024, 2, 29)


class TestMaintain:
    async def test_creates_today_and_the_days_ahead(self, store: ArchiveStore) -> None:
        """A first round creates today's partition and partitions_ahead more, drops none."""
        settings = ArchiveSettings(partitions_ahead=3)
        assert await maintain(store, settings, DAY) == []
        assert await store.partitions() == days(DAY, 4)

    async def test_drops_whole_partitions_past_retention_and_keeps_newer_days(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """With today far ahead, the partitions of days older than retention_days are
        dropped (their events with them) while newer days keep their events."""
        settings = ArchiveSettings(retention_days=7, partitions_ahead=2)
        await maintain(store, settings, DAY)
        old = {day: await store_events(store, day, 3) for day in days(DAY, 3)}
        assert await store.partitions() == days(DAY, 3)
        today = DAY + timedelta(days=9)  # the cutoff is DAY + 2
        recent = await store_events(store, today - timedelta(days=1), 2)

        dropped = await maintain(store, settings, today)
        assert dropped == [
            f"{table}_{day}" for table in ("event_heads", "event_blocks", "event_odd_ids")
            for day in ("20260310", "20260311")
        ]  # fmt: skip
        assert await store.partitions() == [
            DAY + timedelta(days=2),
            today - timedelta(days=1),
            *days(today, 3),
        ]
        assert "event_heads_20260310" not in await partition_oids(postgres_server.dsn)
        assert "event_blocks_20260310" not in await partition_oids(postgres_server.dsn)
        assert await event_ids(store, DAY, DAY + timedelta(days=2)) == set()
        assert await event_ids(store, DAY + timedelta(days=2), today) == {
            *old[DAY + timedelta(days=2)],
            *recent,
        }
        assert await store.count() == 5

    async def test_second_round_is_a_noop(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """Running maintain again (on this store or a fresh one) creates and drops nothing
        and leaves the same tables with their events."""
        settings = ArchiveSettings(retention_days=3, partitions_ahead=2)
        await maintain(store, settings, DAY)
        ids = await store_events(store, DAY, 2)
        today = DAY + timedelta(days=3)
        await maintain(store, settings, today)
        before = await partition_oids(postgres_server.dsn)

        assert await maintain(store, settings, today) == []
        fresh = await ArchiveStore.connect(postgres_server.dsn)
        try:
            assert await maintain(fresh, settings, today) == []
        finally:
            await fresh.close()
        assert await partition_oids(postgres_server.dsn) == before
        assert await event_ids(store, DAY, today) == set(ids)

    async def test_partition_of_an_event_dated_before_year_1000_is_dropped_too(
        self, store: ArchiveStore
    ) -> None:
        """An event with an absurdly old timestamp (a raw entry can carry any) gets a
        partition that retention knows and drops like any other."""
        settings = ArchiveSettings(retention_days=7, partitions_ahead=1)
        await store_events(store, date(999, 1, 1), 1)
        assert await store.partitions() == [date(999, 1, 1)]
        await maintain(store, settings, DAY)
        assert await store.count() == 0
