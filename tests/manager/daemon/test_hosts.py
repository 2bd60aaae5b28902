"""The registry of a deployment's managers: who is live, who is gone, and gone for good."""

from __future__ import annotations

import orjson
import pytest
from redis.asyncio import Redis

from bus.keys import Keys
from manager.daemon.hosts import HostRegistry, hosts_key

pytestmark = [pytest.mark.redis]

KEYS = Keys()


def registry(redis: Redis, host: str, bots: dict[str, list[int]] | None = None) -> HostRegistry:
    """A registry writing every second, forgetting managers gone for 60 s."""
    return HostRegistry(redis, KEYS, host, 1.0, lambda: bots or {}, forget_after=60.0)


async def write_as(redis: Redis, host: str, seconds_ago: float) -> bytes:
    """An entry of ``host`` as if its manager last wrote ``seconds_ago`` (Redis's clock)."""
    now_s, micros = await redis.time()
    at = int(now_s) * 1000 + int(micros) // 1000 - int(seconds_ago * 1000)
    value = orjson.dumps({"pid": 1, "version": "0", "bots": ["a"], "replicas": {}, "at": at})
    await redis.hset(hosts_key(KEYS), host, value)
    return value


class TestHosts:
    async def test_live_gone_and_gone_for_good(self, redis: Redis) -> None:
        """A manager silent for three intervals is listed as gone; one silent past
        ``forget_after`` is deleted, and no longer taken for running its bots."""
        here = registry(redis, "here", {"b": [0]})
        await here.write()
        await write_as(redis, "recent", 0.5)
        await write_as(redis, "silent", 5)
        await write_as(redis, "dead", 120)
        listed = {e.host: e.live for e in await here.entries()}
        assert listed == {"here": True, "recent": True, "silent": False}
        assert not await redis.hexists(hosts_key(KEYS), "dead")
        assert await here.live_hosts() == {"here", "recent"}

    async def test_an_entry_rewritten_meanwhile_is_kept(self, redis: Redis) -> None:
        """The delete only takes the very entry that was read: a manager that came back
        and wrote again in between keeps its new entry."""
        here = registry(redis, "here")
        old = await write_as(redis, "back", 120)
        fresh = await write_as(redis, "back", 0)
        assert old != fresh
        await here._forget("back", old, 120)  # what entries() does with the old value read
        assert await redis.hget(hosts_key(KEYS), "back") == fresh.decode()
