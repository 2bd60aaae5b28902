"""Wire format v1: one event is one Redis stream entry of flat string fields.

The contract is documented in ``bus/WIRE_FORMAT.md``; change both together. Every entry we
write carries the same field set in the same order (Redis then stores the field names once
per stream node instead of once per entry).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from bus.entry_id import EntryId
from bus.errors import EventValidationError, WireFormatError
from bus.event import TYPE_RE, Event

WIRE_VERSION = 1
#: Fields of a v1 entry, in the order we write them.
FIELDS = (
    "wire", "id", "type", "source", "timestamp",
    "correlation_id", "causation_id", "version", "key", "data",
)  # fmt: skip
#: Optional fields set when a dead-lettered event is re-delivered to one group.
TARGET_FIELD = "target"
DLQ_LINK_FIELD = "dlq_id"
_ENTRY_NAMESPACE = uuid.UUID("8a3b6b1e-4d0e-4c55-9a53-0f6c1c2f7a01")


def is_text(value: str) -> bool:
    """Whether a field read from Redis was valid UTF-8.

    Our connections decode replies with ``surrogateescape``, so any bytes can be read: a
    byte that is not UTF-8 becomes a lone surrogate, which no valid text contains.
    """
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def readable(value: str) -> str:
    """The text of a field, with bytes that were not UTF-8 shown as U+FFFD."""
    return value if is_text(value) else raw_bytes(value).decode(errors="replace")


def raw_bytes(value: str) -> bytes:
    """The bytes Redis holds for a field read through a ``surrogateescape`` connection."""
    return value.encode(errors="surrogateescape")


def raw_fields(fields: Mapping[str, str]) -> list[str]:
    """An entry's fields exactly as Redis holds them: ``[name, value, …]``, each base64."""
    return [base64.b64encode(raw_bytes(part)).decode() for item in fields.items() for part in item]


def format_timestamp(ts: datetime) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2026-11-26T22:40:01.123456Z``."""
    if ts.tzinfo is not UTC:
        ts = ts.astimezone(UTC)
    return ts.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def encode_data(data: Mapping[str, Any]) -> bytes:
    """The ``data`` field: compact JSON of the event data."""
    try:
        return orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:
        raise EventValidationError("data", f"is not JSON-serialisable: {exc}") from None


def encode(event: Event, data_json: bytes | None = None) -> dict[str, str | bytes]:
    """Stream entry fields of an event (``data_json`` saves a second encoding)."""
    return {
        "wire": "1",
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "timestamp": format_timestamp(event.timestamp),
        "correlation_id": event.correlation_id or "",
        "causation_id": event.causation_id or "",
        "version": str(event.version),
        "key": event.key or "",
        "data": data_json if data_json is not None else encode_data(event.data),
    }


def entry_event_id(stream: str, entry_id: str) -> str:
    """Deterministic event id for an entry written without one (e.g. by ``redis-cli``)."""
    return str(uuid.uuid5(_ENTRY_NAMESPACE, f"{stream}/{entry_id}"))


def entry_time(entry_id: str) -> datetime:
    """The time Redis gave an entry (its id's millisecond part)."""
    return datetime.fromtimestamp(EntryId.ms_of(entry_id) / 1000, UTC)


def _check_text(fields: Mapping[str, str]) -> None:
    # One look at all of it first: almost every entry is ASCII, or else valid text, and a
    # lone surrogate (a byte that was not UTF-8) stays one when joined to the others.
    joined = "".join([*fields, *fields.values()])
    if joined.isascii():
        return
    try:
        joined.encode()
    except UnicodeEncodeError:
        pass
    else:
        return
    for name, value in fields.items():
        if not (is_text(name) and is_text(value)):
            raise WireFormatError(
                f"field {readable(name)!r} is not UTF-8 text: every field name and value must "
                "be (the dead letter keeps the entry's bytes in `raw`)"
            )


def data_too_long(raw_data: str, limit: int) -> bool:
    """Whether ``raw_data`` takes more than ``limit`` bytes in UTF-8 (cheap for short ones)."""
    return len(raw_data) > limit or (
        len(raw_data) * 4 > limit and len(raw_data.encode("utf-8", "surrogateescape")) > limit
    )


def decode(
    fields: Mapping[str, str], stream: str, entry_id: str, *, max_data_bytes: int | None = None
) -> Event:
    """Decode a stream entry; raise :class:`WireFormatError` saying what is wrong.

    ``type``, ``source`` and ``data`` are required; with ``max_data_bytes``, a ``data``
    longer than that (in UTF-8) is refused too, as publishers refuse it. ``id`` defaults
    to a UUID derived from the stream and entry id (the same for every reader);
    ``timestamp`` defaults to the entry id's time; unknown fields are ignored so newer
    producers can add some.
    """
    wire = fields.get("wire", "1")
    if wire != "1":
        raise WireFormatError(
            f"wire version {wire!r} is not understood by this consumer (it reads version "
            f"{WIRE_VERSION}): upgrade multibot on the consumer side"
        )
    _check_text(fields)
    type_ = fields.get("type")
    if not type_ or not TYPE_RE.match(type_):
        raise WireFormatError(f"field 'type' is missing or not a dotted lowercase type: {type_!r}")
    source = fields.get("source")
    if not source:
        raise WireFormatError("field 'source' is missing or empty")
    return Event(
        type=type_,
        data=_data(fields.get("data"), max_data_bytes),
        source=source,
        id=_event_id(fields.get("id") or entry_event_id(stream, entry_id)),
        correlation_id=fields.get("correlation_id") or None,
        causation_id=fields.get("causation_id") or None,
        timestamp=_timestamp(fields.get("timestamp"), entry_id),
        version=_version(fields.get("version") or "1"),
        key=fields.get("key") or None,
        stream=stream,
        entry_id=entry_id,
    )


def _data(raw_data: str | None, max_data_bytes: int | None) -> dict[str, Any]:
    """The ``data`` field: a JSON object within the size limit."""
    if raw_data is None:
        raise WireFormatError("field 'data' is missing")
    if max_data_bytes is not None and data_too_long(raw_data, max_data_bytes):
        size = len(raw_data.encode("utf-8", "surrogateescape"))
        raise WireFormatError(
            f"field 'data' is {size} bytes, over the limit of {max_data_bytes} "
            "(max_event_bytes): publish a reference to large payloads instead, or raise "
            "max_event_bytes and retry this dead letter"
        )
    try:
        data = orjson.loads(raw_data)
    except orjson.JSONDecodeError as exc:
        raise WireFormatError(f"field 'data' is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WireFormatError(f"field 'data' must be a JSON object, got {type(data).__name__}")
    return data


def _event_id(event_id: str) -> str:
    """The ``id`` field: a UUID, in its canonical form when written otherwise."""
    if len(event_id) != 36:
        try:
            event_id = str(uuid.UUID(event_id))
        except ValueError:
            raise WireFormatError(f"field 'id' is not a UUID: {event_id!r}") from None
    return event_id


def _timestamp(raw_ts: str | None, entry_id: str) -> datetime:
    """The ``timestamp`` field (RFC 3339, naive means UTC), else the entry id's time."""
    try:
        timestamp = datetime.fromisoformat(raw_ts) if raw_ts else entry_time(entry_id)
    except ValueError:
        raise WireFormatError(f"field 'timestamp' is not RFC 3339: {raw_ts!r}") from None
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    return timestamp


def _version(raw_version: str) -> int:
    """The ``version`` field: an integer."""
    try:
        return int(raw_version)
    except ValueError:
        raise WireFormatError(f"field 'version' is not an integer: {raw_version!r}") from None
