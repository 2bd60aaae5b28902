"""Recording every consumer group's acked position in the archive, for a restore without a gap.

Every ``interval`` seconds the recorder reads XINFO GROUPS of every stream of the namespace
and upserts each group's position into ``group_positions``
(:mod:`bus.archive.group_positions`): the group's floor minus one, where the floor is its
oldest pending entry, or the entry after its last delivered one (as the trimmer computes
it). Every entry at or below a position is acked by the group. The archiver's group is left
out: its position is the archive itself (``archive_state``).

After Redis lost data, :mod:`manager.archive.restore` puts each group back at its position. So the
recorder must never record what a damaged Redis shows before the restore repaired it. Two
rules make sure of it, neither depending on timing:

- a stream that :func:`manager.archive.restore.lost_streams` reports (the very test the restore
  uses to decide what to repair: its last id is below the last archived one, or it is gone)
  is skipped, and stays skipped until the restore wrote it back; the groups a bot recreated
  on it at ``0`` or ``$`` are not looked at. A restore writes the groups first and the
  events after, so the stream looks lost until the restore is done;
- a recorded position only moves forward (in SQL), so a group read in the instant between
  that check and Redis going away (recreated at ``0``, say) changes nothing.

That rather than waiting for the daemon's Redis identity check: a Redis flushed without a
restart keeps its run_id, and a restore skipped while PostgreSQL was down would otherwise
stop the recording for good.

Positions trail the groups by up to one round: after a restore a group may be handed again
what it acked in the last ``interval`` before the loss (at-least-once, never a gap). A
stream deleted between the scan and its XINFO is skipped; the rows of a stream no longer in
Redis are kept (see :mod:`bus.archive.group_positions`). A loss that a new event hid
before anything looked (a new entry's id passes the last archived one) is seen by neither
the restore nor the recorder.

Redis or PostgreSQL being away ends nothing: the round is logged (once per outage) and the
next one tries again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bus.archive.errors import ArchiveUnavailableError
from bus.archive.group_positions import clamp
from bus.archive.store import ArchiveStore
from bus.entry_id import EntryId
from bus.fanout import subscribers
from bus.keys import ARCHIVER_GROUP, FANOUT_GROUP, Keys
from bus.periodic import REDIS_UNAVAILABLE, Outage, Periodic
from manager.archive.restore import lost_streams
from manager.config import CoordinatorSettings
from manager.observe.lag import stream_keys

log = structlog.get_logger("manager.archive.group_positions")
Store = Callable[[], Awaitable[ArchiveStore]]
#: PostgreSQL cannot be reached; tried before Redis's outage, as it is an OSError too.
POSTGRES_UNAVAILABLE = Outage((ArchiveUnavailableError,), "PostgreSQL unavailable")


def acked_position(
    last_delivered: tuple[int, int], oldest_pending: tuple[int, int] | None
) -> EntryId:
    """Where a group has acked every entry at or below: its floor minus one."""
    if oldest_pending is None:
        return EntryId(*last_delivered)
    return min(EntryId(*last_delivered), EntryId(*oldest_pending).previous())


class PositionRecorder:
    """Records the groups' positions of every stream every ``interval`` seconds."""

    def __init__(self, redis: Redis, keys: Keys, store: Store, interval: float) -> None:
        self._redis = redis
        self._keys = keys
        self._store = store
        self._interval = interval
        self._rounds = Periodic(
            self.record,
            interval,
            log=log,
            what="record group positions",
            outages=(POSTGRES_UNAVAILABLE, REDIS_UNAVAILABLE),
            resumed="recording group positions again",
        )
        self._skipped: set[str] = set()  # lost streams, logged once each
        #: Rows written (new or moved forward) so far.
        self.recorded = 0

    async def run(self) -> None:
        """Record until cancelled; a failed round is logged and the next one tries again."""
        await self._rounds.run()

    async def record(self) -> dict[tuple[str, str], EntryId]:
        """One round; every ``(stream key, group) → position`` it saw (written if higher)."""
        store = await self._store()
        lost = await lost_streams(self._redis, store)
        seen: dict[tuple[str, str], EntryId] = {}
        for stream in await stream_keys(self._redis, self._keys):
            if stream in lost:
                if stream not in self._skipped:
                    log.warning(
                        "stream lost data: its group positions are not recorded until it is "
                        "restored",
                        stream=stream,
                        last_archived=lost[stream],
                    )
                self._skipped.add(stream)
                continue
            if stream in self._skipped:
                log.info("stream whole again: recording its group positions", stream=stream)
                self._skipped.discard(stream)
            seen.update(await self._positions(stream))
        written = await store.group_positions.record(seen)
        self.recorded += written
        if written:
            log.debug("group positions recorded", seen=len(seen), moved=written)
        return seen

    async def _positions(self, stream: str) -> dict[tuple[str, str], EntryId]:
        """The position of every group reading ``stream`` (on it, or in its inbox of it) but
        the manager's own ({} if it is gone)."""
        found = await self._positions_on(stream, stream)
        for group in await subscribers(self._redis, self._keys, stream):
            found.update(await self._positions_on(self._keys.inbox(group, stream), stream))
        return found

    async def _positions_on(self, key: str, stream: str) -> dict[tuple[str, str], EntryId]:
        """The positions of the groups on ``key``, recorded under ``stream``: an inbox's
        entries have the stream's ids."""
        try:
            groups: Any = await self._redis.xinfo_groups(key)
        except ResponseError:
            if not await self._redis.exists(key):
                return {}  # deleted since the scan
            raise
        found = {}
        for group in groups:
            name = str(group["name"])
            if name in (ARCHIVER_GROUP, FANOUT_GROUP):
                continue
            oldest = None
            if int(group["pending"]) > 0:
                summary: Any = await self._redis.xpending(key, name)
                oldest = EntryId.parse(str(summary["min"])) if summary.get("min") else None
            last = EntryId.parse(str(group["last-delivered-id"]))
            position = clamp(acked_position(last, oldest))
            found[(stream, name)] = position
            log.debug("group position", stream=stream, group=name, acked=str(position))
        return found

    def __repr__(self) -> str:
        return (
            f"<PositionRecorder namespace={self._keys.namespace} interval={self._interval}"
            f" recorded={self.recorded} failing={self._rounds.failing}>"
        )


async def record_positions(
    redis: Redis, keys: Keys, store: Store, settings: CoordinatorSettings
) -> None:
    """Run a :class:`PositionRecorder` every coordinator interval until cancelled."""
    await PositionRecorder(redis, keys, store, settings.interval).run()
