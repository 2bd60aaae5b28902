"""What a test reads off the bus: which events match, what the streams hold, whether a
group has caught up. Plain reads of the real streams; nothing here keeps state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from bus.conditions import Predicate, compile_where
from bus.dlq import DeadLetter
from bus.entry_id import EntryId
from bus.errors import WireFormatError
from bus.event import Event
from bus.patterns import Pattern
from bus.wire import decode

Condition = Mapping[str, Any] | Predicate | None
_BATCH = 1000  # entries per stream per XREAD


@dataclass(frozen=True, slots=True)
class Match:
    """Which events a test wants: a type pattern, data conditions, a source, a cause."""

    pattern: Pattern
    where: Predicate | None
    where_text: str
    source: str | None
    caused_by: str | None

    @classmethod
    def of(cls, pattern: str, where: Condition, source: str | None, caused_by: str | None) -> Match:
        """``where`` takes what ``subscribe(where=...)`` takes; ``caused_by`` is an event id."""
        text = getattr(where, "__qualname__", "") if callable(where) else repr(where)
        return cls(Pattern(pattern), compile_where(where), text, source, caused_by)

    def __call__(self, event: Event) -> bool:
        return (
            self.pattern.matches(event.type)
            and (self.source is None or event.source == self.source)
            and (self.caused_by is None or event.causation_id == self.caused_by)
            and (self.where is None or self.where(event.data))
        )

    def __str__(self) -> str:
        parts = [repr(self.pattern.text)]
        if self.where is not None:
            parts.append(f"where {self.where_text}")
        if self.source is not None:
            parts.append(f"from {self.source}")
        if self.caused_by is not None:
            parts.append(f"caused by {self.caused_by}")
        return " ".join(parts)


def entry_order(event: Event) -> EntryId:
    """When Redis took an event (its entry id), to order events of several streams."""
    return EntryId.parse(str(event.entry_id))


def describe(event: Event) -> str:
    """One line for an error message: type, source, key, id and (the start of) the data."""
    data = orjson.dumps(dict(event.data), option=orjson.OPT_NON_STR_KEYS).decode()
    data = data if len(data) <= 160 else data[:157] + "..."
    key = f" key={event.key}" if event.key else ""
    return f"{event.type} from {event.source}{key} id={event.id} {data}"


def describe_letter(letter: DeadLetter) -> str:
    """One line for an error message: which event, why, where and the error."""
    return (
        f"{letter.type} id={letter.event_id} {letter.reason} in {letter.group}/"
        f"{letter.handler} after {letter.attempts} attempt(s): {letter.error}"
    )


async def read_events(
    redis: Redis,
    cursor: dict[str, str],
    *,
    block: float | None = None,
    interrupt: asyncio.Event | None = None,
) -> list[Event]:
    """The events after ``cursor`` (stream key → entry id, moved past what was read),
    oldest first. With ``block``, wait up to that many seconds for one if there is none
    (one XREAD), or until ``interrupt`` is set. Entries that are not events are skipped.
    """
    events: list[Event] = []
    while True:
        if block is None:
            reply: Any = await redis.xread(cursor, count=_BATCH)  # type: ignore[arg-type]
        else:
            read = asyncio.ensure_future(
                redis.xread(cursor, count=_BATCH, block=max(1, int(block * 1000)))  # type: ignore[arg-type]
            )
            waits: set[asyncio.Future[Any]] = {read}
            if interrupt is not None:
                waits.add(asyncio.ensure_future(interrupt.wait()))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
            await asyncio.wait(waits)
            reply = None if read.cancelled() else read.result()
        got = 0
        for stream, entries in reply.items() if isinstance(reply, dict) else reply or []:
            for entry_id, fields in entries:
                cursor[stream] = entry_id
                got += 1
                with contextlib.suppress(WireFormatError):  # not an event: nothing to match
                    events.append(decode(fields, stream, entry_id))
        if block is not None or got < _BATCH:
            return sorted(events, key=entry_order)


async def group_backlog(redis: Redis, group: str, streams: list[str]) -> list[str]:
    """What ``group`` has not read or not acked yet, one line per stream; [] if nothing."""
    behind = []
    for stream in streams:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xinfo_stream(stream)
            pipe.xinfo_groups(stream)
            info, groups = await pipe.execute(raise_on_error=False)
        if isinstance(info, Exception) or isinstance(groups, Exception):
            behind.append(f"{stream} does not exist")
            continue
        found = next((g for g in groups if g["name"] == group), None)
        if found is None:
            behind.append(f"{group} is missing on {stream}")
        elif found["pending"] or found["last-delivered-id"] != info["last-generated-id"]:
            behind.append(
                f"{group} on {stream} has {found['pending']} pending, read up to "
                f"{found['last-delivered-id']} of {info['last-generated-id']}"
            )
    return behind
