"""Operator actions, kept in PostgreSQL (``audit_log``): who did what, when, with what outcome.

Every write an operator makes through the HTTP API, the control socket or the CLI
(publishing with a token, restarting a bot, retrying, deleting or purging dead letters,
reloading, maintenance, stopping) is one row: the actor (``token:<name>`` for the API,
``user:<name>`` for the OS user of a socket peer or of the CLI, ``signal:SIGHUP``), the
channel (``api``, ``socket``, ``cli``, ``signal``), the action, its target, details,
and the outcome (``ok``, ``refused``, ``failed``, with the error). The manager takes
records through Redis first (``manager.audit``), so a PostgreSQL outage delays them and
loses none; each record's uuid makes a repeated insert a no-op.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson

Outcome = Literal["ok", "refused", "failed"]
Connect = Callable[[], contextlib.AbstractAsyncContextManager[Any]]

_COLUMNS = ("id", "at", "actor", "channel", "action", "target", "detail", "outcome", "error")
# $1..$9: one array per column of _COLUMNS, in order, all the same length. Returns the
# status "INSERT 0 <rows new>"; a record stored already is skipped.
_INSERT = """
INSERT INTO audit_log (id, at, actor, channel, action, target, detail, outcome, error)
SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::jsonb[], $8::text[], $9::text[])
ON CONFLICT (id) DO NOTHING
"""
# $1: since (timestamptz, inclusive), $2: after (at, id) cursor's time or NULL, $3: its id,
# $4: actor or NULL, $5: action prefix or NULL, $6: limit. Oldest first.
_LIST = """
SELECT id, at, actor, channel, action, target, detail, outcome, error FROM audit_log
WHERE at >= $1
  AND ($2::timestamptz IS NULL OR (at, id) > ($2, $3::uuid))
  AND ($4::text IS NULL OR actor = $4)
  AND ($5::text IS NULL OR action LIKE $5 || '%')
ORDER BY at, id
LIMIT $6
"""
_DELETE_BEFORE = "DELETE FROM audit_log WHERE at < $1"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One operator action."""

    at: datetime
    actor: str
    channel: str
    action: str
    target: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    outcome: Outcome = "ok"
    error: str | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def as_json(self) -> dict[str, Any]:
        """The record as JSON-ready values (``at`` in ISO 8601)."""
        return {
            "id": self.id, "at": self.at.isoformat(), "actor": self.actor,
            "channel": self.channel, "action": self.action, "target": self.target,
            "detail": self.detail, "outcome": self.outcome, "error": self.error,
        }  # fmt: skip


class AuditLog:
    """Stores and lists operator actions; get it from ``ArchiveStore.audit``.

    Every method raises :class:`~bus.archive.errors.ArchiveUnavailableError` when
    PostgreSQL cannot be reached."""

    def __init__(self, connection: Connect) -> None:
        self._connection = connection

    def __repr__(self) -> str:
        return "<AuditLog>"

    async def insert(self, records: Sequence[AuditRecord]) -> int:
        """Store ``records`` in one statement; how many were new."""
        if not records:
            return 0
        columns = [
            [uuid.UUID(r.id) for r in records],
            [r.at for r in records],
            [r.actor for r in records],
            [r.channel for r in records],
            [r.action for r in records],
            [r.target for r in records],
            [orjson.dumps(r.detail).decode() for r in records],
            [r.outcome for r in records],
            [r.error for r in records],
        ]
        async with self._connection() as conn:
            status = await conn.execute(_INSERT, *columns)
        return int(str(status).rsplit(" ", 1)[-1])

    async def list(
        self,
        since: datetime,
        *,
        after: tuple[datetime, str] | None = None,
        actor: str | None = None,
        action: str | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Records from ``since`` on, oldest first, after the ``after`` cursor (the last
        record's ``(at, id)``), of ``actor`` only, with ``action`` starting so."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                _LIST, since, after[0] if after else None, after[1] if after else None,
                actor, action, limit,
            )  # fmt: skip
        return [
            AuditRecord(
                id=str(row["id"]),
                at=row["at"],
                actor=row["actor"],
                channel=row["channel"],
                action=row["action"],
                target=row["target"],
                detail=orjson.loads(row["detail"]) if row["detail"] else {},
                outcome=row["outcome"],
                error=row["error"],
            )
            for row in rows
        ]

    async def delete_before(self, cutoff: datetime) -> int:
        """Drop the records older than ``cutoff`` (retention); how many."""
        async with self._connection() as conn:
            status = await conn.execute(_DELETE_BEFORE, cutoff)
        return int(str(status).rsplit(" ", 1)[-1])
