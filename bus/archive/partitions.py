"""Day partitions of the tables of events (``event_heads``, ``event_blocks``,
``event_odd_ids``, and ``events`` from before schema 6) and of ``deliveries``:
``event_heads_YYYYMMDD`` (and so on) holds one UTC day of the events' ``created_at``.

Creating or dropping a partition locks the whole table briefly (ACCESS EXCLUSIVE), so both
take an advisory lock (one creator at a time across managers) and a ``lock_timeout`` (a
long query makes them fail and retry later rather than queue every reader and writer
behind them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import structlog

log = structlog.get_logger("bus.archive")

#: The tables an archived event is written to, one partition each per day.
EVENT_TABLES = ("event_heads", "event_blocks", "event_odd_ids")
#: The tables partitioned by day (their names are also the partitions' prefix); ``events``
#: is only read and dropped (written before schema 6).
TABLES = (*EVENT_TABLES, "events", "deliveries")
_NAME_RE = re.compile(r"^(event_heads|event_blocks|event_odd_ids|events|deliveries)_(\d{8})$")
#: Advisory lock key held (per transaction) while creating or dropping partitions: 'mbpart'.
PARTITION_LOCK = 0x6D_62_70_61_72_74
#: How long DDL waits for its lock on ``events`` before giving up.
LOCK_TIMEOUT = "10s"

# $1: the lock key (bigint). Returns nothing; waits until no other transaction holds it.
_LOCK = "SELECT pg_advisory_xact_lock($1)"
# No parameters. Returns nothing. Bounds the wait for table locks in this transaction.
_LOCK_TIMEOUT = f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"
# $1: the partitioned table's name (text). Returns the names (relname) of its partitions.
_LIST = """
SELECT c.relname
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = $1::regclass
"""


def partition_name(day: date, table: str = "event_heads") -> str:
    """Name of the partition of ``table`` holding ``day`` (UTC), e.g. ``event_heads_20260101``."""
    return f"{table}_{day.year:04d}{day.month:02d}{day.day:02d}"  # %Y is not padded below 1000


def partition_day(name: str, table: str = "event_heads") -> date | None:
    """The day a partition name of ``table`` stands for; None for a table not named by us."""
    match = _NAME_RE.match(name)
    if match is None or match.group(1) != table:
        return None
    try:
        return datetime.strptime(match.group(2), "%Y%m%d").replace(tzinfo=UTC).date()
    except ValueError:
        return None


def day_of(moment: datetime) -> date:
    """The UTC day a timestamp falls in (naive timestamps are taken as UTC)."""
    if moment.tzinfo is None:
        return moment.date()
    return moment.astimezone(UTC).date()


def _create_sql(day: date, table: str) -> str:
    # DDL takes no bind parameters; both bounds are formatted from a date, never user text.
    # Returns nothing. The range is [day 00:00 UTC, next day 00:00 UTC).
    start = datetime.combine(day, time(), UTC)
    end = start + timedelta(days=1)
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(day, table)} PARTITION OF {table} "
        f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
    )


async def existing_days(conn: Any, table: str = "event_heads") -> set[date]:
    """The days that have a partition of ``table``."""
    _check(table)
    rows = await conn.fetch(_LIST, table)
    return {d for row in rows if (d := partition_day(row["relname"], table)) is not None}


async def create_partitions(
    conn: Any, days: Iterable[date], tables: Sequence[str] = EVENT_TABLES
) -> list[str]:
    """Create the missing partitions of ``days`` in each of ``tables`` (the event tables
    together, in one transaction); return the names created (often none)."""
    wanted = set(days)
    for table in tables:
        _check(table)

    async def missing() -> list[tuple[date, str]]:
        return [
            (day, table)
            for table in tables
            for day in sorted(wanted - await existing_days(conn, table))
        ]

    if not await missing():  # the usual case: no lock, no DDL
        return []
    async with conn.transaction():
        await conn.execute(_LOCK, PARTITION_LOCK)
        await conn.execute(_LOCK_TIMEOUT)
        todo = await missing()  # another may have won
        for day, table in todo:
            await conn.execute(_create_sql(day, table))
    names = [partition_name(day, table) for day, table in todo]
    if names:
        log.info("archive partitions created", partitions=names)
    return names


async def drop_partitions_before(conn: Any, day: date, table: str = "event_heads") -> list[str]:
    """DROP every partition of a day before ``day`` (whole tables, no DELETE); return names."""
    async with conn.transaction():
        await conn.execute(_LOCK, PARTITION_LOCK)
        await conn.execute(_LOCK_TIMEOUT)
        old = sorted(d for d in await existing_days(conn, table) if d < day)
        for old_day in old:
            await conn.execute(f"DROP TABLE {partition_name(old_day, table)}")  # returns nothing
    names = [partition_name(d, table) for d in old]
    if names:
        log.info("archive partitions dropped", partitions=names, before=day.isoformat())
    return names


def _check(table: str) -> None:
    if table not in TABLES:  # names go into DDL: only ours
        raise ValueError(f"{table!r} is not a day-partitioned table ({', '.join(TABLES)})")
