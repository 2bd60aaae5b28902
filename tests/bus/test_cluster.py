"""What differs on a Redis Cluster: moves between hash slots (the outbox relay, a dead
letter's retry) take steps instead of one script, and each step may be repeated after a
crash without writing twice."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bus import BusClient
from bus.cluster_relay import _RETRY_ONCE, RETRY_MARKER_TTL, Durable
from bus.connection import is_cluster
from bus.dlq import DeadLetterReason, DeadLetters
from bus.errors import BusDurabilityError, DeadLetterNotFoundError
from bus.keys import Keys
from bus.lease import run_script
from bus.outbox import OutboxRelay
from bus.routing import Router
from bus.settings import BusSettings
from tests.cluster_support import LocalCluster
from tests.conftest import BusFactory
from tests.support import failover_under_load, redis_client, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.cluster_only]

KEYS = Keys()
ROUTER = Router({"user": "user", "bot": "bot"}, "bot")


async def ids_in(redis: Redis, key: str) -> list[str]:
    rows: Any = await redis.xrange(key)
    return [fields["id"] for _, fields in rows]


async def acl_setuser_everywhere(redis: Redis, *rules: str) -> None:
    client: Any = redis
    await client.execute_command("ACL", "SETUSER", *rules, target_nodes="all")


async def test_a_relay_stopped_between_append_and_trim_appends_nothing_twice(
    redis: Redis, redis_url: str, bus_factory: BusFactory
) -> None:
    """The relay's user may append but not trim (the relay stops after step 2, as if
    killed there): a second relay finds the entries still in the outbox and moves each
    exactly once."""
    assert is_cluster(redis)
    alice = await bus_factory("alice", outbox=True)
    ids = await alice.publish_many([("user.login.done", {"n": n}) for n in range(30)])
    await acl_setuser_everywhere(redis, "cut", "on", ">pw", "~*", "&*", "+@all", "-xtrim")
    async with redis_client(
        redis_url.replace("redis+cluster://", "redis+cluster://cut:pw@"), decode_responses=True
    ) as cut:
        stopped = OutboxRelay(cut, KEYS, ROUTER, lambda: ["alice"], batch=10, block=0.1)
        with pytest.raises(ResponseError, match=r"can.t run this command"):
            await stopped.drain("alice")
    assert await ids_in(redis, KEYS.stream("user")) == ids[:10]  # appended, not trimmed
    assert int(await redis.xlen(KEYS.outbox("alice"))) == 30
    relay = OutboxRelay(redis, KEYS, ROUTER, lambda: ["alice"], batch=10, block=0.1)
    assert await relay.drain("alice") == 30
    assert await ids_in(redis, KEYS.stream("user")) == ids
    assert int(await redis.xlen(KEYS.outbox("alice"))) == 0


async def test_outbox_ids_of_any_size_are_relayed_in_order(redis: Redis, raw_url: str) -> None:
    """A bot that gives its outbox entries ids of its own, up to Redis's largest, has each
    relayed once: the cursor compares ids as numbers, not as text."""
    outbox = KEYS.outbox("alice")
    given = ["9-1", "10-0", "99999999999999-0", "18446744073709551615-7"]
    async with redis_client(raw_url, decode_responses=True) as raw:
        for n, entry_id in enumerate(given):
            await raw.xadd(outbox, {"type": "user.a.b", "id": f"e{n}"}, id=entry_id)
    relay = OutboxRelay(redis, KEYS, ROUTER, lambda: ["alice"], batch=2, block=0.1)
    assert await relay.drain("alice") == 4
    assert await ids_in(redis, KEYS.stream("user")) == ["e0", "e1", "e2", "e3"]


async def test_a_removed_bots_relay_cursors_go_with_its_outbox(
    redis: Redis, bus_factory: BusFactory
) -> None:
    """A bot no longer configured: its outbox is relayed, deleted once empty, and its
    cursor in each stream's slot forgotten (a later outbox of that name starts afresh)."""
    carol = await bus_factory("carol", outbox=True)
    event_id = await carol.publish("user.login.done", {})
    cursor = KEYS.relay_cursor(KEYS.stream("user"))
    relay = OutboxRelay(redis, KEYS, ROUTER, lambda: ["alice"], block=0.1)
    assert await relay.drain("carol") == 1
    assert await redis.hget(cursor, "carol") is not None  # relayed: its cursor is kept
    assert await relay.drain_leftovers() == 0  # emptied: the outbox goes, and the cursor
    assert await redis.exists(KEYS.outbox("carol")) == 0
    assert await redis.hget(cursor, "carol") is None
    assert await ids_in(redis, KEYS.stream("user")) == [event_id]


@pytest.fixture
def raw_url(redis_url: str) -> str:
    return redis_url


async def _a_letter(bus_factory: BusFactory) -> tuple[DeadLetters, str]:
    bob = await bus_factory("bob")
    letter_id = await bob.dlq.add(
        fields={"type": "user.a.b", "id": "ev1", "source": "carol"},
        reason=DeadLetterReason.HANDLER_ERROR,
        error="boom",
        stream=KEYS.stream("user"),
        entry_id="1-1",
        group="bot-group-bob",
        consumer="bob-0",
    )
    return DeadLetters(bob.redis, KEYS, ROUTER), letter_id


async def test_a_retry_repeated_after_a_crash_appends_once(
    redis: Redis, bus_factory: BusFactory
) -> None:
    """A retry that appended its entry and stopped before deleting the letter: repeated,
    it appends nothing, deletes the letter and names the entry the first one added."""
    letters, letter_id = await _a_letter(bus_factory)
    stream = KEYS.stream("user")
    marker = KEYS.retry_marker(stream, letter_id)
    first: Any = await run_script(
        redis, _RETRY_ONCE, [stream, marker], [RETRY_MARKER_TTL, "type", "user.a.b", "id", "ev1"]
    )  # step 2 only: the retry stops here
    with pytest.raises(DeadLetterNotFoundError, match=f"retried already, as entry {first}"):
        await letters.retry(letter_id)
    assert await letters.count() == 0
    assert await ids_in(redis, stream) == ["ev1"]
    assert 0 < int(await redis.ttl(marker)) <= RETRY_MARKER_TTL


async def test_two_retries_at_once_append_once(redis: Redis, bus_factory: BusFactory) -> None:
    """Two operators retry one letter at the same moment: one gets the new entry, the
    other is told it was retried already; the stream holds it once."""
    letters, letter_id = await _a_letter(bus_factory)
    results = await asyncio.gather(
        letters.retry(letter_id), letters.retry(letter_id), return_exceptions=True
    )
    added = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, DeadLetterNotFoundError)]
    assert (len(added), len(refused)) == (1, 1), results
    assert await ids_in(redis, KEYS.stream("user")) == ["ev1"]
    assert await letters.count() == 0


class TestDurablePublish:
    async def test_each_shard_written_to_confirms_on_its_own_replica(
        self, redis_url: str, shared_cluster: LocalCluster
    ) -> None:
        """publish_replicas = 1 on a cluster: WAIT goes to each primary a publish wrote to,
        on the connection that wrote; one shard's stopped replica fails the publish (a WAIT
        sent elsewhere would see no write to wait for, and pass)."""
        config = BusSettings(redis_url=redis_url, publish_replicas=1,
                             publish_replicas_timeout=0.3)  # fmt: skip
        async with BusClient("p", settings=config) as producer:
            types = ["user.a.b", "bot.a.b", "system.backup.completed"]
            routes = Router(producer.settings.routes, producer.settings.default_stream)
            stream_of = {t: producer.keys.stream(routes.route(t)) for t in types}
            streams = set(stream_of.values())
            assert len({shared_cluster.node_for(s).port for s in streams}) > 1
            await producer.publish_many([(t, {}) for t in types])
            for stream in streams:
                replica = shared_cluster.replica_of(shared_cluster.node_for(stream))
                with replica.client() as client:
                    client.execute_command("READONLY")  # a replica's reads, not MOVED
                    assert client.xlen(stream) == 1
            lagging = shared_cluster.replica_of(shared_cluster.node_for(stream_of[types[0]]))
            with lagging.paused():
                with pytest.raises(BusDurabilityError, match="only 0 of 1"):
                    await producer.publish_many([(t, {}) for t in types])
                with pytest.raises(BusDurabilityError, match="only 0 of 1"):
                    await producer.publish(types[0], {})
                await producer.publish(types[1], {})  # another shard's replica confirms

    async def test_a_relayed_entry_leaves_its_outbox_only_once_replicas_have_it(
        self, redis: Redis, bus_factory: BusFactory, shared_cluster: LocalCluster
    ) -> None:
        """With publish_replicas, the relay waits for the target shard's replica before it
        trims the outbox: while that replica is stopped the entries stay in the outbox
        (appended, not confirmed); once it is back, the next round confirms and trims
        without appending again."""
        alice = await bus_factory("alice", outbox=True)
        ids = await alice.publish_many([("user.login.done", {"n": n}) for n in range(5)])
        durable = Durable(replicas=1, timeout_ms=300)
        relay = OutboxRelay(redis, KEYS, ROUTER, lambda: ["alice"], block=0.1, durable=durable)
        lagging = shared_cluster.replica_of(shared_cluster.node_for(KEYS.stream("user")))
        with lagging.paused(), pytest.raises(BusDurabilityError, match="only 0 of 1"):
            await relay.drain("alice")
        assert int(await redis.xlen(KEYS.outbox("alice"))) == 5
        assert await relay.drain("alice") == 5
        assert await ids_in(redis, KEYS.stream("user")) == ids


class TestFailover:
    @pytest.mark.slow
    async def test_sigkill_of_a_primary_loses_no_confirmed_event(
        self, cluster_deployment: LocalCluster
    ) -> None:
        """Publishing all along with publish_replicas = 1, the primary of the stream's shard
        is SIGKILLed; the cluster promotes its replica and publisher and consumer follow.
        Until the old primary is back (as a replica) publishes fail with
        BusDurabilityError, as they must. Every event whose publish returned reaches the
        consumer, and none is confirmed twice."""
        url = cluster_deployment.url
        durable = {"publish_replicas": 1, "publish_replicas_timeout": 0.5}
        producer = BusClient("p", settings=BusSettings(redis_url=url, **durable))
        consumer = BusClient(
            "c", settings=BusSettings.model_validate(
                {"redis_url": url, "consumer": {"block_ms": 200, "start_id": "0"}}
            ),
        )  # fmt: skip
        await producer.connect()
        routes = Router(producer.settings.routes, producer.settings.default_stream)
        stream = producer.keys.stream(routes.route("bench.event.sent"))

        async def fail_over() -> None:
            old = cluster_deployment.node_for(stream)
            old.kill()
            await wait_until(
                lambda: _promoted(cluster_deployment, stream, old.port), 30,
                "the replica to be promoted",
            )  # fmt: skip
            cluster_deployment.restart(old)  # back, as a replica of the promoted one

        await failover_under_load(producer, consumer, fail_over)


async def _promoted(cluster: LocalCluster, key: str, old_port: int) -> bool:
    try:
        return cluster.node_for(key).port != old_port
    except LookupError:  # no primary serves it yet
        return False
