"""``multibot start``: the manager daemon, from embedded services to a clean exit.

Start: umask 077 and a private data directory, embedded Redis/PostgreSQL when not
configured, each bot's OS user, a Redis ACL user per bot, the consumer groups of every
declared subscription, then the bots; READY=1 to systemd once they are all up. Running:
supervisor, coordinator, the manager's event publisher, the control socket and the
watchdog pings share one event loop and one task group. SIGHUP reloads the config (a task
of that group; one reload at a time, shared with the control socket's ``reload``);
SIGTERM/SIGINT publish ``system.shutdown``, stop the bots (in-flight events finish within
each bot's stop timeout), then the embedded services, and exit 0.

This module wires the parts; :mod:`~manager.daemon.provision` provisions the bots,
:mod:`~manager.daemon.parts` builds what runs, :mod:`~manager.daemon.redis_repair` repairs
a restarted Redis, :mod:`~manager.daemon.reload` reloads the config and
:mod:`~manager.daemon.commands` answers the control socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
from redis.asyncio import Redis

from bus import BusClient, EventType
from bus.archive.errors import SchemaTooNewError
from bus.connection import connect
from bus.keys import Keys
from bus.routing import Router
from bus.settings import BusSettings
from manager import __version__
from manager.announcer import Announcer
from manager.api.metrics_sources import render_metrics
from manager.api.view import DaemonView, start_api
from manager.archive.link import ArchiveLink
from manager.config import BotConfig, ManagerSettings
from manager.control import ControlServer, control_path
from manager.daemon.commands import Commands, Running
from manager.daemon.hosts import HostRegistry
from manager.daemon.isolation import BotUsers, secure_and_resolve
from manager.daemon.leadership import Leadership
from manager.daemon.membership import (
    coordinator_duties,
    follow_placement,
    join_deployment,
    leave_deployment,
)
from manager.daemon.partition_guard import check_partition_change
from manager.daemon.parts import Clients, Context, Parts, build_parts
from manager.daemon.placement import Placement
from manager.daemon.redis_repair import check_redis
from manager.daemon.reload import Reloader
from manager.daemon.tasks import cancel_all, log_tasks
from manager.embedded.service_watch import keep_running
from manager.embedded.services import Services, start_services
from manager.errors import ManagerError
from manager.observe.sd_notify import Notifier
from manager.supervision.cgroup_detect import detect
from manager.supervision.cgroups import CgroupLimiter, Unavailable
from manager.supervision.supervisor import Supervisor

log = structlog.get_logger("manager")
VERSION = __version__


class Manager:
    """One manager run: :meth:`run` returns when it has shut down."""

    def __init__(
        self,
        settings: ManagerSettings,
        *,
        config_path: Path | None,
        environ: Mapping[str, str],
    ) -> None:
        self.settings = settings
        self._environ = dict(environ)
        self._notifier = Notifier.from_env(environ)
        self._keys = Keys(settings.namespace)
        self._router = Router.of(BusSettings.model_validate(settings.bus_settings("redis://x")))
        self._shutdown = asyncio.Event()
        self._started_at = time.time()
        self._ready = False
        self._limiter: CgroupLimiter | None = None
        self._reloader = Reloader(
            config_path, notifier=self._notifier, shutdown=self._shutdown,
            set_bots=self._set_bots, place=self._place_reloaded,
        )  # fmt: skip
        self._commands = Commands(
            data_dir=settings.data_dir,
            namespace=settings.namespace,
            started_at=self._started_at,
            shutdown=self._shutdown,
            ready=lambda: self._ready,
            reload=self.reload,
        )
        self.services: Services | None = None
        self._coordinating: asyncio.Task[None] | None = None
        #: The coordinator election and the managers' registry (set once Redis is up).
        self._leadership: Leadership | None = None
        self._registry: HostRegistry | None = None
        self._placement: Placement | None = None

    def __repr__(self) -> str:
        state = "stopping" if self._shutdown.is_set() else "ready" if self._ready else "starting"
        bots = len(self.settings.bots)
        return f"<Manager {state} namespace={self._keys.namespace} bots={bots}>"

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the config file and apply bot additions, removals and changes (after any
        reload under way: SIGHUP's and the control socket's never interleave)."""
        return await self._reloader.reload()

    def _running_replicas(self) -> dict[str, list[int]]:
        """The replicas this manager runs, per bot."""
        return {b.id: self._indices(b) for b in self._place(self.settings.bots)}

    def _indices(self, bot: BotConfig) -> list[int]:
        """The replicas of ``bot`` this manager runs (see :mod:`.placement`)."""
        if self._placement is None:  # before Redis is up
            return list(range(bot.replicas))
        return self._placement.indices(bot)

    def _place(self, bots: Sequence[BotConfig]) -> list[BotConfig]:
        """Of ``bots``, those this manager runs (see :mod:`.placement`)."""
        if self._placement is None:  # before Redis is up: those it may run
            host = self.settings.host
            return [b for b in bots if not b.hosts or host in b.hosts]
        return self._placement.place(bots)

    async def _place_reloaded(self, bots: Sequence[BotConfig]) -> list[BotConfig]:
        """:meth:`_place` for a reloaded config: its new unplaced bots that are free are
        taken first."""
        if self._placement is not None:
            await self._placement.round(bots)
        return self._place(bots)

    def _set_bots(self, bots: Sequence[BotConfig]) -> None:
        self.settings = self.settings.model_copy(update={"bots": list(bots)})

    # -- the run -------------------------------------------------------------------------

    async def run(self) -> int:
        """Start everything, run until a stop signal or command, shut down; the exit code."""
        data_dir = self.settings.data_dir
        users = self._isolate()
        control = ControlServer(
            control_path(data_dir), self._commands.handlers(), is_bot=self._is_bot,
            writes=Commands.WRITES, audit=self._commands.audit_socket,
        )  # fmt: skip
        await control.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._shutdown.set)
        loop.add_signal_handler(signal.SIGHUP, self._reloader.on_sighup)
        loop.add_signal_handler(signal.SIGUSR2, log_tasks)
        log.info("manager starting", pid=os.getpid(), data_dir=str(data_dir), version=VERSION)
        try:
            self._notifier.status("starting embedded services")
            self.services = self._commands.services = await start_services(
                self.settings, bots_by_tcp=users.switching
            )
            try:
                await self._run_with(self.services, users)
            finally:
                self._notifier.status("stopping embedded services")
                await self.services.stop()
        finally:
            await control.close()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
                loop.remove_signal_handler(signum)
        log.info("manager stopped")
        return 0

    async def _connect_bus(self, admin: Redis, settings: BusSettings) -> Clients:
        """The manager's bus client, the one of its own events, and their announcer."""
        bus = BusClient("manager", settings=settings)
        await bus.connect()
        # The manager's own events go out past the backpressure flag (see bus.backpressure):
        # they report the pressure; the API's and the operators' events wait like any other.
        system_bus = BusClient("manager", settings=settings, redis=bus.redis, backpressure=False)
        await system_bus.connect()
        return Clients(admin, bus, system_bus, Announcer(system_bus))

    def _is_bot(self, pid: int) -> bool:
        """Whether ``pid`` is a running bot process (the control socket refuses those)."""
        parts = self._reloader.parts
        if parts is None:
            return False
        running = parts.supervisor.running().values()
        return any(p.pid == pid for processes in running for p in processes.values())

    def _isolate(self) -> BotUsers:
        """Before anything starts: umask 077, a private data directory, and the bots' OS
        users looked up (a missing one stops the start here, before the services)."""
        users = secure_and_resolve(self.settings)
        self._commands.bot_users = users.names
        # Before any child is spawned: under cgroup v2 the manager moves into a leaf first.
        limits = detect()
        self._limiter = limits if isinstance(limits, CgroupLimiter) else None
        reason = limits.reason if isinstance(limits, Unavailable) else None
        self._commands.memory_limits = (str(limits.mode), reason)
        return users

    async def _run_with(self, services: Services, users: BotUsers) -> None:
        """Build the parts on ``services``, run them until the shutdown, close them."""
        bus_settings = BusSettings.model_validate(self.settings.bus_settings(services.redis_url))
        admin = connect(bus_settings, client_name="multibot-manager")
        await check_redis(admin, services.redis_url)
        clients = await self._connect_bus(admin, bus_settings)
        assert services.postgres_dsn is not None
        archive = ArchiveLink(services.postgres_dsn, self._keys)
        context = Context(
            self.settings, services, bus_settings, self._keys, self._router, self._environ,
            users, self._limiter, bots=lambda: self.settings.bots,
            local_bots=lambda: self._place(self.settings.bots),
        )  # fmt: skip
        parts = self._reloader.parts = build_parts(context, clients, archive)
        parts.supervisor.replica_indices = self._indices
        self._commands.running = Running(
            clients.bus, parts.supervisor, parts.coordinator, parts.archiver
        )
        try:
            try:
                await archive.try_at_start()
            except SchemaTooNewError as exc:
                raise ManagerError(str(exc)) from None
            await check_partition_change(admin, self._keys, self._router)
            await self._join_deployment(admin)
            await self._prepare(parts, services.postgres_dsn)
            await self._serve(parts, services)
        finally:
            if self._commands.api is not None:
                await self._commands.api.stop()
            await archive.close()
            await clients.system_bus.close()
            await clients.bus.close()
            await admin.aclose()

    async def _join_deployment(self, admin: Redis) -> None:
        registry, self._placement = await join_deployment(
            admin, self._keys, self.settings, lambda: self.settings.bots,
            self._running_replicas,
        )  # fmt: skip
        self._registry = self._commands.registry = registry

    async def _prepare(self, parts: Parts, postgres_dsn: str) -> None:
        """Before the bots start: lost streams restored, the bots provisioned, the API up."""
        bots = self._place(self.settings.bots)
        await parts.repair.restore()
        await parts.provisioner.prepare_reader(postgres_dsn)
        deployment = self.settings.bots
        await parts.provisioner.prepare_bots(bots, parts.coordinator, deployment=deployment)
        parts.coordinator.configure(bots)
        parts.trimmer.removed.configure(b.id for b in deployment)
        view = self._view(parts)
        self._commands.api = await start_api(self.settings.api, self.settings.data_dir, view)

    async def _serve(self, parts: Parts, services: Services) -> None:
        """Run the parts in the task group until the shutdown; stop the bots, then the rest."""
        announcer = parts.clients.announcer
        async with asyncio.TaskGroup() as tg:
            self._reloader.tasks = tg
            try:
                publishing = tg.create_task(announcer.run())
                supervising = tg.create_task(parts.supervisor.run(self._place(self.settings.bots)))
                leadership = self._lead(tg, parts)
                await leadership.settle()  # coordinating from the first round, if free
                helpers = self._helpers(tg, parts, services)
                await self._shutdown.wait()
                await self._stop(parts, supervising)
                log.info("bots stopped; stopping the coordinator and archiver")
                await cancel_all([*helpers, *self._reloader.running])
                if self._leadership is not None:  # its duties, should its stop be cut short
                    await cancel_all(self._leadership.duties)
                await leave_deployment(self._registry, self._placement)
                await announcer.flush(5.0)
                await cancel_all([publishing])
            finally:
                self._reloader.tasks = None

    def _lead(self, tg: asyncio.TaskGroup, parts: Parts) -> Leadership:
        """The coordinator election; the deployment-wide duties run in ``tg`` while this
        manager holds the lease (see :mod:`.leadership`)."""
        settings = self.settings
        leadership = self._leadership = self._commands.leadership = Leadership(
            parts.clients.admin, self._keys, settings.host, settings.coordinator.lease_ttl,
            start=coordinator_duties(tg, parts, self._keys, settings),
            announcer=parts.clients.announcer,
        )  # fmt: skip
        return leadership

    def _helpers(
        self, tg: asyncio.TaskGroup, parts: Parts, services: Services
    ) -> list[asyncio.Task[Any]]:
        """Start the tasks that run beside the bots until the shutdown cancels them."""
        leadership = self._leadership
        assert leadership is not None
        parts.coordinator.leading = lambda: leadership.leading
        self._coordinating = tg.create_task(parts.coordinator.run())
        helpers = [
            self._coordinating,
            tg.create_task(self._notifier.watchdog_loop()),
            tg.create_task(self._announce_ready(parts.supervisor)),
            tg.create_task(leadership.run()),
        ]
        if self.settings.archive.on_every_host:  # else a duty of the coordinator's
            helpers.append(tg.create_task(parts.archiver.run()))
        if self._registry is not None:
            helpers.append(tg.create_task(self._registry.run()))
        if self._placement is not None:
            interval = self.settings.coordinator.lease_ttl / 3
            follow = follow_placement(interval, lambda: self._follow_placement(parts))
            helpers.append(tg.create_task(follow))
        if services.redis is not None:
            restarted = parts.repair.redis_restarted
            watch = keep_running("redis", services.redis, on_restart=restarted)
            helpers.append(tg.create_task(watch))
        if services.postgres is not None:  # the archive's pool reconnects by itself
            helpers.append(tg.create_task(keep_running("postgres", services.postgres)))
        return helpers

    async def _follow_placement(self, parts: Parts) -> None:
        """Take and give up unplaced bots; start and stop them as a reload would."""
        async with self._reloader.held():
            assert self._placement is not None
            if self._shutdown.is_set() or not await self._placement.round():
                return
            bots = self._place(self.settings.bots)
            await parts.provisioner.prepare_bots(
                bots, parts.coordinator, deployment=self.settings.bots
            )
            parts.coordinator.configure(bots)
            added, removed, _ = await parts.supervisor.apply(bots)
        log.info("bots placed here changed", added=added, removed=removed)

    def _view(self, parts: Parts) -> DaemonView:
        def coordinating() -> bool:
            return self._coordinating is not None and not self._coordinating.done()

        return DaemonView(
            bus=parts.clients.bus,
            supervisor=parts.supervisor,
            coordinator=parts.coordinator,
            coordinating=coordinating,
            archiver=parts.archiver,
            archive=parts.archive,
            status=self._commands.status,
            ready=lambda: self._ready,
            metrics=render_metrics,
        )

    async def _stop(self, parts: Parts, supervising: asyncio.Task[None]) -> None:
        log.info("shutting down: stopping the bots")
        self._notifier.stopping()
        announcer = parts.clients.announcer
        announcer.announce(EventType.SYSTEM_SHUTDOWN, {"reason": "the manager is stopping"})
        await announcer.flush(2.0)
        # A reload under way finishes first (the bots it started stop with the rest); a
        # later one sees the shutdown and refuses.
        async with self._reloader.held():
            longest = max((b.stop_timeout for b in self._place(self.settings.bots)), default=0)
            self._notifier.extend_timeout(longest + 30)
            await parts.supervisor.stop()
        await supervising

    async def _announce_ready(self, supervisor: Supervisor) -> None:
        """READY=1 once every bot is consuming, standing by or failed (or at the timeout)."""
        try:
            timeout = self.settings.supervisor.startup_timeout
            await asyncio.wait_for(supervisor.wait_all_up(), timeout)
        except TimeoutError:
            log.warning("not every bot started in time; reporting ready anyway")
        self._ready = True
        gc.freeze()  # start-up's objects live on: out of the full collections (s of pauses)
        started = time.time() - self._started_at
        log.info("manager ready", startup_s=round(started, 2), bots=len(supervisor.bots))
        self._notifier.ready(f"{len(supervisor.bots)} bots running")
        self._reloader.ready()


async def run_manager(settings: ManagerSettings, config_path: Path | None) -> int:
    """Run a manager with ``settings`` until it is stopped; its exit code."""
    manager = Manager(settings, config_path=config_path, environ=os.environ)
    with contextlib.suppress(asyncio.CancelledError):
        return await manager.run()
    return 1
