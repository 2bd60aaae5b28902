"""Reading events from blocks (schema 6): by id, by correlation, by time, and in entry order.

Every function takes a connection and returns archive records (``EVENT_COLUMNS`` order,
stream by name), as :mod:`bus.archive.legacy_reads` does for the old layout. Heads find
events by time, type and source; the rows themselves come from the blocks, inflating only
the 16-row segments that hold them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from bus.archive.block_codec import (
    ROWS_PER_BLOCK,
    BlockDataError,
    decode_block,
    is_canonical,
    uuid_bytes,
)
from bus.archive.block_writes import SPAN_MS, v7_window_ms
from bus.archive.dictionaries import Dictionaries
from bus.archive.errors import ArchiveDataError
from bus.archive.partitions import day_of
from bus.archive.rows import entry_bound

_MS = timedelta(milliseconds=1)
_DAY = timedelta(days=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BLOCK = "block, stream, ids, correlations, body, dict_id"
_STREAM, _ENTRY_MS, _ENTRY_SEQ, _CREATED, _ID, _CORR = 9, 10, 11, 8, 0, 4

# $1: event id (its 16 bytes), $2/$3: created_at window, $4/$5: the days' bounds of the window.
# Returns the block holding the event and the event's position in it, or no row. (LATERAL
# with LIMIT keeps the generic plan a nested loop: a head or two, one block each.)
_GET = f"""
SELECT h.loc & 31 AS pos, {", ".join("b." + c for c in _BLOCK.split(", "))}
FROM event_heads h CROSS JOIN LATERAL (
    SELECT {_BLOCK} FROM event_blocks
    WHERE block = h.loc >> 5 AND created_from >= $4 AND created_from < $5 LIMIT 1) b
WHERE h.created_at >= $2 AND h.created_at < $3
  AND substring(b.ids FROM (h.loc & 31) * 16 + 1 FOR 16) = $1
LIMIT 1
"""
# $1: a value, $2: its kind ('i' event id, 'c' correlation id). Returns the heads of the
# events it names.
_ODD = "SELECT created_at, loc FROM event_odd_ids WHERE value = $1 AND kind = $2"
# $1: block ids (int[]), $2/$3: their day's bounds. Returns the blocks.
_BLOCKS = f"""
SELECT {_BLOCK} FROM event_blocks
WHERE block = ANY($1::integer[]) AND created_from >= $2 AND created_from < $3
"""
# $1: correlation id (uuid). Returns every block holding an event of that correlation.
_CORRELATED = f"SELECT {_BLOCK} FROM event_blocks WHERE correlations @> ARRAY[$1::uuid]"
# $1: stream name, $2: the lowest first entry ms a block after the position may have,
# $3/$4: the position (ms, seq), exclusive, $5/$6: the upper bound (ms, seq), exclusive,
# $7: how many blocks. Returns blocks that may hold entries between, by first entry.
_AFTER = f"""
SELECT {_BLOCK}, first_ms, first_seq FROM event_blocks
WHERE stream = $1 AND first_ms >= $2 AND (last_ms, last_seq) > ($3, $4)
  AND (first_ms, first_seq) < ($5, $6)
ORDER BY first_ms, first_seq LIMIT $7
"""
# <heads>: a heads statement (heads_sql) and its parameters. Returns, per block, the
# chosen heads in it (created, locs) and the block (NULL columns if it is missing).
# Also returns how many kinds are numbered (in the same snapshot as the heads): a row
# even when no head is found.
_WITH_BLOCKS = f"""
WITH kc AS (SELECT count(*) AS kinds FROM event_kinds),
h AS MATERIALIZED (<heads>),
x AS (
    SELECT loc >> 5 AS block, min(created_at) AS at, array_agg(created_at) AS created,
           array_agg(loc) AS locs
    FROM h GROUP BY loc >> 5, date_trunc('day', created_at, 'UTC'))
SELECT kc.kinds, x.created, x.locs, b.block, b.stream, b.ids, b.correlations, b.body,
       b.dict_id
FROM kc LEFT JOIN (x LEFT JOIN LATERAL (
    SELECT {_BLOCK} FROM event_blocks
    WHERE block = x.block AND created_from >= date_trunc('day', x.at, 'UTC')
      AND created_from < date_trunc('day', x.at, 'UTC') + interval '1 day'
    LIMIT 1) b ON true) ON true
"""
_NO_END = (2**63 - 1, 2**63 - 1)


def day_bounds(first: datetime, last: datetime) -> tuple[datetime, datetime]:
    """[midnight UTC of ``first``'s day, midnight after ``last``'s day)."""
    start = datetime.combine(day_of(first), time(), UTC)
    return start, datetime.combine(day_of(last), time(), UTC) + _DAY


async def _fetch(conn: Any, dicts: Dictionaries, sql: str, *args: Any) -> list[Any]:
    """Blocks selected by ``sql``, their dictionaries at hand."""
    blocks = await conn.fetch(sql, *args)
    await dicts.load(conn, {block["dict_id"] for block in blocks if block["block"] is not None})
    return list(blocks)


def _decode(
    dicts: Dictionaries,
    block: Any,
    positions: Iterable[int] | None = None,
    correlation: str | None = None,
) -> dict[int, tuple[Any, ...]]:
    try:
        rows = decode_block(
            block["ids"],
            block["correlations"],
            block["body"],
            dicts.reader(block["dict_id"]),
            positions=positions,
            correlation=correlation,
            stream=block["stream"],
        )
    except BlockDataError as exc:
        raise ArchiveDataError(f"block {block['block']} is damaged: {exc}") from None
    return rows


async def rows_at(
    conn: Any, dicts: Dictionaries, heads: Sequence[tuple[datetime, int]]
) -> list[tuple[Any, ...]]:
    """The records at these heads ((created_at, loc)), in the heads' order."""
    wanted: dict[date, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for created, loc in heads:
        wanted[day_of(created)][loc >> 5].add(loc & (ROWS_PER_BLOCK - 1))
    found: dict[int, tuple[Any, ...]] = {}
    for day, blocks in wanted.items():
        start = datetime.combine(day, time(), UTC)
        for block in await _fetch(conn, dicts, _BLOCKS, list(blocks), start, start + _DAY):
            number = block["block"]
            for pos, row in _decode(dicts, block, blocks[number]).items():
                found[number * ROWS_PER_BLOCK + pos] = row
    return [found[loc] for _, loc in heads if loc in found]


async def get(conn: Any, dicts: Dictionaries, event_id: str) -> tuple[Any, ...] | None:
    """The record of the event with this id, or None."""
    ms = v7_window_ms(event_id)
    if ms is not None:
        low, high = _EPOCH + (ms - 1) * _MS, _EPOCH + (ms + 2) * _MS
        wanted = uuid_bytes(event_id)  # a v7 id is canonical
        found = await _fetch(conn, dicts, _GET, wanted, low, high, *day_bounds(low, high))
        if found:
            return _decode(dicts, found[0], [found[0]["pos"]])[found[0]["pos"]]
    odd = [(r["created_at"], r["loc"]) for r in await conn.fetch(_ODD, event_id, b"i")]
    found = [row for row in await rows_at(conn, dicts, odd) if row[_ID] == event_id]
    return min(found, key=lambda row: row[_CREATED]) if found else None


async def trace(conn: Any, dicts: Dictionaries, correlation_id: str) -> list[tuple[Any, ...]]:
    """The root event (id = correlation_id) and every event correlated with it, unordered."""
    found: dict[tuple[str, int, int], tuple[Any, ...]] = {}
    if is_canonical(correlation_id):
        for block in await _fetch(conn, dicts, _CORRELATED, correlation_id):
            for row in _decode(dicts, block, correlation=correlation_id).values():
                if row[_CORR] == correlation_id:
                    found[row[_STREAM], row[_ENTRY_MS], row[_ENTRY_SEQ]] = row
    else:
        odd = [(r["created_at"], r["loc"]) for r in await conn.fetch(_ODD, correlation_id, b"c")]
        for row in await rows_at(conn, dicts, odd):
            found[row[_STREAM], row[_ENTRY_MS], row[_ENTRY_SEQ]] = row
    root = await get(conn, dicts, correlation_id)
    if root is not None:
        found[root[_STREAM], root[_ENTRY_MS], root[_ENTRY_SEQ]] = root
    return list(found.values())


#: The most kinds a query reads each in time order; beyond, one scan by time checks them.
MERGED_KINDS = 64


def heads_sql(
    kind_ids: Sequence[int] | None,
    *,
    since: datetime | None,
    until: datetime | None,
    bound: tuple[str, datetime] | None,
    limit: int,
    by_time: bool = False,
) -> tuple[str, list[Any]]:
    """The statement selecting heads (``created_at, loc``) by created_at, and its
    arguments: kinds among ``kind_ids`` (None: any), ``since`` inclusive, ``until``
    exclusive, ``bound`` an (operator, time) on created_at, ``limit`` rows.

    One kind is an ordered scan of (kind_id, created_at); a few are one such scan each,
    merged (``UNION ALL`` under ``ORDER BY``: a Merge Append reading each only as far as
    needed); PostgreSQL 15 scans no index in order for ``kind_id = ANY(...)``. Many kinds,
    or ``by_time`` (they are common: bus.archive.kind_shares), are one scan by time that
    keeps the heads of those kinds.
    """
    args: list[Any] = []

    def param(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    times = []
    if since is not None:
        times.append(f"created_at >= {param(since)}")
    if until is not None:
        times.append(f"created_at < {param(until)}")
    if bound is not None:
        times.append(f"created_at {bound[0]} {param(bound[1])}")
    end = f" ORDER BY created_at LIMIT {param(limit)}"  # the last parameter: the limit
    if kind_ids is not None and 1 < len(kind_ids) <= MERGED_KINDS and not by_time:
        each = [
            f"(SELECT created_at, loc FROM event_heads"
            f" WHERE {' AND '.join([f'kind_id = {param(kind)}', *times])}{end})"
            for kind in kind_ids
        ]
        return " UNION ALL ".join(each) + end, args
    if kind_ids is not None and not kind_ids:
        times.append("FALSE")
    elif kind_ids is not None and len(kind_ids) == 1:
        times.append(f"kind_id = {param(kind_ids[0])}")
    elif kind_ids is not None:
        times.append(f"kind_id = ANY({param(list(kind_ids))}::smallint[])")
    return (
        f"SELECT created_at, loc FROM event_heads WHERE {' AND '.join(times) or 'TRUE'}{end}",
        args,
    )


class KindsChanged(Exception):
    """Kinds were numbered since the caller chose which to read: choose again."""


async def scan(
    conn: Any,
    dicts: Dictionaries,
    *,
    select: Callable[[tuple[str, datetime] | None, int], tuple[str, list[Any]]],
    start: datetime | None,
    keep: Callable[[tuple[Any, ...]], bool],
    chunk: int,
    kinds: int | None = None,
) -> AsyncGenerator[list[tuple[Any, ...]]]:
    """Records in (created_at, id) order, in batches, from ``start`` (inclusive) on.

    ``select(bound, limit)`` gives the heads statement (:func:`heads_sql` with the query's
    own conditions). ``keep`` checks each record (a type or source the heads only
    approximate). A batch holds only whole instants: the heads of the last created_at of a
    full chunk wait for the next one, so equal times are ordered by id across batches too.
    ``kinds``: how many kinds the choice of kinds in ``select`` knew of; if the first read
    finds another count, :class:`KindsChanged` is raised before anything is yielded.
    """
    bound = None if start is None else (">=", start)
    while True:
        sql, args = select(bound, chunk)
        found = await _fetch(conn, dicts, _WITH_BLOCKS.replace("<heads>", sql), *args)
        if kinds is not None and found[0]["kinds"] != kinds:
            raise KindsChanged
        kinds = None  # checked once: a query reads one choice of kinds
        found = [row for row in found if row["created"] is not None]
        heads = [head for row in found for head in zip(row["created"], row["locs"], strict=True)]
        full = len(heads) == chunk
        last = max(created for created, _ in heads) if heads else None
        if full and all(created == last for created, _ in heads):
            chunk *= 2  # one instant fills the chunk: read more of it
            continue
        rows = []
        for block in found:
            positions = [
                loc & (ROWS_PER_BLOCK - 1)
                for created, loc in zip(block["created"], block["locs"], strict=True)
                if not full or created != last
            ]
            if positions and block["block"] is not None:
                rows += [row for row in _decode(dicts, block, positions).values() if keep(row)]
        rows.sort(key=lambda row: (row[_CREATED], row[_ID]))
        yield rows
        if not full or last is None:
            return
        bound = (">=", last)  # the instant held back, read whole next time


async def entries(
    conn: Any,
    dicts: Dictionaries,
    stream: str,
    *,
    after: str | None,
    before: str | None,
    keep: Callable[[tuple[Any, ...]], bool],
    limit: int,
) -> list[tuple[Any, ...]]:
    """Records of a stream (by name) strictly between two entry ids, in entry order.

    Blocks are read by their first entry; a block may also hold entries after the first
    of the next one (blocks of one stream can interleave: a batch claimed from a dead
    archiver), so only entries before the first entry of the last block read are taken
    as complete, and reading goes on from there.
    """
    position = (-1, -1) if after is None else entry_bound(after, upper=False)
    end = _NO_END if before is None else entry_bound(before, upper=True)
    out: list[tuple[Any, ...]] = []
    many = max(4, limit // ROWS_PER_BLOCK + 2)
    while len(out) < limit:
        blocks = await _fetch(
            conn, dicts, _AFTER, stream, position[0] - SPAN_MS, *position, *end, many
        )
        if not blocks:
            break
        bound = end
        if len(blocks) == many:
            bound = min(end, (blocks[-1]["first_ms"], blocks[-1]["first_seq"]))
        rows = sorted(
            (row for block in blocks for row in _decode(dicts, block).values()
             if position < (row[_ENTRY_MS], row[_ENTRY_SEQ]) < bound),
            key=lambda row: (row[_ENTRY_MS], row[_ENTRY_SEQ]),
        )  # fmt: skip
        if not rows and bound != end:
            many *= 2  # every entry read lies beyond the last block's first: read more
            continue
        for row in rows:
            position = (row[_ENTRY_MS], row[_ENTRY_SEQ])
            if keep(row):
                out.append(row)
                if len(out) == limit:
                    break
        if bound == end:
            break
    return out
