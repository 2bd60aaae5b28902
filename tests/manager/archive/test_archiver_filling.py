"""Full blocks at a steady rate: the archiver holds a stream's last few entries back until
a block's worth has come (or ``fill_wait`` passed), and loses none it held when it stops.

What an operator depends on: a week at a steady 1,000 events/s takes the disk the sizing
promises (blocks of 32, not a block per read of a few), and no held entry is ever lost.
"""

from __future__ import annotations

from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import pytest
from redis.asyncio import Redis

from bus.archive import ArchiveStore
from bus.keys import ARCHIVER_GROUP, Keys
from manager.archive.filling import Filling
from manager.archive.link import ArchiveLink
from manager.embedded.postgres_server import PostgresServer
from tests.conftest import BusFactory
from tests.manager.archive.archive_support import (
    archived,
    archiving,
    caught_up,
    id_counts,
    make_archiver,
    running,
)
from tests.support import wait_until

KEYS = Keys()


def rows(first: int, n: int) -> list[tuple[str, list[str]]]:
    return [(f"{i}-0", ["k", "v"]) for i in range(first, first + n)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TestFilling:
    def test_whole_blocks_go_at_once_and_the_rest_when_it_has_waited(self) -> None:
        clock = Clock()
        filling = Filling(4, 1.0, exempt=frozenset({"dlq"}), clock=clock)
        out = filling.take([("a", rows(0, 6)), ("b", rows(0, 3)), ("dlq", rows(0, 1))])
        assert out == [("a", rows(0, 4)), ("dlq", rows(0, 1))]
        assert filling.held == 5 and filling.next_due() == 1.0
        clock.now += 0.5
        out = filling.take([("a", rows(6, 3))])  # a: 2 held + 3 read = one block + 1
        assert out == [("a", rows(4, 4))]
        assert filling.take([]) == []
        clock.now += 0.5  # b's three have waited a second; a's last was read 0.5 s ago
        assert filling.next_due() == 0.0
        assert filling.take([]) == [("b", rows(0, 3))]
        clock.now += 0.5
        assert filling.take([]) == [("a", rows(8, 1))]
        assert filling.held == 0 and filling.next_due() is None

    def test_no_wait_holds_nothing(self) -> None:
        filling = Filling(32, 0.0)
        assert filling.take([("a", rows(0, 5))]) == [("a", rows(0, 5))]
        assert filling.held == 0


async def blocks_of(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetch("SELECT n FROM event_blocks ORDER BY block")
    finally:
        await conn.close()
    return [row["n"] for row in found]


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.one_redis  # how entries are held does not differ between Redis versions
class TestArchiverFillsBlocks:
    async def test_events_published_one_by_one_are_stored_in_full_blocks(
        self,
        admin: Redis,
        archive: ArchiveStore,
        link: ArchiveLink,
        bus_factory: BusFactory,
        postgres_server: PostgresServer,
    ) -> None:
        """70 events published one at a time, each read by the archiver before the next
        (a read brings one), are stored as blocks of 32, 32 and the last 6 once they
        waited, not as 70 blocks of one."""
        producer = await bus_factory("producer")
        archiver = make_archiver(admin, link, fill_wait=2.0)
        async with archiving(archiver) as task:
            for n in range(70):
                await producer.publish("user.note.added", {"n": n})
                await wait_until(lambda: _all_read(admin), what=f"event {n} read")
            await wait_until(
                lambda: archived(archive, 70, running(task)), timeout=20, what="70 archived"
            )
            await wait_until(lambda: caught_up(admin), what="every entry acked")
        assert await blocks_of(postgres_server.dsn) == [32, 32, 6]

    async def test_entries_held_when_the_archiver_stops_are_stored_by_the_next(
        self,
        admin: Redis,
        archive: ArchiveStore,
        link: ArchiveLink,
        bus_factory: BusFactory,
        postgres_server: PostgresServer,
    ) -> None:
        """An archiver stopped while it holds 8 entries back (read, not stored, not acked)
        loses none: the next one stores them, each once."""
        producer = await bus_factory("producer")
        first = make_archiver(admin, link, fill_wait=1800.0, claim_idle=3600.0)
        async with archiving(first) as task:
            for n in range(40):
                await producer.publish("user.note.added", {"n": n})
            await wait_until(
                lambda: archived(archive, 32, running(task)), timeout=20, what="32 archived"
            )
            await wait_until(lambda: _pending(admin, 8), what="8 held, pending")
        assert await archive.count() == 32
        async with archiving(make_archiver(admin, link)) as task:
            await wait_until(
                lambda: archived(archive, 40, running(task)), timeout=20, what="40 archived"
            )
            await wait_until(lambda: caught_up(admin), what="every entry acked")
        counts = await id_counts(postgres_server.dsn)
        assert len(counts) == 40 and set(counts.values()) == {1}


async def _pending(redis: Redis, n: int) -> bool:
    """Whether the archiver group holds ``n`` entries of the user stream read, not acked."""
    info = await redis.xpending(KEYS.stream("user"), ARCHIVER_GROUP)
    return int(info["pending"]) == n


async def _all_read(redis: Redis) -> bool:
    """Whether the archiver group has read the user stream's last entry."""
    stream = KEYS.stream("user")
    last: Any = await redis.xrevrange(stream, count=1)
    groups: Any = await redis.xinfo_groups(stream) if last else []
    read = [
        g["last-delivered-id"]
        for g in groups
        if g["name"] in (ARCHIVER_GROUP, ARCHIVER_GROUP.encode())
    ]
    return bool(read) and read[0] == last[0][0]
