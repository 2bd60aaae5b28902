"""Replay across the Redis/PostgreSQL seam while events arrive and streams are trimmed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from bus import BusClient
from bus.archive.store import ArchiveStore
from bus.keys import Keys
from bus.settings import BusSettings
from manager.announcer import Announcer
from manager.archive.archiver import Archiver
from manager.archive.link import ArchiveLink
from manager.archive.trimmer import Trimmer
from manager.config import ArchiveSettings
from manager.embedded.postgres_server import PostgresServer
from tests.support import wait_until

# Replay reads with XRANGE and the trimmer trims with XTRIM MINID, alike on every Redis.
pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow, pytest.mark.one_redis]
FAST = ArchiveSettings(
    batch_wait=0.02, hot_window=0, trim_interval=0.02, batch_size=50, fill_wait=0.05
)


@contextlib.asynccontextmanager
async def archiving(
    redis_url: str, dsn: str
) -> AsyncIterator[tuple[BusClient, ArchiveStore, Trimmer]]:
    """A publisher, the archiver and a trimmer that keeps nothing unarchived in Redis."""
    keys = Keys()
    link = ArchiveLink(dsn, keys)
    async with BusClient("pub", settings=BusSettings(redis_url=redis_url)) as bus:
        store = await link.get()
        archiver = Archiver(bus.redis, keys, FAST, link.get)
        trimmer = Trimmer(bus.redis, keys, FAST, Announcer(bus))
        tasks = [asyncio.create_task(archiver.run()), asyncio.create_task(trimmer.run())]
        try:
            yield bus, store, trimmer
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await link.close()


async def ids(bus: BusClient, store: ArchiveStore, **kw: str) -> list[str]:
    """The ids a replay of ``note.#`` yields, with the archive behind it."""
    return [e.id async for e in bus.replay("note.#", archive=store, **kw)]


class TestSeam:
    async def test_before_during_and_after_a_trim(
        self, redis_url: str, postgres_server: PostgresServer
    ) -> None:
        """Replays taken while events arrive and get trimmed are gap-free ordered prefixes;
        the final replay has every event once, in publish order."""
        async with archiving(redis_url, postgres_server.dsn) as (bus, store, trimmer):
            published: list[str] = []
            for n in range(300):  # before: archived, then trimmed away
                published.append(await bus.publish("note.added", {"n": n}))
            stream = bus.keys.stream("bot")

            async def trimmed() -> bool:
                return bool(trimmer.trimmed.get(stream)) and await store.count() >= 300

            await wait_until(trimmed, 30, "the first events archived and trimmed")
            assert await bus.redis.xlen(stream) < 300

            async def publish_more() -> None:
                for n in range(300, 900):  # during
                    published.append(await bus.publish("note.added", {"n": n}))
                    if n % 50 == 0:
                        await asyncio.sleep(0.01)

            publisher = asyncio.create_task(publish_more())
            snapshots = 0
            while not publisher.done():
                seen = await ids(bus, store)
                assert seen == published[: len(seen)], "a replay skipped or repeated events"
                assert len(seen) >= 300
                snapshots += 1
            await publisher
            assert snapshots >= 2
            for n in range(900, 1000):  # after
                published.append(await bus.publish("note.added", {"n": n}))
            assert await ids(bus, store) == published

            async def all_archived() -> bool:
                return await store.count() == 1000

            await wait_until(all_archived, 30, "every event archived")
            assert await ids(bus, store) == published  # now mostly from PostgreSQL

    async def test_since_and_until_bound_the_replay_on_both_sides(
        self, redis_url: str, postgres_server: PostgresServer
    ) -> None:
        """since/until (entry ids) select the same slice whether it comes from Redis or not."""
        async with archiving(redis_url, postgres_server.dsn) as (bus, store, _):
            for n in range(100):
                await bus.publish("note.added", {"n": n})
            stream = bus.keys.stream("bot")

            async def gone() -> bool:
                return await bus.redis.xlen(stream) < 50 and await store.count() == 100

            await wait_until(gone, 30, "everything archived and most of the stream trimmed")
            archived = await store.entries(stream)
            entry_ids = [str(e.entry_id) for e in sorted(archived, key=lambda e: e.data["n"])]
            events = [
                e async for e in bus.replay("note.#", entry_ids[10], entry_ids[89], archive=store)
            ]
            assert [e.data["n"] for e in events] == list(range(10, 90))
            assert [e.entry_id for e in events] == entry_ids[10:90]

    async def test_without_the_archive_only_redis_is_replayed(
        self, redis_url: str, postgres_server: PostgresServer
    ) -> None:
        """Without ``archive=`` a replay sees only what the stream still holds."""
        async with archiving(redis_url, postgres_server.dsn) as (bus, store, _):
            for n in range(100):
                await bus.publish("note.added", {"n": n})
            stream = bus.keys.stream("bot")

            async def gone() -> bool:
                return await bus.redis.xlen(stream) < 100

            await wait_until(gone, 30, "some of the stream trimmed")
            held_before = await bus.redis.xlen(stream)
            got = len([e async for e in bus.replay("note.#")])
            held_after = await bus.redis.xlen(stream)  # the trimmer goes on meanwhile
            assert held_after <= got <= held_before < 100
            assert len(await ids(bus, store)) == 100
