"""Each consumer group's acked position per stream, kept in PostgreSQL (``group_positions``).

A position ``(ms, seq)`` says: the group has acked every entry of the stream at or below
this id. The manager records the positions it sees in Redis; after Redis lost data, the
restore puts each group back at its position and writes back from the archive what it had
not acked, so a group that was behind the archiver loses nothing.

Positions only move forward: a row is changed only by a higher position. A Redis that
came back empty lets a bot recreate its group at ``0`` (or at ``$``) before the restore
ran; recording that must not lose the good position. The price is an operator's
``XGROUP SETID`` back in time (to handle events again): the row keeps the higher position
until the group passes it again, so if Redis is lost during that replay the group resumes
at the higher position (everything below it had been handled once). To have a rewind
survive a loss too, lower the row by hand (``UPDATE group_positions …``).

Rows are never deleted here: a stream missing from Redis is exactly what a loss looks like,
and its rows are what the restore needs. Rows of removed bots or streams stay (one small
row per group and stream) and are used only for groups the config still declares.

Streams are stored by NAME (``user``), as in ``archive_state``; methods accept the key or
the name and return keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from bus.entry_id import EntryId
from bus.keys import Keys

#: The highest value a ``bigint`` column holds. Redis ids are unsigned 64-bit; a part above
#: this is stored as this, which only lowers the position (an entry may be handled again,
#: none is skipped). The archive's own entry columns cannot hold such ids at all.
MAX_PART = 2**63 - 1

# $1: stream names (text[]), $2: group names (text[]), $3: acked ms (bigint[]), $4: acked
# seq (bigint[]), all the same length, each (stream, group) once. Returns the status
# "INSERT 0 <rows written>": rows new or moved forward; a lower or equal position leaves
# its row alone.
_RECORD = """
INSERT INTO group_positions AS p (stream, group_name, acked_ms, acked_seq, updated_at)
SELECT b.stream, b.group_name, b.acked_ms, b.acked_seq, now()
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
    AS b(stream, group_name, acked_ms, acked_seq)
ON CONFLICT (stream, group_name) DO UPDATE
SET acked_ms = EXCLUDED.acked_ms, acked_seq = EXCLUDED.acked_seq,
    updated_at = EXCLUDED.updated_at
WHERE (EXCLUDED.acked_ms, EXCLUDED.acked_seq) > (p.acked_ms, p.acked_seq)
"""
# $1: stream names (text[]). Returns (stream, group_name, acked_ms, acked_seq) rows of them.
_LOAD = """
SELECT stream, group_name, acked_ms, acked_seq FROM group_positions
WHERE stream = ANY($1::text[])
"""
# No parameters. Returns (stream, group_name, acked_ms, acked_seq) rows of every stream.
_LOAD_ALL = "SELECT stream, group_name, acked_ms, acked_seq FROM group_positions"

Connect = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


def clamp(position: tuple[int, int]) -> EntryId:
    """``position`` with each part at most :data:`MAX_PART` (never higher than it was)."""
    ms, seq = position
    if ms > MAX_PART:
        return EntryId(MAX_PART, MAX_PART)
    return EntryId(ms, min(seq, MAX_PART))


class GroupPositions:
    """Reads and records group positions; get it from ``ArchiveStore.group_positions``.

    Every method raises :class:`~bus.archive.errors.ArchiveUnavailableError` when
    PostgreSQL cannot be reached (the connection factory turns asyncpg's errors into it).
    """

    def __init__(self, connection: Connect, keys: Keys) -> None:
        self._connection = connection
        self._keys = keys

    async def record(self, positions: Mapping[tuple[str, str], tuple[int, int]]) -> int:
        """Upsert ``(stream, group) → position`` in one statement; how many rows were
        written (new or moved forward; a position at or below its row's is ignored)."""
        rows: dict[tuple[str, str], EntryId] = {}
        for (stream, group), position in positions.items():
            key = (self._keys.stream_name(stream), group)  # a key and a name may both come
            rows[key] = max(clamp(position), rows.get(key, EntryId(-1, -1)))
        if not rows:
            return 0
        streams, groups = zip(*rows, strict=True)
        ms = [p[0] for p in rows.values()]
        seq = [p[1] for p in rows.values()]
        async with self._connection() as conn:
            status = await conn.execute(_RECORD, list(streams), list(groups), ms, seq)
        return int(str(status).rsplit(" ", 1)[-1])

    async def load(self, streams: Iterable[str] | None = None) -> dict[tuple[str, str], EntryId]:
        """The recorded ``(stream key, group) → position`` of ``streams`` (keys or names;
        None: of every stream)."""
        async with self._connection() as conn:
            if streams is None:
                rows = await conn.fetch(_LOAD_ALL)
            else:
                rows = await conn.fetch(_LOAD, [self._keys.stream_name(s) for s in streams])
        return {
            (self._keys.stream(row["stream"]), str(row["group_name"])): EntryId(
                int(row["acked_ms"]), int(row["acked_seq"])
            )
            for row in rows
        }

    def __repr__(self) -> str:
        return f"<GroupPositions namespace={self._keys.namespace}>"
