"""The event: what bots publish and handle."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from bus.errors import EventValidationError

#: ``category.entity.action``: 2 to 5 dotted lowercase segments.
TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*){1,4}$")
SOURCE_MAX = 200
KEY_MAX = 200
DEFAULT_MAX_EVENT_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Event:
    """One event. ``stream`` and ``entry_id`` are set on events read from Redis."""

    type: str
    data: Mapping[str, Any]
    source: str
    id: str = field(default_factory=lambda: new_event_id())  # noqa: PLW0108 - defined below
    correlation_id: str | None = None
    causation_id: str | None = None
    timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))
    version: int = 1
    #: Ordering key: events with the same key reach a handler in publish order.
    key: str | None = None
    stream: str | None = None
    entry_id: str | None = None

    def caused(self, type: str, data: Mapping[str, Any], source: str, **kw: Any) -> Event:
        """A new event caused by this one (same correlation chain)."""
        return Event(
            type=type,
            data=data,
            source=source,
            correlation_id=self.correlation_id or self.id,
            causation_id=self.id,
            **kw,
        )

    def with_delivery(self, stream: str, entry_id: str) -> Event:
        """This event as read from ``stream`` at ``entry_id``."""
        return replace(self, stream=stream, entry_id=entry_id)

    def __repr__(self) -> str:
        where = f" entry={self.entry_id}" if self.entry_id else ""
        return f"<Event {self.type} id={self.id} source={self.source}{where}>"


_id_lock = threading.Lock()
_last_ms = 0
_seq = 0


def new_event_id() -> str:
    """A UUIDv7 string (RFC 9562): time-ordered, monotonic within this process."""
    global _last_ms, _seq  # noqa: PLW0603 - process-wide monotonic counter, guarded by the lock
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms, _seq = ms, int.from_bytes(os.urandom(2), "big") & 0x3FF
        else:
            _seq += 1
            if _seq > 0xFFF:  # 4096 ids in one millisecond: borrow the next one
                _last_ms, _seq = _last_ms + 1, 0
            ms = _last_ms
        rand = int.from_bytes(os.urandom(8), "big") & 0x3FFF_FFFF_FFFF_FFFF
        value = (ms << 80) | (0x7 << 76) | (_seq << 64) | (0b10 << 62) | rand
    h = f"{value:032x}"  # str(uuid.UUID(int=value)) without building the object
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def event_time_ms(event_id: str) -> int | None:
    """The millisecond timestamp inside a UUIDv7 id, or None for other UUIDs."""
    try:
        value = uuid.UUID(event_id)
    except ValueError:
        return None
    return value.int >> 80 if value.version == 7 else None


def validate_type(type_: str, field_name: str = "type") -> str:
    """Check an event type is dotted lowercase ``category.entity.action`` (2–5 parts)."""
    if not isinstance(type_, str) or not TYPE_RE.match(type_):
        raise EventValidationError(
            field_name,
            f"{type_!r} is not a valid event type: use 2 to 5 dotted lowercase segments of "
            "letters, digits and underscores, like 'user.message.received'",
        )
    return type_


def validate_source(source: str) -> str:
    """Check the source names its publisher (bot id, ``system`` or ``api:<client>``)."""
    if not isinstance(source, str) or not source or len(source) > SOURCE_MAX:
        raise EventValidationError(
            "source", f"must be a non-empty string of at most {SOURCE_MAX} characters"
        )
    return source


def validate_key(key: str | None) -> str | None:
    """Check an ordering key is a short string (or absent)."""
    if key is not None and (not isinstance(key, str) or not key or len(key) > KEY_MAX):
        raise EventValidationError(
            "key", f"ordering key must be a non-empty string of at most {KEY_MAX} characters"
        )
    return key


def validate_data(data: Any) -> Mapping[str, Any]:
    """Check event data is a JSON object (a mapping with string keys)."""
    if not isinstance(data, Mapping):
        raise EventValidationError(
            "data", f"must be a JSON object (a dict), got {type(data).__name__}"
        )
    return data
