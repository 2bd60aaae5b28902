"""Typed settings of the bus, validated once and passed down (unknown keys are errors)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bus.deployment import parse_redis_url
from bus.event import DEFAULT_MAX_EVENT_BYTES
from bus.partitions import MAX_PARTITIONS, split_partition
from bus.routing import DEFAULT_ROUTES, DEFAULT_STREAM

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrySettings(_Model):
    """How a failing handler is retried before its event is dead-lettered."""

    max_attempts: int = Field(3, ge=1, description="attempts in all, the first included")
    backoff_base: float = Field(0.2, gt=0, description="seconds before the second attempt")
    backoff_cap: float = Field(10.0, gt=0, description="longest wait between attempts")
    jitter: float = Field(0.5, ge=0, le=1, description="randomised fraction of each wait")


class BreakerSettings(_Model):
    """Circuit breaker of a subscription."""

    failure_threshold: int = Field(
        5, ge=0, description="consecutive dead-lettered events that pause it (0: never)"
    )
    cooldown: float = Field(30.0, gt=0, description="seconds paused before a trial event")


class ConsumerSettings(_Model):
    """How a bus client reads its group."""

    concurrency: int = Field(32, ge=1, description="handlers running at once per process")
    read_count: int = Field(200, ge=1, description="entries fetched per XREADGROUP")
    block_ms: int = Field(2000, ge=1, description="XREADGROUP BLOCK; does not add latency")
    visibility_timeout: float = Field(
        60.0, gt=0, description="idle seconds before another consumer may reclaim an entry"
    )
    max_deliveries: int = Field(
        10, ge=1, description="deliveries after which an entry is dead-lettered as poison"
    )
    handler_timeout: float | None = Field(
        60.0,
        gt=0,
        description="seconds one handler call may run; then it is cancelled and counts as a "
        "failed attempt (retried, then dead-lettered as timeout); null: no limit",
    )
    start_id: Literal["$", "0"] = Field(
        "$", description="where a new group starts: '$' new events only, '0' whole stream"
    )
    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    partition_ttl: float = Field(
        10.0,
        gt=0,
        description="lease of a partition a replica reads: a dead replica's partitions "
        "move to the others within this, plus a third of it",
    )


class BusSettings(_Model):
    """Everything a bus client needs; the manager builds it for each bot."""

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis://, rediss://, unix://")
    streams_url: str | None = Field(
        None,
        description="URL of the stream commands (read, ack and claim the bot's group, read "
        "the backpressure flag) when they go through another Redis user than redis_url's "
        "(the manager gives each bot two: one for its own keys, one for the streams); "
        "None: redis_url",
    )
    replay_url: str | None = Field(
        None,
        description="URL of replays' reads of the streams (XRANGE), when they go through "
        "another Redis user than streams_url's (the manager's bots: one that reads the "
        "streams and does nothing else); None: streams_url",
    )
    inboxes: bool = Field(
        False,
        description="read the bot's group in its inboxes, which the manager's fanout fills "
        "from the streams (set by the manager for its bots; see bus.fanout)",
    )
    namespace: str = Field("multibot", description="prefix of every key")
    routes: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_ROUTES))
    default_stream: str = DEFAULT_STREAM
    partitions: dict[str, int] = Field(
        default_factory=dict,
        description="stream name -> N: that route is N partition streams (<name>.p0 ...), "
        "an event going to hash(key) mod N; each partition is handled by one replica of a "
        "group at a time, so per-key order holds across replicas",
    )
    max_event_bytes: int = Field(DEFAULT_MAX_EVENT_BYTES, ge=256)
    strict_schemas: bool = Field(False, description="refuse to publish types with no schema")
    connect_timeout: float = Field(5.0, gt=0)
    command_timeout: float = Field(10.0, gt=0, description="socket timeout of one command")
    connect_retries: int = Field(
        5, ge=0, description="retries of a command on a lost connection before it fails"
    )
    retry_cap: float = Field(2.0, gt=0, description="longest wait between connection retries")
    backpressure_wait: float = Field(
        5.0,
        ge=0,
        description="seconds a publish waits while Redis is near its maxmemory, then "
        "BusBackpressureError; 0: raise at once",
    )
    publish_replicas: int = Field(
        0,
        ge=0,
        description="confirm a publish only once this many replicas have it (WAIT), so a "
        "primary's failover cannot lose it; 0: once the primary has it",
    )
    publish_replicas_timeout: float = Field(
        1.0,
        gt=0,
        description="seconds a publish waits for publish_replicas replicas, then "
        "BusDurabilityError (the event is on the primary, not yet confirmed on replicas)",
    )
    consumer: ConsumerSettings = ConsumerSettings()
    outbox: bool = Field(
        False,
        description="publish and dead-letter through the bot's outbox, which the manager "
        "relays to the streams with the bot as source (set by the manager for its bots)",
    )
    delivery_records: bool = Field(
        False,
        description="report what each delivery came to (handled, dead-lettered, skipped, "
        "retried) through the outbox, with the acks; needs outbox (set by the manager from "
        "audit.deliveries)",
    )
    archive_dsn: str | None = Field(
        None, description="PostgreSQL archive (read-only) for replays older than Redis holds"
    )

    @field_validator("namespace", "default_stream")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("use letters, digits, '_', '.' and '-' only")
        return value

    @field_validator("redis_url", "streams_url", "replay_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_redis_url(value)  # RedisUrlError (a ValueError) says what is wrong
        return value

    @model_validator(mode="after")
    def _routes(self) -> BusSettings:
        for prefix, stream in self.routes.items():
            if not re.match(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$", prefix):
                raise ValueError(f"routes: {prefix!r} is not a dotted lowercase type prefix")
            if not _NAME_RE.match(stream):
                raise ValueError(f"routes.{prefix}: stream name {stream!r} has bad characters")
        named = {*self.routes.values(), self.default_stream}
        for stream, count in self.partitions.items():
            if stream not in named:
                raise ValueError(
                    f"partitions.{stream}: no route names that stream (routes name "
                    f"{', '.join(sorted(named))})"
                )
            if not 1 <= count <= MAX_PARTITIONS:
                raise ValueError(f"partitions.{stream}: {count} is not within 1..{MAX_PARTITIONS}")
        for stream in named:
            if (split := split_partition(stream)) and split[0] in self.partitions:
                raise ValueError(
                    f"stream name {stream!r} is the name of a partition of {split[0]!r}: "
                    "rename the route"
                )
        if self.consumer.block_ms / 1000 >= self.command_timeout:
            raise ValueError("consumer.block_ms must be shorter than command_timeout")
        return self
