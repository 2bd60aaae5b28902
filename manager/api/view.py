"""The running manager as the HTTP API sees it (:class:`manager.api.context.ManagerView`)."""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from redis.exceptions import ResponseError

from bus import BusClient
from bus.archive import ArchiveStore
from manager.api.app import create_app
from manager.api.auth import ADMIN_TOKEN_FILE, TokenError, Tokens
from manager.api.context import UnknownBotError
from manager.api.models import ApiStatus, Health, Throughput
from manager.api.server import ApiServer
from manager.archive.archiver import Archiver
from manager.archive.link import ArchiveLink
from manager.audit import AuditBuffer
from manager.config import ApiSettings
from manager.errors import ManagerError
from manager.observe.history import History
from manager.observe.lag import stream_keys
from manager.status import BotStatus, InstanceState, ManagerStatus
from manager.supervision.coordinator import Coordinator
from manager.supervision.supervisor import Supervisor

log = structlog.get_logger("manager.api")

_CHECK_TIMEOUT = 1.0  # seconds a readiness check may take
_RATE_WINDOW = 30.0  # seconds of stream growth the status page's throughput averages


class DaemonView:
    """Reads the manager's parts; owns nothing."""

    def __init__(
        self,
        *,
        bus: BusClient,
        supervisor: Supervisor,
        coordinator: Coordinator,
        coordinating: Callable[[], bool],
        archiver: Archiver | None,
        archive: ArchiveLink | None,
        status: Callable[[], Awaitable[ManagerStatus]],
        ready: Callable[[], bool],
        metrics: Callable[[DaemonView], Awaitable[bytes]],
    ) -> None:
        self._bus = bus
        self.supervisor = supervisor
        self.coordinator = coordinator
        self._coordinating = coordinating
        self.archiver = archiver
        self._archive = archive
        self._status = status
        self._ready = ready
        self._metrics = metrics
        self._started = time.monotonic()
        #: Requests served, by (method, route template, status code).
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        #: The status page's charts (sampled while the API serves).
        self.history = History()
        #: The publishes' audit records, written every 0.2 s while the API serves.
        self.audit_buffer = AuditBuffer(bus.redis, bus.keys)

    @property
    def bus(self) -> BusClient:
        return self._bus

    async def archive(self) -> ArchiveStore | None:
        return None if self._archive is None else await self._archive.get()

    async def status(self) -> ApiStatus:
        status = await self._status()
        return ApiStatus(
            **dict(status),
            dead_letters=await self._bus.dlq.count(),
            throughput=Throughput(events_per_s=await self._throughput()),
        )

    async def _throughput(self) -> float | None:
        """Events/s added to the namespace's streams over the last half minute (None until
        two looks, a second apart, were taken)."""
        now, total = time.monotonic(), 0
        redis = self._bus.redis
        for key in await stream_keys(redis, self._bus.keys):
            try:
                info: Any = await redis.xinfo_stream(key)
            except ResponseError:
                continue
            added = info.get("entries-added")  # Redis 7; 6.2 has only the length
            total += int(added if added is not None else info["length"])
        samples = self._samples
        while samples and now - samples[0][0] > _RATE_WINDOW:
            samples.popleft()
        if not samples or now - samples[-1][0] >= 1.0:
            samples.append((now, total))
        first_at, first_total = samples[0]
        if now - first_at < 1.0:
            return None
        return round(max(0, total - first_total) / (now - first_at), 1)

    def bots(self) -> list[BotStatus]:
        return self.supervisor.status()

    async def restart_bot(self, bot_id: str) -> None:
        if bot_id not in self.supervisor.bots:
            known = ", ".join(sorted(self.supervisor.bots)) or "none"
            raise UnknownBotError(f"no bot {bot_id!r} is configured (bots: {known})")
        await self.supervisor.restart(bot_id)

    def health(self) -> Health:
        return Health(
            alive=True,
            pid=os.getpid(),
            uptime_seconds=round(time.monotonic() - self._started, 3),
            archive=self.archiver.status() if self.archiver else None,
        )

    async def readiness(self) -> tuple[list[str], dict[str, str]]:
        problems: list[str] = []
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self._bus.redis.ping(), _CHECK_TIMEOUT)
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"unreachable: {exc or type(exc).__name__}"
            problems.append(f"Redis is unreachable ({checks['redis']}): see `multibot status`")
        if self.archiver is None:
            checks["postgres"] = "off"
        elif self.archiver.healthy:
            checks["postgres"] = "ok"
        else:  # events wait in Redis meanwhile: degraded, not down
            checks["postgres"] = f"degraded: {self.archiver.last_error}"
        if self._coordinating():
            checks["coordinator"] = "ok"
        else:
            checks["coordinator"] = "stopped"
            problems.append("the coordinator is not running: see the manager's log")
        failed = [b.id for b in self.bots() if b.state is InstanceState.FAILED]
        checks["bots"] = f"failed: {', '.join(failed)}" if failed else "ok"
        problems += [
            f"bot {bot!r} gave up after a crash loop: read its last error in `multibot "
            f"status`, fix it, then `multibot restart {bot}`"
            for bot in failed
        ]
        if not self._ready():
            checks["startup"] = "starting"
            problems.append("the manager is still starting its bots")
        else:
            checks["startup"] = "done"
        return problems, checks

    async def metrics(self) -> bytes:
        return await self._metrics(self)

    def count_request(self, method: str, route: str, code: int) -> None:
        self.requests[(method, route, str(code))] += 1


async def start_api(settings: ApiSettings, data_dir: Path, view: DaemonView) -> ApiServer | None:
    """Load the tokens (generating the admin one on first start) and serve the API; None
    when ``api.enabled`` is off. A bad token or a port in use is a :class:`ManagerError`."""
    if not settings.enabled:
        log.info("HTTP API disabled (api.enabled = false)")
        return None
    try:
        tokens = Tokens.load(settings.tokens, data_dir)
    except TokenError as exc:
        raise ManagerError(str(exc)) from None
    server = ApiServer(create_app(view, settings, tokens), settings.host, settings.port)
    await server.start()
    view.history = History(settings.history_window, settings.history_interval)
    server.run_beside(view.history.run(view.status))
    server.run_beside(view.audit_buffer.run())
    log.info(
        "HTTP API tokens loaded",
        admin_token_file=str(data_dir / ADMIN_TOKEN_FILE),
        tokens=len(tokens),
        docs=f"{server.url}/docs",
    )
    return server
