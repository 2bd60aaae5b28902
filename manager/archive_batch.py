"""One archiver batch: entries read from Redis, turned into rows, dead letters and rejects.

Every entry read ends in exactly one of: an event row (``records``, with its ``sources``
entry at the same index), a dead letter to store (``letters``, read from the dead-letter
stream), a reject to dead-letter (``rejects``: it does not decode as an event), or nothing
(deleted from its stream while pending). The batch is acked only once each has landed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from bus.archive.rows import entry_record, event_record, nul_free
from bus.dlq import DeadLetter, DeadLetterReason, parse_dead_letter
from bus.errors import WireFormatError
from bus.keys import ARCHIVER_GROUP, Keys
from bus.wire import TARGET_FIELD, decode, readable

log = structlog.get_logger("manager.archiver")

#: What one read returns: per stream, its entries as (entry id, flat [name, value, ...]
#: fields); the fields are empty for an entry deleted while pending.
Entries = list[tuple[str, list[tuple[str, list[str]]]]]
Record = tuple[Any, ...]


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


def decode_batch(entries: Entries, keys: Keys) -> Batch:
    """Rows for the events (our publisher's entries straight from their fields, others
    through the wire decoder), the dead letters, and the entries that are not events."""
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
            record = entry_record(name, entry_id, fields)
            if record is None:
                try:
                    record = event_record(decode(source.as_dict(), stream, entry_id), name)
                except (WireFormatError, ValueError) as exc:
                    if _retried_for_another_group(source):
                        continue  # its first delivery was dead-lettered by the archiver too
                    reason = exc.reason if isinstance(exc, WireFormatError) else str(exc)
                    batch.rejects.append(Reject(source, DeadLetterReason.MALFORMED, reason))
                    continue
            batch.records.append(record)
            batch.sources.append(source)
    return batch


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
