"""The sections of the manager's config file besides its bots: ``[bus]``, ``[supervisor]``,
``[coordinator]`` (with its memory budget), ``[archive]``, ``[api]`` (with its tokens) and
``[redis_tls]``.

Each is a frozen model that refuses unknown keys; :mod:`manager.config` puts them together
and loads the file.
"""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

from bus.settings import ConsumerSettings

#: An OS user or group name, as useradd and groupadd accept them.
OS_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9._-]{0,31}\$?$"


class ConfigModel(BaseModel):
    """A part of the config: unknown keys are errors, values cannot change once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BusOptions(ConfigModel):
    """The bus settings every bot gets (its Redis URL and credentials are added per bot)."""

    routes: dict[str, str] | None = None
    default_stream: str | None = None
    partitions: dict[str, int] | None = Field(
        None,
        description="stream name -> N: split that route into N partition streams, each "
        "handled by one replica of a group at a time (README: Partitions)",
    )
    max_event_bytes: int | None = None
    strict_schemas: bool = False
    backpressure_wait: float | None = Field(
        None, ge=0, description="seconds a publish waits while Redis is nearly full (default 5)"
    )
    publish_replicas: int = Field(
        0,
        ge=0,
        description="replicas that must have each published event before the publish "
        "returns (WAIT); survives a primary's failover; 0: the primary alone",
    )
    publish_replicas_timeout: float | None = Field(
        None, gt=0, description="seconds to wait for them, then BusDurabilityError (default 1)"
    )
    consumer: ConsumerSettings = ConsumerSettings()


class SupervisorSettings(ConfigModel):
    """Heartbeats, start-up and failover timing, and the OS user bots run as."""

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
    bot_user: str = Field(
        "multibot-bot",
        pattern=f"^$|{OS_NAME_PATTERN}",
        description="OS user bots run as when the manager can switch users (root, or "
        "CAP_SETUID+CAP_SETGID+CAP_KILL) and a bot names none; '': the manager's own",
    )
    bot_outbox: bool = Field(
        True,
        description="bots publish through an outbox the manager relays with the bot as "
        "source (bots cannot write streams); false: bots XADD to the streams themselves, "
        "a hop less of latency, but source, trimming and entry ids are then up to them",
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
    lease_ttl: float = Field(
        10.0,
        gt=0,
        description="the coordinator lease among the managers of one deployment: when the "
        "coordinating manager dies, another takes its duties within this",
    )


class ArchiveSettings(ConfigModel):
    """PostgreSQL keeps every event for the retention; Redis keeps the hot window."""

    batch_size: int = Field(2000, ge=1, le=100_000, description="events per insert")
    batch_wait: float = Field(0.2, gt=0, description="seconds a partial batch waits")
    fill_wait: float = Field(
        1.0,
        ge=0,
        description="seconds the last events of a stream, short of a full archive block (32), "
        "may wait for more before they are stored: full blocks take a fraction of the disk "
        "of small ones; 0 stores every read at once",
    )
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
    on_every_host: bool = Field(
        False,
        description="every manager of the deployment archives (a consumer each); false: "
        "only the coordinating one",
    )
    claim_idle: float = Field(
        60.0,
        gt=0,
        description="seconds an entry another archiver read stays unacked before this one "
        "takes it over (that archiver died)",
    )

    @model_validator(mode="after")
    def _fill_before_claim(self) -> ArchiveSettings:
        if "fill_wait" in self.model_fields_set and self.fill_wait * 2 > self.claim_idle:
            raise ValueError(
                "fill_wait must be at most half of claim_idle: events held for a full block "
                "would be taken over by another archiver as if this one had died"
            )
        return self

    @property
    def held_for_blocks(self) -> float:
        """How long the archiver holds events for a full block: ``fill_wait``, but never
        more than half of ``claim_idle`` (a default fill_wait under a short claim_idle)."""
        return min(self.fill_wait, self.claim_idle / 2)


class AuditSettings(ConfigModel):
    """The record of operator actions (``multibot audit``) and of what each group did with
    each event (``multibot events show``)."""

    retention_days: int = Field(
        365, ge=1, description="days operator actions are kept in PostgreSQL (audit_log)"
    )
    deliveries: bool = Field(
        True,
        description="bots report what each delivery came to (handled, dead-lettered, "
        "skipped, retried) with their acks, kept in PostgreSQL's deliveries table as long "
        "as the events; needs supervisor.bot_outbox",
    )
    missed_after: float = Field(
        300.0,
        gt=0,
        description="seconds after which an event a group should have handled and has not "
        "counts as missed (multibot_deliveries_missed_total)",
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
    history_window: float = Field(
        900.0, gt=0, description="seconds of history the status page charts (kept in memory)"
    )
    history_interval: float = Field(5.0, gt=0, description="seconds between history samples")

    @field_validator("tokens")
    @classmethod
    def _unique_names(cls, tokens: list[ApiToken]) -> list[ApiToken]:
        names = [t.name for t in tokens]
        if doubled := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"token names must be unique: {', '.join(doubled)} given twice")
        if "admin" in names:
            raise ValueError("'admin' is the generated token's name: pick another")
        return tokens


class RedisTlsSettings(ConfigModel):
    """TLS of the embedded redis-server (used when ``redis_url`` is unset), and the client
    certificate bots present to a Redis that requires one. Files are PEM."""

    cert_file: Path | None = Field(
        None, description="the embedded server's certificate; set: it listens on TLS only"
    )
    key_file: Path | None = Field(None, description="the key of cert_file")
    ca_file: Path | None = Field(
        None, description="the CA that signed cert_file (and, with client_certs, clients')"
    )
    client_certs: bool = Field(
        False,
        description="clients must present a certificate signed by ca_file; the manager and "
        "the CLI present cert_file, bots bot_cert_file",
    )
    bot_cert_file: Path | None = Field(
        None,
        description="the certificate every bot presents (never the manager's); bots' OS "
        "users must be able to read it and bot_key_file",
    )
    bot_key_file: Path | None = Field(None, description="the key of bot_cert_file")

    @field_validator("cert_file", "key_file", "ca_file", "bot_cert_file", "bot_key_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not (value.is_file() and os.access(value, os.R_OK)):
            raise ValueError(f"{value} is not a file we can read: fix the path or its mode")
        return value

    @model_validator(mode="after")
    def _complete(self) -> RedisTlsSettings:
        server = {"cert_file": self.cert_file, "key_file": self.key_file, "ca_file": self.ca_file}
        if any(server.values()) and not all(server.values()):
            missing = ", ".join(name for name, path in server.items() if path is None)
            raise ValueError(
                f"give cert_file, key_file and ca_file together for the embedded redis-server "
                f"on TLS ({missing} missing)"
            )
        if (self.bot_cert_file is None) != (self.bot_key_file is None):
            raise ValueError("give bot_cert_file and bot_key_file together")
        if self.client_certs and self.cert_file is None:
            raise ValueError("client_certs needs cert_file, key_file and ca_file")
        if self.client_certs and self.bot_cert_file is None:
            raise ValueError(
                "client_certs needs bot_cert_file and bot_key_file: bots must present a "
                "certificate too, and never get the manager's (give them one of their own, "
                "signed by ca_file)"
            )
        _check_pair(self.cert_file, self.key_file, "cert_file and key_file")
        _check_pair(self.bot_cert_file, self.bot_key_file, "bot_cert_file and bot_key_file")
        if self.ca_file is not None:
            try:
                ssl.create_default_context().load_verify_locations(cafile=self.ca_file)
            except (ssl.SSLError, ValueError) as exc:
                raise ValueError(
                    f"ca_file {self.ca_file} holds no PEM certificate ({exc})"
                ) from None
        return self

    @property
    def embedded(self) -> bool:
        """Whether the embedded redis-server is to listen on TLS."""
        return self.cert_file is not None

    @property
    def bot_cert(self) -> tuple[Path, Path] | None:
        """The ``(certificate, key)`` bots present, when configured."""
        if self.bot_cert_file is None or self.bot_key_file is None:
            return None
        return self.bot_cert_file, self.bot_key_file


def _check_pair(cert: Path | None, key: Path | None, names: str) -> None:
    """Refuse a certificate and key that do not load as a pair (PEM, the key matching)."""
    if cert is None or key is None:
        return
    try:
        # A password callback: an encrypted key fails here instead of OpenSSL asking for its
        # password on the terminal.
        ssl.create_default_context().load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(
            f"{names} do not load as a certificate and its key ({exc}): both must be PEM "
            "files, the key unencrypted and matching the certificate"
        ) from None
