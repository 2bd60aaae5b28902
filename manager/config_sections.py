"""The sections of the manager's config file besides its bots: ``[bus]``, ``[supervisor]``,
``[coordinator]`` (with its memory budget), ``[archive]`` and ``[api]`` (with its tokens).

Each is a frozen model that refuses unknown keys; :mod:`manager.config` puts them together
and loads the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

from bus.settings import ConsumerSettings


class ConfigModel(BaseModel):
    """A part of the config: unknown keys are errors, values cannot change once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BusOptions(ConfigModel):
    """The bus settings every bot gets (its Redis URL and credentials are added per bot)."""

    routes: dict[str, str] | None = None
    default_stream: str | None = None
    max_event_bytes: int | None = None
    strict_schemas: bool = False
    backpressure_wait: float | None = Field(
        None, ge=0, description="seconds a publish waits while Redis is nearly full (default 5)"
    )
    consumer: ConsumerSettings = ConsumerSettings()


class SupervisorSettings(ConfigModel):
    """Heartbeats, start-up and failover timing."""

    heartbeat_interval: float = Field(1.0, gt=0, description="seconds between a bot's beats")
    heartbeat_timeout: float = Field(
        10.0, gt=0, description="seconds without a beat before a running bot counts as hung"
    )
    startup_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds a bot may take to start (its first heartbeat, then consuming)",
    )
    lease_ttl: float = Field(5.0, gt=0, description="leader lease of an active/standby bot")
    crash_poison_after: int = Field(
        3, ge=1, description="consecutive crashes with an entry in flight that dead-letter it"
    )

    @model_validator(mode="after")
    def _beats(self) -> SupervisorSettings:
        if self.heartbeat_timeout <= 2 * self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must be more than twice heartbeat_interval")
        return self


class MemorySettings(ConfigModel):
    """The memory budget of the whole system: manager + bots + Redis."""

    budget: ByteSize = Field(ByteSize(2 * 1024**3), description="e.g. '2GiB'")
    high: float = Field(0.9, gt=0, le=1, description="fraction of the budget that alerts")
    low: float = Field(0.8, gt=0, le=1, description="fraction below which the alert clears")
    redis_maxmemory: ByteSize | None = Field(
        None,
        description="maxmemory of the embedded redis-server (noeviction); unset: half the budget",
    )
    pressure_high: float = Field(
        0.8, gt=0, lt=1, description="fraction of Redis's maxmemory at which publishers wait"
    )
    pressure_low: float = Field(
        0.7, gt=0, lt=1, description="fraction of Redis's maxmemory below which they go on"
    )

    @model_validator(mode="after")
    def _order(self) -> MemorySettings:
        if self.low > self.high:
            raise ValueError("low must be <= high")
        if self.pressure_low > self.pressure_high:
            raise ValueError("pressure_low must be <= pressure_high")
        if self.redis_maxmemory is not None and self.redis_maxmemory < 16 * 1024**2:
            raise ValueError("redis_maxmemory must be at least 16MiB")
        return self

    @property
    def embedded_redis_maxmemory(self) -> int:
        """Bytes the embedded redis-server may hold: the setting, else half the budget."""
        return int(self.redis_maxmemory or self.budget // 2)


class CoordinatorSettings(ConfigModel):
    """What the coordinator watches, and how often."""

    interval: float = Field(5.0, gt=0, description="seconds between lag and memory checks")
    lag_threshold: int = Field(1000, ge=1, description="entries behind that ask for help")
    memory: MemorySettings = MemorySettings()


class ArchiveSettings(ConfigModel):
    """PostgreSQL keeps every event for the retention; Redis keeps the hot window."""

    batch_size: int = Field(2000, ge=1, le=100_000, description="events per insert")
    batch_wait: float = Field(0.2, gt=0, description="seconds a partial batch waits")
    retention_days: int = Field(7, ge=1, description="days of events kept in PostgreSQL")
    partitions_ahead: int = Field(3, ge=1, description="daily partitions created in advance")
    hot_window: float = Field(
        3600.0, ge=0, description="seconds of events kept in Redis after they are archived"
    )
    hot_window_max_memory: ByteSize | None = Field(
        None, description="Redis memory past which archived, acked events go whatever their age"
    )
    trim_interval: float = Field(10.0, gt=0, description="seconds between stream trims")
    idle_group_after: float = Field(
        3600.0, gt=0, description="a group whose consumers are all idle this long is reported"
    )
    idle_groups: Literal["pin", "release"] = Field(
        "pin", description="pin: an idle group still holds the trim; release: it stops holding"
    )
    removed_group_grace: float = Field(
        3600.0,
        gt=0,
        description="seconds the group of a bot gone from the config is kept before it is "
        "destroyed (so it stops holding the trim)",
    )
    dlq_retention: float = Field(
        7 * 86400.0,
        gt=0,
        description="seconds dead letters stay in Redis once PostgreSQL stored them",
    )


Scope = Literal["publish", "read", "admin"]
_TOKEN_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class ApiToken(ConfigModel):
    """A bearer token of the HTTP API: its name becomes the ``source`` (``api:<name>``) of
    the events published with it. The secret comes from exactly one of ``token_file``
    (recommended), ``token_env`` or ``token``."""

    name: str
    scopes: list[Scope] = Field(min_length=1)
    token: str | None = Field(None, min_length=16, repr=False)
    token_file: Path | None = None
    token_env: str | None = None
    rate_limit: float | None = Field(None, gt=0, description="unset: api.rate_limit")
    rate_burst: int | None = Field(None, ge=1, description="unset: api.rate_burst")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _TOKEN_NAME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a token name: use lowercase letters, digits, '_', '.', '-'"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ApiToken:
        given = [self.token is not None, self.token_file is not None, self.token_env is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of token_file, token_env or token")
        return self


class ApiSettings(ConfigModel):
    """The HTTP API: where it listens, who may call it, and its limits."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="0: any free port (logged)")
    tokens: list[ApiToken] = Field(
        default_factory=list,
        description="besides the admin token the manager generates into data_dir",
    )
    open_status: bool = Field(
        True, description="serve /, /v1/status and /metrics without a token (never events)"
    )
    max_body_bytes: ByteSize = Field(ByteSize(1024 * 1024), ge=1024)
    rate_limit: float = Field(200.0, gt=0, description="requests per second per token")
    rate_burst: int = Field(400, ge=1, description="requests a token may make at once")

    @field_validator("tokens")
    @classmethod
    def _unique_names(cls, tokens: list[ApiToken]) -> list[ApiToken]:
        names = [t.name for t in tokens]
        if doubled := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"token names must be unique: {', '.join(doubled)} given twice")
        if "admin" in names:
            raise ValueError("'admin' is the generated token's name: pick another")
        return tokens
