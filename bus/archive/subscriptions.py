"""What each bot subscribes to, stored for the coordinator and the API: (pattern, conditions)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from bus.archive.rows import json_text
from bus.conditions import Where
from bus.patterns import Pattern

# $1: subscriber. Returns nothing.
_DELETE = "DELETE FROM event_subscriptions WHERE subscriber = $1"
# $1: subscriber, $2: patterns (text[]), $3: their conditions as JSON (text[], same order).
# Returns nothing.
_INSERT = """
INSERT INTO event_subscriptions (subscriber, pattern, conditions)
SELECT $1, p, c::jsonb FROM unnest($2::text[], $3::text[]) AS s(p, c)
"""
# $1: subscriber. Returns (pattern, conditions as JSON text) rows by pattern.
_SELECT = """
SELECT pattern, conditions FROM event_subscriptions WHERE subscriber = $1 ORDER BY pattern
"""


async def replace_subscriptions(
    conn: Any, subscriber: str, subscriptions: Iterable[tuple[str, Mapping[str, Any] | None]]
) -> int:
    """Replace ``subscriber``'s rows in one transaction; return how many it has now.

    Patterns and conditions are checked first (``SubscriptionError``, nothing written); a
    repeated pattern keeps its last conditions; None conditions are stored as ``{}``.
    """
    rows: dict[str, str] = {}
    for pattern, conditions in subscriptions:
        Pattern(pattern)
        rows[pattern] = json_text(Where(conditions or {}).to_json(), "subscription")
    async with conn.transaction():
        await conn.execute(_DELETE, subscriber)
        await conn.execute(_INSERT, subscriber, list(rows), list(rows.values()))
    return len(rows)


async def load_subscriptions(conn: Any, subscriber: str) -> list[tuple[str, dict[str, Any]]]:
    """``subscriber``'s stored (pattern, conditions), by pattern."""
    rows = await conn.fetch(_SELECT, subscriber)
    return [(row["pattern"], orjson.loads(row["conditions"])) for row in rows]
