"""The archive under a real manager: everything archived, and Redis restored after a loss."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from bus import BusClient, EventType
from bus.archive.errors import ArchiveError
from bus.archive.store import ArchiveStore
from bus.entry_id import EntryId
from bus.keys import Keys, group_name
from bus.settings import BusSettings
from manager.embedded.postgres_server import PostgresServer
from manager.embedded.redis_server import RedisServer
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import FAST, ManagerProcess, bot_toml, events
from tests.support import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]


class TestRedisLoss:
    # away 3 s: longer than the coordinator lease (2 s here), so the manager stops its
    # duties while Redis is gone and starts them again when it is back, empty.
    @pytest.mark.parametrize("away", [0.0, 3.0], ids=["back-at-once", "away-past-the-lease"])
    async def test_emptied_redis_gets_the_archive_back_and_nothing_is_handled_twice(
        self,
        away: float,
        manager_factory: ManagerFactory,
        redis_server: RedisServer,
        postgres_server: PostgresServer,
        keys: Keys,
    ) -> None:
        """Redis restarts empty: each group restarts after its recorded position, the hot
        window is written back, system.redis.restored says so, and bots go on with new
        events."""
        manager = await manager_factory(
            bot_toml(
                "recorder",
                "tests.daemon.sample_bots:poisoned",
                subscriptions=[{"pattern": "test.#"}],
            )
        )
        pid = await manager.pid("recorder")
        handled = keys.bot_state("recorder", "handled")
        async with BusClient("tester", settings=BusSettings(redis_url=redis_server.url)) as bus:
            before = [await bus.publish("test.ok", {"n": n}) for n in range(5)]

            async def all_handled() -> bool:
                items: Any = await bus.redis.lrange(handled, 0, -1)
                return set(items) == set(before)

            await wait_until(all_handled, 20, "the first events handled")
        async with await ArchiveStore.connect(postgres_server.dsn) as store:

            async def archived() -> bool:
                return all([await store.get(i) for i in before])

            await wait_until(archived, 20, "the first events archived")
            last = await store.get(before[-1])
            assert last is not None
            assert last.entry_id is not None
            acked = (keys.stream("bot"), group_name("recorder"))

            async def position_recorded() -> bool:
                recorded = await store.group_positions.load()
                return recorded.get(acked) == EntryId.parse(str(last.entry_id))

            await wait_until(position_recorded, 20, "the bot's position recorded")
        # Redis loses everything: killed, its AOF gone, started again empty.
        await redis_server.kill()
        shutil.rmtree(redis_server.data_dir / "appendonlydir", ignore_errors=True)
        (redis_server.data_dir / "appendonly.aof").unlink(missing_ok=True)
        await asyncio.sleep(away)  # the fault's length, not a wait for a condition
        await redis_server.start()
        async with Redis.from_url(redis_server.url, decode_responses=True) as redis:

            async def restored() -> bool:
                return bool(await events(redis, keys, EventType.REDIS_RESTORED))

            await wait_until(restored, 30, "system.redis.restored")
            note = (await events(redis, keys, EventType.REDIS_RESTORED))[0].data
            assert note["streams"]["bot"] >= 5
            assert f"{group_name('recorder')} after {last.entry_id}" in note["note"]
            replayed = [e.id async for e in _replay(redis_server.url)]
            assert set(before) <= set(replayed)  # the hot window is back in the stream
            async with BusClient("tester", settings=BusSettings(redis_url=redis_server.url)) as bus:
                after = await bus.publish("test.ok", {"n": "after"})

                async def new_one_handled() -> bool:
                    items: Any = await bus.redis.lrange(handled, 0, -1)
                    return after in items

                await wait_until(new_one_handled, 30, "a new event handled after the loss")
                items: Any = await bus.redis.lrange(handled, 0, -1)
                assert list(items) == [after]  # none of the restored events handled again
        # The bot's placement lease went with Redis's data: taken again, the bot not stopped.
        assert await manager.pid("recorder") == pid
        assert await manager.terminate() == 0


async def _replay(url: str) -> Any:
    async with BusClient("reader", settings=BusSettings(redis_url=url)) as bus:
        async for event in bus.replay("test.#"):
            yield event


class TestSubscriptions:
    async def test_declared_subscriptions_are_recorded_and_follow_reloads(
        self, manager_factory: ManagerFactory, postgres_server: PostgresServer
    ) -> None:
        """event_subscriptions holds each bot's declared patterns and conditions."""
        steady = "tests.daemon.sample_bots:steady"
        subs = [{"pattern": "test.#", "where": {"lang": "en"}}]
        manager = await manager_factory(
            bot_toml("a", steady, subscriptions=subs) + bot_toml("b", steady)
        )
        async with await ArchiveStore.connect(postgres_server.dsn) as store:
            assert await store.subscriptions("a") == [("test.#", {"lang": "en"})]
            assert await store.subscribers() == ["a"]  # b declares none
            config = manager.config_path.read_text().split("[[bots]]")[0]
            manager.config_path.write_text(config + bot_toml("b", steady, subscriptions=subs))
            await manager.command("reload")
            assert await store.subscribers() == ["b"]
        assert await manager.terminate() == 0


class TestCatchUp:
    async def test_bot_gets_everything_since_the_start_then_live(
        self, manager_factory: ManagerFactory, redis_server: RedisServer, keys: Keys
    ) -> None:
        """A new bot catches up on events already trimmed to the archive, then live ones:
        each exactly once, in order."""
        fast_trim = "[archive]\nhot_window = 0\ntrim_interval = 0.2\n"
        manager = await manager_factory("", extra=fast_trim)
        stream = keys.stream("bot")
        async with BusClient("tester", settings=BusSettings(redis_url=redis_server.url)) as bus:
            old = [await bus.publish("test.old", {"n": n}) for n in range(5)]

            async def trimmed() -> bool:
                return await bus.redis.xlen(stream) == 0

            await wait_until(trimmed, 30, "the old events archived and trimmed from Redis")
            config = manager.config_path.read_text()
            manager.config_path.write_text(
                config + bot_toml("late", "tests.daemon.sample_bots:historian")
            )
            await manager.command("reload")
            await manager.pid("late")
            # One ordering key: live events are handled in order per key (without one, two
            # may run on different workers at once).
            new = [await bus.publish("test.new", {"n": n}, key="k") for n in range(2)]
            seen_key = keys.bot_state("late", "seen")

            async def all_seen() -> bool:
                return len(await bus.redis.lrange(seen_key, 0, -1)) >= 7

            await wait_until(all_seen, 30, "the late bot to see old and new events")
            seen: Any = await bus.redis.lrange(seen_key, 0, -1)
            assert list(seen) == old + new
        assert await manager.terminate() == 0


@pytest.mark.one_redis  # PostgreSQL's fault: the same on every Redis
class TestEmbeddedPostgres:
    async def test_killed_embedded_postgres_comes_back_and_archiving_goes_on(
        self, reachable_dir: Path, redis_server: RedisServer
    ) -> None:
        """SIGKILL the embedded PostgreSQL: restarted on its data; events archived after."""
        config = f'data_dir = "data"\nredis_url = "{redis_server.url}"\n' + FAST
        manager = ManagerProcess(reachable_dir, config)
        try:
            await manager.start()
            found: Any = await manager.command("connection")
            dsn = str(found["postgres_dsn"])
            postgres = manager.children("postgres")
            assert postgres
            settings = BusSettings(redis_url=redis_server.url)
            async with BusClient("tester", settings=settings) as bus:
                before = await bus.publish("test.ok", {})
                await wait_until(lambda: _archived(dsn, before), 20, "an event archived")
                os.kill(postgres[0], signal.SIGKILL)

                async def back() -> bool:
                    now = manager.children("postgres")
                    return bool(now) and now[0] != postgres[0]

                await wait_until(back, 30, "the embedded PostgreSQL to be restarted")
                after = await bus.publish("test.ok", {})
                await wait_until(lambda: _archived(dsn, after), 30, "an event archived after")
            assert await manager.terminate() == 0
        finally:
            await manager.kill()


async def _archived(dsn: str, event_id: str) -> bool:
    try:
        async with await ArchiveStore.connect(dsn, connect_timeout=2) as store:
            return await store.get(event_id) is not None
    except ArchiveError:
        return False
