"""Idempotent batch writes of the archive: events (with each stream's archived position in
the same transaction) and dead letters. Writing a batch twice stores it once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import structlog

from bus.archive.rows import DEAD_LETTER_COLUMNS, EVENT_COLUMNS, dead_letter_record
from bus.dlq import DeadLetter

log = structlog.get_logger("bus.archive")

_COLUMNS = ", ".join(EVENT_COLUMNS)
_STREAM, _ENTRY_MS, _ENTRY_SEQ = map(EVENT_COLUMNS.index, ("stream", "entry_ms", "entry_seq"))

# No parameters; returns nothing. The batch's staging table, private to the connection and
# emptied at each commit (kept, not re-created, so batches cause no catalog churn).
_CREATE_INCOMING = """
CREATE TEMP TABLE IF NOT EXISTS events_incoming (
    id text, type text, source text, data jsonb, correlation_id text, causation_id text,
    version integer, key text, created_at timestamptz, stream text, entry_ms bigint,
    entry_seq bigint
) ON COMMIT DELETE ROWS
"""
# No parameters. Returns the status "INSERT 0 <rows newly stored>"; an event already
# stored (same id and created_at) is skipped, so archiving a batch twice stores it once.
_INSERT_EVENTS = f"""
INSERT INTO events ({_COLUMNS}) SELECT {_COLUMNS} FROM events_incoming ON CONFLICT DO NOTHING
"""
# $1: stream names (text[]), $2: the highest entry id of each in the batch (text[], same
# order). Returns nothing. A stream's row only moves forward: re-archiving an older batch
# (a reclaimed one) leaves it alone.
_ADVANCE_STATE = """
INSERT INTO archive_state AS s (stream, last_entry_id, updated_at)
SELECT b.stream, b.last_entry_id, now()
FROM unnest($1::text[], $2::text[]) AS b(stream, last_entry_id)
ON CONFLICT (stream) DO UPDATE
SET last_entry_id = EXCLUDED.last_entry_id, updated_at = EXCLUDED.updated_at
WHERE (split_part(EXCLUDED.last_entry_id, '-', 1)::numeric,
       split_part(EXCLUDED.last_entry_id, '-', 2)::numeric)
    > (split_part(s.last_entry_id, '-', 1)::numeric, split_part(s.last_entry_id, '-', 2)::numeric)
"""
# $1..$15: one array per column of DEAD_LETTER_COLUMNS, in that order, all the same length.
# Returns the status "INSERT 0 <rows newly stored>"; a dead letter already stored is skipped.
_INSERT_DEAD_LETTERS = f"""
INSERT INTO dead_letters ({", ".join(DEAD_LETTER_COLUMNS)})
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::integer[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
    $13::timestamptz[], $14::text[]::jsonb[], $15::text[]::jsonb[])
ON CONFLICT (id) DO NOTHING
"""


def _status_count(status: str) -> int:
    """Rows of a command status like ``INSERT 0 12``."""
    return int(status.rsplit(" ", 1)[-1])


def stream_heads(records: Sequence[tuple[Any, ...]]) -> dict[str, tuple[int, int]]:
    """The highest (entry ms, entry seq) of each stream name among event rows."""
    heads: dict[str, tuple[int, int]] = {}
    for record in records:
        name, position = record[_STREAM], (record[_ENTRY_MS], record[_ENTRY_SEQ])
        if position > heads.get(name, (-1, -1)):
            heads[name] = position
    return heads


def advance_state(records: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """The statement moving ``archive_state`` to the highest entry of each stream among
    event rows, with its arguments."""
    heads = stream_heads(records)
    return (_ADVANCE_STATE, list(heads), [f"{ms}-{seq}" for ms, seq in heads.values()])


async def write_events(
    conn: Any, records: Sequence[tuple[Any, ...]], heads: Mapping[str, tuple[int, int]]
) -> int:
    """Store event rows in the old layout (``events``, before schema 6; the archive bench
    compares against it) and move ``archive_state`` to ``heads`` in one transaction;
    return how many rows were new.

    COPY straight into ``events`` (one write per row); only when some rows are there
    already (a batch retried after a crash) go through a temporary table and
    ``INSERT … ON CONFLICT DO NOTHING``, which writes every row twice."""
    state = (_ADVANCE_STATE, list(heads), [f"{ms}-{seq}" for ms, seq in heads.values()])
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("events", records=records, columns=EVENT_COLUMNS)
            await conn.execute(*state)
        inserted = len(records)
    except asyncpg.UniqueViolationError:
        async with conn.transaction():
            await conn.execute(_CREATE_INCOMING)
            await conn.copy_records_to_table(
                "events_incoming", records=records, columns=EVENT_COLUMNS
            )
            inserted = _status_count(await conn.execute(_INSERT_EVENTS))
            await conn.execute(*state)
    log.debug("events archived", batch=len(records), new=inserted)
    return inserted


async def write_dead_letters(conn: Any, letters: Sequence[DeadLetter]) -> int:
    """Store dead letters; return how many were new (one already stored is skipped)."""
    columns = [list(column) for column in zip(*map(dead_letter_record, letters), strict=True)]
    return _status_count(await conn.execute(_INSERT_DEAD_LETTERS, *columns))
