"""Writing events as blocks (schema 6): each stream's new entries cut into blocks of up to
32, one head row per event, and the stream's archived position, in one transaction.

Idempotent like the old row-per-event insert: the transaction locks each stream's
``archive_state`` row, and only entries at or below the stream's archived position (a batch
stored before and read again, or another archiver's, claimed) are looked for among what is
stored; entries above it cannot be there. So the common case costs no lookup at all.

A block holds entries of one stream, one UTC day of ``created_at`` (its partition) and at
most :data:`SPAN_MS` of entry time, so replay finds every block that can hold entries after
a position by looking that far back (bus.archive.block_reads).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import date
from typing import Any, NamedTuple

import structlog

from bus.archive import legacy_reads
from bus.archive.block_codec import (
    ROWS_PER_BLOCK,
    BlockDataError,
    Pack,
    decode_block,
    encode_block,
    is_canonical,
    micros,
)
from bus.archive.dictionaries import Dictionaries
from bus.archive.errors import ArchiveDataError
from bus.archive.names import Kinds
from bus.archive.partitions import day_of

log = structlog.get_logger("bus.archive")

#: The most entry time (ms) one block spans.
SPAN_MS = 60_000
_DATA_EXCEPTION = "22000"
_ID, _TYPE, _SOURCE, _CORR, _CREATED, _STREAM, _MS, _SEQ = 0, 1, 2, 4, 8, 9, 10, 11

# $1: stream names (text[]). Returns nothing. Gives each stream a state row to lock.
_ENSURE_STATE = """
INSERT INTO archive_state (stream, last_entry_id)
SELECT unnest($1::text[]), '0-0' ON CONFLICT (stream) DO NOTHING
"""
# $1: stream names (text[]). Returns (stream, last_entry_id), locked until commit: one
# writer at a time per stream.
_LOCK_STATE = """
SELECT stream, last_entry_id FROM archive_state WHERE stream = ANY($1::text[])
ORDER BY stream FOR UPDATE
"""
# $1: how many. Returns that many new block ids.
_BLOCK_IDS = "SELECT nextval('event_block_ids')::integer AS id FROM generate_series(1, $1)"
# $1: stream name, $2: lowest entry ms any block holding $3-$4.. may start at,
# $3/$4: the lowest entry (ms, seq), $5/$6: the highest. Returns the blocks that may hold
# entries between them.
_NEAR_BLOCKS = """
SELECT ids, correlations, body, dict_id FROM event_blocks
WHERE stream = $1 AND first_ms >= $2 AND (first_ms, first_seq) <= ($5, $6)
  AND (last_ms, last_seq) >= ($3, $4)
"""
_BLOCK_COLUMNS = (
    "block", "created_from", "created_to", "first_ms", "first_seq", "last_ms", "last_seq",
    "n", "dict_id", "stream", "ids", "correlations", "body",
)  # fmt: skip
_HEAD_COLUMNS = ("created_at", "loc", "kind_id")
_ODD_COLUMNS = ("created_at", "loc", "kind", "value")


class Cut(NamedTuple):
    """The rows of one block to be, with the stream's name."""

    stream: str
    rows: list[tuple[Any, ...]]


def parse_entry(text: str) -> tuple[int, int]:
    """An ``archive_state`` position as (ms, seq)."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def v7_window_ms(event_id: str) -> int | None:
    """The millisecond a UUIDv7 id names, or None for any other id."""
    if not is_canonical(event_id) or event_id[14] != "7":
        return None
    return int(event_id[:8] + event_id[9:13], 16)


def found_by_time(event_id: str, created_us: int) -> bool:
    """Whether a lookup by the id's own time finds the event: a UUIDv7 whose millisecond
    is within [-2, +1] ms of ``created_at``'s (bus.archive.block_reads looks there)."""
    ms = v7_window_ms(event_id)
    return ms is not None and ms - 1 <= created_us // 1000 <= ms + 1


def _windows(rows: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """A stream's rows (entry order) in runs of one UTC day spanning at most SPAN_MS."""
    windows: list[list[tuple[Any, ...]]] = []
    current: list[tuple[Any, ...]] = []
    day: date | None = None
    for row in rows:
        row_day = day_of(row[_CREATED])
        if current and (row_day != day or row[_MS] - current[0][_MS] > SPAN_MS):
            windows.append(current)
            current = []
        if not current:
            day = row_day
        current.append(row)
    if current:
        windows.append(current)
    return windows


def _entry(row: tuple[Any, ...]) -> tuple[int, int]:
    return row[_MS], row[_SEQ]


def cut(stream: str, rows: list[tuple[Any, ...]]) -> list[Cut]:
    """A stream's rows (entry order) in blocks of at most 32 rows, one day and SPAN_MS.

    Within each such run the rows are grouped by source and type before they are cut, so
    the events of one source (and of one type) share blocks: a query by source or type
    then inflates a few blocks, not one per event. Each block keeps its rows in entry
    order; blocks of one run interleave in entry order, which replay reads (by each
    block's first entry) as it reads the batches of two archivers.
    """
    blocks: list[Cut] = []
    for window in _windows(rows):
        grouped = sorted(window, key=lambda row: (row[_SOURCE], row[_TYPE]))  # stable
        for start in range(0, len(grouped), ROWS_PER_BLOCK):
            part = sorted(grouped[start : start + ROWS_PER_BLOCK], key=_entry)
            blocks.append(Cut(stream, part))
    return blocks


async def _stored(
    conn: Any, dicts: Dictionaries, stream: str, low: tuple[int, int], high: tuple[int, int]
) -> set[Any]:
    """Entry ids of a stream already archived in [low, high], in either layout."""
    found = await legacy_reads.stored_entries(conn, stream, low, high)
    rows = await conn.fetch(_NEAR_BLOCKS, stream, low[0] - SPAN_MS, *low, *high)
    await dicts.load(conn, {row["dict_id"] for row in rows})
    for row in rows:
        try:
            decoded = decode_block(
                row["ids"], row["correlations"], row["body"], dicts.reader(row["dict_id"])
            )
        except BlockDataError as exc:
            raise ArchiveDataError(f"a stored block of {stream!r} is damaged: {exc}") from None
        found |= {(r[_MS], r[_SEQ]) for r in decoded.values()}
    return found


async def _fresh(
    conn: Any,
    dicts: Dictionaries,
    by_stream: dict[str, list[tuple[Any, ...]]],
    state: dict[str, tuple[int, int]],
) -> list[Cut]:
    """The blocks of the entries not archived yet."""
    blocks: list[Cut] = []
    for stream, rows in sorted(by_stream.items()):
        unique = {(row[_MS], row[_SEQ]): row for row in reversed(rows)}  # first of repeats
        ordered = [unique[position] for position in sorted(unique)]
        archived = state[stream]
        below = [row for row in ordered if (row[_MS], row[_SEQ]) <= archived]
        if below:
            low, high = (below[0][_MS], below[0][_SEQ]), (below[-1][_MS], below[-1][_SEQ])
            stored = await _stored(conn, dicts, stream, low, high)
            ordered = [row for row in ordered if (row[_MS], row[_SEQ]) not in stored]
        blocks += cut(stream, ordered)
    return blocks


def _encode(
    blocks: list[Cut],
    block_ids: list[int],
    kinds: dict[tuple[str, str], int],
    dictionary: tuple[int | None, Pack],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Rows for event_blocks, event_heads and event_odd_ids."""
    block_rows, heads, odd = [], [], []
    for (stream, rows), block in zip(blocks, block_ids, strict=True):
        try:
            encoded = encode_block(rows, dictionary[1])
        except BlockDataError as exc:
            raise ArchiveDataError(str(exc), _DATA_EXCEPTION) from None
        created = [row[_CREATED] for row in rows]
        block_rows.append((
            block, min(created), max(created), rows[0][_MS], rows[0][_SEQ], rows[-1][_MS],
            rows[-1][_SEQ], len(rows), dictionary[0], stream, encoded.ids, encoded.correlations,
            encoded.body,
        ))  # fmt: skip
        for position, row in enumerate(rows):
            loc = block * ROWS_PER_BLOCK + position
            heads.append((row[_CREATED], loc, kinds[row[_TYPE], row[_SOURCE]]))
            if not found_by_time(row[_ID], micros(row[_CREATED])):
                odd.append((row[_CREATED], loc, b"i", row[_ID]))
            if row[_CORR] is not None and not is_canonical(row[_CORR]):
                odd.append((row[_CREATED], loc, b"c", row[_CORR]))
    return block_rows, heads, odd


async def write_blocks(
    conn: Any,
    records: Sequence[tuple[Any, ...]],
    *,
    advance_state: tuple[Any, ...],
    kinds: Kinds,
    dicts: Dictionaries,
) -> int:
    """Store event records (``EVENT_COLUMNS`` order, streams by name) as blocks, and run
    ``advance_state`` (the statement moving ``archive_state``, with its arguments) in the
    same transaction; return how many were new."""
    kind_ids = await kinds.number(conn, {(row[_TYPE], row[_SOURCE]) for row in records})
    dictionary = await dicts.for_writing(conn, records)
    by_stream: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in records:
        by_stream[row[_STREAM]].append(row)
    async with conn.transaction():
        await conn.execute(_ENSURE_STATE, sorted(by_stream))
        locked = await conn.fetch(_LOCK_STATE, sorted(by_stream))
        state = {row["stream"]: parse_entry(row["last_entry_id"]) for row in locked}
        blocks = await _fresh(conn, dicts, by_stream, state)
        if blocks:
            ids = [row["id"] for row in await conn.fetch(_BLOCK_IDS, len(blocks))]
            block_rows, heads, odd = _encode(blocks, ids, kind_ids, dictionary)
            await conn.copy_records_to_table(
                "event_blocks", records=block_rows, columns=_BLOCK_COLUMNS
            )
            await conn.copy_records_to_table("event_heads", records=heads, columns=_HEAD_COLUMNS)
            if odd:
                await conn.copy_records_to_table("event_odd_ids", records=odd, columns=_ODD_COLUMNS)
        await conn.execute(*advance_state)
    stored = sum(len(block.rows) for block in blocks)
    log.debug("events archived", batch=len(records), new=stored, blocks=len(blocks))
    return stored
