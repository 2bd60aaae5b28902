"""Bus metrics from the bots to the manager: reported on the status pipe, summed, kept."""

from __future__ import annotations

from typing import Any

import pytest

from bus import BusClient
from bus.settings import BusSettings
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import ManagerProcess, bot_toml
from tests.support import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.one_redis]
GROUP = "bot-group-worker"


async def fleet(manager: ManagerProcess) -> dict[str, Any]:
    """The fleet's metrics in the manager's status."""
    metrics: dict[str, Any] = (await manager.status())["metrics"]
    return metrics


async def count(manager: ManagerProcess, kind: str, group: str, category: str) -> int:
    """One counter of the fleet (0 when absent)."""
    counters = (await fleet(manager))["counters"]
    return int(counters.get(kind, {}).get(group, {}).get(category, 0))


class TestMetricsPipeline:
    async def test_counts_reach_the_manager_and_survive_a_restart(
        self, manager_factory: ManagerFactory, redis_url: str
    ) -> None:
        """Events a bot handles show in the manager's totals (with the manager's own
        publishing), and stay counted after the bot's process is replaced."""
        manager = await manager_factory(bot_toml("worker", "tests.daemon.sample_bots:steady"))
        async with BusClient("tester", settings=BusSettings(redis_url=redis_url)) as bus:
            await bus.publish_many([("test.ping.sent", {"n": n}) for n in range(5)])

            async def acked(n: int) -> bool:
                return await count(manager, "acked", GROUP, "test") == n

            await wait_until(lambda: acked(5), 15, "5 acks in the manager's metrics")
            totals = await fleet(manager)
            assert totals["counters"]["consumed"][GROUP] == {"test": 5}
            for name in ("handler_duration", "delay_start", "delay_ack"):
                assert totals["histograms"][name][GROUP]["count"] == 5, name
            assert totals["counters"]["published"][""]["bot"] >= 1  # bot.lifecycle.started

            await manager.command("restart", bot="worker")
            await manager.pid("worker")
            assert await count(manager, "acked", GROUP, "test") == 5  # kept from the old one
            await bus.publish_many([("test.ping.sent", {"n": n}) for n in range(2)])
            await wait_until(lambda: acked(7), 15, "the new process's acks added")
        assert await count(manager, "consumed", GROUP, "test") == 7
        assert await manager.terminate() == 0
