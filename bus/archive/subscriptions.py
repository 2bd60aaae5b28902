"""What each bot subscribes to, stored for the coordinator and the API: (pattern, conditions),
now (``event_subscriptions``) and over time (``subscription_history``: which groups should
have received an event published at a given moment)."""

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
# $1: subscriber. Returns its open history rows: (pattern, conditions as JSON text).
_OPEN = """
SELECT pattern, conditions::text AS conditions FROM subscription_history
WHERE subscriber = $1 AND valid_to IS NULL
"""
# $1: subscriber, $2: patterns (text[]) no longer declared as they were. Returns nothing.
_CLOSE = """
UPDATE subscription_history SET valid_to = now()
WHERE subscriber = $1 AND valid_to IS NULL AND pattern = ANY($2::text[])
"""
# $1: subscriber, $2: patterns, $3: their regexes, $4: their conditions (text[] each, same
# order). Returns nothing.
_OPEN_NEW = """
INSERT INTO subscription_history (subscriber, pattern, type_regex, conditions, valid_from)
SELECT $1, p, r, c::jsonb, now() FROM unnest($2::text[], $3::text[], $4::text[]) AS s(p, r, c)
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
    regexes: dict[str, str] = {}
    for pattern, conditions in subscriptions:
        regexes[pattern] = Pattern(pattern).regex
        rows[pattern] = json_text(Where(conditions or {}).to_json(), "subscription")
    async with conn.transaction():
        await conn.execute(_DELETE, subscriber)
        await conn.execute(_INSERT, subscriber, list(rows), list(rows.values()))
        await _record_history(conn, subscriber, rows, regexes)
    return len(rows)


async def _record_history(
    conn: Any, subscriber: str, rows: Mapping[str, str], regexes: Mapping[str, str]
) -> None:
    """Close the history rows of patterns withdrawn or changed, open rows for new ones."""
    current = {
        row["pattern"]: orjson.loads(row["conditions"])
        for row in await conn.fetch(_OPEN, subscriber)
    }
    changed = [p for p, c in current.items() if p not in rows or orjson.loads(rows[p]) != c]
    if changed:
        await conn.execute(_CLOSE, subscriber, changed)
    new = [p for p in rows if p not in current or p in changed]
    if new:
        await conn.execute(
            _OPEN_NEW, subscriber, new, [regexes[p] for p in new], [rows[p] for p in new]
        )


async def load_subscriptions(conn: Any, subscriber: str) -> list[tuple[str, dict[str, Any]]]:
    """``subscriber``'s stored (pattern, conditions), by pattern."""
    rows = await conn.fetch(_SELECT, subscriber)
    return [(row["pattern"], orjson.loads(row["conditions"])) for row in rows]
