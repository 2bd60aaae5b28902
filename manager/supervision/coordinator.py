"""The bus coordinator: consumer groups before the bots start, lag and memory watched after.

Every ``interval`` it measures each group's lag (a group past the threshold gets one
``multibot.load.balance_required``, not one per check) and the memory of the manager, every
bot process tree and Redis against the budget (``bot.overload`` for a bot past its limit,
``system.memory.pressure`` for the whole system, both with hysteresis). A bot whose policy
says so is restarted when it goes past its limit.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import psutil
import structlog
from redis.asyncio import Redis

from bus import EventType
from bus.fanout import Fanout
from bus.keys import ARCHIVER_GROUP, FANOUT_GROUP, GROUP_PREFIX, Keys, group_name
from bus.periodic import every
from bus.routing import Router
from manager.announcer import PUBLISHED_BY, Announcer
from manager.config import BotConfig, CoordinatorSettings
from manager.observe.lag import GroupLag, group_lags, stream_keys
from manager.observe.memory import (
    MemoryAlert,
    MemoryBudget,
    MemorySample,
    redis_used_memory,
    tree_rss,
)
from manager.observe.proc_access import running_child
from manager.observe.thresholds import Threshold, ThresholdWatch
from manager.status import GroupStatus, MemoryStatus, RedisMemoryStatus
from manager.supervision.group_grants import declared_streams
from manager.supervision.supervisor import Supervisor

if TYPE_CHECKING:  # supervision does not import the archive: only its type is named
    from manager.archive.pressure import PressureState

log = structlog.get_logger("manager.supervision.coordinator")


class Coordinator:
    """Creates groups, watches lag and memory, and publishes what it sees."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        redis: Redis,
        keys: Keys,
        router: Router,
        announcer: Announcer,
        supervisor: Supervisor,
        fanout: Fanout,
        extra_pids: Callable[[], Sequence[int]] = tuple,
    ) -> None:
        self._fanout = fanout
        self._settings = settings
        self._redis = redis
        self._keys = keys
        self._router = router
        self._announcer = announcer
        self._supervisor = supervisor
        self._extra_pids = extra_pids
        self._lag = ThresholdWatch[tuple[str, str]](
            Threshold(settings.lag_threshold, settings.lag_threshold / 2)
        )
        self._budget = MemoryBudget(1)
        #: The pressure watch's state, when one runs (set by the daemon).
        self.pressure: PressureState | None = None
        #: Events that missed each group past the deadline, as counted while this manager
        #: coordinated (set by the daemon to the missed-deliveries watch's totals).
        self.missed_deliveries: Callable[[], dict[str, int]] = dict
        #: Whether this manager coordinates the deployment (set by the daemon): the lag of
        #: the groups is watched there only; each manager watches its own host's memory.
        self.leading: Callable[[], bool] = lambda: True
        self.configure([])
        self._process = psutil.Process(os.getpid())
        #: The last measurements (for status).
        self.lags: list[GroupLag] = []
        self.memory = MemorySample(manager=0)
        self._restarts: set[asyncio.Task[None]] = set()
        #: Pids of bot processes whose memory /proc did not show (warned about once).
        self._unseen: set[int] = set()

    def configure(self, bots: Sequence[BotConfig]) -> None:
        """Take the bots' memory limits (at start and after a reload)."""
        memory = self._settings.memory
        limits = {
            f"{bot.id}-{i}": int(bot.memory_limit)
            for bot in bots
            if bot.memory_limit
            for i in range(bot.replicas)
        }
        self._budget = MemoryBudget(int(memory.budget), memory.high, memory.low, limits)

    async def ensure_groups(self, bots: Sequence[BotConfig]) -> int:
        """Subscribe every declared subscription's group (its inbox, at new events;
        idempotent); how many new."""
        created = 0
        for bot in bots:
            for stream in declared_streams(bot, self._router, self._keys):
                if await self._fanout.subscribe(stream, group_name(bot.id), "$"):
                    created += 1
                    log.info("consumer group created", group=group_name(bot.id), stream=stream)
        return created

    async def run(self) -> None:
        """Watch lag and memory every interval until cancelled; errors are logged, not fatal."""
        await every(self._settings.interval, self.check, log=log, what="watch lag and memory")

    async def check(self) -> None:
        """One round: lag, then memory."""
        if self.leading():
            streams = await stream_keys(self._redis, self._keys)
            self.lags = await group_lags(self._redis, streams, keys=self._keys)
            for lag in self.lags:
                self._check_lag(lag)
        else:
            self.lags = []
        self.memory = await self._sample()
        for alert in self._budget.check(self.memory):
            self._memory_alert(alert)
        await self._supervisor.clean_consumers()

    def _check_lag(self, lag: GroupLag) -> None:
        if lag.lag is None or lag.group in (ARCHIVER_GROUP, FANOUT_GROUP):
            return  # the archive's lag is the archiver's to report, not the bots' to share
        crossing = self._lag.update((lag.stream, lag.group), lag.lag)
        if crossing is None:
            return
        stream = self._keys.stream_name(lag.stream)
        if not crossing.raised:
            log.info("group caught up", group=lag.group, stream=stream, lag=lag.lag)
            return
        bot_id = (
            lag.group.removeprefix(GROUP_PREFIX) if lag.group.startswith(GROUP_PREFIX) else None
        )
        log.warning(
            "group lagging: asking for load balancing",
            group=lag.group,
            stream=stream,
            lag=lag.lag,
            threshold=self._settings.lag_threshold,
        )
        self._announcer.announce(
            EventType.LOAD_BALANCE_REQUIRED,
            {
                "reason": f"lag {lag.lag} >= {self._settings.lag_threshold}",
                "group": lag.group,
                "stream": stream,
                "lag": lag.lag,
                "bot_id": bot_id,
            },
        )

    async def _sample(self) -> MemorySample:
        manager = self._process.memory_info().rss
        manager += sum(tree_rss(p) or 0 for p in self._extra_pids())
        bots: dict[str, int] = {}
        for bot_id, processes in self._supervisor.running().items():
            for index, process in processes.items():
                assert process.pid is not None  # running() has only spawned ones
                rss = tree_rss(process.pid, process.user)
                if rss is not None:
                    bots[f"{bot_id}-{index}"] = rss
                elif running_child(process.pid) and process.pid not in self._unseen:
                    self._unseen.add(process.pid)
                    log.warning(
                        "bot hides its memory: /proc does not show its process even to its "
                        "own user (it made itself non-dumpable); its memory_limit is not "
                        "checked. Fix the bot, or give bots kernel-enforced limits "
                        "(systemd/multibot-cgroups.conf)",
                        bot_id=bot_id,
                        instance=index,
                        pid=process.pid,
                    )
        return MemorySample(manager, bots, await redis_used_memory(self._redis))

    def _memory_alert(self, alert: MemoryAlert) -> None:
        (log.warning if alert.raised else log.info)(
            str(alert), value=alert.value, limit=alert.limit
        )
        if alert.scope == "total":
            self._announcer.announce(
                EventType.MEMORY_PRESSURE,
                {
                    "used_bytes": alert.value,
                    "budget_bytes": alert.limit,
                    "raised": alert.raised,
                    "manager_bytes": self.memory.manager,
                    "bots_bytes": sum(self.memory.bots.values()),
                    "redis_bytes": self.memory.redis,
                },
            )
            return
        if not alert.raised:
            return
        bot_id, _, index = alert.key.rpartition("-")
        instance = self._supervisor.instance(bot_id, int(index))
        if instance is None:
            return
        restart = instance.bot.memory_action == "restart"
        self._announcer.announce(
            EventType.BOT_OVERLOAD,
            {
                "bot_id": bot_id,
                "instance": index,
                "rss_bytes": alert.value,
                "limit_bytes": alert.limit,
                "action": "restart" if restart else None,
                "published_by": PUBLISHED_BY,
            },
            source=bot_id,
        )
        if restart:
            log.warning("restarting a bot over its memory limit", bot_id=bot_id, instance=index)
            task = asyncio.get_running_loop().create_task(instance.recycle())
            self._restarts.add(task)  # keep a reference until it is done
            task.add_done_callback(self._restarts.discard)

    def memory_status(self) -> MemoryStatus:
        """The budget and its use as of the last check (``manager`` is the manager process
        and the embedded PostgreSQL; ``redis`` is Redis's ``used_memory``)."""
        memory = self.memory
        return MemoryStatus(
            budget=int(self._settings.memory.budget),
            used=memory.total,
            manager=memory.manager,
            bots=sum(memory.bots.values()),
            redis=memory.redis,
        )

    def redis_memory_status(self) -> RedisMemoryStatus | None:
        """The pressure watch's view of Redis against its maxmemory (None without one)."""
        return self.pressure.status(self._keys) if self.pressure else None

    def group_status(self) -> list[GroupStatus]:
        """Each group's lag, pending and consumers, as of the last check."""
        return [
            GroupStatus(
                stream=self._keys.stream_name(g.stream),
                group=g.group,
                lag=g.lag,
                lag_capped=g.lag_capped,
                pending=g.pending,
                consumers=g.consumers,
            )
            for g in self.lags
        ]
