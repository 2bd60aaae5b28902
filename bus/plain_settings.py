"""The bus settings as plain frozen dataclasses, for a process whose settings were validated
elsewhere: a bot the manager runs gets them as JSON the manager dumped from a validated
:class:`~bus.settings.BusSettings`, and trusts them.

The same fields and defaults as :mod:`bus.settings` (a test keeps the two in step), without
their validation, and without pydantic: importing pydantic and building the models costs an
idle bot process about 9 MiB, a quarter of its memory. The bus's own code reads its settings
through the ``Any*`` aliases, so it takes either kind; bots and scripts keep building the
validated ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from bus.event import DEFAULT_MAX_EVENT_BYTES
from bus.routing import DEFAULT_ROUTES, DEFAULT_STREAM

if TYPE_CHECKING:
    from bus.settings import BreakerSettings, BusSettings, ConsumerSettings, RetrySettings


@dataclass(frozen=True, slots=True, kw_only=True)
class PlainRetrySettings:
    """:class:`~bus.settings.RetrySettings`, trusted."""

    max_attempts: int = 3
    backoff_base: float = 0.2
    backoff_cap: float = 10.0
    jitter: float = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class PlainBreakerSettings:
    """:class:`~bus.settings.BreakerSettings`, trusted."""

    failure_threshold: int = 5
    cooldown: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PlainConsumerSettings:
    """:class:`~bus.settings.ConsumerSettings`, trusted."""

    concurrency: int = 32
    read_count: int = 200
    block_ms: int = 2000
    visibility_timeout: float = 60.0
    max_deliveries: int = 10
    handler_timeout: float | None = 60.0
    start_id: Literal["$", "0"] = "$"
    retry: PlainRetrySettings = PlainRetrySettings()
    breaker: PlainBreakerSettings = PlainBreakerSettings()
    partition_ttl: float = 10.0

    @classmethod
    def from_json(cls, fields: Mapping[str, Any]) -> PlainConsumerSettings:
        """From the JSON of validated consumer settings; TypeError for a key it lacks."""
        nested = dict(fields)
        if "retry" in nested:
            nested["retry"] = PlainRetrySettings(**nested["retry"])
        if "breaker" in nested:
            nested["breaker"] = PlainBreakerSettings(**nested["breaker"])
        return cls(**nested)


@dataclass(frozen=True, slots=True, kw_only=True)
class PlainBusSettings:
    """:class:`~bus.settings.BusSettings`, trusted."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    streams_url: str | None = None
    replay_url: str | None = None
    inboxes: bool = False
    namespace: str = "multibot"
    routes: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ROUTES))
    default_stream: str = DEFAULT_STREAM
    partitions: dict[str, int] = field(default_factory=dict)
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    strict_schemas: bool = False
    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    connect_retries: int = 5
    retry_cap: float = 2.0
    backpressure_wait: float = 5.0
    publish_replicas: int = 0
    publish_replicas_timeout: float = 1.0
    consumer: PlainConsumerSettings = PlainConsumerSettings()
    outbox: bool = False
    delivery_records: bool = False
    archive_dsn: str | None = None

    @classmethod
    def from_json(cls, fields: Mapping[str, Any]) -> PlainBusSettings:
        """From the JSON of validated bus settings (``BusSettings.model_dump(mode="json")``);
        TypeError for a key it lacks, as the validated ones refuse unknown keys."""
        nested = dict(fields)
        if "consumer" in nested:
            nested["consumer"] = PlainConsumerSettings.from_json(nested["consumer"])
        return cls(**nested)

    def __repr__(self) -> str:  # the URLs carry a bot's Redis password
        return f"<PlainBusSettings namespace={self.namespace} inboxes={self.inboxes}>"


#: Settings as the bus reads them: validated, or plain and trusted.
AnyBusSettings: TypeAlias = "BusSettings | PlainBusSettings"
AnyConsumerSettings: TypeAlias = "ConsumerSettings | PlainConsumerSettings"
AnyRetrySettings: TypeAlias = "RetrySettings | PlainRetrySettings"
AnyBreakerSettings: TypeAlias = "BreakerSettings | PlainBreakerSettings"
