"""The dead-letter stream: entries no handler could take, with why, and how to retry them."""

from __future__ import annotations

import base64
import binascii
import builtins
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from bus.cluster_relay import NO_WAIT, Durable, TargetNotAStreamError, retry_once
from bus.connection import is_cluster
from bus.errors import DeadLetterNotFoundError, DeadLetterRetryError, WireFormatError
from bus.event import TYPE_RE, Event
from bus.keys import Keys
from bus.routing import Router
from bus.wire import (
    DLQ_LINK_FIELD,
    TARGET_FIELD,
    decode,
    format_timestamp,
    is_text,
    raw_fields,
    readable,
)

#: Field of an outbox entry that is a dead letter, not an event (the relay, bus.outbox, takes
#: it to the dead-letter stream and drops the field).
DEAD_LETTER_MARK = "outbox.dead_letter"
#: Dead-letter field with the original entry's exact bytes when they were not UTF-8: a
#: JSON array ``[name, value, …]`` of base64 strings.
RAW_FIELD = "raw"


class DeadLetterReason(enum.StrEnum):
    """Why an entry was dead-lettered."""

    #: The handler raised on every attempt.
    HANDLER_ERROR = "handler_error"
    #: The entry does not decode as an event (foreign or broken producer).
    MALFORMED = "malformed"
    #: The entry was delivered more than ``max_deliveries`` times (consumers keep dying on it).
    POISON = "poison"
    #: The data does not fit the model the handler asked for.
    SCHEMA = "schema"
    #: The entry was in flight at several consecutive crashes of its bot's process.
    CRASHED = "crashed"
    #: PostgreSQL refused to store the event (a data error): not archived, kept here.
    UNARCHIVABLE = "unarchivable"
    #: The handler ran past its subscription's timeout on every attempt.
    TIMEOUT = "timeout"


#: KEYS: the dead-letter stream, the target stream; ARGV: the letter's id, then the entry's
#: field/value pairs. Writes only while the letter is there and the target is a stream (or
#: absent); "gone" / "wrongtype" otherwise, with nothing written.
_RETRY = """
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return 'gone' end
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'stream' and kind ~= 'none' then return 'wrongtype' end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-letter entry."""

    id: str
    event_id: str
    type: str
    reason: str
    error: str
    traceback: str
    attempts: int
    group: str
    consumer: str
    handler: str
    stream: str
    entry_id: str
    failed_at: str
    fields: Mapping[str, str]
    #: The entry's exact bytes (``[name, value, …]``, base64) when it was not UTF-8, else ().
    raw: tuple[str, ...] = ()
    #: For a letter a bot wrote through its outbox: ``found`` when its stream held the entry
    #: it names as the letter was relayed, else ``missing``; None for other letters.
    origin: str | None = None
    #: The event's publisher as its stream held it (``origin`` found); None without one.
    source: str | None = None

    @property
    def event(self) -> Event | None:
        """The original event, or None when the entry was malformed."""
        try:
            return decode(self.fields, self.stream, self.entry_id)
        except WireFormatError:
            return None

    def raw_entry(self) -> dict[bytes, bytes] | None:
        """The original entry's exact fields from ``raw``; None without (or with a bad) one."""
        if not self.raw or len(self.raw) % 2:
            return None
        try:
            parts = [base64.b64decode(p, validate=True) for p in self.raw]
        except binascii.Error:
            return None
        return dict(zip(parts[0::2], parts[1::2], strict=True))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (CLI and API)."""
        return {
            "id": self.id,
            "event_id": self.event_id,
            "type": self.type,
            "reason": self.reason,
            "error": self.error,
            "traceback": self.traceback,
            "attempts": self.attempts,
            "group": self.group,
            "consumer": self.consumer,
            "handler": self.handler,
            "stream": self.stream,
            "entry_id": self.entry_id,
            "failed_at": self.failed_at,
            "fields": dict(self.fields),
            "raw": list(self.raw),
            "origin": self.origin,
            "source": self.source,
        }


def _count(value: str | None) -> int:
    """A small non-negative count from an entry field; 0 for anything else (a foreign
    writer's garbage must not stop a reader)."""
    return int(value) if value and value.isascii() and value.isdigit() and len(value) < 9 else 0


def parse_dead_letter(entry_id: str, f: Mapping[str, str]) -> DeadLetter:
    """A dead letter from its entry in the dead-letter stream (any writer's: text that was
    not UTF-8 is shown with U+FFFD, a field that does not parse reads as empty)."""

    def text(name: str) -> str:
        return readable(f.get(name, ""))

    try:
        original = orjson.loads(text("entry") or "{}")
    except orjson.JSONDecodeError:
        original = {}
    return DeadLetter(
        id=entry_id,
        event_id=text("event_id"),
        type=text("type"),
        reason=text("reason"),
        error=text("error"),
        traceback=text("traceback"),
        attempts=_count(f.get("attempts")),
        group=text("group"),
        consumer=text("consumer"),
        handler=text("handler"),
        stream=text("stream"),
        entry_id=text("entry_id"),
        failed_at=text("failed_at"),
        fields={str(k): str(v) for k, v in original.items()} if isinstance(original, dict) else {},
        raw=_raw(text(RAW_FIELD)),
        origin=text("origin") if "origin" in f else None,
        source=text("source") if "source" in f else None,
    )


def _raw(value: str | None) -> tuple[str, ...]:
    """The ``raw`` field's base64 strings; () when absent or not a list of strings."""
    if not value:
        return ()
    try:
        parts = orjson.loads(value)
    except orjson.JSONDecodeError:
        return ()
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        return ()
    return tuple(parts)


class DeadLetters:
    """List, inspect, retry and purge the namespace's dead-letter stream."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        router: Router | None = None,
        *,
        outbox: str | None = None,
        durable: Durable = NO_WAIT,
    ) -> None:
        """``router``, the namespace's routing table, says where :meth:`retry` may write
        (without one, retry refuses). With ``outbox`` (a bot run by the manager),
        :meth:`add` writes there and the manager's relay moves the letter here.
        ``durable``: on a cluster, the replicas a retried entry must reach before its
        letter is deleted (``publish_replicas``)."""
        self._redis = redis
        #: The key names of the namespace (an inbox's letter names its stream).
        self.keys = keys
        self._router = router
        self._outbox = outbox
        self.key = keys.dead_letters()
        self._durable = durable

    async def add(
        self,
        *,
        fields: Mapping[str, str],
        reason: DeadLetterReason,
        error: str,
        stream: str,
        entry_id: str,
        group: str,
        consumer: str,
        handler: str = "",
        attempts: int = 0,
        traceback: str = "",
    ) -> str:
        """Write one dead letter; return its id (of its outbox entry, through an outbox).
        The caller acks the source entry after this.

        Fields that were not UTF-8 are written readable (U+FFFD for the bad bytes), and the
        entry's exact bytes go in ``raw`` (base64), so nothing of it is lost.
        """
        text = all(is_text(k) and is_text(v) for k, v in fields.items())
        entry: dict[str, str] = {
            "reason": str(reason),
            "event_id": readable(fields.get("id", "")),
            "type": readable(fields.get("type", "")),
            "error": readable(error[:2000]),
            "traceback": readable(traceback[-4000:]),
            "attempts": str(attempts),
            "group": group,
            "consumer": consumer,
            "handler": handler,
            "stream": readable(stream),
            "entry_id": entry_id,
            "failed_at": format_timestamp(datetime.now(UTC)),
            "entry": orjson.dumps(
                dict(fields) if text else {readable(k): readable(v) for k, v in fields.items()}
            ).decode(),
        }
        if not text:
            entry[RAW_FIELD] = orjson.dumps(raw_fields(fields)).decode()
        if self._outbox is not None:
            entry[DEAD_LETTER_MARK] = "1"
        dlq_id: Any = await self._redis.xadd(self._outbox or self.key, entry)  # type: ignore[arg-type]
        return str(dlq_id)

    async def list(self, count: int = 100, after: str = "-") -> builtins.list[DeadLetter]:
        """Dead letters oldest first, at most ``count``, starting after entry id ``after``."""
        start = after if after == "-" else f"({after}"
        rows: Any = await self._redis.xrange(self.key, start, "+", count=count)
        return [parse_dead_letter(entry_id, fields) for entry_id, fields in rows]

    async def count(self) -> int:
        """How many dead letters there are."""
        return int(await self._redis.xlen(self.key))

    async def get(self, dlq_id: str) -> DeadLetter:
        """One dead letter; :class:`DeadLetterNotFoundError` if it is gone."""
        rows: Any = await self._redis.xrange(self.key, dlq_id, dlq_id, count=1)
        if not rows or rows[0][0] != dlq_id:  # XRANGE treats "ms" as "ms-0..ms-max"
            raise DeadLetterNotFoundError(
                f"dead letter {dlq_id} not found: it was retried or purged; list them with "
                "`multibot dlq list`"
            )
        return parse_dead_letter(*rows[0])

    async def retry(self, dlq_id: str) -> str:
        """Re-deliver a dead letter to the group that failed it; return the new entry id.

        The original fields are re-added to the origin stream with ``target`` (the group,
        and handler) so other groups skip it, and ``dlq_id`` linking back; then the dead
        letter is removed. One script does both, and only while the letter is still there,
        so a retry is never lost or doubled (two retries at once: one wins, the other gets
        :class:`DeadLetterNotFoundError`). The letter's ``stream`` must be where the routing
        table sends its event type, and a stream (or absent): otherwise
        :class:`DeadLetterRetryError`, nothing is written and the letter is kept. A letter a
        bot wrote through its outbox is retried with the ``source`` the stream held (see
        :mod:`bus.outbox`), and refused when that is unknown. On a Redis Cluster the
        re-add and the delete are two steps that a repeated retry completes without
        re-adding (:func:`bus.cluster_relay.retry_once`).
        """
        letter = await self.get(dlq_id)
        self._check_route(letter)
        fields: dict[Any, str | bytes] = dict(letter.raw_entry() or letter.fields)
        if letter.origin is not None:  # a bot's letter: its copy's source is only its word
            if letter.origin != "found":
                raise DeadLetterRetryError(
                    f"dead letter {dlq_id} came from a bot, and its event ({letter.stream} "
                    f"{letter.entry_id}) was not in that stream when it was written, so who "
                    "published it is unknown: not retried, the letter is kept. Publish the "
                    f"event again, or delete the letter with `multibot dlq purge {dlq_id}`"
                )
            for name in [n for n in fields if n in ("source", b"source")]:
                del fields[name]
            if letter.source is not None:
                fields["source"] = letter.source
        target = letter.group + (f"/{letter.handler}" if letter.handler else "")
        fields[TARGET_FIELD] = target
        fields[DLQ_LINK_FIELD] = dlq_id
        parts = [part for pair in fields.items() for part in pair]
        if is_cluster(self._redis):  # the letter and its stream are in two slots
            try:
                return await retry_once(
                    self._redis, self.keys, self.key, dlq_id, stream=letter.stream,
                    fields=parts, durable=self._durable,
                )  # fmt: skip
            except TargetNotAStreamError:
                reply = "wrongtype"
            except LookupError as done:
                raise DeadLetterNotFoundError(
                    f"dead letter {dlq_id} was retried already, as entry {done} of {letter.stream}"
                ) from None
        else:
            result: Any = await self._redis.eval(_RETRY, 2, self.key, letter.stream, dlq_id, *parts)
            reply = result.decode() if isinstance(result, bytes) else str(result)
        if reply == "gone":
            raise DeadLetterNotFoundError(
                f"dead letter {dlq_id} not found: it was retried or purged meanwhile"
            )
        if reply == "wrongtype":
            raise DeadLetterRetryError(
                f"dead letter {dlq_id} names {letter.stream!r}, which is not a stream: not "
                f"retried, the letter is kept; delete it with `multibot dlq purge {dlq_id}`"
            )
        return reply

    def _check_route(self, letter: DeadLetter) -> None:
        """Refuse a letter whose stream is not where its event type is routed (a forged or
        outdated letter): retry writes with whatever rights its caller has."""
        if self._router is None:
            raise DeadLetterRetryError("retry needs the routing table: DeadLetters(router=...)")
        type_ = letter.fields.get("type", "")
        if TYPE_RE.fullmatch(type_):
            key = letter.fields.get("key") or None
            names = (
                [self._router.target(type_, key)]  # a key's partition, on a partitioned route
                if key
                else self._router.expand(self._router.route(type_))
            )
            allowed = {self.keys.stream(name) for name in names}
        else:  # not an event (malformed): back to any stream of the routing table
            allowed = {self.keys.stream(name) for name in self._router.streams()}
        if letter.stream not in allowed:
            raise DeadLetterRetryError(
                f"dead letter {letter.id} names stream {letter.stream!r}, but its event "
                f"(type {type_!r}) is routed to {' or '.join(sorted(allowed))}: not retried, "
                "the letter is kept. If the routing table changed since, publish the event "
                f"again; if the letter is forged, delete it with `multibot dlq purge {letter.id}`"
            )

    async def purge(self, ids: builtins.list[str] | None = None) -> int:
        """Delete the given dead letters, or all of them when ``ids`` is None; return count."""
        if ids is None:
            count = await self.count()
            await self._redis.delete(self.key)
            return count
        if not ids:
            return 0
        return int(await self._redis.xdel(self.key, *ids))

    def __repr__(self) -> str:
        return f"<DeadLetters key={self.key}>"
