"""The manager's configuration: a TOML file overridden by ``MULTIBOT_…`` environment variables.

Read once at start (and again on SIGHUP), validated whole, passed down as typed objects.
A bad config is refused before anything starts, with every error listed by its path in the
file: ``bots[2].memory_limit: …``. Relative paths in a file are relative to that file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from bus.conditions import Where
from bus.errors import SubscriptionError
from bus.patterns import Pattern
from bus.settings import BusSettings, ConsumerSettings
from manager.errors import ManagerError

#: The config a checkout starts with when neither ``--config`` nor ``MULTIBOT_CONFIG`` is set.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "config" / "multibot.toml"
CONFIG_ENV = "MULTIBOT_CONFIG"
_BOT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ENTRY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*(:[A-Za-z_][\w]*)?$")


class ConfigError(ManagerError):
    """The configuration is invalid; ``errors`` lists each problem as ``path: message``."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(
            f"{source} is invalid ({len(errors)} error{'s' * (len(errors) != 1)}):\n{lines}\n"
            "Fix these and start again; `multibot config check` prints this list."
        )


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RestartPolicy(_Model):
    """When a bot process that exited is started again, and when to give up."""

    policy: Literal["always", "on-failure", "never"] = Field(
        "always", description="always; on-failure (non-zero exit or signal); never"
    )
    backoff_base: float = Field(1.0, gt=0, description="seconds before the first restart")
    backoff_cap: float = Field(30.0, gt=0, description="longest wait between restarts")
    crash_loop_restarts: int = Field(
        5, ge=1, description="restarts within crash_loop_window that mark the bot failed"
    )
    crash_loop_window: float = Field(60.0, gt=0, description="seconds")
    reset_after: float = Field(
        30.0, gt=0, description="a run this long (seconds) resets the backoff to backoff_base"
    )

    @model_validator(mode="after")
    def _cap(self) -> RestartPolicy:
        if self.backoff_cap < self.backoff_base:
            raise ValueError("backoff_cap must be >= backoff_base")
        return self


class SubscriptionConfig(_Model):
    """A subscription declared for a bot: its group is created on these streams at start,
    and once a bot declares any, only events matching one (pattern and conditions) reach
    its handlers."""

    pattern: str = Field(description="type pattern, e.g. 'user.message.*'")
    where: dict[str, Any] = Field(default_factory=dict, description="conditions on data")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            Pattern(value)
        except SubscriptionError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("where")
    @classmethod
    def _where(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            Where(value)
        except SubscriptionError as exc:
            raise ValueError(str(exc)) from None
        return value


class BotConfig(_Model):
    """One bot: which code runs, how many processes, and how they are kept alive."""

    id: str = Field(description="lowercase letters, digits, '-' and '_'; names its group")
    entry: str = Field(description="'package.module:function' called with the bus client")
    replicas: int = Field(1, ge=1, le=64, description="processes sharing the bot's group")
    standby: bool = Field(
        False, description="one active replica holds a leader lease, the others wait"
    )
    subscriptions: list[SubscriptionConfig] = Field(default_factory=list)
    restart: RestartPolicy = RestartPolicy()
    memory_limit: ByteSize | None = Field(None, description="RSS of the bot's process tree")
    memory_action: Literal["warn", "restart"] = Field(
        "warn", description="over its memory limit: publish bot.overload, or also restart it"
    )
    environment: dict[str, str] = Field(default_factory=dict)
    stop_timeout: float = Field(10.0, gt=0, description="seconds to finish in-flight events")
    consumer: ConsumerSettings | None = Field(None, description="overrides [bus.consumer]")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _BOT_ID_RE.match(value):
            raise ValueError(
                f"{value!r} is not a bot id: use 1-63 lowercase letters, digits, '-' and '_', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("entry")
    @classmethod
    def _entry(cls, value: str) -> str:
        if not _ENTRY_RE.match(value):
            raise ValueError(f"{value!r} is not an entry point: write 'package.module:function'")
        return value if ":" in value else f"{value}:main"

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name.startswith("MULTIBOT_"):
                raise ValueError(f"{name}: MULTIBOT_* variables are the manager's own")
        return value

    @model_validator(mode="after")
    def _standby(self) -> BotConfig:
        if self.standby and self.replicas < 2:
            raise ValueError("standby = true needs replicas >= 2 (one active, the rest waiting)")
        return self


class BusOptions(_Model):
    """The bus settings every bot gets (its Redis URL and credentials are added per bot)."""

    routes: dict[str, str] | None = None
    default_stream: str | None = None
    max_event_bytes: int | None = None
    strict_schemas: bool = False
    backpressure_wait: float | None = Field(
        None, ge=0, description="seconds a publish waits while Redis is nearly full (default 5)"
    )
    consumer: ConsumerSettings = ConsumerSettings()


class SupervisorSettings(_Model):
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


class MemorySettings(_Model):
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


class CoordinatorSettings(_Model):
    """What the coordinator watches, and how often."""

    interval: float = Field(5.0, gt=0, description="seconds between lag and memory checks")
    lag_threshold: int = Field(1000, ge=1, description="entries behind that ask for help")
    memory: MemorySettings = MemorySettings()


class ArchiveSettings(_Model):
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


class ApiToken(_Model):
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


class ApiSettings(_Model):
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


class ManagerSettings(BaseSettings):
    """Everything ``multibot start`` needs. File values are overridden by the environment."""

    model_config = SettingsConfigDict(
        env_prefix="MULTIBOT_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Field(Path("data"), description="embedded servers' data, control socket")
    namespace: str = Field("multibot", description="prefix of every Redis key")
    redis_url: str | None = Field(None, description="unset: run an embedded redis-server")
    postgres_dsn: str | None = Field(None, description="unset: run an embedded PostgreSQL")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    bus: BusOptions = BusOptions()
    supervisor: SupervisorSettings = SupervisorSettings()
    coordinator: CoordinatorSettings = CoordinatorSettings()
    archive: ArchiveSettings = ArchiveSettings()
    api: ApiSettings = ApiSettings()
    bots: list[BotConfig] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values come in as init arguments; the environment overrides them.
        return env_settings, init_settings

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()  # MULTIBOT_DATA_DIR: relative to where it runs

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value or None

    @field_validator("postgres_dsn")
    @classmethod
    def _dsn(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql://")
        return value or None

    @model_validator(mode="after")
    def _bots(self) -> ManagerSettings:
        if errors := _duplicate_ids([bot.id for bot in self.bots]):
            raise ValueError("; ".join(errors))
        BusSettings.model_validate(self.bus_settings(redis_url="redis://localhost"))
        return self

    def bus_settings(self, redis_url: str) -> dict[str, Any]:
        """The ``BusSettings`` fields every bot and the coordinator share."""
        options = self.bus.model_dump(exclude_none=True)
        return {"redis_url": redis_url, "namespace": self.namespace, **options}

    def bot(self, bot_id: str) -> BotConfig:
        """The bot with this id; KeyError if there is none."""
        for bot in self.bots:
            if bot.id == bot_id:
                return bot
        raise KeyError(bot_id)


def _duplicate_ids(ids: list[Any]) -> list[str]:
    seen: dict[Any, int] = {}
    errors = []
    for index, bot_id in enumerate(ids):
        if bot_id in seen:
            errors.append(f"bots[{index}].id: {bot_id!r} is already the id of bots[{seen[bot_id]}]")
        elif isinstance(bot_id, str):
            seen[bot_id] = index
    return errors


def config_path(given: Path | None, environ: Mapping[str, str]) -> Path:
    """The file to read: ``--config``, else ``MULTIBOT_CONFIG``, else the checkout's default."""
    if given is not None:
        return given
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


def _loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _messages(exc: ValidationError) -> list[str]:
    errors = []
    for error in exc.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and "[" in p))
        if error["type"] == "extra_forbidden":
            message = "unknown setting (check its spelling and section)"
        elif message.startswith("bots[") and ": " in message:  # the cross-bot check
            continue  # listed by load_config even when other errors stop the model check
        got = error.get("input")
        if error["type"] not in ("missing", "extra_forbidden") and not isinstance(got, dict):
            message += f" (got {got!r})"
        env = "MULTIBOT_" + "__".join(str(p).upper() for p in loc)
        if len(loc) > 0 and env in os.environ:
            message += f" (from the environment: {env})"
        errors.append(f"{_loc(loc)}: {message}")
    return errors


def _resolve_paths(document: dict[str, Any], base: Path) -> dict[str, Any]:
    """``data_dir`` (also the default, so every command finds it) and the API's token
    files, relative to the file."""

    def resolved(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base / path)

    data_dir = document.get("data_dir", "data")
    if isinstance(data_dir, str):
        document = {**document, "data_dir": resolved(data_dir)}
    api = document.get("api")
    if isinstance(api, dict) and isinstance(api.get("tokens"), list):
        tokens = [
            {**t, "token_file": resolved(t["token_file"])}
            if isinstance(t, dict) and isinstance(t.get("token_file"), str)
            else t
            for t in api["tokens"]
        ]
        document = {**document, "api": {**api, "tokens": tokens}}
    return document


def load_config(path: Path) -> ManagerSettings:
    """Read and validate ``path`` with the environment's ``MULTIBOT_*`` overrides.

    Raises :class:`ConfigError` listing every problem, each with its path in the file.
    """
    source = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            source, [f"cannot read it: {exc.strerror} (pass --config or set {CONFIG_ENV})"]
        ) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    bots = document.get("bots")
    ids = [b.get("id") for b in bots if isinstance(b, dict)] if isinstance(bots, list) else []
    try:
        return ManagerSettings(**_resolve_paths(document, path.parent))
    except ValidationError as exc:
        raise ConfigError(source, _messages(exc) + _duplicate_ids(ids)) from None
