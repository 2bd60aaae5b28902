"""Events and dead letters as archive rows and back; entry ids and paging cursors.

PostgreSQL text and jsonb cannot hold the NUL character, which Redis strings and JSON
(``\\u0000``) can: one such event would fail its whole batch again and again, so NUL is
stored as U+FFFD (with a warning) rather than blocking the archive.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog

from bus.archive.errors import CursorError
from bus.dlq import DeadLetter
from bus.entry_id import EntryId
from bus.event import TYPE_RE, Event
from bus.keys import Keys
from bus.wire import FIELDS, data_too_long, encode_data, is_text

log = structlog.get_logger("bus.archive")

#: Columns the archiver writes, in the order of :func:`event_record`.
EVENT_COLUMNS = (
    "id", "type", "source", "data", "correlation_id", "causation_id",
    "version", "key", "created_at", "stream", "entry_ms", "entry_seq",
)  # fmt: skip
#: The select list every read uses; :func:`row_event` reads these names.
SELECT_COLUMNS = ", ".join(EVENT_COLUMNS)
#: Columns of ``dead_letters`` written by :func:`dead_letter_record`, in its order.
DEAD_LETTER_COLUMNS = (
    "id", "event_id", "type", "reason", "error", "traceback", "attempts", "group_name",
    "consumer", "handler", "stream", "entry_id", "failed_at", "entry", "raw",
)  # fmt: skip
_BIGINT_MAX = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_NUL = "\x00"
_REPLACEMENT = "\ufffd"
_WIRE_NAMES = list(FIELDS)


def nul_free(value: str) -> str:
    """The text with NUL (which PostgreSQL text cannot hold) as U+FFFD."""
    return value.replace(_NUL, _REPLACEMENT) if _NUL in value else value


def _opt_text(value: str | None) -> str | None:
    return None if value is None else nul_free(value)


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return nul_free(value)
    if isinstance(value, Mapping):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nul(v) for v in value]
    return value


def json_text(value: Mapping[str, Any], what: str) -> str:
    """Compact JSON for a jsonb column (asyncpg takes jsonb as text), NUL replaced."""
    raw = encode_data(value)
    if b"\\u0000" in raw:  # rare: only then walk the value (may also be an escaped backslash)
        cleaned = encode_data(_without_nul(value))
        if cleaned != raw:
            log.warning("NUL characters stored as U+FFFD: jsonb cannot hold them", what=what)
            raw = cleaned
    return raw.decode()


def _stored_entry_id(entry_id: str) -> EntryId:
    """The full ``"<ms>-<seq>"`` id of a stored entry; ValueError for anything else, or for
    a part the archive's bigint columns cannot hold."""
    parsed = EntryId.parse(entry_id, require_seq=True)
    if max(parsed) > _BIGINT_MAX:
        raise ValueError(f"entry id {entry_id!r} is beyond what the archive stores (2^63-1)")
    return parsed


def entry_bound(entry_id: str, *, upper: bool) -> tuple[int, int]:
    """An entry id used as an exclusive bound; parts beyond the archive's 2^63-1 are capped.

    ``ms`` alone excludes that whole millisecond: it reads as ``ms-<max>`` for a lower
    bound (after it) and ``ms-0`` for an upper bound (before it). ValueError for text that
    is not an entry id (see :meth:`EntryId.parse`).
    """
    ms, seq = EntryId.parse(entry_id)
    if not upper and "-" not in entry_id:  # ms alone, parsed as ms-0
        seq = _BIGINT_MAX
    return min(ms, _BIGINT_MAX), min(seq, _BIGINT_MAX)


def as_utc(moment: datetime) -> datetime:
    """A timestamp with a zone: naive ones are taken as UTC, as the wire format reads them."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def event_record(event: Event, stream_name: str) -> tuple[Any, ...]:
    """The row of an event read from Redis, in :data:`EVENT_COLUMNS` order."""
    if event.entry_id is None:
        raise ValueError(
            f"{event!r} has no entry id: the archive stores events read from a stream; "
            "publish it first"
        )
    ms, seq = _stored_entry_id(event.entry_id)
    return (
        nul_free(event.id),
        event.type,
        nul_free(event.source),
        json_text(event.data, f"event {event.id} data"),
        _opt_text(event.correlation_id),
        _opt_text(event.causation_id),
        event.version,
        _opt_text(event.key),
        as_utc(event.timestamp),
        nul_free(stream_name),
        ms,
        seq,
    )


def entry_record(
    stream_name: str, entry_id: str, fields: list[str], max_data_bytes: int | None = None
) -> tuple[Any, ...] | None:
    """The row of a stream entry written by our publisher, straight from its flat
    ``[name, value, ...]`` fields: no :class:`Event` is built and ``data`` is stored as
    sent (jsonb normalises it). This is the archiver's fast path; it returns None for any
    other entry (another field set, a NUL, anything unusual), which then goes through
    :func:`bus.wire.decode` and :func:`event_record` and is stored, or refused, as there.
    """
    if fields[0::2] != _WIRE_NAMES:
        return None
    wire, id_, type_, source, ts, correlation, causation, version, key, data = fields[1::2]
    if (
        wire != "1"
        or len(id_) != 36
        or not source
        or not ts
        or not version.isdigit()
        or not TYPE_RE.match(type_)
        or _NUL in (text := id_ + source + correlation + causation + key)
        or not is_text(text)
        or "\\u0000" in data
        or (max_data_bytes is not None and data_too_long(data, max_data_bytes))
    ):
        return None
    try:
        if type(orjson.loads(data)) is not dict:
            return None
        created = datetime.fromisoformat(ts)
        ms, seq = _stored_entry_id(entry_id)
    except ValueError:  # orjson.JSONDecodeError is one too
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return (
        id_, type_, source, data, correlation or None, causation or None, int(version),
        key or None, created, stream_name, ms, seq,
    )  # fmt: skip


def record_event(record: tuple[Any, ...], keys: Keys) -> Event:
    """The event of an archive record (:data:`EVENT_COLUMNS` order, stream by name), as it
    was read from Redis."""
    id_, type_, source, data, correlation, causation, version, key, created, stream, ms, seq = (
        record
    )
    return Event(
        type=type_,
        data=orjson.loads(data),
        source=source,
        id=id_,
        correlation_id=correlation,
        causation_id=causation,
        timestamp=created,
        version=version,
        key=key,
        stream=keys.stream(stream),
        entry_id=f"{ms}-{seq}",
    )


def _parse_time(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def dead_letter_record(letter: DeadLetter) -> tuple[Any, ...]:
    """The row of a dead letter, in :data:`DEAD_LETTER_COLUMNS` order."""
    head = (letter.id, letter.event_id, letter.type, letter.reason, letter.error, letter.traceback)
    tail = (letter.group, letter.consumer, letter.handler, letter.stream, letter.entry_id)
    return (
        *map(nul_free, head),
        letter.attempts,
        *map(nul_free, tail),
        _parse_time(letter.failed_at),
        json_text(dict(letter.fields), f"dead letter {letter.id} entry"),
        orjson.dumps(list(letter.raw)).decode() if letter.raw else None,
    )


def encode_cursor(created_at: datetime, event_id: str) -> str:
    """An opaque cursor for "after this (created_at, id)"."""
    micros = (created_at - _EPOCH) // _MICROSECOND
    return base64.urlsafe_b64encode(f"{micros}/{event_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a cursor stands for; :class:`CursorError` if it is not one."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        micros, sep, event_id = text.partition("/")
        if not sep or not event_id:
            raise ValueError(text)
        return _EPOCH + int(micros) * _MICROSECOND, event_id
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        raise CursorError(
            f"{cursor!r} is not a cursor returned by query(): pass the one the previous page "
            "returned, or none for the first page"
        ) from None
