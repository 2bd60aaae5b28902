"""The manager's configuration: a TOML file overridden by ``MULTIBOT_…`` environment variables.

Read once at start (and again on SIGHUP), validated whole, passed down as typed objects.
A bad config is refused before anything starts, with every error listed by its path in the
file: ``bots[2].memory_limit: …``. Relative paths in a file are relative to that file.

This module holds the whole (:class:`ManagerSettings`) and its loading; the sections are
defined in :mod:`manager.config_sections` and the bots in :mod:`manager.config_bots`, and
are importable from here too.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from bus.deployment import parse_redis_url
from bus.settings import BusSettings
from manager.config_bots import BotConfig, RestartPolicy, SubscriptionConfig
from manager.config_sections import (
    ApiSettings,
    ApiToken,
    ArchiveSettings,
    AuditSettings,
    BusOptions,
    CoordinatorSettings,
    MemorySettings,
    RedisTlsSettings,
    Scope,
    SupervisorSettings,
)
from manager.errors import ManagerError

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "ApiSettings",
    "ApiToken",
    "ArchiveSettings",
    "BotConfig",
    "BusOptions",
    "ConfigError",
    "CoordinatorSettings",
    "ManagerSettings",
    "MemorySettings",
    "RedisTlsSettings",
    "RestartPolicy",
    "Scope",
    "SubscriptionConfig",
    "SupervisorSettings",
    "config_path",
    "load_config",
]

#: The config a checkout starts with when neither ``--config`` nor ``MULTIBOT_CONFIG`` is set.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "config" / "multibot.toml"
CONFIG_ENV = "MULTIBOT_CONFIG"


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
    host: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="this manager's name among the managers of one deployment (bots' "
        "hosts = [...] name it); default: the machine's host name",
    )
    redis_url: str | None = Field(None, description="unset: run an embedded redis-server")
    redis_appendfsync: Literal["always", "everysec"] | None = Field(
        None,
        description="the embedded redis-server's AOF fsync policy (unset: everysec): 'always' "
        "writes and syncs the AOF before Redis answers, so a killed redis-server or a power "
        "cut loses no confirmed event, at the cost of a sync per round of commands",
    )
    postgres_dsn: str | None = Field(None, description="unset: run an embedded PostgreSQL")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    bus: BusOptions = BusOptions()
    supervisor: SupervisorSettings = SupervisorSettings()
    coordinator: CoordinatorSettings = CoordinatorSettings()
    archive: ArchiveSettings = ArchiveSettings()
    audit: AuditSettings = AuditSettings()
    api: ApiSettings = ApiSettings()
    redis_tls: RedisTlsSettings = RedisTlsSettings()
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
        if value:
            parse_redis_url(value)  # RedisUrlError (a ValueError) says what is wrong
        return value or None

    @field_validator("redis_appendfsync")
    @classmethod
    def _appendfsync(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("redis_url") is not None:
            raise ValueError(
                "sets the embedded redis-server's AOF, which does not run when redis_url is "
                "set: set appendfsync in that Redis's own configuration instead"
            )
        return value

    @field_validator("postgres_dsn")
    @classmethod
    def _dsn(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql://")
        return value or None

    @field_validator("redis_tls")
    @classmethod
    def _tls(cls, value: RedisTlsSettings, info: ValidationInfo) -> RedisTlsSettings:
        if info.data.get("redis_url") is not None and value.embedded:
            raise ValueError(
                "cert_file, key_file, ca_file and client_certs set up the embedded "
                "redis-server, which does not run when redis_url is set: put TLS in redis_url "
                "instead (rediss://…?ssl_ca_certs=CA&ssl_certfile=CERT&ssl_keyfile=KEY)"
            )
        return value

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

    @property
    def local_bots(self) -> list[BotConfig]:
        """The bots this manager runs: those placed on its host, or on no host in
        particular."""
        return [bot for bot in self.bots if not bot.hosts or self.host in bot.hosts]

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
    """``data_dir`` (also the default, so every command finds it), the API's token files and
    the files of ``redis_tls``, relative to the file."""

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
    tls = document.get("redis_tls")
    if isinstance(tls, dict):
        files = {
            k: resolved(v) for k, v in tls.items() if k.endswith("_file") and isinstance(v, str)
        }
        document = {**document, "redis_tls": {**tls, **files}}
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
