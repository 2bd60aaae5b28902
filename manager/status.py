"""The status document: what ``multibot status``, ``/v1/status``, ``/v1/bots``, the
metrics and readiness read about the running manager, as typed models.

Built once by its owners (the supervisor: :class:`BotStatus`; the coordinator: memory and
groups; the pressure watch: :class:`RedisMemoryStatus`; the daemon: the whole
:class:`ManagerStatus`) and sent as JSON over the control socket and the API; readers
validate it back (``ManagerStatus.model_validate(answer)``). States are enum members, so a
reader compares ``bot.state is InstanceState.FAILED``, never a retyped string.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class InstanceState(enum.StrEnum):
    """Where a bot's slot (one replica) is in its life; a bot's state is its worst."""

    #: Spawned; not yet consuming.
    STARTING = "starting"
    #: Consuming (or holding the lease, for an active/standby bot).
    RUNNING = "running"
    #: An active/standby replica waiting for the lease.
    STANDBY = "standby"
    #: Exited; waiting out the restart backoff.
    BACKOFF = "backoff"
    #: Being stopped (SIGTERM sent).
    STOPPING = "stopping"
    #: Exited and not restarted (policy), or retired.
    STOPPED = "stopped"
    #: Gave up: a crash loop, or it cannot start. `multibot restart` tries again.
    FAILED = "failed"
    #: Alive but silent past the heartbeat timeout (or no first beat within the start-up
    #: timeout); being restarted.
    HUNG = "hung"


#: States in which an instance does its work (or stands by to).
UP_STATES = frozenset({InstanceState.RUNNING, InstanceState.STANDBY})
#: States shown in red: the bot gave up, or an instance is silent.
TROUBLE_STATES = frozenset({InstanceState.FAILED, InstanceState.HUNG})


class Role(enum.StrEnum):
    """An active/standby replica's role."""

    ACTIVE = "active"
    STANDBY = "standby"


class _Status(BaseModel):
    # A reader ignores fields it does not know: `multibot status` of one version still
    # reads the answer of a manager of another that is running through an upgrade.
    model_config = ConfigDict(frozen=True, extra="ignore")


class InstanceStatus(_Status):
    """One replica of a bot."""

    instance: int
    pid: int | None = None
    state: InstanceState
    role: Role | None = Field(None, description="only for active/standby bots, while alive")
    uptime: float | None = Field(None, description="seconds since its process started")
    restarts: int = 0
    rss: int | None = Field(None, description="bytes, its process tree")
    heartbeat_age: float | None = Field(None, description="seconds since its last heartbeat")
    last_exit: str | None = None


class BotStatus(_Status):
    """A configured bot and its replicas."""

    id: str
    state: InstanceState = Field(description="the worst of its instances'")
    restarts: int
    replicas: int
    standby: bool
    instances: list[InstanceStatus]
    outbox: int | None = Field(
        None,
        description="events (and dead letters) it published that the manager has not "
        "relayed to their stream yet; None when Redis did not say",
    )

    @property
    def failed(self) -> bool:
        """Whether the bot gave up (a crash loop, or it cannot start)."""
        return self.state is InstanceState.FAILED


class MemoryStatus(_Status):
    """The fleet's memory against its budget, in bytes (None: not measured)."""

    budget: int | None
    used: int | None
    manager: int | None
    bots: int | None
    redis: int | None


class TrimHolderStatus(_Status):
    """A group whose unfinished entries keep a stream from being trimmed."""

    stream: str
    group: str
    since_id: str
    pending: int
    lag: int | None = None


class RedisMemoryStatus(_Status):
    """Redis against its ``maxmemory``, and whether publishers are held back."""

    used: int
    maxmemory: int = Field(description="0: unlimited")
    policy: str = Field("", description="maxmemory-policy (noeviction is the safe one)")
    backpressure: bool
    holders: list[TrimHolderStatus] = Field(default_factory=list)
    shard: str = Field(
        "", description="on a Redis Cluster: the primary (host:port) these figures are of, "
        "the fullest shard; empty for one node"
    )  # fmt: skip
    shards: int = Field(1, description="primaries: 1, or a cluster's shard count")


class GroupStatus(_Status):
    """One consumer group's backlog on one stream."""

    stream: str
    group: str
    lag: int | None
    lag_capped: bool
    pending: int
    consumers: int


class ArchiveStatus(_Status):
    """The archiver: whether its last write to PostgreSQL worked, and what it did this run."""

    healthy: bool
    last_error: str | None = None
    archived: int = Field(0, description="events stored this run")
    dead_letters: int = Field(0, description="dead letters stored this run")
    batches: int = 0
    skipped: int = Field(0, description="entries that are not events (set aside)")
    unarchivable: int = Field(0, description="events the archive refused (set aside)")
    too_old: int = Field(0, description="of the unarchivable: older than retention_days")
    held: int = Field(
        0, description="events read and held back for a full block (archive.fill_wait)"
    )


class ManagerInfo(_Status):
    """The manager process."""

    pid: int
    version: str
    uptime: float | None = Field(None, description="seconds; None when unknown")
    rss: int | None = None
    data_dir: str
    redis: str | None = Field(None, description="its URL, password hidden")
    postgres: str | None = Field(None, description="its DSN, password hidden")
    maintenance: bool
    ready: bool | None = Field(None, description="whether the bots are up; None when unknown")
    api: str | None = None
    bot_users: list[str] | None = Field(
        None,
        description="the OS users the bots run as; empty: the manager's own (isolation is "
        "Redis-only); None: unknown",
    )
    memory_limits: str | None = Field(
        None,
        description="who enforces memory_action = 'restart' limits: 'cgroup v2' or "
        "'cgroup v1' (the kernel), 'polling' (the manager); None: unknown",
    )
    memory_limits_reason: str | None = Field(
        None, description="with 'polling': why the kernel cannot enforce them here"
    )


class HostStatus(_Status):
    """One manager of the deployment, as its last entry in Redis says."""

    host: str
    pid: int
    version: str
    bots: list[str] = Field(description="the bots it runs")
    replicas: dict[str, list[int]] = Field(
        default_factory=dict, description="the replicas (instance indices) it runs, per bot"
    )
    seen_ago: float = Field(description="seconds since it last wrote its entry")
    live: bool = Field(description="false: not heard from for three coordinator intervals")
    coordinator: bool = Field(description="whether it holds the coordinator lease")


class DeploymentStatus(_Status):
    """The managers of one deployment (one Redis, one config), seen from any of them."""

    host: str = Field(description="this manager's host")
    coordinator: str | None = Field(
        description="the host holding the coordinator lease (lag, archiver, trimmer, ...)"
    )
    hosts: list[HostStatus] = Field(default_factory=list)


class ManagerStatus(_Status):
    """Everything ``multibot status`` shows."""

    manager: ManagerInfo
    deployment: DeploymentStatus | None = None
    memory: MemoryStatus | None = None
    redis_memory: RedisMemoryStatus | None = None
    archive: ArchiveStatus | None = None
    bots: list[BotStatus] = Field(default_factory=list)
    groups: list[GroupStatus] = Field(default_factory=list)
    metrics: dict[str, Any] | None = Field(None, description="the fleet's event counters")

    def bot(self, bot_id: str) -> BotStatus:
        """The bot with this id; KeyError if there is none."""
        for bot in self.bots:
            if bot.id == bot_id:
                return bot
        raise KeyError(bot_id)
