"""The schema of each standard event type's data (the types are in :mod:`bus.event_types`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bus.event_types import EventType


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BotLifecycle(_Schema):
    """``bot.lifecycle.started`` / ``stopped``: a bot process changed state."""

    bot_id: str
    instance: str | None = None
    pid: int | None = None
    exit_code: int | None = None
    signal: str | None = None
    reason: str | None = None
    published_by: str | None = Field(None, description="'manager' when not the bot itself")


class BotError(_Schema):
    """``bot.lifecycle.error``: a bot failed (crash loop, start failure, handler storm)."""

    bot_id: str
    error: str
    error_type: str | None = None
    instance: str | None = None
    published_by: str | None = None


class BotHealthChanged(_Schema):
    """``bot.lifecycle.health_changed``: heartbeats stopped or resumed."""

    bot_id: str
    healthy: bool
    reason: str | None = None
    instance: str | None = None
    published_by: str | None = None


class BotOverload(_Schema):
    """``bot.overload``: a bot went past its memory limit."""

    bot_id: str
    rss_bytes: int
    limit_bytes: int
    instance: str | None = None
    action: str | None = Field(None, description="'restart' when the manager restarts it")
    published_by: str | None = None


class UserMessage(_Schema):
    """``user.message.received`` / ``sent``."""

    user_id: str | int
    bot_id: str
    text: str = ""
    message_id: str | None = None


class Conversation(_Schema):
    """``user.conversation.started`` / ``ended``."""

    user_id: str | int
    bot_id: str
    reason: str | None = None


class Profile(_Schema):
    """``profile.girl.created`` / ``updated`` / ``deleted``."""

    profile_id: str | int
    fields: dict[str, object] = Field(default_factory=dict)


class SharedUserDetected(_Schema):
    """``multibot.user.shared_detected``: one user talks to several bots."""

    user_id: str | int
    bot_ids: list[str] = Field(min_length=2)


class ResourceConflict(_Schema):
    """``multibot.resource.conflict``: two bots want one resource."""

    resource: str
    holders: list[str]


class LoadBalanceRequired(_Schema):
    """``multibot.load.balance_required``: a group lags or a bot is overloaded."""

    reason: str
    group: str | None = None
    stream: str | None = None
    lag: int | None = None
    bot_id: str | None = None


class FailoverTriggered(_Schema):
    """``multibot.failover.triggered``: a standby took over from the active instance, or
    (``role: coordinator``) a manager took over the deployment's coordinator duties from
    another (``old_instance`` and ``new_instance`` are then the hosts)."""

    role: Literal["bot", "coordinator"] = "bot"
    bot_id: str
    old_instance: str | None
    new_instance: str
    fencing_token: int | None = None
    reason: str | None = None
    published_by: str | None = None


class Maintenance(_Schema):
    """``system.maintenance.started`` / ``ended``."""

    reason: str | None = None
    by: str | None = None


class BackupCompleted(_Schema):
    """``system.backup.completed``."""

    location: str | None = None
    size_bytes: int | None = None


class ConfigUpdated(_Schema):
    """``system.config.updated``: the manager applied a new configuration."""

    added: list[str] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)
    changed: list[str] = Field(default_factory=list)


class TrimHolder(_Schema):
    """A consumer group whose unfinished entries keep a stream from being trimmed."""

    stream: str
    group: str = Field(description="'archiver': the archive is not storing (PostgreSQL?)")
    since_id: str = Field(description="its oldest unfinished entry; nothing from here on goes")
    pending: int | None = None
    lag: int | None = None


class MemoryPressure(_Schema):
    """``system.memory.pressure``: the whole system's memory crossed its budget threshold
    (``scope`` "budget"), or Redis neared its ``maxmemory`` (``scope`` "redis": publishers
    are held back while ``raised``, and ``holders`` say what keeps the streams long)."""

    used_bytes: int
    budget_bytes: int = Field(description="the budget, or Redis's maxmemory")
    raised: bool = Field(description="true: went above the threshold; false: back below")
    scope: Literal["budget", "redis"] = "budget"
    manager_bytes: int | None = None
    bots_bytes: int | None = None
    redis_bytes: int | None = None
    holders: list[TrimHolder] | None = None


class GroupRemoved(_Schema):
    """``system.group.removed``: the group of a bot gone from the config was destroyed."""

    group: str
    stream: str
    absent_seconds: float
    pending: int = Field(description="entries it had taken and not acked (now dropped)")
    lag: int | None = None


class GroupIdle(_Schema):
    """``system.group.idle``: no consumer of a group read for a long time (a removed bot?)."""

    group: str
    stream: str
    idle_seconds: float
    lag: int | None = None
    released: bool = Field(description="true: it no longer holds back trimming of the stream")


class RedisRestored(_Schema):
    """``system.redis.restored``: Redis had lost data; the manager put back the archive's."""

    streams: dict[str, int] = Field(description="stream → events written back into it")
    positions: dict[str, str] = Field(description="stream → last archived entry id")
    groups: dict[str, dict[str, str]] | None = Field(
        None, description="stream → group → the entry it resumes after"
    )
    note: str | None = None


class ArchiveStalled(_Schema):
    """``system.archive.stalled`` / ``resumed``: PostgreSQL took no events for a while; they
    wait in Redis (and count against its memory) until it is back."""

    error: str | None = None
    seconds: float = Field(description="how long the archive has been (or was) stalled")
    waiting: int | None = Field(None, description="entries read and not yet stored")


class Shutdown(_Schema):
    """``system.shutdown``: the manager is stopping."""

    reason: str | None = None


STANDARD_SCHEMAS: dict[str, type[BaseModel]] = {
    EventType.BOT_STARTED: BotLifecycle,
    EventType.BOT_STOPPED: BotLifecycle,
    EventType.BOT_ERROR: BotError,
    EventType.BOT_HEALTH_CHANGED: BotHealthChanged,
    EventType.BOT_OVERLOAD: BotOverload,
    EventType.MESSAGE_RECEIVED: UserMessage,
    EventType.MESSAGE_SENT: UserMessage,
    EventType.CONVERSATION_STARTED: Conversation,
    EventType.CONVERSATION_ENDED: Conversation,
    EventType.PROFILE_CREATED: Profile,
    EventType.PROFILE_UPDATED: Profile,
    EventType.PROFILE_DELETED: Profile,
    EventType.SHARED_USER_DETECTED: SharedUserDetected,
    EventType.RESOURCE_CONFLICT: ResourceConflict,
    EventType.LOAD_BALANCE_REQUIRED: LoadBalanceRequired,
    EventType.FAILOVER_TRIGGERED: FailoverTriggered,
    EventType.MAINTENANCE_STARTED: Maintenance,
    EventType.MAINTENANCE_ENDED: Maintenance,
    EventType.BACKUP_COMPLETED: BackupCompleted,
    EventType.CONFIGURATION_UPDATED: ConfigUpdated,
    EventType.SYSTEM_SHUTDOWN: Shutdown,
    EventType.MEMORY_PRESSURE: MemoryPressure,
    EventType.GROUP_IDLE: GroupIdle,
    EventType.GROUP_REMOVED: GroupRemoved,
    EventType.REDIS_RESTORED: RedisRestored,
    EventType.ARCHIVE_STALLED: ArchiveStalled,
    EventType.ARCHIVE_RESUMED: ArchiveStalled,
}
