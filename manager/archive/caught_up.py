"""Whether the archive holds everything up to a moment: the events (the archiver has read
and committed every entry older than it) and the delivery records (none waits to be
copied for long). A count over the archive made before both is made too early."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bus.entry_id import EntryId
from bus.keys import ARCHIVER_GROUP, Keys
from manager.observe.lag import stream_keys

#: Seconds a delivery record may wait in Redis before the copy counts as behind.
COPY_SLACK = 10.0


async def archive_caught_up(redis: Redis, keys: Keys, until: datetime, now: datetime) -> str:
    """``""`` when the archive has every event created before ``until`` and every delivery
    record written before ``now - COPY_SLACK``; else what it is still waiting for."""
    until_ms = int(until.timestamp() * 1000)
    for stream in [*await stream_keys(redis, keys), keys.dead_letters()]:
        if behind := await _archiver_behind(redis, stream, until_ms):
            return f"the archiver on {keys.stream_name(stream)}: {behind}"
    first: Any = await redis.xrange(keys.deliveries(), count=1)
    if first:
        entry = EntryId.parse(_text(first[0][0]))
        if entry.ms < (now.timestamp() - COPY_SLACK) * 1000:
            return "the delivery records' copy into PostgreSQL"
    return ""


async def _archiver_behind(redis: Redis, stream: str, until_ms: int) -> str:
    try:
        groups: Any = await redis.xinfo_groups(stream)
        pending: Any = await redis.xpending(stream, ARCHIVER_GROUP)
        info: Any = await redis.xinfo_stream(stream)
    except ResponseError:  # the stream or the archiver's group is gone: nothing to wait on
        return ""
    group = next((g for g in groups if _text(g["name"]) == ARCHIVER_GROUP), None)
    if group is None:
        return ""
    if int(pending["pending"]) and EntryId.parse(_text(pending["min"])).ms < until_ms:
        return "entries read and not yet stored"
    delivered = EntryId.parse(_text(group["last-delivered-id"]))
    last = EntryId.parse(_text(info["last-generated-id"]))
    if delivered < last:
        unread: Any = await redis.xrange(stream, min=f"({delivered}", count=1)
        if unread and EntryId.parse(_text(unread[0][0])).ms < until_ms:
            return "entries not read yet"
    return ""


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
