"""Redis memory under control: publishers are held back before Redis refuses writes.

Against a private Redis (7.0 and 6.2) with a small ``maxmemory`` and ``noeviction``. The
archive being down is played by an archiver group that never acks; a slow bot by a bot
group that never reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from bus import BusBackpressureError, BusClient, EventType
from bus.connection import is_cluster
from bus.keys import ARCHIVER_GROUP
from bus.settings import BusSettings
from manager.announcer import Announcer
from manager.archive.pressure import PressureWatch
from manager.config import MemorySettings
from tests.conftest import BusFactory
from tests.manager.archive.test_trimmer import (
    KEYS,
    STREAM,
    ack,
    archived,
    join,
    make_trimmer,
    read,
    system_events,
)
from tests.support import config_set, in_background, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.deployments]

PAYLOAD = "x" * 2000


@pytest.fixture
async def bus(bus_factory: BusFactory) -> BusClient:
    """A bot's client: waits at most 0.3 s for the flag to clear."""
    return await bus_factory("sender", backpressure_wait=0.3)


@pytest.fixture
async def manager_bus(redis_url: str) -> AsyncIterator[BusClient]:
    """The manager's client for its own events: past the flag."""
    settings = BusSettings(redis_url=redis_url)
    async with BusClient("manager", settings=settings, backpressure=False) as client:
        yield client


@pytest.fixture
async def announcer(manager_bus: BusClient) -> AsyncIterator[Announcer]:
    """An announcer publishing in the background for the whole test."""
    announcements = Announcer(manager_bus)
    async with in_background(announcements.run()):
        yield announcements


async def used(redis: Redis) -> int:
    """Redis's used_memory (on a cluster: the node holding the user stream's)."""
    info: Any = await redis.info("memory", **await _stream_node(redis))
    return int(info["used_memory"])


async def _stream_node(redis: Redis) -> dict[str, Any]:
    """On a cluster: the node the events of these tests go to, as redis-py's target."""
    if not is_cluster(redis):
        return {}
    cluster: Any = redis
    await cluster.initialize()
    return {"target_nodes": cluster.get_node_from_key(STREAM)}


async def limit_memory(redis: Redis, headroom: int) -> int:
    """Set maxmemory to what is used now plus ``headroom``, noeviction, on the node of the
    user stream (its shard's limit, on a cluster); the limit."""
    limit = await used(redis) + headroom
    await redis.config_set("maxmemory-policy", "noeviction", **await _stream_node(redis))
    await redis.config_set("maxmemory", str(limit), **await _stream_node(redis))
    return limit


async def fill(bus: BusClient, n: int) -> None:
    """Publish ``n`` events of about 2 KB each to the user stream."""
    for start in range(0, n, 50):
        await bus.publish_many([("user.note.added", {"p": PAYLOAD})] * min(50, n - start))


async def held_back(bus: BusClient, reason: str) -> bool:
    """Whether a publish now is refused for ``reason`` (a publisher reads the flag at most
    every half second, so one just before may still go through)."""
    try:
        await bus.publish("user.note.added", {"n": 1})
    except BusBackpressureError as exc:
        if reason not in str(exc):  # Redis's own OOM, not the manager's flag
            raise
        return True
    return False


class TestPublisher:
    async def test_flag_up_for_the_whole_wait_raises_and_writes_nothing(
        self, bus: BusClient, redis: Redis
    ) -> None:
        """With the flag up, publish waits backpressure_wait, then raises
        BusBackpressureError naming the reason; nothing reaches the stream."""
        await redis.set(KEYS.pressure(), "the archive is not storing events", px=10_000)
        for attempt in (bus.publish("user.note.added", {"n": 1}),
                        bus.publish_many([("user.note.added", {"n": 2})])):  # fmt: skip
            with pytest.raises(BusBackpressureError, match="archive is not storing") as caught:
                await attempt
            assert caught.value.reason == "the archive is not storing events"
        assert await redis.exists(STREAM) == 0

    async def test_flag_cleared_during_the_wait_lets_the_event_through(
        self, bus_factory: BusFactory, redis: Redis
    ) -> None:
        """A publish that waits goes through as soon as the flag is lowered."""
        patient = await bus_factory("patient", backpressure_wait=30)
        await redis.set(KEYS.pressure(), "busy", px=30_000)
        publishing = asyncio.create_task(patient.publish("user.note.added", {"n": 1}))
        await asyncio.sleep(0.2)  # the fault: the flag stays up a while
        assert not publishing.done()
        await redis.delete(KEYS.pressure())
        entry_id = await asyncio.wait_for(publishing, 5)
        assert entry_id
        assert await redis.xlen(STREAM) == 1

    async def test_redis_refusing_at_maxmemory_is_backpressure_not_a_crash(
        self, bus: BusClient, redis: Redis
    ) -> None:
        """When Redis itself refuses the write (OOM under noeviction) the publisher gets
        BusBackpressureError, one event or many, and can publish again once it has room."""
        await fill(bus, 10)
        await limit_memory(redis, 0)
        await redis.config_set("maxmemory", "1", **await _stream_node(redis))
        with pytest.raises(BusBackpressureError, match="maxmemory"):
            await bus.publish("user.note.added", {"n": 1})
        with pytest.raises(BusBackpressureError, match="maxmemory"):
            await bus.publish_many([("user.note.added", {"n": i}) for i in range(3)])
        await redis.config_set("maxmemory", "0", **await _stream_node(redis))
        assert await bus.publish("user.note.added", {"n": 2})


class TestPressureWatch:
    async def test_archive_down_holds_publishers_back_before_redis_is_full(
        self, bus: BusClient, redis: Redis, announcer: Announcer
    ) -> None:
        """The archive stores nothing: the watch raises the flag at pressure_high, names the
        archiver as the holder, and publishers get BusBackpressureError before Redis ever
        refuses a write; once the archive catches up the streams are trimmed at once and
        the flag goes down."""
        await bus.publish("user.note.added", {"p": PAYLOAD})
        await join(redis, ARCHIVER_GROUP)
        limit = await limit_memory(redis, 3 * 1024 * 1024)
        trimmer = make_trimmer(bus, announcer)
        watch = PressureWatch(redis, KEYS, trimmer, announcer, MemorySettings())
        for _ in range(5000):
            await watch.check()
            if watch.state.backpressure:
                break
            await fill(bus, 20)
        assert watch.state.backpressure, "publishers were never held back"
        await wait_until(lambda: held_back(bus, "archive is not storing"), what="held back")
        assert await used(redis) <= limit
        assert watch.state.backpressure
        (holder,) = watch.state.holders
        assert (holder.stream, holder.group) == (STREAM, ARCHIVER_GROUP)

        await archived(redis)  # the archive is back and stores everything
        await watch.check()
        assert await redis.xlen(STREAM) == 0  # trimmed at once, not after the hot window
        # The flag goes down at the check that finds the memory freed: on a cluster node
        # the replica's output buffer (the burst just written) counts in used_memory until
        # the replica has read it, which under load can take past this first check.
        await wait_until(lambda: _lowered(watch), what="the flag lowered")
        assert await redis.exists(KEYS.pressure()) == 0
        assert await bus.publish("user.note.added", {"n": 1})
        assert await announcer.flush(5)
        raised, cleared = await system_events(redis, EventType.MEMORY_PRESSURE)
        assert raised.data["scope"] == "redis" and raised.data["raised"] is True
        assert raised.data["holders"][0]["group"] == ARCHIVER_GROUP
        assert raised.data["budget_bytes"] == limit
        assert cleared.data["raised"] is False

    async def test_slow_group_is_named_and_memory_freed_once_it_catches_up(
        self, bus: BusClient, redis: Redis, announcer: Announcer
    ) -> None:
        """Everything is archived but a bot's group is behind: the watch names that group,
        and when it acks, the trim frees the memory and publishers go on."""
        await bus.publish("user.note.added", {"p": PAYLOAD})
        await join(redis, ARCHIVER_GROUP, start="0")
        await join(redis, "bot-group-slow", start="0")
        limit = await limit_memory(redis, 3 * 1024 * 1024)
        trimmer = make_trimmer(bus, announcer)
        watch = PressureWatch(redis, KEYS, trimmer, announcer, MemorySettings())

        async def pressed() -> bool:
            await archived(redis)
            await watch.check()
            if watch.state.backpressure:
                return True
            await fill(bus, 20)
            return False

        await wait_until(pressed, timeout=60, what="backpressure")
        assert await used(redis) <= limit
        assert [h.group for h in watch.state.holders] == ["bot-group-slow"]
        await wait_until(lambda: held_back(bus, "bot-group-slow is behind"), what="held back")
        while ids := await read(redis, "bot-group-slow", 1000):
            await ack(redis, "bot-group-slow", ids)
        await watch.check()
        assert not watch.state.backpressure
        assert await bus.publish("user.note.added", {"n": 1})

    async def test_unbounded_redis_is_watched_without_a_flag(
        self, bus: BusClient, redis: Redis, announcer: Announcer
    ) -> None:
        """A Redis without maxmemory is reported (state says 0) and nobody is held back."""
        await config_set(redis, "maxmemory", "0")
        watch = PressureWatch(redis, KEYS, make_trimmer(bus, announcer), announcer,
                              MemorySettings())  # fmt: skip
        await watch.check()
        assert watch.state.maxmemory == 0
        assert not watch.state.backpressure
        assert await bus.publish("user.note.added", {"n": 1})


async def _lowered(watch: PressureWatch) -> bool:
    """Check once more; whether the flag is down."""
    await watch.check()
    return not watch.state.backpressure
