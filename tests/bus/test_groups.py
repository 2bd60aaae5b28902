"""Consumer groups made idempotent: created once, left or moved when they exist."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bus.groups import ensure_group, has_group
from bus.redis_errors import is_oom
from tests.support import config_set

pytestmark = [pytest.mark.redis, pytest.mark.deployments]

STREAM = "test:groups"


async def add(redis: Redis) -> str:
    """A new entry on the stream; its id."""
    entry_id: Any = await redis.xadd(STREAM, {"n": "1"})
    return str(entry_id)


async def last_delivered(redis: Redis, group: str) -> str:
    """The group's last delivered id on the stream."""
    groups: Any = await redis.xinfo_groups(STREAM)
    return next(str(g["last-delivered-id"]) for g in groups if g["name"] == group)


class TestEnsureGroup:
    async def test_creates_the_group_and_the_stream(self, redis: Redis) -> None:
        """A missing stream is created with the group, which starts after ``start_id``."""
        assert not await has_group(redis, STREAM, "g")
        assert await ensure_group(redis, STREAM, "g", "0") is True
        assert await has_group(redis, STREAM, "g")
        assert await redis.xlen(STREAM) == 0
        assert await last_delivered(redis, "g") == "0-0"

    async def test_new_group_at_dollar_starts_at_new_entries(self, redis: Redis) -> None:
        """``$`` puts a new group after the stream's last entry."""
        last = await add(redis)
        assert await ensure_group(redis, STREAM, "g", "$") is True
        assert await last_delivered(redis, "g") == last

    async def test_existing_group_stays_where_it_is(self, redis: Redis) -> None:
        """A second call is no error, creates nothing and does not move the group."""
        first = await add(redis)
        await ensure_group(redis, STREAM, "g", first)
        await add(redis)
        assert await ensure_group(redis, STREAM, "g", "$") is False
        assert await last_delivered(redis, "g") == first

    async def test_move_sets_an_existing_group_to_start_id(self, redis: Redis) -> None:
        """With ``move`` an existing group is moved to start after ``start_id``."""
        first = await add(redis)
        second = await add(redis)
        await ensure_group(redis, STREAM, "g", second)
        assert await ensure_group(redis, STREAM, "g", first, move=True) is False
        assert await last_delivered(redis, "g") == first

    async def test_move_creates_a_missing_group_at_start_id(self, redis: Redis) -> None:
        """With ``move`` a missing group is created where it would have been moved."""
        first = await add(redis)
        await add(redis)
        assert await ensure_group(redis, STREAM, "g", first, move=True) is True
        assert await last_delivered(redis, "g") == first

    async def test_existing_group_is_fine_while_redis_is_full(self, redis: Redis) -> None:
        """At ``maxmemory`` Redis refuses XGROUP CREATE, but an existing group is found
        first, so nothing is asked of it."""
        await ensure_group(redis, STREAM, "g", "0")
        await config_set(redis, "maxmemory-policy", "noeviction")
        await config_set(redis, "maxmemory", "1")
        try:
            with pytest.raises(ResponseError) as refused:
                await redis.xgroup_create(STREAM, "g", id="0", mkstream=True)
            assert is_oom(refused.value)
            assert await ensure_group(redis, STREAM, "g", "0") is False
        finally:
            await config_set(redis, "maxmemory", "0")

    async def test_a_key_of_another_type_is_an_error(self, redis: Redis) -> None:
        """A key that is not a stream raises Redis's error, not a silent success."""
        await redis.set(STREAM, "x")
        assert not await has_group(redis, STREAM, "g")
        with pytest.raises(ResponseError, match=r"WRONGTYPE|requires the key to exist"):
            await ensure_group(redis, STREAM, "g", "0")
