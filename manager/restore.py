"""After Redis comes back empty or older: put back what the archive knows.

A stream whose last entry is older than what the archive stored from it (or that is gone)
lost data: Redis restarted without its AOF, or from an old backup. For each such stream the
manager

1. points every consumer group it knows for the stream (the archiver's and each bot's
   declared group) at the last archived entry, so nothing archived is handled or stored a
   second time, and what arrives from now on is delivered, and
2. writes the archived events of the hot window back into the stream under their original
   entry ids (so replay and late readers find them again);

then publishes ``system.redis.restored`` saying what it did. Events that reached Redis but
not the archive before the loss are gone; the event says from which entry on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.asyncio import Redis

from bus.archive.store import ArchiveStore
from bus.keys import ARCHIVER_GROUP, Keys
from bus.redis_errors import is_busygroup
from bus.wire import encode
from manager.trimmer import parse_id

log = structlog.get_logger("manager.restore")
_PAGE = 1000


@dataclass
class Restored:
    """What a restore did, per stream key."""

    #: Events written back into each stream.
    events: dict[str, int] = field(default_factory=dict)
    #: The last archived entry each stream's groups now start after.
    positions: dict[str, str] = field(default_factory=dict)
    #: Groups pointed at that position.
    groups: dict[str, list[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.positions)


async def _last_id(redis: Redis, stream: str) -> str | None:
    """The stream's last generated id, None if the stream does not exist."""
    try:
        info: Any = await redis.xinfo_stream(stream)
    except Exception as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    return str(info["last-generated-id"])


async def lost_streams(redis: Redis, store: ArchiveStore) -> dict[str, str]:
    """Streams Redis holds less of than the archive: stream key → last archived id."""
    lost = {}
    for stream, archived in (await store.positions()).items():
        last = await _last_id(redis, stream)
        if last is None or parse_id(last) < parse_id(archived):
            lost[stream] = archived
    return lost


async def restore(
    redis: Redis,
    store: ArchiveStore,
    keys: Keys,
    *,
    groups_for: Callable[[str], Iterable[str]],
    hot_window_ms: int,
    now_ms: int,
) -> Restored:
    """Repair every stream that lost data (see the module); what was done."""
    done = Restored()
    for stream, archived in (await lost_streams(redis, store)).items():
        # Groups first: a bot whose group vanished recreates it at the start of the stream,
        # and must not then read the events written back.
        wanted = [ARCHIVER_GROUP, *groups_for(stream)]
        done.groups[stream] = await _point_groups(redis, stream, archived, wanted)
        done.events[stream] = await _write_back(
            redis, store, stream, archived, window=(hot_window_ms, now_ms)
        )
        done.positions[stream] = archived
        log.warning(
            "Redis had lost this stream's data: restored from the archive",
            stream=stream,
            events_written_back=done.events[stream],
            groups_start_after=archived,
        )
    return done


async def _write_back(
    redis: Redis, store: ArchiveStore, stream: str, archived: str, *, window: tuple[int, int]
) -> int:
    hot_window_ms, now_ms = window
    last = await _last_id(redis, stream)
    after = f"{max(0, now_ms - hot_window_ms)}-0"
    if last is not None and parse_id(last) >= parse_id(after):
        after = last  # XADD needs ids above the stream's last one
    written = 0
    while True:
        page = await store.entries(stream, after=after, limit=_PAGE)
        if not page:
            return written
        async with redis.pipeline(transaction=False) as pipe:
            for event in page:
                fields: Any = encode(event)
                pipe.xadd(stream, fields, id=str(event.entry_id))
            await pipe.execute()
        written += len(page)
        after = str(page[-1].entry_id)
        if parse_id(after) >= parse_id(archived):
            return written


async def _point_groups(redis: Redis, stream: str, position: str, groups: list[str]) -> list[str]:
    for group in groups:
        try:
            await redis.xgroup_create(stream, group, id=position, mkstream=True)
        except Exception as exc:
            if not is_busygroup(exc):
                raise
            await redis.xgroup_setid(stream, group, position)
    return groups
