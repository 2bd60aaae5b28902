"""Consumer groups of bots gone from the config: kept for a grace period, then destroyed.

A bot removed from the config leaves its group on every stream it read. The group still
holds back trimming (its floor never moves), so Redis would keep those streams for ever.
The trimmer asks :meth:`RemovedGroups.expired` about every group it sees: the group of a
bot the config no longer names is noted the first time, and once it has been absent for
``grace`` seconds it is destroyed (``XGROUP DESTROY``), logged and announced as
``system.group.removed``. A bot put back within the grace period keeps its group and its
position. Only groups named like a bot's (``bot-group-<id>``) are touched: groups made by
other tools are left alone (they are reported idle like any other).

The clock starts when this manager first sees the group absent, so a manager restart
starts the grace period over: a removal is never hurried, only delayed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from redis.asyncio import Redis

from bus import EventType
from bus.fanout import unsubscribe
from bus.keys import GROUP_PREFIX, Keys
from manager.announcer import Announcer

log = structlog.get_logger("manager.archive.removed_groups")


class RemovedGroups:
    """Which groups belong to bots no longer configured, and when they may go."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        announcer: Announcer,
        grace: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._announcer = announcer
        self._grace = grace
        self._clock = clock
        self._bots: frozenset[str] | None = None  # None: not configured yet, touch nothing
        self._absent_since: dict[tuple[str, str], float] = {}
        #: Groups destroyed so far, as (stream key, group).
        self.destroyed: list[tuple[str, str]] = []

    def configure(self, bot_ids: Iterable[str]) -> None:
        """The bots of the running config (call again after a reload)."""
        self._bots = frozenset(bot_ids)
        self._absent_since = {
            key: since for key, since in self._absent_since.items() if self._orphan(key[1])
        }

    def _orphan(self, group: str) -> bool:
        if self._bots is None or not group.startswith(GROUP_PREFIX):
            return False
        return group.removeprefix(GROUP_PREFIX) not in self._bots

    async def expired(self, stream: str, group: dict[str, Any], *, inbox: bool = False) -> bool:
        """Whether ``group`` (an XINFO GROUPS item of ``stream``, or with ``inbox`` of its
        inbox of it) was destroyed just now (an inbox: unsubscribed and deleted)."""
        name = str(group["name"])
        if not self._orphan(name):
            return False
        key, now = (stream, name), self._clock()
        since = self._absent_since.setdefault(key, now)
        if since == now:
            log.warning(
                "consumer group of a bot gone from the config: destroyed after the grace "
                "period unless the bot comes back",
                group=name,
                stream=stream,
                grace_s=self._grace,
            )
        if now - since < self._grace:
            return False
        if inbox:
            await unsubscribe(self._redis, self._keys, stream, name)
        else:
            await self._redis.xgroup_destroy(stream, name)
        del self._absent_since[key]
        self.destroyed.append(key)
        log.warning(
            "consumer group of a removed bot destroyed: it no longer holds the trim",
            group=name,
            stream=stream,
            pending=group.get("pending"),
            lag=group.get("lag"),
        )
        self._announcer.announce(
            EventType.GROUP_REMOVED,
            {
                "group": name,
                "stream": self._keys.stream_name(stream),
                "absent_seconds": round(now - since, 1),
                "pending": int(group.get("pending") or 0),
                "lag": group.get("lag"),
            },
        )
        return True
