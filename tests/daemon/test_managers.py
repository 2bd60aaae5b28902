"""Two managers, one deployment: each runs the bots placed on its host, one coordinates,
and when its process is SIGKILLed the other takes the coordinator duties over within the
lease, announcing it, and no confirmed event is lost."""

from __future__ import annotations

import re
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bus.keys import ARCHIVER_GROUP, Keys
from manager.embedded.postgres_server import PostgresServer
from manager.observe.lag import stream_keys
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import ManagerProcess, bot_toml, events
from tests.manager.archive.archive_support import id_counts
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
    await _every_confirmed_event_handled(second, redis, keys)
    failovers = [
        e
        for e in await events(redis, keys, "multibot.failover")
        if e.data.get("role") == "coordinator"
    ]
    assert [(e.data["old_instance"], e.data["new_instance"]) for e in failovers] == [("a", "b")]
    seen = await deployment(second)
    assert {h["host"]: h["live"] for h in seen["hosts"]}["b"] is True


async def _every_confirmed_event_handled(
    emitting: ManagerProcess, redis: Redis, keys: Keys
) -> None:
    """Wait for the emitter to finish, then for the collector to have handled every event
    whose publish returned."""
    await wait_until(lambda: len(confirmed(emitting)) >= 600, 90, "the emitter to finish")
    handled_key = keys.bot_state("collector", "handled")

    async def all_handled() -> bool:
        handled = set(await redis.smembers(handled_key))
        return set(confirmed(emitting)) <= handled

    await wait_until(all_handled, 60, "the collector to handle every confirmed event")


async def _wait_coordinator(manager: ManagerProcess, host: str) -> bool:
    async def coordinating() -> bool:
        return bool((await deployment(manager))["coordinator"] == host)

    await wait_until(coordinating, 20, f"{host} to coordinate")
    return True


async def _runs(manager: ManagerProcess, bot_id: str) -> bool:
    return bot_id in [b["id"] for b in (await manager.status())["bots"]]


EVERY_HOST = "[archive]\non_every_host = true\nclaim_idle = 1.0\nbatch_size = 20\n"


async def test_every_manager_archives_and_what_a_killed_one_held_is_taken_over(
    manager_factory: ManagerFactory, redis: Redis, keys: Keys, postgres_server: PostgresServer
) -> None:
    """With ``archive.on_every_host`` both managers archive, each a consumer of the group;
    a is SIGKILLed under load, and b takes over what a's archiver had read and not acked:
    every confirmed event is stored exactly once, and a holds nothing."""
    first = await manager_factory(BOTS, extra='host = "a"\n' + EVERY_HOST)
    second = await manager_factory(BOTS, extra='host = "b"\n' + EVERY_HOST)

    async def both_archive() -> bool:
        return {"archiver-a", "archiver-b"} <= set(await _archiver_pending(redis, keys))

    await wait_until(both_archive, 30, "both managers reading the archiver group")
    await wait_until(lambda: len(confirmed(second)) >= 100, 60, "events before the kill")
    await first.kill()
    await wait_until(lambda: len(confirmed(second)) >= 600, 90, "the emitter to finish")

    async def all_archived() -> bool:
        return set(confirmed(second)) <= set(await id_counts(postgres_server.dsn))

    await wait_until(all_archived, 60, "every confirmed event archived")

    async def nothing_held_by_a() -> bool:
        return (await _archiver_pending(redis, keys)).get("archiver-a", 0) == 0

    await wait_until(nothing_held_by_a, 30, "a's unacked entries taken over")
    counts = await id_counts(postgres_server.dsn)
    assert [i for i, n in counts.items() if n > 1] == []


async def _archiver_pending(redis: Redis, keys: Keys) -> dict[str, int]:
    """Each consumer of the archiver group and what it holds, over the namespace's streams."""
    held: dict[str, int] = {}
    for stream in await stream_keys(redis, keys):
        try:
            rows: Any = await redis.xinfo_consumers(stream, ARCHIVER_GROUP)
        except ResponseError:  # no archiver group there yet
            continue
        for row in rows:
            held[row["name"]] = held.get(row["name"], 0) + int(row["pending"])
    return held


SPREAD = bot_toml("emitter", "tests.daemon.sample_bots:emitter", hosts=["b"]) + bot_toml(
    "collector",
    "tests.daemon.sample_bots:collector",
    replicas=2,
    subscriptions=[{"pattern": "test.#"}],
)


async def test_a_bots_replicas_spread_over_the_managers_and_move_when_one_dies(
    manager_factory: ManagerFactory, redis: Redis, keys: Keys
) -> None:
    """The collector, placed nowhere with two replicas: a starts alone and runs both, b
    joins and a gives replica 1 back for b to run (one password for both hosts' logins).
    a is SIGKILLed under load: b runs both replicas within the lease, and every event
    whose publish returned is handled."""
    first = await manager_factory(SPREAD, extra='host = "a"\n')
    second = await manager_factory(SPREAD, extra='host = "b"\n')

    async def replicas() -> dict[str, list[int]]:
        return {h["host"]: h["replicas"].get("collector", []) for h in
                (await deployment(second))["hosts"] if h["live"]}  # fmt: skip

    async def spread_out() -> bool:
        return await replicas() == {"a": [0], "b": [1]}

    await wait_until(spread_out, 30, "one collector replica on each manager")
    assert [r["instance"] for r in await first.instances("collector")] == [0]
    await second.pid("collector")  # its one replica (1) runs
    await wait_until(lambda: len(confirmed(second)) >= 100, 60, "events before the kill")
    await first.kill()

    async def moved() -> bool:
        return await replicas() == {"b": [0, 1]}

    await wait_until(moved, 30, "b to run both replicas")
    await _every_confirmed_event_handled(second, redis, keys)
