"""One bot's entry in the manager's config (``[[bots]]``): the code it runs, its replicas,
the subscriptions it declares, its restart policy and its memory limit."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ByteSize, Field, field_validator, model_validator

from bus.conditions import Where
from bus.errors import SubscriptionError
from bus.patterns import Pattern
from bus.settings import ConsumerSettings
from manager.config_sections import OS_NAME_PATTERN, ConfigModel

_BOT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ENTRY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*(:[A-Za-z_][\w]*)?$")


class RestartPolicy(ConfigModel):
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


class SubscriptionConfig(ConfigModel):
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


class BotConfig(ConfigModel):
    """One bot: which code runs, how many processes, and how they are kept alive."""

    id: str = Field(description="lowercase letters, digits, '-' and '_'; names its group")
    entry: str = Field(description="'package.module:function' called with the bus client")
    replicas: int = Field(1, ge=1, le=64, description="processes sharing the bot's group")
    hosts: list[str] | None = Field(
        None,
        description="the managers (by their host setting) that run this bot: one host runs "
        "every replica; several, or unset (any manager), share the replicas out among the "
        "live ones",
    )
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
    user: str | None = Field(
        None,
        pattern=OS_NAME_PATTERN,
        description="OS user its processes run as (needs a manager that can switch users); "
        "unset: supervisor.bot_user",
    )
    group: str | None = Field(
        None,
        pattern=OS_NAME_PATTERN,
        description="OS group its processes run with; unset: the user's primary group",
    )
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
