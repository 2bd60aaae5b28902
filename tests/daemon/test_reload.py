"""Config reloads of a running manager (manager.daemon.reload): one at a time, from a SIGHUP
or the control socket."""

from __future__ import annotations

import signal

import pytest
from redis.asyncio import Redis

from bus import EventType
from bus.keys import Keys
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import (
    ManagerProcess,
    bots_before_reload,
    events,
    rewrite_for_reload,
)
from tests.support import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.one_redis, pytest.mark.redis]

STEADY = "tests.daemon.sample_bots:steady"


async def _updates(redis: Redis, keys: Keys) -> list[tuple[list[str], list[str], list[str]]]:
    """The (added, removed, changed) of every ``system.config.updated``, oldest first."""
    found = await events(redis, keys, EventType.CONFIGURATION_UPDATED)
    return [(e.data["added"], e.data["removed"], e.data["changed"]) for e in found]


async def _bot_pids(manager: ManagerProcess) -> list[int]:
    return sorted(i["pid"] for b in (await manager.status())["bots"] for i in b["instances"])


class TestSerialisedReloads:
    async def test_sighup_and_reload_command_run_one_after_the_other(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys
    ) -> None:
        """A SIGHUP and `multibot reload` at once: both complete in turn, the second finds
        nothing left to change, and the bots are the final config's, with no strays."""
        manager = await manager_factory(bots_before_reload(STEADY))
        keep_pid = await manager.pid("keep")
        rewrite_for_reload(manager.config_path, STEADY)
        assert manager.process is not None
        manager.process.send_signal(signal.SIGHUP)
        reply = await manager.command("reload")

        async def both_applied() -> bool:
            return len(await _updates(redis, keys)) >= 2

        await wait_until(both_applied, 30, "two system.config.updated events")
        full = (["new"], ["drop"], ["change"])
        assert await _updates(redis, keys) == [full, ([], [], [])]
        assert (reply["added"], reply["removed"], reply["changed"]) in (full, ([], [], []))
        await manager.pid("new")
        await manager.pid("change", 1)
        assert await manager.pid("keep") == keep_pid
        status = await manager.status()
        assert sorted(b["id"] for b in status["bots"]) == ["change", "keep", "new"]
        assert {b["id"]: len(b["instances"]) for b in status["bots"]} == {
            "keep": 1, "change": 2, "new": 1,
        }  # fmt: skip

        async def no_strays() -> bool:
            return sorted(manager.children()) == await _bot_pids(manager)

        await wait_until(no_strays, 20, "only the final config's bot processes to remain")
        assert await manager.terminate() == 0
