"""Changing a route's partition count: refused while its streams hold unhandled events,
recorded once they are drained."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from bus import Event
from bus.groups import ensure_group
from bus.keys import Keys, group_name
from bus.routing import Router
from manager.daemon.partition_guard import check_partition_change, layout_key
from manager.errors import ManagerError
from tests.conftest import BusFactory
from tests.support import running, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.one_redis]

KEYS = Keys()
ROUTES = {"user": "user", "bot": "bot"}


async def test_a_change_waits_for_the_old_streams_to_drain(
    redis: Redis, bus_factory: BusFactory
) -> None:
    """The first start records the counts. Going from 1 to 4 while a group has 5 events
    to handle is refused, saying how to drain; once they are handled it is recorded."""
    assert await check_partition_change(redis, KEYS, Router(ROUTES, "bot")) == {}
    assert await redis.hgetall(layout_key(KEYS)) == {"user": "1", "bot": "1"}
    worker = await bus_factory("worker", consumer={"start_id": "0"})
    handled: list[str] = []

    @worker.subscribe("user.#")
    async def handle(event: Event) -> None:
        handled.append(event.id)

    await ensure_group(redis, KEYS.stream("user"), group_name("worker"), "0")
    producer = await bus_factory("producer")
    for n in range(5):
        await producer.publish("user.job.run", {"n": n}, key=f"k{n}")
    split = Router(ROUTES, "bot", {"user": 4})
    with pytest.raises(ManagerError, match=r"from 1 to 4 while 5 event\(s\).*Drain first"):
        await check_partition_change(redis, KEYS, split)
    assert await redis.hget(layout_key(KEYS), "user") == "1"
    async with running(worker):
        await wait_until(lambda: len(handled) == 5, what="the old stream drained")
        await wait_until(lambda: _acked(redis), what="its acks")
    assert await check_partition_change(redis, KEYS, split) == {"user": 4}
    assert await redis.hget(layout_key(KEYS), "user") == "4"
    assert await check_partition_change(redis, KEYS, split) == {}


async def _acked(redis: Redis) -> bool:
    groups = await redis.xinfo_groups(KEYS.stream("user"))
    return all(int(g["pending"]) == 0 for g in groups)
