"""Gathering the evidence of a run from where each party left it.

- confirmed publishes: the load processes' files (``<event id> <wall time>`` per line);
- handled per group: the soak bots' record files (``<bot id>-<pid>.handled``);
- dead letters: the dead-letter stream, and the ``dead_letters`` table for any the stream no
  longer holds;
- archived: the ``events`` table (id and ``stored_at``) for the soak's event types.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
from redis.asyncio import Redis

from bus.keys import group_name
from manager.soak.reconcile import DeadLetterRow, Handling

HANDLED_SUFFIX = ".handled"
LOAD_SUFFIX = ".out"


def read_confirmed(paths: Iterable[Path]) -> dict[str, float]:
    """Event id → confirmation wall time, from the load processes' files."""
    confirmed: dict[str, float] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                confirmed[parts[0]] = float(parts[1])
    return confirmed


def read_handled(records: Path) -> dict[str, list[Handling]]:
    """Group → every handling recorded (in file order per process), from the record files.
    A line cut short by a kill is skipped (each line is one ``write``, so none should be)."""
    handled: dict[str, list[Handling]] = defaultdict(list)
    for path in sorted(records.glob(f"*{HANDLED_SUFFIX}")):
        bot_id = path.name.removesuffix(HANDLED_SUFFIX).rsplit("-", 1)[0]
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit():
                handled[group_name(bot_id)].append(
                    Handling(parts[0], int(parts[1]), float(parts[2]))
                )
    return dict(handled)


@dataclass(frozen=True, slots=True)
class HostileLetter:
    """A dead letter of an entry the hostile fault wrote (matched by stream and entry id)."""

    entry_id: str
    group: str
    reason: str


async def read_dead_letters(redis: Redis, dlq: str, dsn: str | None) -> list[DeadLetterRow]:
    """Every dead letter: the stream's, plus the table's the stream no longer holds."""
    rows: dict[str, DeadLetterRow] = {}
    after = "-"
    while True:
        batch: Any = await redis.xrange(dlq, after, "+", count=10_000)
        for dlq_id, fields in batch:
            rows[str(dlq_id)] = DeadLetterRow(
                str(fields.get("event_id", "")),
                str(fields.get("group", "")),
                str(fields.get("reason", "")),
                str(fields.get("stream", "")),
                str(fields.get("entry_id", "")),
            )
        if len(batch) < 10_000:
            break
        after = f"({batch[-1][0]}"
    if dsn is not None:
        conn = await asyncpg.connect(dsn)
        try:
            table = await conn.fetch(
                "SELECT id, event_id, group_name, reason, stream, entry_id FROM dead_letters"
            )
        finally:
            await conn.close()
        for r in table:
            rows.setdefault(
                r["id"],
                DeadLetterRow(
                    r["event_id"], r["group_name"], r["reason"], r["stream"], r["entry_id"]
                ),
            )
    return list(rows.values())


async def read_archived(dsn: str, types: Iterable[str]) -> dict[str, float]:
    """Event id → ``stored_at`` (epoch seconds) of the archived events of ``types``."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            # $1: the event types; returns (id, stored_at as epoch seconds).
            "SELECT id, extract(epoch FROM stored_at)::float8 AS stored FROM event_index "
            "WHERE type = ANY($1::text[])",
            list(types),
        )
    finally:
        await conn.close()
    return {r["id"]: float(r["stored"]) for r in rows}
