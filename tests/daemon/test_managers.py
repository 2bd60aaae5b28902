"""Two managers, one deployment: each runs the bots placed on its host, one coordinates,
and when its process is SIGKILLed the other takes the coordinator duties over within the
lease, announcing it, and no confirmed event is lost."""

from __future__ import annotations

import re
from typing import Any

import pytest
from redis.asyncio import Redis

from bus.keys import Keys
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import ManagerProcess, bot_toml, events
from tests.support import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow, pytest.mark.one_redis]

CONFIRMED = re.compile(r'"event": "confirmed ([0-9a-f-]+)"')
BOTS = (
    bot_toml("emitter", "tests.daemon.sample_bots:emitter", hosts=["b"])
    + bot_toml(
        "collector",
        "tests.daemon.sample_bots:collector",
        hosts=["b"],
        subscriptions=[{"pattern": "test.#"}],
    )
    + bot_toml("idler", "tests.daemon.sample_bots:idle", hosts=["a"])
    + bot_toml("roamer", "tests.daemon.sample_bots:idle")  # placed nowhere
)


def confirmed(manager: ManagerProcess) -> list[str]:
    return CONFIRMED.findall(manager.log_path.read_text(errors="replace"))


async def deployment(manager: ManagerProcess) -> dict[str, Any]:
    status = await manager.status()
    found: dict[str, Any] = status["deployment"]
    return found


async def test_the_coordinator_moves_when_its_manager_dies_and_nothing_is_lost(
    manager_factory: ManagerFactory, redis: Redis, keys: Keys
) -> None:
    """Manager a starts first: it coordinates and runs the bot placed nowhere; b runs
    the emitter and the collector. Both show the whole deployment. a is SIGKILLed while
    the emitter publishes: b takes the coordinator lease, announces the failover, relays
    and fans out from then on, starts the unplaced bot, and the collector handles every
    event whose publish returned."""
    first = await manager_factory(BOTS, extra='host = "a"\n')
    second = await manager_factory(BOTS, extra='host = "b"\n')
    seen = await deployment(second)
    assert (seen["host"], seen["coordinator"]) == ("b", "a")
    assert {h["host"]: h["bots"] for h in seen["hosts"]} == {
        "a": ["idler", "roamer"],  # roamer is placed nowhere: the first manager took it
        "b": ["collector", "emitter"],
    }
    assert [b["id"] for b in (await first.status())["bots"]] == ["idler", "roamer"]
    await wait_until(lambda: len(confirmed(second)) >= 100, 60, "events before the kill")
    await first.kill()
    moved = await _wait_coordinator(second, "b")
    assert moved
    await wait_until(lambda: _runs(second, "roamer"), 20, "b to take the unplaced bot")
    await second.pid("roamer")  # and start it
    await wait_until(lambda: len(confirmed(second)) >= 600, 90, "the emitter to finish")
    handled_key = keys.bot_state("collector", "handled")

    async def all_handled() -> bool:
        handled = set(await redis.smembers(handled_key))
        return set(confirmed(second)) <= handled

    await wait_until(all_handled, 60, "the collector to handle every confirmed event")
    failovers = [
        e
        for e in await events(redis, keys, "multibot.failover")
        if e.data.get("role") == "coordinator"
    ]
    assert [(e.data["old_instance"], e.data["new_instance"]) for e in failovers] == [("a", "b")]
    seen = await deployment(second)
    assert {h["host"]: h["live"] for h in seen["hosts"]}["b"] is True


async def _wait_coordinator(manager: ManagerProcess, host: str) -> bool:
    async def coordinating() -> bool:
        return bool((await deployment(manager))["coordinator"] == host)

    await wait_until(coordinating, 20, f"{host} to coordinate")
    return True


async def _runs(manager: ManagerProcess, bot_id: str) -> bool:
    return bot_id in [b["id"] for b in (await manager.status())["bots"]]
