"""Kinds of events: each (type, source) pair archived, numbered (``event_kinds``).

A head row carries its event's kind as a ``smallint``, and heads are indexed by (kind,
created_at): a query by type reads the kinds of that type, a query by source the kinds of
that source, each in time order, exactly. A pair is numbered the first time it is archived
and keeps its number for good. The numbering has room for 65,535 pairs; past that (a
writer making up a new source for every event), a pair gets :data:`OTHER`: its events are
still stored whole (the block holds both names), and a query reads the ``OTHER`` heads too
and checks each event.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import structlog

from bus.patterns import Pattern

log = structlog.get_logger("bus.archive")

#: The number of every pair the numbering had no room for.
OTHER = -32768
Kind = tuple[str, str]  # (type, source)

# $1: types, $2: sources (text[], same order). Returns (id, type, source) of those numbered.
_LOAD = """
SELECT k.id, k.type, k.source FROM event_kinds k
JOIN unnest($1::text[], $2::text[]) AS w(type, source) ON k.type = w.type AND k.source = w.source
"""
# $1: types, $2: sources (text[], same order). Returns nothing; a pair numbered meanwhile is
# left alone.
_ADD = """
INSERT INTO event_kinds (type, source) SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT DO NOTHING
"""
# No parameters. Returns every kind.
_ALL = "SELECT id, type, source FROM event_kinds"
_ROOM = 65_535  # smallint numbers from -32767 to 32767
_MATCHES_KEPT = 1024  # matching() results kept until the kinds are read again


class Kinds:
    """The numbering of (type, source) pairs, cached for writing."""

    __slots__ = ("_ids", "_known", "_matched")

    def __init__(self) -> None:
        self._ids: dict[Kind, int] = {}
        self._known: list[tuple[int, str, str]] = []
        # (patterns, source): what matching() found among the known kinds
        self._matched: dict[tuple[tuple[str, ...], str | None], tuple[list[int], bool]] = {}

    async def number(self, conn: Any, kinds: Iterable[Kind]) -> dict[Kind, int]:
        """The number of each pair, numbering those never seen (outside any transaction
        of the caller's: a head must never exist before its pair)."""
        wanted = set(kinds)
        missing = [kind for kind in wanted if kind not in self._ids]
        if missing:
            await self._load(conn, missing)
            new = [kind for kind in missing if kind not in self._ids]
            if new:
                await self._add(conn, new)
                await self._load(conn, new)  # ours, or another writer's that won
        return {kind: self._ids.get(kind, OTHER) for kind in wanted}

    @property
    def known(self) -> int:
        """How many kinds :meth:`matching` knows of (compare with the table's count)."""
        return len(self._known)

    async def refresh(self, conn: Any) -> None:
        """Read every kind afresh (other writers number kinds too)."""
        self._known = [(row["id"], row["type"], row["source"]) for row in await conn.fetch(_ALL)]
        self._matched = {}

    def matching(self, patterns: Iterable[Pattern], source: str | None) -> tuple[list[int], bool]:
        """The numbers of the known kinds whose type matches one of ``patterns`` (none:
        any) and whose source is ``source`` (None: any); and whether :data:`OTHER` is
        among them (the numbering is full: then records need checking)."""
        patterns = list(patterns)
        key = (tuple(p.text for p in patterns), source)
        if (cached := self._matched.get(key)) is not None:
            return list(cached[0]), cached[1]
        found = [
            kind
            for kind, type_, kind_source in self._known
            if (source is None or kind_source == source)
            and (not patterns or any(p.matches(type_) for p in patterns))
        ]
        full = len(self._known) >= _ROOM
        result = sorted(found) + ([OTHER] if full else []), full
        if len(self._matched) >= _MATCHES_KEPT:
            self._matched.clear()  # many distinct queries: start over rather than grow
        self._matched[key] = result
        return list(result[0]), full

    async def _load(self, conn: Any, kinds: list[Kind]) -> None:
        types, sources = zip(*kinds, strict=True)
        for row in await conn.fetch(_LOAD, list(types), list(sources)):
            self._ids[row["type"], row["source"]] = row["id"]

    async def _add(self, conn: Any, kinds: list[Kind]) -> None:
        try:
            types, sources = zip(*sorted(kinds), strict=True)
            await conn.execute(_ADD, list(types), list(sources))
            return
        except asyncpg.SequenceGeneratorLimitExceededError:
            pass
        for type_, source in kinds:  # full: number what still fits, one by one
            try:
                await conn.execute(_ADD, [type_], [source])
            except asyncpg.SequenceGeneratorLimitExceededError:
                self._ids[type_, source] = OTHER
                log.warning(
                    "no room left to number an event kind: its events are stored, and "
                    "queries for it read every such event",
                    type=type_,
                    source=source[:200],
                )
