"""``multibot start``: the manager daemon, from embedded services to a clean exit.

Start: data directory, embedded Redis/PostgreSQL when not configured, a Redis ACL user per
bot, the consumer groups of every declared subscription, then the bots; READY=1 to systemd
once they are all up. Running: supervisor, coordinator, the manager's event publisher, the
control socket and the watchdog pings share one event loop. SIGHUP reloads the config;
SIGTERM/SIGINT publish ``system.shutdown``, stop the bots (in-flight events finish within
each bot's stop timeout), then the embedded services, and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError

from bus import BusClient, BusSettings, EventType
from bus.archive.errors import ArchiveUnavailableError, SchemaTooNewError
from bus.connection import connect, raise_swallowed_cancel, redact
from bus.keys import Keys, group_name
from bus.routing import Router
from bus.supervision import RuntimeSpec
from manager import __version__
from manager.announcer import Announcer
from manager.api.metrics_sources import render_metrics
from manager.api.server import ApiServer
from manager.api.view import DaemonView, start_api
from manager.archive.archiver import Archiver
from manager.archive.group_positions import record_positions
from manager.archive.link import ArchiveLink, ensure_reader
from manager.archive.pressure import PressureWatch
from manager.archive.restore import restore
from manager.archive.retention import run_retention
from manager.archive.trimmer import Trimmer
from manager.config import BotConfig, ConfigError, ManagerSettings, load_config
from manager.control import CommandError, ControlServer, control_path
from manager.daemon.redis_acl import (
    bot_redis_url,
    bot_username,
    bot_users,
    delete_bot_user,
    ensure_bot_user,
    generate_password,
)
from manager.embedded.service_watch import keep_running
from manager.embedded.services import Services, start_services
from manager.errors import ManagerError
from manager.observe.sd_notify import NOTIFY_ENV_KEYS, Notifier
from manager.supervision.coordinator import Coordinator, declared_streams
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
        self._config_path = config_path
        self._environ = dict(environ)
        self._notifier = Notifier.from_env(environ)
        self._keys = Keys(settings.namespace)
        self._router = Router(*_routes(settings))
        self._shutdown = asyncio.Event()
        self._passwords: dict[str, str] = {}
        self._started_at = time.time()
        self._maintenance = False
        self._ready = False
        self.services: Services | None = None
        self._admin: Redis | None = None
        self._bus: BusClient | None = None
        self._supervisor: Supervisor | None = None
        self._coordinator: Coordinator | None = None
        self._archiver: Archiver | None = None
        self._trimmer: Trimmer | None = None
        self._system_bus: BusClient | None = None
        self._archive: ArchiveLink | None = None
        self._reader_dsn: str | None = None
        self._api: ApiServer | None = None
        self._coordinating: asyncio.Task[None] | None = None

    # -- the run -------------------------------------------------------------------------

    async def run(self) -> int:
        """Start everything, run until a stop signal or command, shut down; the exit code."""
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        control = ControlServer(control_path(data_dir), self._handlers())
        await control.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._shutdown.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGUSR2, _log_tasks)
        log.info("manager starting", pid=os.getpid(), data_dir=str(data_dir), version=VERSION)
        try:
            self._notifier.status("starting embedded services")
            self.services = await start_services(self.settings)
            try:
                await self._run_with(self.services)
            finally:
                self._notifier.status("stopping embedded services")
                await self.services.stop()
        finally:
            await control.close()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
                loop.remove_signal_handler(signum)
        log.info("manager stopped")
        return 0

    async def _connect_bus(self, settings: BusSettings) -> tuple[BusClient, BusClient, Announcer]:
        """The manager's bus client, the one of its own events, and their announcer."""
        self._bus = bus = BusClient("manager", settings=settings)
        await bus.connect()
        # The manager's own events go out past the backpressure flag (see bus.backpressure):
        # they report the pressure; the API's and the operators' events wait like any other.
        system_bus = BusClient("manager", settings=settings, redis=bus.redis, backpressure=False)
        await system_bus.connect()
        self._system_bus = system_bus
        return bus, system_bus, Announcer(system_bus)

    def _memory_keepers(
        self, coordinator: Coordinator, announcer: Announcer
    ) -> tuple[Trimmer, PressureWatch]:
        """The trimmer, and the watch that holds publishers back when Redis is nearly full."""
        assert self._admin is not None
        self._trimmer = trimmer = Trimmer(self._admin, self._keys, self.settings.archive, announcer)
        pressure = PressureWatch(
            self._admin, self._keys, trimmer, announcer, self.settings.coordinator.memory
        )
        coordinator.pressure = pressure.state
        return trimmer, pressure

    async def _run_with(self, services: Services) -> None:
        bus_settings = BusSettings.model_validate(self.settings.bus_settings(services.redis_url))
        self._admin = connect(bus_settings, client_name="multibot-manager")
        await self._check_redis(self._admin, services.redis_url)
        bus, system_bus, announcer = await self._connect_bus(bus_settings)
        supervisor = self._supervisor = Supervisor(
            self.settings.supervisor,
            spec_factory=self._spec,
            announcer=announcer,
            redis=self._admin,
            keys=self._keys,
            visibility_timeout=bus_settings.consumer.visibility_timeout,
        )
        supervisor.metrics.add_local(bus.metrics)
        supervisor.metrics.add_local(system_bus.metrics)
        coordinator = self._coordinator = Coordinator(
            self.settings.coordinator,
            redis=self._admin,
            keys=self._keys,
            router=self._router,
            announcer=announcer,
            supervisor=supervisor,
            extra_pids=lambda: services.memory_pids,
        )
        assert services.postgres_dsn is not None
        archive = ArchiveLink(services.postgres_dsn, self._keys)
        self._archiver = archiver = Archiver(
            self._admin,
            self._keys,
            self.settings.archive,
            archive.get,
            announce=announcer.announce,
            max_data_bytes=bus_settings.max_event_bytes,
        )
        trimmer, pressure = self._memory_keepers(coordinator, announcer)
        try:
            try:
                await archive.try_at_start()
            except SchemaTooNewError as exc:
                raise ManagerError(str(exc)) from None
            self._archive = archive
            await self._restore()
            await self._prepare_reader(archive, services.postgres_dsn)
            await self._prepare_bots(self.settings.bots)
            coordinator.configure(self.settings.bots)
            trimmer.removed.configure(b.id for b in self.settings.bots)
            self._api = await start_api(self.settings.api, self.settings.data_dir, self._view())
            async with asyncio.TaskGroup() as tg:
                publishing = tg.create_task(announcer.run())
                supervising = tg.create_task(supervisor.run(self.settings.bots))
                self._coordinating = tg.create_task(coordinator.run())
                helpers = [
                    self._coordinating,
                    tg.create_task(self._notifier.watchdog_loop()),
                    tg.create_task(self._announce_ready(supervisor)),
                    tg.create_task(archiver.run()),
                    tg.create_task(trimmer.run()),
                    tg.create_task(
                        record_positions(
                            self._admin, self._keys, archive.get, self.settings.coordinator
                        )
                    ),
                    tg.create_task(pressure.run()),
                    tg.create_task(run_retention(archive.get, self.settings.archive)),
                    tg.create_task(self._watch_redis_identity()),
                ]
                if services.redis is not None:
                    restarted = self._redis_restarted
                    watch = keep_running("redis", services.redis, on_restart=restarted)
                    helpers.append(tg.create_task(watch))
                if services.postgres is not None:  # the archive's pool reconnects by itself
                    helpers.append(tg.create_task(keep_running("postgres", services.postgres)))
                await self._shutdown.wait()
                await self._stop(announcer, supervisor, supervising)
                log.info("bots stopped; stopping the coordinator and archiver")
                await _cancel_all(helpers)
                await announcer.flush(5.0)
                await _cancel_all([publishing])
        finally:
            if self._api is not None:
                await self._api.stop()
            await archive.close()
            await system_bus.close()
            await bus.close()
            await self._admin.aclose()

    def _view(self) -> DaemonView:
        assert self._bus is not None
        assert self._supervisor is not None
        assert self._coordinator is not None

        def coordinating() -> bool:
            return self._coordinating is not None and not self._coordinating.done()

        return DaemonView(
            bus=self._bus,
            supervisor=self._supervisor,
            coordinator=self._coordinator,
            coordinating=coordinating,
            archiver=self._archiver,
            archive=self._archive,
            status=lambda: self._cmd_status({}),
            ready=lambda: self._ready,
            metrics=render_metrics,
        )

    async def _stop(
        self, announcer: Announcer, supervisor: Supervisor, supervising: asyncio.Task[None]
    ) -> None:
        log.info("shutting down: stopping the bots")
        self._notifier.stopping()
        announcer.announce(EventType.SYSTEM_SHUTDOWN, {"reason": "the manager is stopping"})
        await announcer.flush(2.0)
        longest = max((b.stop_timeout for b in self.settings.bots), default=0)
        self._notifier.extend_timeout(longest + 30)
        await supervisor.stop()
        await supervising

    async def _announce_ready(self, supervisor: Supervisor) -> None:
        """READY=1 once every bot is consuming, standing by or failed (or at the timeout)."""
        try:
            timeout = self.settings.supervisor.startup_timeout
            await asyncio.wait_for(supervisor.wait_all_up(), timeout)
        except TimeoutError:
            log.warning("not every bot started in time; reporting ready anyway")
        self._ready = True
        started = time.time() - self._started_at
        log.info("manager ready", startup_s=round(started, 2), bots=len(supervisor.bots))
        self._notifier.ready(f"{len(supervisor.bots)} bots running")

    async def _check_redis(self, redis: Redis, url: str) -> None:
        """Fail the start with a clear error when Redis cannot be used."""
        try:
            await redis.ping()
        except AuthenticationError as exc:
            await redis.aclose()
            raise ManagerError(
                f"Redis at {redact(url)} refused the credentials ({exc}): put the right user "
                "and password in redis_url (or MULTIBOT_REDIS_URL)"
            ) from None
        except (RedisError, OSError) as exc:
            await redis.aclose()
            raise ManagerError(
                f"cannot reach Redis at {redact(url)} ({exc}): start it, fix redis_url (or "
                "MULTIBOT_REDIS_URL), or leave it unset to run an embedded redis-server"
            ) from None

    async def _redis_restarted(self) -> None:
        """Redis came back (restarted, maybe empty): data the archive has, ACL users (kept
        in memory only) and groups."""
        await self._restore()
        await self._prepare_bots(self.settings.bots)

    async def _restore(self) -> None:
        """Put back what the archive has of streams Redis lost (see manager.archive.restore)."""
        if self._archive is None or not self._archive.connected or self._admin is None:
            return
        store = await self._archive.get()
        keys, router = self._keys, self._router
        groups_of: dict[str, list[str]] = {}
        for bot in self.settings.bots:
            for stream in declared_streams(bot, router, keys):
                groups_of.setdefault(stream, []).append(group_name(bot.id))
        done = await restore(
            self._admin,
            store,
            keys,
            groups_for=lambda stream: groups_of.get(stream, []),
            hot_window_ms=int(self.settings.archive.hot_window * 1000),
            now_ms=int(time.time() * 1000),
        )
        if done and self._system_bus is not None:
            await self._system_bus.publish(
                EventType.REDIS_RESTORED,
                {
                    "streams": {keys.stream_name(s): n for s, n in done.events.items()},
                    "positions": {keys.stream_name(s): p for s, p in done.positions.items()},
                    "groups": {keys.stream_name(s): g for s, g in done.groups.items()},
                    "note": "each group resumes after its recorded position ("
                    + done.describe_groups(keys.stream_name)
                    + "); events that reached Redis after the last archived entry but were "
                    "not archived before the loss are gone",
                },
            )

    async def _watch_redis_identity(self) -> None:
        """Notice a restarted Redis (its run_id changes) and repair what it may have lost."""
        assert self._admin is not None
        run_id: str | None = None
        while True:
            raise_swallowed_cancel()
            try:
                info: Any = await self._admin.info("server")
                current = str(info.get("run_id"))
                if run_id is not None and current != run_id:
                    log.warning("Redis restarted (new run_id): checking what it lost")
                    await self._redis_restarted()
                run_id = current
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot check Redis's identity", error=str(exc))
            await asyncio.sleep(self.settings.coordinator.interval)

    # -- bots ----------------------------------------------------------------------------

    async def _prepare_bots(self, bots: list[BotConfig]) -> None:
        """A Redis user per bot (users of removed bots dropped), and the declared groups."""
        assert self._admin is not None
        assert self._coordinator is not None
        wanted = {bot_username(self._keys.namespace, b.id) for b in bots}
        for username in await bot_users(self._admin, self._keys):
            if username not in wanted:
                bot_id = username.rpartition(".")[2]
                await delete_bot_user(self._admin, self._keys, bot_id)
        for bot in bots:
            if bot.id not in self._passwords:
                self._passwords[bot.id] = generate_password()
            await ensure_bot_user(self._admin, self._keys, bot.id, self._passwords[bot.id])
        created = await self._coordinator.ensure_groups(bots)
        await self._record_subscriptions(bots)
        log.info("bots prepared", bots=len(bots), groups_created=created)

    async def _prepare_reader(self, archive: ArchiveLink, dsn: str) -> None:
        """A read-only PostgreSQL role for the bots' replays (best effort: without it, and
        while PostgreSQL is away at start, bots replay only what Redis holds)."""
        if not archive.connected:
            return
        try:
            self._reader_dsn = await ensure_reader(await archive.get(), dsn, generate_password())
        except Exception as exc:
            log.warning(
                "cannot create the read-only archive role for bots (needs CREATEROLE); "
                "their replays see only what Redis holds",
                error=str(exc),
            )

    async def _record_subscriptions(self, bots: list[BotConfig]) -> None:
        """The declared subscriptions into the archive's event_subscriptions (best effort:
        PostgreSQL may be away; they are written again at the next start or reload)."""
        if self._archive is None or not self._archive.connected:
            return
        try:
            store = await self._archive.get()
            for gone in set(await store.subscribers()) - {b.id for b in bots}:
                await store.upsert_subscriptions(gone, [])
            for bot in bots:
                declared = [(s.pattern, s.where) for s in bot.subscriptions]
                await store.upsert_subscriptions(bot.id, declared)
        except ArchiveUnavailableError as exc:
            log.warning("cannot record the subscriptions in PostgreSQL", error=str(exc))

    def _spec(self, bot: BotConfig, index: int) -> tuple[RuntimeSpec, dict[str, str]]:
        """What the bot's next process gets: its spec (own Redis user) and environment."""
        assert self.services is not None
        username = bot_username(self._keys.namespace, bot.id)
        url = bot_redis_url(self.services.redis_url, username, self._passwords[bot.id])
        options = self.settings.bus_settings(url)
        options["archive_dsn"] = self._reader_dsn
        if bot.consumer is not None:
            options["consumer"] = bot.consumer
        spec = RuntimeSpec(
            bot_id=bot.id,
            instance=index,
            entry=bot.entry,
            bus=BusSettings.model_validate(options),
            heartbeat_interval=self.settings.supervisor.heartbeat_interval,
            stop_timeout=bot.stop_timeout,
            lease_ttl=self.settings.supervisor.lease_ttl if bot.standby else None,
            log_level=self.settings.log_level,
            subscriptions=[(sub.pattern, sub.where) for sub in bot.subscriptions],
        )
        environment = {
            k: v
            for k, v in self._environ.items()
            if not k.startswith("MULTIBOT_") and k not in NOTIFY_ENV_KEYS
        }
        environment.update(bot.environment)
        return spec, environment

    # -- commands ------------------------------------------------------------------------

    def _handlers(self) -> dict[str, Any]:
        return {
            "status": self._cmd_status,
            "stop": self._cmd_stop,
            "restart": self._cmd_restart,
            "maintenance": self._cmd_maintenance,
            "reload": self._cmd_reload,
            "connection": self._cmd_connection,
        }

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_logged())
        self._background = task  # keep a reference while it runs

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except (ConfigError, CommandError) as exc:
            log.error("reload refused: keeping the running config", error=str(exc))

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the config file and apply bot additions, removals and changes."""
        if self._config_path is None or self._supervisor is None:
            raise CommandError("the manager is not running from a config file or not started")
        settings = load_config(self._config_path)
        self._notifier.reloading()
        try:
            await self._prepare_bots(settings.bots)
            assert self._coordinator is not None
            self._coordinator.configure(settings.bots)
            if self._trimmer is not None:
                self._trimmer.removed.configure(b.id for b in settings.bots)
            self.settings = self.settings.model_copy(update={"bots": settings.bots})
            added, removed, changed = await self._supervisor.apply(settings.bots)
        finally:
            self._notifier.ready()
        result = {"added": added, "removed": removed, "changed": changed}
        log.info("config reloaded", **result)
        if self._bus is not None and self._supervisor is not None:
            await self._bus.publish(EventType.CONFIGURATION_UPDATED, result)
        return result

    async def _cmd_status(self, _: Mapping[str, Any]) -> dict[str, Any]:
        import psutil  # noqa: PLC0415 - only the status command needs it here

        services = self.services
        coordinator = self._coordinator.status() if self._coordinator else {}
        return {
            "manager": {
                "pid": os.getpid(),
                "version": VERSION,
                "uptime": time.time() - self._started_at,
                "rss": psutil.Process().memory_info().rss,
                "data_dir": str(self.settings.data_dir),
                "redis": redact(services.redis_url) if services else None,
                "postgres": redact(services.postgres_dsn or "") if services else None,
                "maintenance": self._maintenance,
                "ready": self._ready,
                "api": self._api.url if self._api else None,
            },
            "memory": coordinator.get("memory", {}),
            "redis_memory": coordinator.get("redis_memory"),
            "archive": self._archiver.status() if self._archiver else None,
            "bots": self._supervisor.status() if self._supervisor else [],
            "groups": coordinator.get("groups", []),
            "metrics": self._supervisor.metrics.snapshot() if self._supervisor else None,
        }

    async def _cmd_connection(self, _: Mapping[str, Any]) -> dict[str, Any]:
        """Where the manager's Redis and PostgreSQL are, credentials included (the socket is
        readable by the manager's user only), so CLI commands need no flags."""
        if self.services is None:
            raise CommandError("the manager is still starting its services")
        return {
            "redis_url": self.services.redis_url,
            "postgres_dsn": self.services.postgres_dsn,
            "namespace": self.settings.namespace,
        }

    async def _cmd_stop(self, _: Mapping[str, Any]) -> str:
        self._shutdown.set()
        return "stopping"

    async def _cmd_restart(self, request: Mapping[str, Any]) -> str:
        bot_id = str(request.get("bot"))
        if self._supervisor is None or bot_id not in self._supervisor.bots:
            known = ", ".join(self._supervisor.bots) if self._supervisor else ""
            raise CommandError(f"no bot {bot_id!r} is configured (bots: {known})")
        await self._supervisor.restart(bot_id)
        return f"restarted {bot_id}"

    async def _cmd_maintenance(self, request: Mapping[str, Any]) -> str:
        on = bool(request.get("on"))
        if self._bus is None:
            raise CommandError("the manager is still starting")
        self._maintenance = on
        event = EventType.MAINTENANCE_STARTED if on else EventType.MAINTENANCE_ENDED
        reason = request.get("reason")
        await self._bus.publish(event, {"reason": reason, "by": "operator"})
        log.info("maintenance " + ("started" if on else "ended"), reason=reason)
        return "maintenance on" if on else "maintenance off"

    async def _cmd_reload(self, _: Mapping[str, Any]) -> dict[str, list[str]]:
        try:
            return await self.reload()
        except ConfigError as exc:
            raise CommandError(str(exc)) from None


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them; cancel again any that swallowed the cancel (a
    redis-py call on Python 3.11 can), saying where it was, so shutdown never hangs."""
    while pending := [t for t in tasks if not t.done()]:
        for task in pending:
            task.cancel()
        _, late = await asyncio.wait(pending, timeout=2.0)
        for task in late:
            frames = [f"{f.f_code.co_filename}:{f.f_lineno}" for f in task.get_stack()]
            log.warning("a task ignored its cancel; cancelling again", task=repr(task), at=frames)


def _log_tasks() -> None:
    """SIGUSR2: log where every task of the manager waits (for a manager that seems stuck)."""
    for task in asyncio.all_tasks():
        frames = [
            f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in task.get_stack()
        ]
        log.warning("task", name=task.get_name(), coro=repr(task.get_coro()), stack=frames)


def _routes(settings: ManagerSettings) -> tuple[dict[str, str], str]:
    bus = BusSettings.model_validate(settings.bus_settings("redis://localhost"))
    return dict(bus.routes), bus.default_stream


async def run_manager(settings: ManagerSettings, config_path: Path | None) -> int:
    """Run a manager with ``settings`` until it is stopped; its exit code."""
    manager = Manager(settings, config_path=config_path, environ=os.environ)
    with contextlib.suppress(asyncio.CancelledError):
        return await manager.run()
    return 1
