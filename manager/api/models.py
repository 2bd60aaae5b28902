"""What the HTTP API takes and returns, as pydantic models (they make the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bus import Event
from bus.event import TYPE_RE
from manager.status import ArchiveStatus, ManagerStatus

#: Events in one ``POST /v1/events`` batch at most.
MAX_BATCH = 1000


class ErrorOut(BaseModel):
    """Every 4xx and 5xx answer: what is wrong and what to do, and per item or field details."""

    error: str
    detail: list[dict[str, Any]] | None = None


class EventIn(BaseModel):
    """An event to publish; the source is ``api:<token name>``, the id and time are given
    by the bus. Validated with the same rules as the library."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(
        description="dotted lowercase category.entity.action",
        min_length=1,
        json_schema_extra={"pattern": TYPE_RE.pattern},  # checked by the library, its message
    )
    data: dict[str, Any] = Field(default_factory=dict, description="a JSON object")
    key: str | None = Field(None, description="ordering key: same key, same order")
    correlation_id: str | None = None
    causation_id: str | None = None
    version: int = Field(1, ge=1, le=2**31 - 1)


class Published(BaseModel):
    """Accepted events, in the order given: ids as they will appear on the bus."""

    ids: list[str]


class EventOut(BaseModel):
    id: str
    type: str
    source: str
    data: dict[str, Any]
    correlation_id: str | None
    causation_id: str | None
    timestamp: datetime
    version: int
    key: str | None
    stream: str | None
    entry_id: str | None

    @classmethod
    def of(cls, event: Event, stream: str | None) -> EventOut:
        return cls(
            id=event.id,
            type=event.type,
            source=event.source,
            data=dict(event.data),
            correlation_id=event.correlation_id,
            causation_id=event.causation_id,
            timestamp=event.timestamp,
            version=event.version,
            key=event.key,
            stream=stream,
            entry_id=event.entry_id,
        )


class EventPage(BaseModel):
    events: list[EventOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class TraceNode(EventOut):
    """An event of the chain, placed in the tree by causation."""

    parent_id: str | None = Field(
        description="the event it hangs under (its cause); null for a root: an event whose "
        "cause is not in the chain"
    )
    depth: int = Field(ge=0, description="hops from its root, 0 for a root")


class Trace(BaseModel):
    """A correlation chain as a tree by causation, given flat so that any depth fits: the
    nodes come depth-first (each root, then what it caused, children by time), so a node's
    parent comes before it; indent by ``depth``, or rebuild the tree from ``parent_id``."""

    correlation_id: str
    events: int = Field(description="events in the chain (the length of nodes)")
    nodes: list[TraceNode]


class StreamOut(BaseModel):
    stream: str
    key: str
    length: int
    first_entry_id: str | None
    last_entry_id: str | None
    memory_bytes: int | None


class ConsumerOut(BaseModel):
    name: str
    pending: int
    idle_seconds: float


class GroupOut(BaseModel):
    stream: str
    group: str
    lag: int | None
    pending: int
    last_delivered_id: str
    consumers: list[ConsumerOut]


class DeadLetterOut(BaseModel):
    """A dead letter; ``fields`` are the original entry's (empty fields: a foreign writer's
    entry that said nothing)."""

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
    fields: dict[str, str]
    raw: list[str] = Field(
        default_factory=list,
        description="the entry's exact bytes when it was not UTF-8: [name, value, ...], base64",
    )
    origin: str | None = Field(
        None,
        description="for a bot's letter: 'found' when its stream held the entry it names "
        "(retry then writes that entry's source, not the copy's), 'missing' (retry refuses)",
    )
    source: str | None = Field(
        None, description="with origin 'found': the entry's source as its stream held it"
    )


class DeadLetterPage(BaseModel):
    dead_letters: list[DeadLetterOut]
    next_after: str | None = Field(description="pass as `after` for the next page")


class Retried(BaseModel):
    id: str
    entry_id: str = Field(description="the entry re-added to the origin stream")


class Deleted(BaseModel):
    deleted: int


class Restarted(BaseModel):
    bot: str


class Health(BaseModel):
    alive: bool
    pid: int
    uptime_seconds: float
    archive: ArchiveStatus | None = Field(description="the archiver's health, if archiving")


class Throughput(BaseModel):
    events_per_s: float | None = Field(
        description="events added to the streams over the last 30 s (null until measured)"
    )


class ApiStatus(ManagerStatus):
    """What ``multibot status --json`` shows, with the dead letters and the throughput."""

    dead_letters: int = Field(description="entries in the dead-letter stream")
    throughput: Throughput


class Readiness(BaseModel):
    ready: bool
    problems: list[str]
    checks: dict[str, str]


class AuditEntryOut(BaseModel):
    """One operator action."""

    id: str
    at: datetime
    actor: str = Field(description="token:<name> (API) or user:<OS user> (socket, CLI)")
    channel: str = Field(description="api, socket, cli or signal")
    action: str = Field(description="events.publish, restart, dlq.retry, reload, stop, ...")
    target: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    outcome: Literal["ok", "refused", "failed"]
    error: str | None = None


class AuditPage(BaseModel):
    """A page of operator actions, oldest first."""

    actions: list[AuditEntryOut]
    next_after: str | None = Field(None, description="pass as after= for the next page")


class HistorySampleOut(BaseModel):
    """The fleet at one moment of the history."""

    at: float = Field(description="Unix time, seconds")
    events_per_s: float | None
    dead_letters: int | None
    memory_used: int | None = Field(description="bytes: Redis, the manager and the bots")
    memory_budget: int | None
    lag: dict[str, int] = Field(description="stream/group: entries unread plus unacked")


class HistoryOut(BaseModel):
    """Samples of the last ``window`` seconds, oldest first, one each ``interval``."""

    interval: float
    window: float
    groups: list[str] = Field(description="the groups charted: furthest behind first")
    samples: list[HistorySampleOut]
