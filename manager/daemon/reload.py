"""Config reloads: one at a time, whether a SIGHUP or the control socket's ``reload`` asks.

A SIGHUP's reload runs as a task of the manager's task group, so the shutdown waits for it
and its errors are logged, not lost. A SIGHUP that comes during start-up (before the bots
are up) is remembered and applied once they are; one that comes while the manager stops is
logged and ignored. The shutdown holds the same lock while it stops the bots, so a reload
under way finishes first and any later one is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import structlog

from bus import EventType
from bus.archive.audit_log import Outcome
from manager.audit import record
from manager.config import BotConfig, ConfigError, load_config
from manager.control import CommandError
from manager.daemon.isolation import OsUserError
from manager.daemon.parts import Parts
from manager.observe.sd_notify import Notifier

log = structlog.get_logger("manager")


class Reloader:
    """Re-reads the config file and applies bot additions, removals and changes."""

    def __init__(
        self,
        config_path: Path | None,
        *,
        notifier: Notifier,
        shutdown: asyncio.Event,
        set_bots: Callable[[Sequence[BotConfig]], None],
        place: Callable[[Sequence[BotConfig]], Awaitable[list[BotConfig]]],
    ) -> None:
        """``set_bots`` takes the reloaded bots into the manager's running settings; a
        reload applies those ``place`` says this manager runs (taking unplaced new bots
        that are free)."""
        self._config_path = config_path
        self._place = place
        self._notifier = notifier
        self._shutdown = shutdown
        self._set_bots = set_bots
        self._lock = asyncio.Lock()
        self._requested = False
        self._ready = False
        #: The built parts a reload changes (None until built).
        self.parts: Parts | None = None
        #: The manager's task group, where a SIGHUP's reload runs (None outside its run).
        self.tasks: asyncio.TaskGroup | None = None
        #: SIGHUP's reloads under way.
        self.running: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        busy = "reloading" if self._lock.locked() else "idle"
        return f"<Reloader {busy} config={self._config_path} sighup_pending={self._requested}>"

    def on_sighup(self) -> None:
        """SIGHUP: start a reload in the task group, or remember it during start-up."""
        if self._shutdown.is_set():
            log.warning("SIGHUP ignored: the manager is stopping")
        elif self.tasks is None or not self._ready:
            self._requested = True
            log.info("SIGHUP during start-up: the config is reloaded once the bots are up")
        else:
            self._start()

    def ready(self) -> None:
        """The bots are up: apply a SIGHUP that came during start-up."""
        self._ready = True
        if self._requested and not self._shutdown.is_set():
            self._requested = False
            self._start()

    @asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Hold off reloads (waiting for one under way) while the block runs."""
        async with self._lock:
            yield

    async def reload(self) -> dict[str, list[str]]:
        """Reload now, after any reload under way: the added, removed and changed bot ids.

        Raises ConfigError for a bad config, CommandError before the start or once the
        manager is stopping."""
        if self._config_path is None or self.parts is None:
            raise CommandError("the manager is not running from a config file or not started")
        async with self._lock:
            if self._shutdown.is_set():
                raise CommandError("the manager is stopping: reload refused")
            return await self._apply(self._config_path, self.parts)

    def _start(self) -> None:
        if self.tasks is None:
            log.warning("reload not started: the manager is stopping")
            return
        try:
            task = self.tasks.create_task(self._reload_logged())
        except RuntimeError as exc:  # the task group is ending: the manager is stopping
            log.warning("reload not started: the manager is stopping", error=str(exc))
            return
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _reload_logged(self) -> None:
        """A SIGHUP's reload: a refused or failed reload keeps the running config and the
        manager running (as the control socket's does), logged with its cause, and
        recorded in the audit log (actor ``signal:SIGHUP``: the kernel does not say who
        sent it)."""
        outcome: Outcome = "ok"
        error: str | None = None
        detail: dict[str, object] = {}
        try:
            detail.update(await self.reload())
        except (ConfigError, CommandError, OsUserError) as exc:
            log.error("reload refused: keeping the running config", error=str(exc))
            outcome, error = "refused", str(exc)
        except Exception as exc:
            log.exception("reload failed")
            outcome, error = "failed", f"{type(exc).__name__}: {exc}"
        if self.parts is not None:
            bus = self.parts.clients.bus
            await record(bus.redis, bus.keys, actor="signal:SIGHUP", channel="signal",
                         action="reload", detail=detail, outcome=outcome, error=error)  # fmt: skip

    async def _apply(self, config_path: Path, parts: Parts) -> dict[str, list[str]]:
        settings = load_config(config_path)
        self._notifier.reloading()
        try:
            local = await self._place(settings.bots)
            await parts.provisioner.prepare_bots(local, parts.coordinator, deployment=settings.bots)
            parts.coordinator.configure(local)
            parts.trimmer.removed.configure(b.id for b in settings.bots)
            self._set_bots(settings.bots)
            added, removed, changed = await parts.supervisor.apply(local)
        finally:
            self._notifier.ready()
        result = {"added": added, "removed": removed, "changed": changed}
        log.info("config reloaded", **result)
        await parts.clients.bus.publish(EventType.CONFIGURATION_UPDATED, result)
        return result
