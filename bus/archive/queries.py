"""SELECTs of archived events, built condition by condition with bind parameters only."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from bus.archive.filters import type_clause
from bus.archive.rows import SELECT_COLUMNS, as_utc, entry_bound

#: (created_at, id): publisher-time order, what query() pages through.
TIME_ORDER = ("created_at", "id")
#: (entry_ms, entry_seq): a stream's entry id order, what replay reads.
ENTRY_ORDER = ("entry_ms", "entry_seq")


class EventSelect:
    """Conditions on ``events`` and their parameters (``$n`` is ``args[n-1]``)."""

    __slots__ = ("args", "conditions")

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.args: list[Any] = []

    def _param(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"

    def types(self, patterns: Sequence[str]) -> EventSelect:
        """Keep events whose type matches one of ``patterns`` (none: every type)."""
        if isinstance(patterns, str):  # one pattern, not a sequence of one-letter ones
            patterns = [patterns]
        if patterns:
            self.conditions.append(type_clause(patterns, self.args))
        return self

    def equals(self, column: str, value: Any) -> EventSelect:
        """Keep events whose ``column`` (a name from our code, never user text) is ``value``."""
        if value is not None:
            self.conditions.append(f"{column} = {self._param(value)}")
        return self

    def time_range(self, since: datetime | None, until: datetime | None) -> EventSelect:
        """Keep events published at or after ``since`` and before ``until`` (naive: UTC)."""
        if since is not None:
            self.conditions.append(f"created_at >= {self._param(as_utc(since))}")
        if until is not None:
            self.conditions.append(f"created_at < {self._param(as_utc(until))}")
        return self

    def entry_range(self, after: str | None, before: str | None) -> EventSelect:
        """Keep entries strictly between two entry ids (see :func:`rows.entry_bound`)."""
        if after is not None:
            ms, seq = entry_bound(after, upper=False)
            self.conditions.append(
                f"(entry_ms, entry_seq) > ({self._param(ms)}, {self._param(seq)})"
            )
        if before is not None:
            ms, seq = entry_bound(before, upper=True)
            self.conditions.append(
                f"(entry_ms, entry_seq) < ({self._param(ms)}, {self._param(seq)})"
            )
        return self

    def sql(
        self, order: tuple[str, str], limit: int, after: tuple[Any, Any] | None = None
    ) -> tuple[str, list[Any]]:
        """The statement and its parameters: rows after the ``after`` position (if any) in
        ``order``, at most ``limit``.

        Parameters: those of the conditions, then the two of ``after``, then the limit.
        Returns rows of :data:`rows.SELECT_COLUMNS` in ``order``.
        """
        page = EventSelect()
        page.conditions, page.args = [*self.conditions], [*self.args]
        if after is not None:
            first, second = (page._param(value) for value in after)
            page.conditions.append(f"({order[0]}, {order[1]}) > ({first}, {second})")
        sql = (
            f"SELECT {SELECT_COLUMNS} FROM events"
            f" WHERE {' AND '.join(page.conditions) or 'TRUE'}"
            f" ORDER BY {order[0]}, {order[1]} LIMIT {page._param(limit)}"
        )
        return sql, page.args
