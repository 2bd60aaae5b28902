"""Spreading a bot's replicas over the managers, on a real Redis: each replica on exactly
one manager, shares evened out as managers come and go."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from bus.keys import Keys
from manager.config import BotConfig
from manager.daemon.bot_credentials import credentials_key, shared_password
from manager.daemon.placement import Placement, placement_key
from tests.support import wait_until

pytestmark = pytest.mark.redis

KEYS = Keys()
TTL = 0.6


class Deployment:
    """Placements of several managers sharing one Redis and one config, with the set of
    live hosts in the test's hands."""

    def __init__(self, admin: Redis, bots: list[BotConfig]) -> None:
        self.admin = admin
        self.bots = bots
        self.live: set[str] = set()
        self.managers: dict[str, Placement] = {}

    def join(self, host: str) -> Placement:
        async def live() -> set[str]:
            return set(self.live)

        placement = Placement(self.admin, KEYS, host, TTL, lambda: self.bots, live_hosts=live)
        self.managers[host] = placement
        self.live.add(host)
        return placement

    async def rounds(self, n: int = 1) -> None:
        """``n`` rounds of every live manager, in host order."""
        for _ in range(n):
            for host in sorted(self.live):
                await self.managers[host].round()

    def spread(self, bot: BotConfig) -> dict[str, list[int]]:
        return {h: p.indices(bot) for h, p in sorted(self.managers.items()) if h in self.live}


@pytest.fixture
async def deployment(admin: Redis) -> AsyncIterator[Callable[[list[BotConfig]], Deployment]]:
    made: list[Deployment] = []

    def make(bots: list[BotConfig]) -> Deployment:
        made.append(Deployment(admin, bots))
        return made[-1]

    yield make
    for each in made:
        for placement in each.managers.values():
            await placement.release_all()


def bot(bot_id: str, replicas: int, hosts: list[str] | None = None) -> BotConfig:
    return BotConfig(id=bot_id, entry="bots.x:main", replicas=replicas, hosts=hosts)


async def test_a_joining_manager_gets_its_share_and_a_dead_ones_replicas_move(
    deployment: Callable[[list[BotConfig]], Deployment],
) -> None:
    """Alone, a runs all three replicas; b joins and a gives one back for b to take (one
    per round, the highest); b dies and a takes its replica once b's lease lapsed."""
    worker = bot("worker", 3)
    d = deployment([worker])
    d.join("a")
    await d.rounds()
    assert d.spread(worker) == {"a": [0, 1, 2]}
    d.join("b")
    await d.rounds(2)
    assert d.spread(worker) == {"a": [0, 1], "b": [2]}
    await d.rounds(2)
    assert d.spread(worker) == {"a": [0, 1], "b": [2]}  # settled: no more moves
    d.live.discard("b")  # b dies: it renews nothing any more

    async def a_runs_all() -> bool:
        await d.rounds()
        return d.spread(worker) == {"a": [0, 1, 2]}

    await wait_until(a_runs_all, 5, "a to take b's replica once its lease lapsed")


async def test_several_hosts_share_a_bot_and_others_stay_out(
    deployment: Callable[[list[BotConfig]], Deployment],
) -> None:
    """hosts = [a, b]: four replicas two and two; c runs none. hosts = [c]: all on c."""
    shared, pinned = bot("shared", 4, ["a", "b"]), bot("pinned", 2, ["c"])
    d = deployment([shared, pinned])
    for host in "abc":
        d.join(host)
    await d.rounds(3)
    assert d.spread(shared) == {"a": [0, 1], "b": [2, 3], "c": []}
    assert d.spread(pinned) == {"a": [], "b": [], "c": [0, 1]}
    assert [b.id for b in d.managers["c"].place(d.bots)] == ["pinned"]


async def test_a_lease_redis_lost_is_taken_again_and_fewer_replicas_are_given_back(
    deployment: Callable[[list[BotConfig]], Deployment], admin: Redis
) -> None:
    """Redis loses a placement lease (restarted empty): its holder keeps the replica. The
    config lowers the replicas: the ones past the count are given up."""
    worker = bot("worker", 2)
    d = deployment([worker])
    a = d.join("a")
    await d.rounds()
    await admin.delete(placement_key(KEYS, "worker", 1))
    assert not await a.round()  # nothing changed for a
    assert a.indices(worker) == [0, 1]
    assert await admin.get(placement_key(KEYS, "worker", 1))
    d.bots = [bot("worker", 1)]
    assert await a.round()
    assert a.indices(d.bots[0]) == [0]
    assert not await admin.exists(placement_key(KEYS, "worker", 1))


async def test_every_manager_gets_one_password_per_bot_and_keeps_it_after_a_loss(
    admin: Redis,
) -> None:
    """Two managers provisioning one bot use the password the first stored; when Redis
    lost it, the one a manager knows is stored again (its running bots keep working)."""
    first = await shared_password(admin, KEYS, "worker", "first-candidate")
    second = await shared_password(admin, KEYS, "worker", "second-candidate")
    assert first == second == "first-candidate"
    await admin.delete(credentials_key(KEYS, "worker"))
    assert await shared_password(admin, KEYS, "worker", second) == "first-candidate"
