"""A Sentinel-watched primary: publishes confirmed on replicas survive its SIGKILL, and the
bus follows the promoted replica without a restart."""

from __future__ import annotations

import contextlib

import pytest

from bus import BusClient, BusDurabilityError
from bus.routing import Router
from bus.settings import BusSettings
from tests.sentinel_support import SentinelSet
from tests.support import entries, failover_under_load, redis_client, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.one_redis]


def client(url: str, bot_id: str, **settings: object) -> BusClient:
    config = BusSettings.model_validate(
        {
            "redis_url": url,
            "consumer": {"block_ms": 300, "visibility_timeout": 5.0, "start_id": "0"},
            # Ride out the failover (the sentinels take ~1 s to call the primary down).
            "connect_retries": 3,
            "retry_cap": 0.5,
            "connect_timeout": 1.0,
            "command_timeout": 2.0,
            **settings,
        }
    )
    return BusClient(bot_id, settings=config)


class TestDurablePublish:
    async def test_a_publish_returns_once_the_replica_has_it(
        self, voting_sentinels: SentinelSet
    ) -> None:
        """publish_replicas = 1: the replica holds the entry by the time publish returns."""
        producer = await client(voting_sentinels.url, "p", publish_replicas=1).connect()
        try:
            await producer.publish("system.backup.completed", {"size_bytes": 1})
            async with redis_client(voting_sentinels.replica.url, decode_responses=True) as replica:
                rows = await entries(replica, producer.keys.stream("system"))
            assert len(rows) == 1
        finally:
            await producer.close()

    async def test_too_few_replicas_raise_after_writing(
        self, voting_sentinels: SentinelSet
    ) -> None:
        """Asking for 2 replicas of a primary that has 1: BusDurabilityError names how many
        confirmed, within the timeout; the event is written (the primary has it)."""
        producer = await client(
            voting_sentinels.url, "p", publish_replicas=2, publish_replicas_timeout=0.2
        ).connect()
        try:
            with pytest.raises(BusDurabilityError, match="only 1 of 2 replicas") as raised:
                await producer.publish("system.backup.completed", {"size_bytes": 1})
            assert raised.value.acknowledged == 1
            with pytest.raises(BusDurabilityError, match="3 event"):
                await producer.publish_many([("bench.event.sent", {"n": n}) for n in range(3)])
            assert len(await entries(producer.redis, producer.keys.stream("system"))) == 1
            bench = Router(producer.settings.routes, producer.settings.default_stream)
            stream = producer.keys.stream(bench.route("bench.event.sent"))
            assert len(await entries(producer.redis, stream)) == 3
        finally:
            await producer.close()


class TestFailover:
    @pytest.mark.slow
    async def test_sigkill_of_the_primary_loses_no_confirmed_event(
        self, voting_sentinels: SentinelSet
    ) -> None:
        """Publishing all along with publish_replicas = 1, the primary is SIGKILLed; the
        sentinels promote the replica, and publisher and consumer follow it. The promoted
        primary has no replica until the old one is back (the sentinels make it a replica):
        meanwhile publishes fail with BusDurabilityError, as they must. Every event whose
        publish returned reaches the consumer."""
        producer = await client(voting_sentinels.url, "p", publish_replicas=1).connect()
        consumer = await client(voting_sentinels.url, "c").connect()
        old_port = voting_sentinels.primary.port

        async def fail_over() -> None:
            await voting_sentinels.primary.kill()
            await wait_until(
                lambda: _promoted(voting_sentinels, old_port), 30, "the sentinels to promote"
            )
            await voting_sentinels.primary.start()  # back as a replica of the promoted one

        await failover_under_load(producer, consumer, fail_over)


async def _promoted(voting_sentinels: SentinelSet, old_port: int | None) -> bool:
    with contextlib.suppress(Exception):
        port = await voting_sentinels.agreed_primary_port()
        return port is not None and port != old_port
    return False
