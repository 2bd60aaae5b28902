"""Trimming the streams to the hot window, never below what is unarchived or unacked.

Each stream is trimmed with ``XTRIM MINID`` to the lowest of:

- the *safe floor*: for every consumer group on the stream (the archiver's included), the
  oldest entry it has not finished: its oldest pending entry, or the first entry after its
  last delivered one. Below the floor every group has acked every entry, so the archiver
  has stored it (the archiver acks only after its transaction committed);
- the *time cutoff*: entries younger than ``hot_window`` seconds stay, unless Redis uses
  more than ``hot_window_max_memory``: then everything below the floor goes.

A stream without the archiver's group yet is not trimmed at all. A group whose consumers
have all been idle longer than ``idle_group_after`` is reported once as
``system.group.idle``; with ``idle_groups = "release"`` it stops holding the floor (its bot
would find those entries gone). The group of a bot gone from the config is destroyed after
``removed_group_grace`` (see :mod:`manager.archive.removed_groups`).

While :attr:`Trimmer.urgent` is set (Redis near its ``maxmemory``: see
:mod:`manager.archive.pressure`) the time cutoff is ignored, as over ``hot_window_max_memory``.
:attr:`Trimmer.holders` says, per stream, which group's floor stopped the last trim short
of the cutoff: what an operator must fix to free memory.

The dead-letter stream keeps its letters ``dlq_retention`` seconds, and never drops one the
archiver has not stored in PostgreSQL yet.

The groups on a stream are the archiver's and the fanout's (and, until they are moved, bots'
groups of the former layout). A bot's group reads its inbox of the stream (see
:mod:`bus.fanout`), which holds copies only: each inbox is trimmed to its group's floor at
every round, whatever the entries' age, and an idle group released by policy has its inbox
trimmed as if it had read everything.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bus import EventType
from bus.entry_id import EntryId
from bus.fanout import subscribers
from bus.keys import ARCHIVER_GROUP, FANOUT_GROUP, Keys
from bus.periodic import every
from manager.announcer import Announcer
from manager.archive.removed_groups import RemovedGroups
from manager.config import ArchiveSettings
from manager.observe.lag import stream_keys
from manager.observe.redis_info import shard_memory

log = structlog.get_logger("manager.archive.trimmer")


@dataclass(frozen=True, slots=True)
class Holder:
    """The group whose floor stopped a stream's trim short of the cutoff."""

    stream: str
    group: str
    floor: EntryId
    pending: int
    lag: int | None


def trim_point(floors: Sequence[tuple[int, int]], cutoff: tuple[int, int]) -> EntryId | None:
    """The MINID to trim to: the lowest group floor, no higher than the time cutoff.

    None when there is no group to vouch for the entries (nothing may be trimmed).
    """
    return EntryId(*min([*floors, cutoff])) if floors else None


class Trimmer:
    """Trims every stream of the namespace every ``trim_interval`` seconds."""

    def __init__(
        self, redis: Redis, keys: Keys, settings: ArchiveSettings, announcer: Announcer
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._announcer = announcer
        self._idle: set[tuple[str, str]] = set()
        self._unread_since: dict[tuple[str, str], float] = {}
        self._over_memory = False
        #: Entries trimmed so far, per stream key.
        self.trimmed: dict[str, int] = {}
        #: Set by the pressure watch: trim to the floors whatever the entries' age.
        self.urgent = False
        #: Per stream key, the group that held the last trim short of the cutoff.
        self.holders: dict[str, Holder] = {}
        #: Groups of bots gone from the config (call ``removed.configure`` with the bots).
        self.removed = RemovedGroups(redis, keys, announcer, settings.removed_group_grace)

    async def run(self) -> None:
        """Trim until cancelled; errors are logged and the next round tries again."""
        await every(self._settings.trim_interval, self.trim_all, log=log, what="trim")

    async def trim_all(self, now_ms: int | None = None) -> int:
        """One round over every stream; entries trimmed."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = EntryId(max(0, now_ms - int(self._settings.hot_window * 1000)), 0)
        limit = self._settings.hot_window_max_memory
        if self.urgent:
            cutoff = EntryId(now_ms + 1, 0)
        elif limit is not None and (await shard_memory(self._redis))[0].used > limit:
            # Over the memory share of the hot window: keep only what is not yet safe to
            # drop (unarchived or unacked), whatever its age.
            cutoff = EntryId(now_ms + 1, 0)
            if not self._over_memory:
                log.warning("hot window over its memory limit: trimming to the safe floor",
                            limit=int(limit))  # fmt: skip
            self._over_memory = True
        else:
            self._over_memory = False
        total = 0
        streams = await stream_keys(self._redis, self._keys)
        for stream in streams:
            total += await self.trim(stream, cutoff)
            total += await self.trim_inboxes(stream, now_ms)
        self.holders = {s: h for s, h in self.holders.items() if s in streams}
        dlq = self._keys.dead_letters()
        if await self._redis.exists(dlq):
            dlq_cutoff = max(0, now_ms - int(self._settings.dlq_retention * 1000))
            total += await self.trim(dlq, EntryId(dlq_cutoff, 0))
        return total

    async def trim(self, stream: str, cutoff: tuple[int, int]) -> int:
        """Trim one stream below its safe floor and the cutoff; entries trimmed."""
        groups: Any = await self._redis.xinfo_groups(stream)
        if not any(g["name"] == ARCHIVER_GROUP for g in groups):
            return 0  # not archived yet: nothing may go
        info: Any = await self._redis.xinfo_stream(stream)
        last = EntryId.parse(str(info["last-generated-id"]))
        floors: list[tuple[EntryId, dict[str, Any]]] = []
        for group in groups:
            if await self.removed.expired(stream, group):
                continue
            floor = await self._floor(stream, group)
            if await self._holds(stream, group, lagging=floor <= last):
                floors.append((floor, group))
        point = trim_point([floor for floor, _ in floors], cutoff)
        self._note_holder(stream, floors, cutoff)
        if point is None or point <= (0, 1):
            return 0
        minid = str(point)
        trimmed: Any = await self._redis.xtrim(stream, minid=minid, approximate=False)
        if trimmed:
            self.trimmed[stream] = self.trimmed.get(stream, 0) + int(trimmed)
            log.debug("stream trimmed", stream=stream, entries=trimmed, minid=minid)
        return int(trimmed)

    async def trim_inboxes(self, stream: str, now_ms: int) -> int:
        """Trim the inbox of each group subscribed to ``stream`` to its group's floor."""
        total = 0
        for name in await subscribers(self._redis, self._keys, stream):
            inbox = self._keys.inbox(name, stream)
            try:
                groups: Any = await self._redis.xinfo_groups(inbox)
            except ResponseError:
                continue  # not there (yet), or not a stream: nothing to trim
            for group in groups:
                if str(group["name"]) != name:
                    continue
                if await self.removed.expired(stream, group, inbox=True):
                    break
                floor = await self._floor(inbox, group)
                info: Any = await self._redis.xinfo_stream(inbox)
                last = EntryId.parse(str(info["last-generated-id"]))
                held = await self._holds(stream, group, lagging=floor <= last, key=inbox)
                point = floor if held else EntryId(now_ms + 1, 0)
                if point <= (0, 1):
                    continue
                trimmed: Any = await self._redis.xtrim(inbox, minid=str(point), approximate=False)
                total += int(trimmed)
        return total

    def _note_holder(
        self, stream: str, floors: list[tuple[EntryId, dict[str, Any]]], cutoff: tuple[int, int]
    ) -> None:
        floor, group = min(floors, key=lambda item: item[0], default=(EntryId(0, 0), None))
        if group is None or floor >= cutoff:
            self.holders.pop(stream, None)
            return
        lag = group.get("lag")
        self.holders[stream] = Holder(
            stream,
            str(group["name"]),
            floor,
            int(group["pending"]),
            None if lag is None else int(lag),
        )

    async def _floor(self, stream: str, group: dict[str, Any]) -> EntryId:
        """The group's oldest unfinished entry: oldest pending, or the first undelivered."""
        floor = EntryId.parse(str(group["last-delivered-id"])).next()
        if int(group["pending"]) > 0:
            summary: Any = await self._redis.xpending(stream, group["name"])
            if summary.get("min"):
                floor = min(floor, EntryId.parse(str(summary["min"])))
        return floor

    async def _holds(
        self, stream: str, group: dict[str, Any], *, lagging: bool, key: str | None = None
    ) -> bool:
        """Whether this group's floor counts: not an idle group released by policy.
        ``key``: where the group reads (its inbox), when not on ``stream``."""
        name = str(group["name"])
        if name in (ARCHIVER_GROUP, FANOUT_GROUP):
            return True  # never released: they are what makes trimming safe
        consumers: Any = await self._redis.xinfo_consumers(key or stream, name)
        key_ = (stream, name)
        if consumers:
            self._unread_since.pop(key_, None)
            idle_ms = min(int(c["idle"]) for c in consumers)
        else:  # nobody ever read (or all were deleted): count from when we first saw it
            since = self._unread_since.setdefault(key_, time.monotonic())
            idle_ms = int((time.monotonic() - since) * 1000)
        return self._idle_verdict(stream, name, group, lagging=lagging, idle_ms=idle_ms)

    def _idle_verdict(
        self, stream: str, name: str, group: dict[str, Any], *, lagging: bool, idle_ms: int
    ) -> bool:
        """Whether an idle group (reported once) still holds the floor."""
        key = (stream, name)
        idle = lagging and idle_ms > self._settings.idle_group_after * 1000
        if not idle:
            self._idle.discard(key)
            return True
        release = self._settings.idle_groups == "release"
        if key not in self._idle:
            self._idle.add(key)
            seconds = idle_ms / 1000
            log.warning(
                "consumer group idle: its consumers read nothing for a long time",
                group=name,
                stream=stream,
                idle_s=round(seconds, 1),
                released=release,
            )
            self._announcer.announce(
                EventType.GROUP_IDLE,
                {
                    "group": name,
                    "stream": self._keys.stream_name(stream),
                    "idle_seconds": round(seconds, 1),
                    "lag": group.get("lag"),
                    "released": release,
                },
            )
        return not release
