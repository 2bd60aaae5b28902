"""Creating consumer groups: idempotent, and still possible while Redis is full."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from bus.errors import GroupMissingError
from bus.redis_errors import is_busygroup


async def has_group(redis: Redis, stream: str, group: str) -> bool:
    """Whether ``group`` exists on ``stream`` (False when the stream does not exist)."""
    try:
        groups: Any = await redis.xinfo_groups(stream)
    except ResponseError:  # no such key
        return False
    return any(_text(g.get("name")) == group for g in groups)


async def ensure_group(
    redis: Redis, stream: str, group: str, start_id: str, *, move: bool = False
) -> bool:
    """Make sure ``group`` exists on ``stream`` (creating the stream too); True if created.

    A new group starts after ``start_id`` (``"$"``: at new entries, ``"0"``: the whole
    stream). An existing group stays where it is, or with ``move`` is moved to start after
    ``start_id`` (XGROUP SETID). The group is looked up before XGROUP CREATE: Redis at
    ``maxmemory`` refuses XGROUP CREATE even for a group that exists, and a restarted bot,
    or the manager, must still start then. A client that may not create groups (a bot's
    Redis user) gets :class:`GroupMissingError` for a missing one.
    """
    if not await has_group(redis, stream, group):
        try:
            await redis.xgroup_create(stream, group, id=start_id, mkstream=True)
        except NoPermissionError as exc:
            raise GroupMissingError(
                f"consumer group {group} does not exist on {stream}, and this bot may not "
                "create it: the manager creates the group of every subscription declared in "
                "the bot's config (declare it there), and recreates them after Redis lost "
                "its data; waiting for it"
            ) from exc
        except ResponseError as exc:
            if not is_busygroup(exc):
                raise
        else:
            return True
    if move:
        await redis.xgroup_setid(stream, group, start_id)
    return False


def _text(value: Any) -> str:
    """A reply value as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else str(value)
