"""One archiver batch: entries read from Redis, turned into rows, dead letters and rejects.

Every entry read ends in exactly one of: an event row (``records``, with its ``sources``
entry at the same index), a dead letter to store (``letters``, read from the dead-letter
stream), a reject to dead-letter (``rejects``: it does not decode as an event, or it is
older than retention keeps), or nothing (deleted from its stream while pending). The batch
is acked only once each has landed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import structlog

from bus.archive.errors import ArchiveDataError
from bus.archive.partitions import day_of
from bus.archive.rows import EVENT_COLUMNS, entry_record, event_record, nul_free
from bus.dlq import DeadLetter, DeadLetterReason, parse_dead_letter
from bus.errors import WireFormatError
from bus.keys import ARCHIVER_GROUP, Keys
from bus.wire import TARGET_FIELD, decode, format_timestamp, readable

log = structlog.get_logger("manager.archive.archiver")

#: What one read returns: per stream, its entries as (entry id, flat [name, value, ...]
#: fields); the fields are empty for an entry deleted while pending.
Entries = list[tuple[str, list[tuple[str, list[str]]]]]
Record = tuple[Any, ...]
_CREATED_AT = EVENT_COLUMNS.index("created_at")
_NO_PARTITION = "23514"  # check_violation: a row of events fits no partition


@dataclass(frozen=True, slots=True)
class Source:
    """Where a row or a reject came from: its stream key, entry id and flat fields."""

    stream: str
    entry_id: str
    fields: list[str]

    def as_dict(self) -> dict[str, str]:
        """The fields as a mapping (the last value of a name given twice wins, as in
        redis-py's reply parsing)."""
        return dict(zip(self.fields[0::2], self.fields[1::2], strict=False))


@dataclass(frozen=True, slots=True)
class Reject:
    """An entry the archive does not store as an event: it goes to the dead-letter stream."""

    source: Source
    reason: DeadLetterReason
    error: str
    #: Set aside for its timestamp (older than retention keeps), not for its data.
    too_old: bool = False


@dataclass(slots=True)
class Batch:
    """What one read turned into; see the module's docstring."""

    entries: Entries
    records: list[Record] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Rows and dead letters to store."""
        return len(self.records) + len(self.letters)


def decode_batch(entries: Entries, keys: Keys, max_data_bytes: int | None = None) -> Batch:
    """Rows for the events (our publisher's entries straight from their fields, others
    through the wire decoder), the dead letters, and the entries that are not events
    (``data`` over ``max_data_bytes`` among them, as consumers refuse it)."""
    batch = Batch(entries)
    dlq = keys.dead_letters()
    for stream, rows in entries:
        if stream == dlq:
            batch.letters.extend(_letters(rows))
            continue
        name = nul_free(readable(keys.stream_name(stream)))
        for entry_id, fields in rows:
            if not fields:
                continue  # deleted while pending
            source = Source(stream, entry_id, fields)
            if _retried_for_another_group(source):
                # Archived at its first delivery, under its first entry id: only acked.
                continue
            record = entry_record(name, entry_id, fields, max_data_bytes)
            if record is None:
                try:
                    event = decode(
                        source.as_dict(), stream, entry_id, max_data_bytes=max_data_bytes
                    )
                    record = event_record(event, name)
                except (WireFormatError, ValueError) as exc:
                    reason = exc.reason if isinstance(exc, WireFormatError) else str(exc)
                    batch.rejects.append(Reject(source, DeadLetterReason.MALFORMED, reason))
                    continue
            batch.records.append(record)
            batch.sources.append(source)
    return batch


def set_aside_too_old(batch: Batch, oldest_day: date, retention_days: int) -> int:
    """Move the rows of events published before ``oldest_day`` (UTC), the first day
    retention keeps, from ``records`` to ``rejects``; return how many were moved.

    Stored, such an event would land in a partition the retention job drops at its next
    round (the store creates any missing day on demand), so it is dead-lettered instead,
    saying so. An entry retried for another group was archived at its first delivery: it
    is only acked.
    """
    keep: list[int] = []
    moved = 0
    for index, (record, source) in enumerate(zip(batch.records, batch.sources, strict=True)):
        created: datetime = record[_CREATED_AT]
        if day_of(created) >= oldest_day:
            keep.append(index)
        elif not _retried_for_another_group(source):
            error = (
                f"timestamp {format_timestamp(created)} is older than "
                f"archive.retention_days={retention_days}: it would be dropped; fix the "
                "publisher's clock or raise retention_days (the archive keeps "
                f"{oldest_day.isoformat()} UTC on), then retry this dead letter"
            )
            batch.rejects.append(Reject(source, DeadLetterReason.UNARCHIVABLE, error, too_old=True))
            moved += 1
    if len(keep) < len(batch.records):
        batch.records = [batch.records[i] for i in keep]
        batch.sources = [batch.sources[i] for i in keep]
    return moved


def refusal(record: Record, exc: ArchiveDataError) -> str:
    """Why PostgreSQL refused an event's row, for its dead letter: what it said, and for a
    row that fits no partition (its day's was dropped while it was stored) what to do."""
    if exc.sqlstate != _NO_PARTITION:
        return str(exc)
    created = format_timestamp(record[_CREATED_AT])
    return (
        f"timestamp {created} has no partition in the archive: its day's partition was "
        "dropped while the event was stored (by retention on a manager with a smaller "
        "archive.retention_days, or by hand); give every manager on this PostgreSQL the "
        f"same retention_days, then retry this dead letter ({exc})"
    )


def _retried_for_another_group(source: Source) -> bool:
    """A dead letter retried to one group (``target``) that is not the archiver's."""
    target = source.as_dict().get(TARGET_FIELD, "")
    return bool(target) and target.partition("/")[0] != ARCHIVER_GROUP


def _letters(rows: list[tuple[str, list[str]]]) -> list[DeadLetter]:
    letters: list[DeadLetter] = []
    for entry_id, fields in rows:
        if not fields:
            continue
        try:
            letters.append(parse_dead_letter(entry_id, Source("", entry_id, fields).as_dict()))
        except Exception as exc:  # parse_dead_letter is lenient; this would be a bug
            log.error("not archiving a dead letter that does not parse", entry_id=entry_id,
                      error=f"{type(exc).__name__}: {exc}")  # fmt: skip
    return letters
