"""Reads of the ``events`` table, the layout written before schema 6: one row per event.

New events go to blocks (bus.archive.blocks); these read the days written before, until
retention has dropped them. Every function takes a connection and returns archive records
(``EVENT_COLUMNS`` order, stream by name) so the store can merge both layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from bus.archive.queries import ENTRY_ORDER, TIME_ORDER, EventSelect
from bus.archive.rows import EVENT_COLUMNS, SELECT_COLUMNS

# $1: event id. Returns the event's row, or no row.
_GET = f"SELECT {SELECT_COLUMNS} FROM events WHERE id = $1 ORDER BY created_at LIMIT 1"
# $1: correlation id, $2: row limit. Returns the root event (id = $1) and every event
# correlated with it, by created_at.
_TRACE = f"""
SELECT {SELECT_COLUMNS} FROM events WHERE correlation_id = $1 OR id = $1
ORDER BY created_at, id LIMIT $2
"""
# No parameters. Returns the number of events in the old layout.
_COUNT = "SELECT count(*) FROM events"
# $1: stream name, $2/$3 and $4/$5: the lowest and highest entry (ms, seq), inclusive.
# Returns (entry_ms, entry_seq) of the entries of the stream stored between them.
_STORED = """
SELECT entry_ms, entry_seq FROM events
WHERE stream = $1 AND (entry_ms, entry_seq) >= ($2, $3) AND (entry_ms, entry_seq) <= ($4, $5)
"""


def record_of(row: Any) -> tuple[Any, ...]:
    """A selected row as an archive record (``EVENT_COLUMNS`` order)."""
    return tuple(row[name] for name in EVENT_COLUMNS)


async def get(conn: Any, event_id: str) -> tuple[Any, ...] | None:
    """The record of the event with this id, or None."""
    row = await conn.fetchrow(_GET, event_id)
    return None if row is None else record_of(row)


async def trace(conn: Any, correlation_id: str, limit: int) -> list[tuple[Any, ...]]:
    """The root event and every event correlated with it, by (created_at, id)."""
    return [record_of(row) for row in await conn.fetch(_TRACE, correlation_id, limit)]


async def page(
    conn: Any,
    select: EventSelect,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[tuple[Any, ...]]:
    """Up to ``limit`` records matching ``select``, after ``after`` in (created_at, id)
    order."""
    sql, args = select.sql(TIME_ORDER, limit, after)
    return [record_of(row) for row in await conn.fetch(sql, *args)]


async def entries(
    conn: Any,
    stream: str,
    *,
    after: str | None,
    before: str | None,
    types: Sequence[str],
    limit: int,
) -> list[tuple[Any, ...]]:
    """Records of a stream (by name) strictly between two entry ids, in entry order."""
    select = EventSelect().equals("stream", stream).entry_range(after, before).types(types)
    sql, args = select.sql(ENTRY_ORDER, limit)
    return [record_of(row) for row in await conn.fetch(sql, *args)]


async def stored_entries(
    conn: Any, stream: str, low: tuple[int, int], high: tuple[int, int]
) -> set[tuple[int, int]]:
    """The entry ids of a stream stored in ``[low, high]``, as (ms, seq)."""
    rows = await conn.fetch(_STORED, stream, *low, *high)
    return {(row["entry_ms"], row["entry_seq"]) for row in rows}


async def count(conn: Any) -> int:
    """How many events the old layout holds."""
    return int(await conn.fetchval(_COUNT))
