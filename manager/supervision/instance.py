"""One supervised slot: bot X, instance i. Starts its process, and restarts it per policy.

The slot outlives its processes: each (re)start is a new :class:`BotProcess` with the same
instance number, so the same stable consumer name (a restarted process finds the entries
it had taken). What to publish and how to clean up after an exit is the owner's business
(:class:`InstanceOwner`); the slot only runs the loop of spawn, wait, decide, back off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

import structlog

from bus.supervision import Status, StatusLine
from manager.config import BotConfig
from manager.status import InstanceState
from manager.supervision.bot_process import BotProcess, Launch
from manager.supervision.restart_policy import Decision, ExitStatus, RestartTracker

log = structlog.get_logger("manager.supervision.supervisor")
#: Seconds past a bot's stop timeout before SIGKILL: the runtime's own deadline comes first.
STOP_GRACE = 3.0


class InstanceOwner(Protocol):
    """What a slot reports to (the supervisor)."""

    def spec_for(self, instance: Instance) -> Launch:
        """The spec, environment and OS user of the next process."""

    def on_started(self, instance: Instance, process: BotProcess) -> None:
        """A process was spawned."""

    def on_status(self, instance: Instance, process: BotProcess, line: StatusLine) -> None:
        """A process reported a status line."""

    async def on_exit(self, instance: Instance, process: BotProcess, status: ExitStatus) -> None:
        """A process exited (clean up before any restart)."""

    def on_failed(self, instance: Instance, reason: str) -> None:
        """The slot gave up restarting."""


class Instance:
    """A bot instance slot, run by :meth:`run` until :meth:`retire`."""

    def __init__(self, owner: InstanceOwner, bot: BotConfig, index: int) -> None:
        self.owner = owner
        self.bot = bot
        self.index = index
        self.state = InstanceState.STARTING
        self.tracker = RestartTracker(bot.restart)
        self.process: BotProcess | None = None
        self.last_exit: str | None = None
        #: Whether the slot is marked hung (until its next process beats again).
        self.unhealthy = False
        self._retired = False
        self._restart_now = False
        self._forced = False
        self._hold = False
        self._wakeup = asyncio.Event()
        self._log = log.bind(bot_id=bot.id, instance=index)

    @property
    def name(self) -> str:
        """``<bot>-<instance>``: also its consumer name."""
        return f"{self.bot.id}-{self.index}"

    @property
    def retired(self) -> bool:
        """Whether :meth:`retire` was called."""
        return self._retired

    async def run(self) -> None:
        """Spawn, wait, decide and back off until retired."""
        while not self._retired:
            if self._hold:
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            process = BotProcess(self.owner.spec_for(self), on_status=self._status)
            self.state = InstanceState.STARTING
            try:
                await process.start()
            except OSError as exc:
                self._log.error("cannot spawn the bot process", error=str(exc))
                status = ExitStatus(code=127)
            else:
                self.process = process
                self.owner.on_started(self, process)
                status = await process.wait()
            ran_for = time.monotonic() - process.started_at if process.started_at else 0.0
            self.last_exit = str(status)
            self.state = InstanceState.STOPPED if self._retired else self.state
            try:
                await self.owner.on_exit(self, process, status)
            finally:
                self.process = None
            if self._retired:
                break
            if self._restart_now:
                self._restart_now = False
                self.tracker.reset()
                continue
            forced, self._forced = self._forced, False
            decision = self.tracker.on_exit(
                status, now=time.monotonic(), ran_for=ran_for, forced=forced
            )
            if decision.failed and process.last_error:
                reason = f"{decision.reason} (its last error: {process.last_error})"
                decision = Decision(False, failed=True, reason=reason)
            await self._after(decision)
        self.state = InstanceState.STOPPED

    async def _after(self, decision: Decision) -> None:
        if decision.failed:
            self.state = InstanceState.FAILED
            self._hold = True
            self._log.error("bot instance failed", reason=decision.reason)
            self.owner.on_failed(self, decision.reason)
        elif not decision.restart:
            self.state = InstanceState.STOPPED
            self._hold = True
            self._log.info("bot instance exited; not restarting", reason=decision.reason)
        else:
            self.state = InstanceState.BACKOFF
            self._log.warning(
                "bot instance exited; restarting", reason=decision.reason, delay=decision.delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), decision.delay)
            self._wakeup.clear()

    def _status(self, process: BotProcess, line: StatusLine) -> None:
        if line.kind is Status.READY or line.kind is Status.ACTIVE:
            self.state = InstanceState.RUNNING
        elif line.kind is Status.STANDBY:
            self.state = InstanceState.STANDBY
        self.owner.on_status(self, process, line)

    async def _stop_process(self, timeout: float) -> None:  # noqa: ASYNC109 - then SIGKILL
        process = self.process
        if process is not None and not process.exited:
            await process.stop(timeout)

    async def retire(self) -> None:
        """Stop the process gracefully (the bot's stop timeout, then SIGKILL); no restart."""
        self._retired = True
        self._wakeup.set()
        if self.process is not None:
            self.state = InstanceState.STOPPING
        await self._stop_process(self.bot.stop_timeout + STOP_GRACE)

    async def restart(self) -> None:
        """Stop the process gracefully and start a new one now (also from failed)."""
        self._restart_now = True
        self._hold = False
        self.tracker.reset()
        if self.process is not None and not self.process.exited:
            self.state = InstanceState.STOPPING
            await self._stop_process(self.bot.stop_timeout + STOP_GRACE)
        else:
            self._restart_now = False
            self._wakeup.set()

    async def recycle(self) -> None:
        """Replace the process (it went over its memory limit): a graceful stop, then a
        restart whatever the policy, counted towards the crash loop."""
        if self.process is not None and not self.process.exited:
            self._forced = True
            self.state = InstanceState.STOPPING
            await self._stop_process(self.bot.stop_timeout + STOP_GRACE)

    async def kill_hung(self, grace: float) -> None:
        """A hung process: SIGTERM, ``grace`` seconds, SIGKILL; the policy restarts it."""
        self.state = InstanceState.HUNG
        self.unhealthy = True
        await self._stop_process(grace)

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        return f"<Instance {self.name} {self.state} pid={pid} restarts={self.tracker.restarts}>"
