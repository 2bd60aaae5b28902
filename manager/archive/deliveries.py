"""Delivery records on their way into PostgreSQL's ``deliveries`` (see
:mod:`bus.delivery_records` for how consumers write them, :mod:`bus.archive.deliveries`
for the table).

The outbox relay puts each bot's records on the stream ``<ns>:deliveries`` with ``group``
set to the bot's group; the coordinating manager's :class:`DeliveriesCopier` copies them
with COPY, acking and deleting each entry after the commit. Anything can sit in that
stream (an admin's ``redis-cli``, a bot's own lies about its own group), so every record
is checked: one that is not well formed is dropped alone, counted and logged once per
entry, and holds nothing up.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis

from bus.archive.deliveries import DeliveryRow
from bus.archive.errors import ArchiveDataError
from bus.archive.store import ArchiveStore
from bus.delivery_records import DeliveryOutcome
from bus.keys import GROUP_PREFIX, Keys
from manager.stream_copier import StreamCopier

log = structlog.get_logger("manager.archive.deliveries")

#: The copier's group on the deliveries stream.
DELIVERIES_GROUP = "deliveries-copier"
_OUTCOMES = frozenset(o.value for o in DeliveryOutcome)
_ENTRY_ID_RE = re.compile(r"^\d{1,19}-\d{1,19}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Times outside these bounds (in ms since the epoch) are not a clock's: 2000 to 2200.
_EARLIEST_MS, _LATEST_MS = 946_684_800_000, 7_258_118_400_000
_MOST_TEXT = 200
_FIELDS = 10


class DeliveriesCopier(StreamCopier[DeliveryRow]):
    """Moves the deliveries stream into ``deliveries``; :meth:`run` until cancelled."""

    what = "delivery records"

    def __init__(
        self, redis: Redis, keys: Keys, store: Callable[[], Awaitable[ArchiveStore]]
    ) -> None:
        super().__init__(redis, keys.deliveries(), DELIVERIES_GROUP, store, batch=200)

    def decode(self, entry_id: str, fields: Mapping[Any, Any]) -> list[DeliveryRow]:
        """The well-formed records of one entry; the others are dropped (and logged)."""
        text = {_text(k): v for k, v in fields.items()}
        group = _name(text.get("group"), "group")
        if not group.startswith(GROUP_PREFIX):
            raise ValueError(f"group {group!r} is not a bot's")
        consumer = _name(text.get("consumer"), "consumer")
        items = orjson.loads(text["records"])
        if not isinstance(items, list):
            raise ValueError("records is not a JSON array")
        rows, bad = [], []
        for item in items:
            try:
                rows.append(_row(item, group, consumer))
            except (ValueError, TypeError, OverflowError) as exc:
                bad.append(str(exc))
        if bad:
            self.dropped += len(bad)
            log.error("delivery records not well formed: dropped", entry_id=entry_id,
                      group=group, dropped=len(bad), first_error=bad[0])  # fmt: skip
        return rows

    async def store(self, store: ArchiveStore, records: Sequence[DeliveryRow]) -> None:
        """One COPY; if PostgreSQL refuses the data, row by row, dropping what it refuses."""
        try:
            self.copied += await store.deliveries.copy(records)
            return
        except ArchiveDataError:
            pass
        for row in records:
            try:
                self.copied += await store.deliveries.copy([row])
            except ArchiveDataError as exc:
                self.dropped += 1
                log.error("PostgreSQL refused a delivery record: dropped", error=str(exc),
                          event_id=row.event_id, group=row.group_name)  # fmt: skip


def _row(item: Any, group: str, consumer: str) -> DeliveryRow:
    if not isinstance(item, list) or len(item) != _FIELDS:
        raise ValueError(f"a record is an array of {_FIELDS} values")
    outcome, event_id, created_us, entry_id, attempts, read_ms, done_ms, ran_ms, prev, retry = item
    if outcome not in _OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    if not isinstance(event_id, str):
        raise TypeError("event id is not text")
    event_id = str(uuid.UUID(event_id))
    if not isinstance(entry_id, str) or not _ENTRY_ID_RE.match(entry_id):
        raise ValueError(f"entry id {entry_id!r} is not a stream id")
    if not _int(attempts) or not 0 < attempts < 2**31:  # stored as at most MOST_ATTEMPTS
        raise ValueError(f"attempts {attempts!r} out of range")
    if not (_int(created_us) and _EARLIEST_MS * 1000 <= created_us <= _LATEST_MS * 1000):
        raise ValueError(f"created_at {created_us!r} out of range")
    read_at, done_at = _moment(read_ms), _moment(done_ms)
    if not isinstance(ran_ms, int | float) or isinstance(ran_ms, bool) or not ran_ms >= 0:
        raise ValueError(f"handler_ms {ran_ms!r} is not a duration")
    previous = _name(prev, "previous consumer", empty=True) or None
    if retry not in (0, 1):
        raise ValueError(f"retry {retry!r} is not 0 or 1")
    return DeliveryRow(
        event_id=event_id,
        created_at=_EPOCH + timedelta(microseconds=created_us),
        group_name=group,
        consumer=consumer,
        outcome=outcome,
        attempts=attempts,
        entry_id=entry_id,
        read_at=read_at,
        done_at=done_at,
        handler_ms=min(float(ran_ms), 3.0e38),
        previous=previous,
        retry=bool(retry),
    )


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _moment(ms: Any) -> datetime:
    if (
        isinstance(ms, bool)
        or not isinstance(ms, int | float)
        or not (_EARLIEST_MS <= ms <= _LATEST_MS)
    ):
        raise ValueError(f"time {ms!r} is not milliseconds since the epoch")
    return _EPOCH + timedelta(milliseconds=ms)


def _name(value: Any, what: str, *, empty: bool = False) -> str:
    text = _text(value) if isinstance(value, str | bytes) else None
    if text is None or (not text and not empty):
        raise ValueError(f"{what} missing")
    if len(text) > _MOST_TEXT or "\x00" in text:
        raise ValueError(f"{what} {text[:40]!r}… is not a name")
    return text


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")  # UnicodeDecodeError is a ValueError
    return str(value)
