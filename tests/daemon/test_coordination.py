"""The coordinator and failover under a real manager: overload, standby takeover, ACL users."""

from __future__ import annotations

import itertools
import os
import signal
from typing import Any

import pytest
from redis.asyncio import Redis

from bus import BusClient, EventType
from bus.keys import Keys
from bus.settings import BusSettings
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import bot_toml, events
from tests.support import wait_until

# Whole-daemon behaviour; what differs between Redis versions is tested below it (bus,
# lag, handover, lease) on each version.
pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.one_redis]


class TestMemory:
    async def test_bot_past_its_limit_is_reported(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys
    ) -> None:
        """A bot holding more than its memory_limit: one bot.overload with RSS and limit."""
        manager = await manager_factory(
            bot_toml("small", "tests.daemon.sample_bots:steady", memory_limit="400MiB")
            + bot_toml("greedy", "tests.daemon.sample_bots:hog", memory_limit="120MiB")
        )

        async def overloaded() -> bool:
            return bool(await events(redis, keys, EventType.BOT_OVERLOAD))

        await wait_until(overloaded, 30, "bot.overload for the greedy bot")
        found = await events(redis, keys, EventType.BOT_OVERLOAD)
        assert [e.source for e in found] == ["greedy"]
        data = found[0].data
        assert data["limit_bytes"] == 120 * 1024 * 1024
        assert data["rss_bytes"] > data["limit_bytes"]
        assert data["action"] is None  # memory_action = "warn": reported, not restarted
        status = await manager.status()
        assert status["memory"]["bots"] > 160 * 1024 * 1024
        assert status["memory"]["budget"] == 2 * 1024**3
        assert await manager.terminate() == 0


class TestFailover:
    async def test_standby_takes_over_when_the_active_dies(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys
    ) -> None:
        """Kill the active: the standby takes the lease, failover.triggered, never two actives."""
        manager = await manager_factory(
            bot_toml(
                "pilot", "tests.daemon.sample_bots:leader", replicas=2, standby=True, stop_timeout=1
            )
        )
        ticks = keys.bot_state("pilot", "ticks")

        async def one_active() -> bool:
            rows = await manager.instances("pilot")
            return sorted(str(r["role"]) for r in rows) == ["active", "standby"]

        await wait_until(one_active, 20, "one active and one standby")
        rows = await manager.instances("pilot")
        active = next(r for r in rows if r["role"] == "active")
        standby = next(r for r in rows if r["role"] == "standby")
        os.kill(active["pid"], signal.SIGKILL)

        async def took_over() -> bool:
            found = await events(redis, keys, EventType.FAILOVER_TRIGGERED)
            return bool(found)

        await wait_until(took_over, 1.5 + 3, "failover within the lease time")
        failover = (await events(redis, keys, EventType.FAILOVER_TRIGGERED))[0]
        assert failover.source == "pilot"
        assert failover.data["old_instance"] == str(active["instance"])
        assert failover.data["new_instance"] == str(standby["instance"])
        assert failover.data["fencing_token"] >= 2
        await wait_until(one_active, 20, "the killed replica back as standby")
        # Never two actives: the ticks switch from one instance to the other exactly once.
        sequence: Any = await redis.lrange(ticks, 0, -1)
        switches = [b for a, b in itertools.pairwise(sequence) if a != b]
        assert switches == [str(standby["instance"])]
        assert await manager.terminate() == 0


class TestRedisUser:
    async def test_bot_cannot_touch_other_keys_or_admin_commands(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys
    ) -> None:
        """A bot's own Redis user: other namespaces, other bots, admin commands are refused."""
        await redis.set("other:bot:x:secret", "s3cret")
        manager = await manager_factory(bot_toml("nosy", "tests.daemon.sample_bots:prober"))

        async def reported() -> bool:
            return bool(await events(redis, keys, "test.acl.result"))

        await wait_until(reported, 20, "the prober's report")
        results = dict((await events(redis, keys, "test.acl.result"))[0].data)
        assert results.pop("own_state") == "allowed"
        for name, answer in results.items():
            assert answer.startswith("denied: NoPermissionError"), (name, answer)
        assert await redis.get("other:bot:x:secret") == "s3cret"
        assert await redis.ping()  # SHUTDOWN was refused
        assert await manager.terminate() == 0


class TestLag:
    async def test_lagging_group_asks_for_balance_once_per_crossing(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys, redis_url: str
    ) -> None:
        """A group past lag_threshold: one load.balance_required, not one per check."""
        manager = await manager_factory(
            bot_toml(
                "lazy",
                "tests.daemon.sample_bots:idle",
                stop_timeout=1,
                subscriptions=[{"pattern": "test.#"}],
            ),
            extra='[coordinator.memory]\nbudget = "64MiB"\n',
        )
        async with BusClient("tester", settings=BusSettings(redis_url=redis_url)) as bus:
            for _ in range(8):
                await bus.publish("test.work", {})

            async def asked() -> bool:
                return bool(await events(redis, keys, EventType.LOAD_BALANCE_REQUIRED))

            await wait_until(asked, 10, "load.balance_required for the lazy group")
            for _ in range(8):
                await bus.publish("test.work", {})

            async def lag_seen(at_least: int) -> bool:
                groups = (await manager.status())["groups"]
                return any(g["group"] == "bot-group-lazy" and g["lag"] >= at_least for g in groups)

            await wait_until(lambda: lag_seen(16), 10, "the lag of 16 in status")
            found = await events(redis, keys, EventType.LOAD_BALANCE_REQUIRED)
            assert len(found) == 1
            assert found[0].data["group"] == "bot-group-lazy"
            assert found[0].data["bot_id"] == "lazy"
            assert found[0].data["lag"] >= 5
        # The 64 MiB budget is below what the manager alone uses: one pressure event.
        pressure = await events(redis, keys, EventType.MEMORY_PRESSURE)
        assert [e.data["raised"] for e in pressure] == [True]
        assert pressure[0].data["budget_bytes"] == 64 * 1024 * 1024
        assert await manager.terminate() == 0


class TestMemoryRestart:
    async def test_bot_past_its_limit_is_replaced_when_policy_says_so(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys
    ) -> None:
        """memory_action = "restart": the kernel kills it at the limit (cgroups), or the
        manager's overload says so and replaces it (polling); repeated replacements count as
        a crash loop (never restarted forever)."""
        loop = {"backoff_base": 0.05, "backoff_cap": 0.1, "crash_loop_restarts": 2}
        manager = await manager_factory(
            bot_toml(
                "greedy",
                "tests.daemon.sample_bots:hog",
                memory_limit="120MiB",
                memory_action="restart",
                restart={"policy": "on-failure", **loop},
                stop_timeout=1,
            )
        )
        limits = (await manager.status())["manager"]["memory_limits"]
        first = await manager.pid("greedy") if limits == "polling" else None

        async def failed() -> bool:
            return bool((await manager.instances("greedy"))[0]["state"] == "failed")

        await wait_until(failed, 60, "the always-greedy bot to be given up on")
        stopped = await events(redis, keys, EventType.BOT_STOPPED)
        if limits == "polling":  # the manager saw it over and replaced it
            overloads = await events(redis, keys, EventType.BOT_OVERLOAD)
            assert len(overloads) >= 3
            assert {e.data["action"] for e in overloads} == {"restart"}
            # The process seen running was replaced (under load an earlier one may have
            # been replaced before the test looked).
            assert first in [e.data["pid"] for e in stopped]
        else:  # the kernel killed each at the limit, before it ran, and before any poll
            assert limits in ("cgroup v1", "cgroup v2")
            reasons = {e.data["reason"] for e in stopped}
            assert reasons == {"killed by the kernel: over its memory_limit of 120.0 MiB"}
            assert len(stopped) >= 3
        error = (await events(redis, keys, EventType.BOT_ERROR))[0]
        assert "crash loop" in error.data["error"]
        assert await manager.terminate() == 0
