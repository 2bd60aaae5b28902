"""Redis memory under control: trim early, then hold publishers back, before Redis is full.

Redis runs with ``maxmemory`` and ``noeviction`` (the embedded one gets half the budget by
default): the streams are the bus's data and must never be evicted, so a full Redis refuses
writes instead. The watch checks ``INFO memory`` every second and acts well before that:

1. at ``pressure_high`` of ``maxmemory`` it makes the trimmer drop everything below the
   groups' floors at once, whatever its age (archived and acked by every group, so nothing
   is lost), and measures again;
2. if Redis is still above the mark, the streams are held by something that is not done
   with them: the archive (PostgreSQL down, read-only, full) or a slow group. It raises
   the backpressure flag (:mod:`bus.backpressure`): publishers wait, then get
   ``BusBackpressureError``; and it announces ``system.memory.pressure`` (scope "redis")
   naming the groups that hold the trim, and logs them;
3. while the flag is up, each round trims at once again (what held the trim may have
   caught up); below ``pressure_low`` it lowers the flag and announces the all-clear.

The flag is a key with a short expiry, refreshed every round, so a manager that dies does
not leave publishers waiting for ever. The manager's own events are published past it, and
dead letters and acks are never held (they free memory or are tiny). A Redis without
``maxmemory``, or with an evicting policy, is reported once at start: nothing bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.asyncio import Redis

from bus import EventType
from bus.keys import Keys
from bus.periodic import every
from manager.announcer import Announcer
from manager.archive.trimmer import Holder, Trimmer
from manager.config import MemorySettings
from manager.observe.redis_info import shard_memory
from manager.status import RedisMemoryStatus, TrimHolderStatus

log = structlog.get_logger("manager.archive.pressure")

#: Seconds between checks.
INTERVAL = 1.0
#: The flag outlives this many missed rounds.
FLAG_TTL_ROUNDS = 5


@dataclass
class PressureState:
    """What the last check saw (for the status document and the metrics)."""

    used: int = 0
    maxmemory: int = 0
    policy: str = ""
    backpressure: bool = False
    holders: list[Holder] = field(default_factory=list)
    #: On a cluster: the shard the figures are of (the fullest), and how many there are.
    shard: str = ""
    shards: int = 1

    def status(self, keys: Keys) -> RedisMemoryStatus:
        """Its part of the status document."""
        return RedisMemoryStatus(
            used=self.used,
            maxmemory=self.maxmemory,
            policy=self.policy,
            backpressure=self.backpressure,
            holders=[_holder(keys, h) for h in self.holders],
            shard=self.shard,
            shards=self.shards,
        )


def _holder(keys: Keys, holder: Holder) -> TrimHolderStatus:
    stream = holder.stream
    name = "dlq" if stream == keys.dead_letters() else keys.stream_name(stream)
    return TrimHolderStatus(
        stream=name,
        group=holder.group,
        since_id=str(holder.floor),
        pending=holder.pending,
        lag=holder.lag,
    )


class PressureWatch:
    """Watches Redis's memory against its ``maxmemory`` (see the module)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        trimmer: Trimmer,
        announcer: Announcer,
        settings: MemorySettings,
        *,
        interval: float = INTERVAL,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._trimmer = trimmer
        self._announcer = announcer
        self._settings = settings
        self._interval = interval
        self._warned_unbounded = False
        self.state = PressureState()

    async def run(self) -> None:
        """Check until cancelled; a failed check is logged and tried again."""
        await every(self._interval, self.check, log=log, what="check Redis memory")

    async def check(self) -> None:
        """One round (see the module)."""
        if not await self._measure():
            return
        state, settings = self.state, self._settings
        ratio = state.used / state.maxmemory
        # While the flag is up, every round trims at once too: what held the trim (the
        # archive, a slow group) may have caught up since, and publishers wait on it.
        if ratio >= settings.pressure_high or state.backpressure:
            self._trimmer.urgent = True
            await self._trimmer.trim_all()
            await self._measure()
            ratio = state.used / state.maxmemory
        if ratio >= settings.pressure_high or (
            state.backpressure and ratio >= settings.pressure_low
        ):
            state.holders = sorted(self._trimmer.holders.values(), key=lambda h: h.floor)
            await self._raise()
        elif state.backpressure or self._trimmer.urgent:
            await self._lower()

    async def _measure(self) -> bool:
        """Read used memory and the limit; False when Redis has no limit to watch."""
        shards = await shard_memory(self._redis)  # the fullest first
        bounded = [s for s in shards if s.maxmemory > 0]
        unsafe = [s for s in shards if s.maxmemory <= 0 or s.policy != "noeviction"]
        fullest = (bounded or shards)[0]
        state = self.state
        state.used, state.maxmemory, state.policy = fullest.used, fullest.maxmemory, fullest.policy
        state.shard, state.shards = fullest.node, len(shards)
        if unsafe and not self._warned_unbounded:
            log.error(
                "Redis's memory is not bounded safely: set maxmemory and "
                "maxmemory-policy noeviction (see config/redis.conf). Without a limit it "
                "grows until the kernel kills it; with an evicting policy it deletes events",
                maxmemory=unsafe[0].maxmemory,
                policy=unsafe[0].policy,
                **({"shard": unsafe[0].node} if unsafe[0].node else {}),
            )
            self._warned_unbounded = True
        return bool(bounded)

    async def _raise(self) -> None:
        state = self.state
        holders = [_holder(self._keys, h) for h in state.holders]
        reason = _reason(holders)
        described = [h.model_dump(mode="json") for h in holders]
        ttl_ms = int(self._interval * FLAG_TTL_ROUNDS * 1000)
        await self._redis.set(self._keys.pressure(), reason, px=ttl_ms)
        if state.backpressure:
            return
        state.backpressure = True
        log.warning(
            "Redis near its maxmemory: publishers held back until the trim can go on",
            used=state.used,
            maxmemory=state.maxmemory,
            holders=described,
        )
        self._announce(raised=True, holders=described)

    async def _lower(self) -> None:
        state = self.state
        self._trimmer.urgent = False
        await self._redis.delete(self._keys.pressure())
        if not state.backpressure:
            return
        state.backpressure = False
        state.holders = []
        log.info("Redis memory back under its mark: publishers go on",
                 used=state.used, maxmemory=state.maxmemory)  # fmt: skip
        self._announce(raised=False, holders=[])

    def _announce(self, *, raised: bool, holders: list[dict[str, Any]]) -> None:
        state = self.state
        self._announcer.announce(
            EventType.MEMORY_PRESSURE,
            {
                "scope": "redis",
                "used_bytes": state.used,
                "budget_bytes": state.maxmemory,
                "redis_bytes": state.used,
                "raised": raised,
                "holders": holders,
            },
        )


def _reason(holders: list[TrimHolderStatus]) -> str:
    """The flag's text: what holds the memory, for the error publishers get."""
    if not holders:
        return "Redis's memory is held by something other than the streams' hot window"
    first = holders[0]
    if first.group == "archiver":
        what = "the archive is not storing events (is PostgreSQL up and writable?)"
    else:
        what = f"group {first.group} is behind"
    return f"{what}: stream {first.stream} kept from entry {first.since_id} on"
