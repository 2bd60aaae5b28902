"""Delivery records in PostgreSQL (``deliveries``): what each group did with each event.

Consumers report their outcomes with their acks (:mod:`bus.delivery_records`); the
coordinator copies them here with COPY (:mod:`manager.archive.deliveries`). A row is one outcome
of one delivery: ``handled``, ``dead_lettered``, ``skipped`` (by ``where`` conditions) or
``retried`` (left pending, delivered again). The table is partitioned by the event's day,
like ``events``, and dropped with it.

Which groups *should* have received an event follows from ``subscription_history`` at the
event's ``created_at``: :meth:`Deliveries.trail` lists each of them with its outcomes, or as
expected and not handled. A dead letter in ``dead_letters`` counts as the group's outcome
too (it has the DLQ id, and poison entries are dead-lettered without a delivery record).
A copy repeated after a crash between commit and ack stores a row twice; every read here
takes distinct rows, so a repeat never shows.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from bus.archive import partitions
from bus.keys import GROUP_PREFIX

Connect = Callable[[], contextlib.AbstractAsyncContextManager[Any]]

#: The outcomes that end a group's part in an event.
FINAL = ("handled", "dead_lettered", "skipped")

COLUMNS = (
    "created_at", "done_at", "event_id", "handler_ms", "held_ms", "attempts", "retry", "bot",
    "outcome", "consumer", "entry_id", "previous",
)  # fmt: skip
#: The most a smallint ``attempts`` holds.
MOST_ATTEMPTS = 32767

# $1: event id (uuid), $2: its created_at. Returns its delivery rows, each once, in order.
_TRAIL = """
SELECT DISTINCT bot, consumer, outcome, attempts, entry_id, done_at, held_ms, handler_ms,
       previous, retry
FROM deliveries WHERE event_id = $1 AND created_at = $2
ORDER BY bot, done_at, outcome
"""
# $1: '.' || event type, $2: created_at. Returns the subscribers whose declared patterns
# (as they were at $2) match the type.
_EXPECTED = """
SELECT DISTINCT subscriber FROM subscription_history
WHERE valid_from <= $2 AND (valid_to IS NULL OR valid_to > $2) AND $1 ~ type_regex
ORDER BY subscriber
"""
# $1: event id. Returns its dead letters.
_LETTERS = """
SELECT id, group_name, attempts, reason, error, failed_at, consumer, handler
FROM dead_letters WHERE event_id = $1 ORDER BY id
"""
# $1: since, $2: until (timestamptz). Returns the distinct types of events created then.
_TYPES = "SELECT DISTINCT type FROM event_index WHERE created_at >= $1 AND created_at < $2"
# $1: since, $2: until, $3: types (text[]), $4: the subscriber (bot id), $5: its declared
# patterns' regexes (text[]). Returns how many events of those types created in
# [$1, $2), expected by the subscriber then, its group has no final outcome for. (An
# archived id that is no UUID, which no record can name, is cast to NULL, not an error.)
_MISSED = """
SELECT count(*) FROM event_index e
WHERE e.created_at >= $1 AND e.created_at < $2 AND e.type = ANY($3::text[])
  AND EXISTS (
    SELECT 1 FROM subscription_history s
    WHERE s.subscriber = $4
      AND s.valid_from <= e.created_at AND (s.valid_to IS NULL OR s.valid_to > e.created_at)
      AND '.' || e.type ~ s.type_regex AND s.type_regex = ANY($5::text[]))
  AND NOT EXISTS (
    SELECT 1 FROM deliveries d
    WHERE d.event_id = (CASE WHEN e.id ~* '{uuid}' THEN e.id::uuid END)
      AND d.created_at = e.created_at AND d.bot = $4
      AND d.outcome IN ('handled', 'dead_lettered', 'skipped'))
  AND NOT EXISTS (
    SELECT 1 FROM dead_letters l WHERE l.event_id = e.id AND l.group_name = '{prefix}' || $4)
""".replace("{prefix}", GROUP_PREFIX).replace(
    "{uuid}", "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
)
# $1: since, $2: until. Returns (subscriber, type_regex) of every declaration valid at
# some moment in [$1, $2).
_DECLARED = """
SELECT DISTINCT subscriber, type_regex FROM subscription_history
WHERE valid_from < $2 AND (valid_to IS NULL OR valid_to > $1)
"""
# $1: day (date). Returns nothing. History rows closed before it are of no event kept.
_FORGET_HISTORY = "DELETE FROM subscription_history WHERE valid_to < $1"


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One outcome of one delivery of an event to a group."""

    event_id: str
    created_at: datetime
    group_name: str
    consumer: str
    outcome: str
    attempts: int
    entry_id: str
    read_at: datetime
    done_at: datetime
    handler_ms: float
    previous: str | None = None
    retry: bool = False

    def as_tuple(self) -> tuple[Any, ...]:
        """The row in :data:`COLUMNS` order (for COPY); ValueError for an event id that is
        no UUID or a group that is no bot's."""
        if not self.group_name.startswith(GROUP_PREFIX):
            raise ValueError(f"{self.group_name!r} is not a bot's group")
        held = max(0.0, (self.done_at - self.read_at).total_seconds() * 1000)
        return (
            self.created_at, self.done_at, uuid.UUID(self.event_id), self.handler_ms, held,
            min(self.attempts, MOST_ATTEMPTS), self.retry,
            self.group_name.removeprefix(GROUP_PREFIX), self.outcome, self.consumer,
            self.entry_id, self.previous,
        )  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        """The outcome as JSON-ready values (times in ISO 8601)."""
        return {
            "consumer": self.consumer, "outcome": self.outcome, "attempts": self.attempts,
            "entry_id": self.entry_id, "read_at": self.read_at.isoformat(),
            "done_at": self.done_at.isoformat(), "handler_ms": round(self.handler_ms, 3),
            "previous_consumer": self.previous, "dead_letter_retry": self.retry,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class GroupTrail:
    """What one group did with one event: its outcomes, its dead letters, and whether it
    was expected to receive it (declared a matching subscription at the time)."""

    group: str
    expected: bool
    outcomes: list[DeliveryRow] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``handled``, ``dead_lettered``, ``skipped``, ``pending`` (delivered, no final
        outcome yet) or ``not handled`` (expected, nothing recorded)."""
        finals = [o.outcome for o in self.outcomes if o.outcome in FINAL]
        if self.dead_letters and "handled" not in finals[-1:]:
            return "dead_lettered"
        if finals:
            return finals[-1]
        return "pending" if self.outcomes else "not handled"

    def as_json(self) -> dict[str, Any]:
        """The group's trail as JSON-ready values."""
        return {
            "group": self.group,
            "expected": self.expected,
            "status": self.status,
            "outcomes": [o.as_json() for o in self.outcomes],
            "dead_letters": self.dead_letters,
        }


class Deliveries:
    """Stores and reads delivery records; get it from ``ArchiveStore.deliveries``.

    Every method raises :class:`~bus.archive.errors.ArchiveUnavailableError` when
    PostgreSQL cannot be reached. ``days`` is the store's set of days known to have a
    partition (shared, so a partition is looked for once per store)."""

    def __init__(self, connection: Connect, days: set[date]) -> None:
        self._connection = connection
        self._days = days

    def __repr__(self) -> str:
        return f"<Deliveries partitions_known={len(self._days)}>"

    async def copy(self, rows: Sequence[DeliveryRow]) -> int:
        """Store ``rows`` with one COPY (creating missing day partitions first)."""
        if not rows:
            return 0
        days = {partitions.day_of(row.created_at) for row in rows}
        async with self._connection() as conn:
            if missing := days - self._days:
                await partitions.create_partitions(conn, missing, ("deliveries",))
                self._days |= missing
            await conn.copy_records_to_table(
                "deliveries", records=[row.as_tuple() for row in rows], columns=COLUMNS
            )
        return len(rows)

    async def trail(self, event_id: str, created_at: datetime, event_type: str) -> list[GroupTrail]:
        """Each group that received or should have received the event, with what it did,
        by group name."""
        try:
            key: uuid.UUID | None = uuid.UUID(event_id)
        except ValueError:  # archived under an id no consumer can report on
            key = None
        async with self._connection() as conn:
            rows = [] if key is None else await conn.fetch(_TRAIL, key, created_at)
            expected = await conn.fetch(_EXPECTED, "." + event_type, created_at)
            letters = await conn.fetch(_LETTERS, event_id)
        groups: dict[str, GroupTrail] = {
            f"{GROUP_PREFIX}{row['subscriber']}": GroupTrail(
                f"{GROUP_PREFIX}{row['subscriber']}", expected=True
            )
            for row in expected
        }
        for row in rows:
            group = f"{GROUP_PREFIX}{row['bot']}"
            trail = groups.setdefault(group, GroupTrail(group, False))
            trail.outcomes.append(
                DeliveryRow(
                    event_id=event_id, created_at=created_at, group_name=group,
                    consumer=row["consumer"], outcome=row["outcome"], attempts=row["attempts"],
                    entry_id=row["entry_id"],
                    read_at=row["done_at"] - timedelta(milliseconds=row["held_ms"]),
                    done_at=row["done_at"], handler_ms=row["handler_ms"],
                    previous=row["previous"], retry=row["retry"],
                )
            )  # fmt: skip
        for row in letters:
            trail = groups.setdefault(row["group_name"], GroupTrail(row["group_name"], False))
            trail.dead_letters.append(
                {
                    "dlq_id": row["id"], "attempts": row["attempts"], "reason": row["reason"],
                    "error": row["error"], "consumer": row["consumer"],
                    "handler": row["handler"],
                    "failed_at": row["failed_at"].isoformat() if row["failed_at"] else None,
                }
            )  # fmt: skip
        for trail in groups.values():
            trail.outcomes.sort(key=lambda o: (o.done_at, o.outcome))
        return [groups[name] for name in sorted(groups)]

    async def missed(self, since: datetime, until: datetime) -> dict[str, int]:
        """Per group: the events created in [since, until) it should have received (by
        the subscriptions declared then) and has no final outcome for."""
        async with self._connection() as conn:
            types = [row["type"] for row in await conn.fetch(_TYPES, since, until)]
            declared = await conn.fetch(_DECLARED, since, until)
            by_bot: dict[str, list[str]] = {}
            for row in declared:
                by_bot.setdefault(row["subscriber"], []).append(row["type_regex"])
            missed: dict[str, int] = {}
            for bot, regexes in sorted(by_bot.items()):
                wanted = _matching(types, regexes)
                if wanted:
                    count = int(await conn.fetchval(_MISSED, since, until, wanted, bot, regexes))
                    if count:
                        missed[f"{GROUP_PREFIX}{bot}"] = count
        return missed

    async def forget_history_before(self, day: date) -> int:
        """Drop subscription history rows that ended before ``day`` (retention)."""
        async with self._connection() as conn:
            status = await conn.execute(_FORGET_HISTORY, day)
        return int(str(status).rsplit(" ", 1)[-1])


def _matching(types: Iterable[str], regexes: Sequence[str]) -> list[str]:
    compiled = [re.compile(r) for r in regexes]
    return [t for t in types if any(c.match("." + t) for c in compiled)]
