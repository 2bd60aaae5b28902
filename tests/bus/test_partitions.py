"""Partitioned streams: a key's events go to one partition, and each partition is read by
one replica of a group at a time, so per-key order holds across replicas, through a
replica's SIGKILL and a new replica's arrival."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bus import BusClient, Event
from bus.keys import Keys
from bus.outbox import OutboxRelay
from bus.partition_owner import deal
from bus.partitions import partition_name, partition_of, split_partition
from bus.routing import Router
from bus.settings import BusSettings
from tests.bus.conftest import ConsumerProcs
from tests.conftest import BusFactory
from tests.support import running, wait_until

KEYS = Keys()
PARTS = {"user": 4}
ROUTER = Router({"user": "user", "bot": "bot"}, "bot", PARTS)


class TestRouting:
    def test_a_key_always_goes_to_the_same_partition_and_keys_spread(self) -> None:
        """hash(key) mod N: stable for a key, and 100 keys reach every partition."""
        targets = {ROUTER.target("user.msg.sent", f"k{n}") for n in range(100)}
        assert targets == {partition_name("user", i) for i in range(4)}
        assert ROUTER.target("user.msg.sent", "alice") == ROUTER.target("user.x.y", "alice")
        assert ROUTER.target("bot.x.y", "alice") == "bot"  # not partitioned
        assert ROUTER.target("user.a.b", "alice") == f"user.p{partition_of('alice', 4)}"

    def test_streams_are_the_partitions(self) -> None:
        """Everything that walks the streams (fanout, archiver, lag, trimmer) sees the
        partitions, never the route's bare name."""
        assert ROUTER.streams() == {"bot", "user.p0", "user.p1", "user.p2", "user.p3"}
        assert split_partition("user.p12") == ("user", 12)
        assert split_partition("user.p01") is None and split_partition("user") is None

    @pytest.mark.parametrize(
        ("partitions", "says"),
        [
            ({"nope": 2}, "no route names that stream"),
            ({"user": 0}, "not within 1..256"),
            ({"user": 1000}, "not within 1..256"),
        ],
    )
    def test_bad_partition_settings_say_why(self, partitions: dict[str, int], says: str) -> None:
        with pytest.raises(ValueError, match=says):
            BusSettings(partitions=partitions)

    def test_a_route_named_like_a_partition_is_refused(self) -> None:
        with pytest.raises(ValueError, match="is the name of a partition of 'user'"):
            BusSettings(routes={"user": "user", "odd": "user.p1"}, partitions={"user": 2})

    def test_the_deal_gives_each_partition_to_exactly_one_live_replica(self) -> None:
        parts = [partition_name("user", i) for i in range(10)]
        live = ["w-0", "w-1", "w-2"]
        shares = [deal(parts, live, me) for me in live]
        assert sorted(p for share in shares for p in share) == sorted(parts)
        assert [len(s) for s in shares] == [4, 3, 3]
        assert deal(parts, live, "w-9") == []  # not (yet) among the live ones


@pytest.mark.redis
@pytest.mark.deployments
class TestPublishing:
    async def test_a_bots_outbox_lands_in_the_partition_a_direct_publish_picks(
        self, redis: Redis, bus_factory: BusFactory, redis_url: str
    ) -> None:
        """The relay's script hashes keys as the publisher does (SHA-1, first 32 bits)."""
        direct = await bus_factory("direct", partitions=PARTS)
        alice = await bus_factory("alice", outbox=True, partitions=PARTS)
        keys = [f"user-{n}" for n in range(20)]
        for key in keys:
            await direct.publish("user.msg.sent", {"via": "direct"}, key=key)
            await alice.publish("user.msg.sent", {"via": "outbox"}, key=key)
        await alice.publish("user.msg.sent", {"via": "outbox"})  # unkeyed: any partition
        relay = OutboxRelay(redis, KEYS, ROUTER, lambda: ["alice"], block=0.1)
        assert await relay.drain("alice") == len(keys) + 1
        for index in range(4):
            rows: Any = await redis.xrange(KEYS.stream(partition_name("user", index)))
            by_via: dict[str, list[str]] = {"direct": [], "outbox": []}
            for _, fields in rows:
                if fields.get("key"):
                    by_via[orjson.loads(fields["data"])["via"]].append(fields["key"])
            assert by_via["direct"] == by_via["outbox"]
            assert all(partition_of(k, 4) == index for k in by_via["direct"])
        assert await redis.exists(KEYS.stream("user")) == 0


@pytest.fixture
async def producer(bus_factory: BusFactory) -> BusClient:
    return await bus_factory("producer", partitions=PARTS)


async def publish(
    producer: BusClient, keys: int, per_key: int, start: int = 0, pause: float = 0.0
) -> None:
    """``per_key`` events for each of ``keys`` keys, interleaved, ``seq`` counting up."""
    for seq in range(start, start + per_key):
        await producer.publish_many(
            [producer.event("user.job.run", {"seq": seq}, key=f"k{k}") for k in range(keys)]
        )
        await asyncio.sleep(pause)


def in_order(handled: list[int]) -> bool:
    """Each event's first handling came after every earlier one of its key (a re-delivery
    after a crash repeats from an earlier point: allowed, but nothing is handled early)."""
    firsts: list[int] = []
    seen: set[int] = set()
    for seq in handled:
        if seq not in seen:
            seen.add(seq)
            firsts.append(seq)
    return firsts == list(range(len(firsts)))


async def order_of(redis: Redis, keys: int) -> dict[str, list[int]]:
    out = {}
    for k in range(keys):
        values: Any = await redis.lrange(f"test:order:k{k}", 0, -1)
        out[f"k{k}"] = [int(v) for v in values]
    return out


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.deployments
class TestOrderAcrossReplicas:
    KEYS = 6
    PER_KEY = 60

    async def test_per_key_order_holds_across_two_replicas_and_a_sigkill(
        self, redis: Redis, producer: BusClient, consumer_procs: ConsumerProcs
    ) -> None:
        """Two replica processes of one bot share 4 partitions; handlers take random time,
        so two readers of one key would interleave it. One replica is SIGKILLed mid-way:
        its partitions move to the other within the partition TTL, which first handles
        what the dead one had taken, in order; a third replica joins while events flow,
        and the first hands it a share once its own handlers of those partitions are
        done. Every key's events are handled in order, and every event is handled."""
        extra = ["--partitions", "user=4", "--partition-ttl", "1.5", "--record",
                 "--handle-ms", "8", "--pattern", "user.#"]  # fmt: skip
        first = await consumer_procs("worker", 0, extra=extra)
        second = await consumer_procs("worker", 1, extra=extra)
        await wait_until(lambda: _shared(redis), 15, "both replicas reading partitions")
        await publish(producer, self.KEYS, self.PER_KEY // 2)
        await wait_until(lambda: _handled_at_least(redis, self.KEYS, 40), 20, "handling")
        await second.kill()
        # A new replica joins while the rest is published: the first hands it a share.
        third = asyncio.create_task(consumer_procs("worker", 2, extra=extra))
        await publish(producer, self.KEYS, self.PER_KEY // 2, start=self.PER_KEY // 2, pause=0.05)
        await third
        await wait_until(
            lambda: _holders_are(redis, {"worker-0", "worker-2"}), 15, "the new one's share"
        )
        await wait_until(
            lambda: _all_handled(redis, self.KEYS, self.PER_KEY), 30, "every event handled"
        )
        order = await order_of(redis, self.KEYS)
        assert all(in_order(seqs) for seqs in order.values()), order
        assert first.process.returncode is None


async def _holders(redis: Redis) -> set[str]:
    found = set()
    for index in range(4):
        value: Any = await redis.get(KEYS.partition_lease("worker", partition_name("user", index)))
        if value:
            found.add(value.split()[0])
    return found


async def _shared(redis: Redis) -> bool:
    return len(await _holders(redis)) == 2


async def _holders_are(redis: Redis, wanted: set[str]) -> bool:
    return await _holders(redis) == wanted


async def _handled_at_least(redis: Redis, keys: int, count: int) -> bool:
    return sum(map(len, (await order_of(redis, keys)).values())) >= count


async def _all_handled(redis: Redis, keys: int, per_key: int) -> bool:
    return all(set(v) >= set(range(per_key)) for v in (await order_of(redis, keys)).values())


@pytest.mark.redis
@pytest.mark.one_redis
class TestLostLease:
    async def test_a_partition_whose_lease_is_taken_is_not_read_until_it_is_back(
        self, redis: Redis, bus_factory: BusFactory
    ) -> None:
        """Another holder has a partition's lease (as when this replica was paused past
        the TTL and another took it): at its next renewal this replica stops reading the
        partition, and reads it again once the lease is free. An event published
        meanwhile waits, and is handled then, under this replica's lease."""
        parts = {"user": 2}
        worker = await bus_factory(
            "worker", partitions=parts, consumer={"partition_ttl": 0.6, "block_ms": 100}
        )
        seen_under: list[str] = []
        key = next(k for k in (f"k{n}" for n in range(50)) if partition_of(k, 2) == 0)
        lease = KEYS.partition_lease("worker", partition_name("user", 0))

        @worker.subscribe("user.#")
        async def handle(event: Event) -> None:
            seen_under.append(str(await redis.get(lease)))

        async with running(worker):
            await wait_until(lambda: _held_by(redis, lease, "worker-0"), 10, "the lease taken")
            with capture_logs() as logs:
                await redis.set(lease, "intruder 999", px=2000)
                await wait_until(lambda: _logged(logs, "partition lease lost"), 5, "it noticed")
            producer = await bus_factory("producer", partitions=parts)
            await producer.publish("user.job.run", {}, key=key)
            await wait_until(lambda: _held_by(redis, lease, "worker-0"), 10, "the lease back")
            await wait_until(lambda: len(seen_under) == 1, 10, "the event handled")
        assert seen_under[0].startswith("worker-0 ")


def _logged(logs: list[MutableMapping[str, Any]], text: str) -> bool:
    return any(text in str(entry.get("event")) for entry in logs)


async def _held_by(redis: Redis, key: str, member: str) -> bool:
    value = await redis.get(key)
    return bool(value) and str(value).startswith(member + " ")
