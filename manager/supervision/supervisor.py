"""The supervisor: reconciles the configured bots against running processes and reports.

Circus's vocabulary: desired bots are reconciled against running slots (spawn missing,
retire extra, restart changed). Each slot (:class:`Instance`) restarts its own process per
policy; the supervisor watches heartbeats (a hung bot is reported and restarted), follows
the leader lease of active/standby bots (failover is announced), and cleans up after every
exit: lifecycle events, crash-linked poison, the dead consumer's pending entries, its lease.
It keeps the fleet's bus metrics (:class:`FleetMetrics`) from the processes' reports.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from redis.asyncio import Redis

from bus import EventType
from bus.dlq import DeadLetters
from bus.keys import Keys, group_name
from bus.lease import release_for
from bus.redis_errors import UNAVAILABLE
from bus.supervision import Status, StatusLine
from manager.announcer import PUBLISHED_BY, Announcer
from manager.config import BotConfig, SupervisorSettings
from manager.observe.fleet_metrics import FleetMetrics
from manager.status import BotStatus, InstanceState
from manager.supervision.bot import Bot
from manager.supervision.bot_process import BotProcess, HangCheck, Launch
from manager.supervision.cgroups import CgroupLimiter, SlotCgroups
from manager.supervision.group_grants import GroupGrants
from manager.supervision.handover import (
    CrashLedger,
    dead_letter_crashed,
    release_everywhere,
    retire_everywhere,
)
from manager.supervision.instance import Instance
from manager.supervision.report import bot_status
from manager.supervision.restart_policy import ExitStatus

log = structlog.get_logger("manager.supervision.supervisor")
#: Slots the hang watch skips: already being restarted, or being stopped.
_UNWATCHED = (InstanceState.HUNG, InstanceState.STOPPING)
SpecFactory = Callable[[BotConfig, int], Launch]


class Supervisor:
    """Runs every configured bot's slots; :meth:`apply` changes the set while running."""

    def __init__(
        self,
        settings: SupervisorSettings,
        *,
        spec_factory: SpecFactory,
        announcer: Announcer,
        redis: Redis,
        keys: Keys,
        visibility_timeout: float,
        grants: GroupGrants | None = None,
        limiter: CgroupLimiter | None = None,
    ) -> None:
        self._settings = settings
        self._grants = grants
        #: Each bot process with a memory_limit in a cgroup of its own (without a limiter,
        #: the coordinator's RSS polling is all there is).
        self._cgroups = SlotCgroups(limiter)
        self._granting: set[str] = set()
        self._hang = HangCheck(settings.heartbeat_timeout, settings.startup_timeout)
        self._spec_factory = spec_factory
        self._announcer = announcer
        self._redis = redis
        self._keys = keys
        self._visibility_ms = int(visibility_timeout * 1000)
        self.bots: dict[str, Bot] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._changed = asyncio.Event()
        self._leftover: set[tuple[str, str]] = set()
        #: The bus metrics of every bot process, kept across their restarts.
        self.metrics = FleetMetrics()
        #: Which replicas (instance indices) of a bot run here: all, unless the manager
        #: shares them out among several hosts (manager.daemon.placement).
        self.replica_indices: Callable[[BotConfig], Sequence[int]] = lambda bot: range(bot.replicas)

    # -- running -------------------------------------------------------------------------

    async def run(self, bots: Sequence[BotConfig]) -> None:
        """Start ``bots`` and supervise until :meth:`stop` has stopped them all."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            watcher = tg.create_task(self._watch())
            for config in bots:
                self._add(config)
            self._started.set()
            await self._stop.wait()
            await asyncio.gather(*(self._retire(bot) for bot in self.bots.values()))
            watcher.cancel()
        self._tg = None

    async def stop(self) -> None:
        """Stop every bot gracefully (each its stop timeout, then SIGKILL), concurrently."""
        self._stop.set()

    async def wait_all_up(self) -> None:
        """Wait until :meth:`all_up`."""
        await self._started.wait()
        while not self.all_up():
            self._changed.clear()
            await self._changed.wait()

    def all_up(self) -> bool:
        """Whether every instance is consuming, standing by, or failed (nothing pending)."""
        settled = {InstanceState.RUNNING, InstanceState.STANDBY, InstanceState.FAILED}
        return all(i.state in settled for bot in self.bots.values() for i in bot.instances)

    def _add(self, config: BotConfig) -> None:
        assert self._tg is not None
        bot = Bot(config, ledger=CrashLedger(self._settings.crash_poison_after))
        bot.instances = [Instance(self, config, i) for i in self.replica_indices(config)]
        bot.tasks = [self._tg.create_task(i.run()) for i in bot.instances]
        self.bots[config.id] = bot
        log.info("bot added", bot_id=config.id, replicas=config.replicas, entry=config.entry,
                 here=[i.index for i in bot.instances])  # fmt: skip

    async def _retire(self, bot: Bot) -> None:
        await asyncio.gather(*(i.retire() for i in bot.instances))
        await asyncio.gather(*bot.tasks)

    async def apply(self, bots: Sequence[BotConfig]) -> tuple[list[str], list[str], list[str]]:
        """Make the running bots match ``bots``: (added, removed, changed) bot ids.

        Unchanged bots keep running untouched; a changed bot is stopped and started anew.
        """
        wanted = {b.id: b for b in bots}
        removed = [i for i in self.bots if i not in wanted]
        changed = [i for i, b in wanted.items() if i in self.bots and self.bots[i].config != b]
        added = [i for i in wanted if i not in self.bots]
        for bot_id in removed + changed:
            bot = self.bots.pop(bot_id)
            await self._retire(bot)
            keep = wanted[bot_id].replicas if bot_id in wanted else 0
            self._leftover |= {(bot_id, i.name) for i in bot.instances if i.index >= keep}
        for bot_id in changed + added:
            self._add(wanted[bot_id])
        for bot_id in wanted.keys() - {*changed, *added}:
            await self._move_replicas(self.bots[bot_id])
        await self.clean_consumers()
        return added, removed, changed

    async def _move_replicas(self, bot: Bot) -> None:
        """Start the replicas of an unchanged bot newly placed here, stop those placed
        elsewhere now; the others run on untouched. A moved replica keeps its consumer
        (its index names it), so its pending entries go with it."""
        assert self._tg is not None
        here = set(self.replica_indices(bot.config))
        leaving = [i for i in bot.instances if i.index not in here]
        if leaving:
            await asyncio.gather(*(i.retire() for i in leaving))
            log.info("replicas stopped here: placed elsewhere", bot_id=bot.config.id,
                     instances=[i.index for i in leaving])  # fmt: skip
        kept = [(i, t) for i, t in zip(bot.instances, bot.tasks, strict=True) if i.index in here]
        await asyncio.gather(*(t for i, t in zip(bot.instances, bot.tasks, strict=True)
                               if i.index not in here))  # fmt: skip
        arriving = sorted(here - {i.index for i, _ in kept})
        new = [Instance(self, bot.config, index) for index in arriving]
        kept += [(i, self._tg.create_task(i.run())) for i in new]
        kept.sort(key=lambda pair: pair[0].index)
        bot.instances, bot.tasks = [i for i, _ in kept], [t for _, t in kept]
        if arriving:
            log.info("replicas started here: placed on this host", bot_id=bot.config.id,
                     instances=arriving)  # fmt: skip

    async def clean_consumers(self) -> None:
        """Delete the consumers of retired instances from their groups once nothing is
        pending on them (a live replica takes what is; until then they are kept)."""
        for bot_id, consumer in sorted(self._leftover):
            if await retire_everywhere(self._redis, self._keys, group_name(bot_id), consumer):
                self._leftover.discard((bot_id, consumer))
                log.info("consumer deleted from its group", bot_id=bot_id, consumer=consumer)

    async def restart(self, bot_id: str) -> None:
        """Restart every instance of a bot now (also a failed one); KeyError if unknown."""
        bot = self.bots[bot_id]
        await asyncio.gather(*(i.restart() for i in bot.instances))

    # -- InstanceOwner -------------------------------------------------------------------

    def spec_for(self, instance: Instance) -> Launch:
        """The spec, environment and OS user of the instance's next process."""
        return self._spec_factory(instance.bot, instance.index)

    def on_started(self, instance: Instance, process: BotProcess) -> None:
        """Put the new process in its memory cgroup, announce ``bot.lifecycle.started``."""
        # A limit the operator wants enforced (restart) is the kernel's to enforce, at once;
        # one only reported (warn) stays with the coordinator's polling.
        bot = instance.bot
        if bot.memory_limit and bot.memory_action == "restart" and process.pid is not None:
            self._cgroups.place(instance.name, process.pid, int(bot.memory_limit))
        self._announce(
            EventType.BOT_STARTED,
            instance,
            pid=process.pid,
            reason=instance.last_exit and "restart",
        )

    def on_status(self, instance: Instance, process: BotProcess, line: StatusLine) -> None:
        """Follow heartbeats (recovery of a hung slot), lease changes (failover) and metrics."""
        if line.kind is Status.METRICS:
            if line.data is not None:
                self.metrics.update(instance.name, line.data)
            return
        if line.kind is Status.GROUPS:
            if self._grants is not None and self._tg is not None:
                self._grants.request(
                    instance.name, instance.bot, line.entry_ids, line.stream, self._tg
                )
            return
        if line.kind is not Status.HEARTBEAT:
            self._changed.set()
        if line.kind is Status.HEARTBEAT and instance.unhealthy:
            instance.unhealthy = False
            self._announce(EventType.BOT_HEALTH_CHANGED, instance, healthy=True, reason="beating")
        elif line.kind is Status.ACTIVE and line.token is not None:
            bot = self.bots.get(instance.bot.id)
            if bot is None:
                return
            previous, bot.active = bot.active, (instance.index, line.token)
            if previous is not None and previous[0] != instance.index:
                log.warning(
                    "failover: a standby took the lease",
                    bot_id=bot.config.id,
                    old_instance=previous[0],
                    new_instance=instance.index,
                    token=line.token,
                )
                self._announcer.announce(
                    EventType.FAILOVER_TRIGGERED,
                    {
                        "bot_id": bot.config.id,
                        "old_instance": str(previous[0]),
                        "new_instance": str(instance.index),
                        "fencing_token": line.token,
                        "reason": "the active instance stopped renewing the lease",
                        "published_by": PUBLISHED_BY,
                    },
                    source=bot.config.id,
                )

    async def on_exit(self, instance: Instance, process: BotProcess, status: ExitStatus) -> None:
        """Keep its metrics, announce the stop, settle the dead consumer's entries and lease."""
        self.metrics.exited(instance.name)
        reason = "stopped by the manager" if instance.retired else str(status)
        if status.signal == signal.SIGKILL and (oom := self._cgroups.oom_reason(instance.name)):
            reason = process.last_error = oom
        self._announce(
            EventType.BOT_STOPPED,
            instance,
            pid=process.spawned_pid,
            exit_code=status.code,
            signal=status.signal_name,
            reason=reason,
        )
        try:
            await self._settle(instance, process, status)
        except UNAVAILABLE as exc:
            log.warning(
                "cannot settle a dead bot's entries: Redis unavailable; they stay pending",
                bot_id=instance.bot.id,
                instance=instance.index,
                error=str(exc),
            )
        await self._cgroups.remove(instance.name)  # and what the bot left behind

    def on_failed(self, instance: Instance, reason: str) -> None:
        """Announce ``bot.lifecycle.error``: the slot gave up."""
        self._changed.set()
        self._announcer.announce(
            EventType.BOT_ERROR,
            {
                "bot_id": instance.bot.id,
                "instance": str(instance.index),
                "error": reason,
                "error_type": "crash_loop" if "crash loop" in reason else "start_failure",
                "published_by": PUBLISHED_BY,
            },
            source=instance.bot.id,
        )

    # -- after an exit -------------------------------------------------------------------

    async def _settle(self, instance: Instance, process: BotProcess, status: ExitStatus) -> None:
        bot = self.bots.get(instance.bot.id)
        group = group_name(instance.bot.id)
        if bot is not None:
            if status.failed and not instance.retired:
                poison = bot.ledger.record_crash(process.inflight, str(status))
                dlq = DeadLetters(self._redis, self._keys)
                for entry in poison:
                    exits = bot.ledger.exits.get(entry, [])
                    await dead_letter_crashed(
                        self._redis,
                        dlq,
                        group=group,
                        consumer=instance.name,
                        entry=entry,
                        exits=exits,
                    )
                    bot.ledger.forget(entry)
            if process.active_token is not None and bot.active == (
                instance.index,
                process.active_token,
            ):
                await release_for(self._redis, self._keys, bot.config.id, str(instance.index))
        consumer = instance.bot.consumer
        visibility_ms = int(consumer.visibility_timeout * 1000) if consumer else self._visibility_ms
        released = await release_everywhere(
            self._redis, self._keys, group, instance.name, visibility_ms + 1000
        )
        if released and bot is not None:
            live = [
                i.process
                for i in bot.instances
                if i is not instance and i.process and i.state is InstanceState.RUNNING
            ]
            for other in live:
                other.command("reclaim")
            log.info(
                "handed a dead consumer's pending entries over",
                bot_id=instance.bot.id,
                consumer=instance.name,
                entries=released,
                to=[p.spec.instance for p in live] or "its restart",
            )

    # -- watching ------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Every heartbeat interval: restart slots whose process stopped beating, or sent
        no first beat within the start-up timeout (see :class:`HangCheck`)."""
        while True:
            await asyncio.sleep(self._settings.heartbeat_interval)
            now = time.monotonic()
            for bot in list(self.bots.values()):
                for instance in bot.instances:
                    process = instance.process
                    if process is None or process.exited or instance.state in _UNWATCHED:
                        continue
                    reason = self._hang.reason(
                        now, started_at=process.started_at, last_heartbeat=process.last_heartbeat
                    )
                    if reason is not None:
                        self._hung(instance, reason)

    def _hung(self, instance: Instance, reason: str) -> None:
        log.error(
            "bot hung: restarting it",
            bot_id=instance.bot.id,
            instance=instance.index,
            reason=reason,
        )
        self._announce(EventType.BOT_HEALTH_CHANGED, instance, healthy=False, reason=reason)
        assert self._tg is not None
        self._tg.create_task(instance.kill_hung(grace=min(2.0, instance.bot.stop_timeout)))

    # -- reporting -----------------------------------------------------------------------

    def _announce(self, type_: str, instance: Instance, **data: Any) -> None:
        payload = {"bot_id": instance.bot.id, "instance": str(instance.index), **data}
        payload["published_by"] = PUBLISHED_BY
        self._announcer.announce(
            type_, {k: v for k, v in payload.items() if v is not None}, source=instance.bot.id
        )

    def status(self) -> list[BotStatus]:
        """The bots and their instances, for ``multibot status``, the API and the metrics."""
        now, wall = time.monotonic(), time.time()
        return [bot_status(bot, now=now, wall=wall) for bot in self.bots.values()]

    def running(self) -> dict[str, dict[int, BotProcess]]:
        """Spawned processes: bot id → instance → process (for the memory watch)."""
        return {
            bot_id: {i.index: i.process for i in bot.instances if i.process and i.process.pid}
            for bot_id, bot in self.bots.items()
        }

    def instance(self, bot_id: str, index: int) -> Instance | None:
        """One slot, or None."""
        bot = self.bots.get(bot_id)
        return bot.instances[index] if bot and 0 <= index < len(bot.instances) else None

    def __repr__(self) -> str:
        count = sum(len(b.instances) for b in self.bots.values())
        return f"<Supervisor bots={len(self.bots)} instances={count}>"
