"""The control socket's commands (``multibot status``, ``stop``, ``restart``, ``maintenance``,
``reload``, and ``connection`` for the other CLI commands) and the status document.

The control socket is up before the embedded services and the bots: until
:attr:`Commands.services` and :attr:`Commands.running` are set, each command answers with
what there is or says the manager is still starting.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from redis.exceptions import RedisError

from bus import BusClient, EventType
from bus.archive.audit_log import Outcome
from bus.connection import redact
from bus.keys import Keys
from bus.outbox import outbox_backlog
from manager import __version__
from manager.api.server import ApiServer
from manager.archive.archiver import Archiver
from manager.audit import os_actor, record
from manager.config import ConfigError
from manager.control import CommandError, Handler
from manager.control_peer import Peer
from manager.daemon.hosts import HostRegistry
from manager.daemon.isolation import OsUserError
from manager.daemon.leadership import Leadership
from manager.embedded.services import Services
from manager.status import (
    BotStatus,
    DeploymentStatus,
    HostStatus,
    ManagerInfo,
    ManagerStatus,
)
from manager.supervision.coordinator import Coordinator
from manager.supervision.supervisor import Supervisor

log = structlog.get_logger("manager")


@dataclass(frozen=True)
class Running:
    """The started parts the commands read and drive."""

    bus: BusClient
    supervisor: Supervisor
    coordinator: Coordinator
    archiver: Archiver


class Commands:
    """Answers the control commands from the manager's parts, as far as they are started."""

    def __init__(
        self,
        *,
        data_dir: Path,
        namespace: str,
        started_at: float,
        shutdown: asyncio.Event,
        ready: Callable[[], bool],
        reload: Callable[[], Awaitable[dict[str, list[str]]]],
    ) -> None:
        """``shutdown`` is set by ``stop``; ``ready`` says whether the bots are up;
        ``reload`` re-reads the config (the manager serialises its reloads)."""
        self._data_dir = data_dir
        self._namespace = namespace
        self._started_at = started_at
        self._shutdown = shutdown
        self._ready = ready
        self._reload = reload
        #: The embedded or configured Redis and PostgreSQL, once started.
        self.services: Services | None = None
        #: The bus, supervisor, coordinator and archiver, once built.
        self.running: Running | None = None
        #: The HTTP API, once listening.
        self.api: ApiServer | None = None
        #: Whether an operator declared maintenance (``multibot maintenance on``).
        self.maintenance = False
        #: The OS users the bots run as (empty: the manager's), once known.
        self.bot_users: Callable[[], list[str]] | None = None
        #: Who enforces the bots' memory limits, and why not the kernel (from cgroup_detect).
        self.memory_limits: tuple[str, str | None] | None = None
        #: The deployment's managers and its coordinator election (set once Redis is up).
        self.registry: HostRegistry | None = None
        self.leadership: Leadership | None = None

    def __repr__(self) -> str:
        started = "running" if self.running else "starting"
        return f"<Commands {started} maintenance={self.maintenance}>"

    #: The control commands that change something: each is recorded in the audit log.
    WRITES = ("stop", "restart", "maintenance", "reload")

    async def audit_socket(
        self,
        peer: Peer | None,
        command: str,
        request: Mapping[str, Any],
        outcome: Outcome,
        error: str | None,
    ) -> None:
        """Record a write command of the control socket: its peer's OS user, and what."""
        detail = {k: v for k, v in request.items() if k != "command"}
        if peer is not None:
            detail["pid"] = peer.pid
        actor = os_actor(peer.uid) if peer is not None else "user:unknown"
        target = str(request["bot"]) if command == "restart" and "bot" in request else None
        fields: dict[str, Any] = {"actor": actor, "channel": "socket", "action": command,
                                  "target": target, "detail": detail, "outcome": outcome,
                                  "error": error}  # fmt: skip
        if self.running is None:  # before Redis is up: the log is all there is
            log.warning("audit record before Redis is up: it is only in this log", **fields)
            return
        await record(self.running.bus.redis, Keys(self._namespace), **fields)

    def handlers(self) -> dict[str, Handler]:
        """The control server's handlers, by command name."""
        return {
            "status": self._status_command,
            "stop": self._stop,
            "restart": self._restart,
            "maintenance": self._maintenance,
            "reload": self._reload_command,
            "connection": self._connection,
        }

    async def _deployment(self) -> DeploymentStatus | None:
        """The deployment's managers as the registry has them, and who coordinates."""
        if self.registry is None or self.leadership is None:
            return None
        try:
            entries = await self.registry.entries()
        except Exception:  # Redis away: the rest of the status still answers
            entries = []
        leader = self.leadership.host if self.leadership.leading else self.leadership.holder
        return DeploymentStatus(
            host=self.registry.host,
            coordinator=leader,
            hosts=[
                HostStatus(host=e.host, pid=e.pid, version=e.version, bots=list(e.bots),
                           replicas=e.replicas, seen_ago=e.age, live=e.live,
                           coordinator=e.host == leader)
                for e in entries
            ],
        )  # fmt: skip

    async def status(self) -> ManagerStatus:
        """The status document of ``multibot status`` and the HTTP API."""
        import psutil  # noqa: PLC0415 - only the status command needs it here

        services, running = self.services, self.running
        manager = ManagerInfo(
            pid=os.getpid(),
            version=__version__,
            uptime=time.time() - self._started_at,
            rss=psutil.Process().memory_info().rss,
            data_dir=str(self._data_dir),
            redis=redact(services.redis_url) if services else None,
            postgres=redact(services.postgres_dsn or "") if services else None,
            maintenance=self.maintenance,
            ready=self._ready(),
            api=self.api.url if self.api else None,
            bot_users=self.bot_users() if self.bot_users else None,
            memory_limits=self.memory_limits[0] if self.memory_limits else None,
            memory_limits_reason=self.memory_limits[1] if self.memory_limits else None,
        )
        if running is None:
            return ManagerStatus(manager=manager)
        coordinator = running.coordinator
        return ManagerStatus(
            manager=manager,
            deployment=await self._deployment(),
            memory=coordinator.memory_status(),
            redis_memory=coordinator.redis_memory_status(),
            archive=running.archiver.status(),
            bots=await _with_outboxes(running.bus, running.supervisor.status()),
            groups=coordinator.group_status(),
            metrics=running.supervisor.metrics.snapshot(),
        )

    async def _status_command(self, _: Mapping[str, Any]) -> dict[str, Any]:
        return (await self.status()).model_dump(mode="json")

    async def _connection(self, _: Mapping[str, Any]) -> dict[str, Any]:
        """Where the manager's Redis and PostgreSQL are, credentials included (the socket is
        readable by the manager's user only), so CLI commands need no flags."""
        if self.services is None:
            raise CommandError("the manager is still starting its services")
        return {
            "redis_url": self.services.redis_url,
            "postgres_dsn": self.services.postgres_dsn,
            "namespace": self._namespace,
        }

    async def _stop(self, _: Mapping[str, Any]) -> str:
        self._shutdown.set()
        return "stopping"

    async def _restart(self, request: Mapping[str, Any]) -> str:
        bot_id = str(request.get("bot"))
        supervisor = self.running.supervisor if self.running else None
        if supervisor is None or bot_id not in supervisor.bots:
            known = ", ".join(supervisor.bots) if supervisor else ""
            raise CommandError(f"no bot {bot_id!r} is configured (bots: {known})")
        await supervisor.restart(bot_id)
        return f"restarted {bot_id}"

    async def _maintenance(self, request: Mapping[str, Any]) -> str:
        on = bool(request.get("on"))
        if self.running is None:
            raise CommandError("the manager is still starting")
        self.maintenance = on
        event = EventType.MAINTENANCE_STARTED if on else EventType.MAINTENANCE_ENDED
        reason = request.get("reason")
        await self.running.bus.publish(event, {"reason": reason, "by": "operator"})
        log.info("maintenance " + ("started" if on else "ended"), reason=reason)
        return "maintenance on" if on else "maintenance off"

    async def _reload_command(self, _: Mapping[str, Any]) -> dict[str, list[str]]:
        try:
            return await self._reload()
        except (ConfigError, OsUserError) as exc:
            raise CommandError(str(exc)) from None


async def _with_outboxes(bus: BusClient, bots: list[BotStatus]) -> list[BotStatus]:
    """``bots`` with what waits in their outboxes (unchanged when Redis does not say)."""
    try:
        waiting = await outbox_backlog(bus.redis, bus.keys, [b.id for b in bots])
    except (RedisError, OSError):
        return bots
    return [b.model_copy(update={"outbox": waiting.get(b.id)}) for b in bots]
