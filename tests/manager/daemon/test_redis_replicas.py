"""Bot users reach every node that may become the primary: ACL users are not replicated."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from bus import BusClient
from bus.keys import Keys
from bus.routing import Router
from bus.settings import BusSettings
from manager.config import ArchiveSettings
from manager.daemon.redis_acl import (
    bot_redis_url,
    bot_username,
    delete_bot_user,
    ensure_bot_user,
)
from manager.daemon.redis_repair import RedisRepair
from manager.daemon.redis_replicas import replica_addresses, replica_clients
from manager.embedded.redis_server import RedisServer
from tests.sentinel_support import SentinelSet
from tests.support import redis_client

pytestmark = [pytest.mark.redis, pytest.mark.one_redis]


async def _users(url: str) -> list[str]:
    async with redis_client(url, decode_responses=True) as client:
        return [str(u) for u in await client.acl_users()]


class TestReplicas:
    async def test_the_primary_lists_its_replica(self, sentinel_deployment: SentinelSet) -> None:
        """INFO replication of the primary names the replica's address."""
        async with redis_client(sentinel_deployment.primary.url, decode_responses=True) as primary:
            assert await replica_addresses(primary) == [
                ("127.0.0.1", sentinel_deployment.replica.port)
            ]
        async with redis_client(sentinel_deployment.replica.url, decode_responses=True) as replica:
            assert await replica_addresses(replica) == []

    async def test_bot_users_are_set_and_deleted_on_the_replica_too(
        self, sentinel_deployment: SentinelSet
    ) -> None:
        """ensure_bot_user with the replicas puts the bot's three users on the replica, the
        bot logs in there (as it would after a failover), and delete_bot_user removes them
        from both."""
        keys = Keys()
        async with (
            redis_client(sentinel_deployment.url, decode_responses=True) as admin,
            replica_clients(admin, sentinel_deployment.url) as replicas,
        ):
            assert len(replicas) == 1
            await ensure_bot_user(admin, keys, "greeter", "pw-greeter", replicas=replicas)
            on_replica = await _users(sentinel_deployment.replica.url)
            assert bot_username(keys.namespace, "greeter") in on_replica
            assert set(await _users(sentinel_deployment.primary.url)) == set(on_replica)
            bot_url = bot_redis_url(
                sentinel_deployment.replica.url,
                bot_username(keys.namespace, "greeter"),
                "pw-greeter",
            )
            async with Redis.from_url(bot_url) as bot:
                assert await bot.ping()
            assert await delete_bot_user(admin, keys, "greeter", replicas=replicas)
            assert bot_username(keys.namespace, "greeter") not in await _users(
                sentinel_deployment.replica.url
            )

    async def test_without_the_replicas_the_replica_has_no_bot_user(
        self, sentinel_deployment: SentinelSet
    ) -> None:
        """What the fan-out is for: ACL SETUSER on the primary does not reach the replica."""
        async with redis_client(sentinel_deployment.url, decode_responses=True) as admin:
            await ensure_bot_user(admin, Keys(), "greeter", "pw")
        assert bot_username("multibot", "greeter") in await _users(sentinel_deployment.primary.url)
        assert bot_username("multibot", "greeter") not in await _users(
            sentinel_deployment.replica.url
        )


class TestAReplicaJoins:
    async def test_the_manager_sets_the_bots_users_on_a_new_replica(
        self, sentinel_deployment: SentinelSet, tmp_path: Path
    ) -> None:
        """The identity watch sees a replica join the primary and provisions again (which
        reaches every replica), without a restart of anything."""
        provisioned = asyncio.Event()

        async def provision() -> None:
            provisioned.set()

        async with redis_client(sentinel_deployment.url, decode_responses=True) as admin:
            repair = RedisRepair(
                admin,
                keys=Keys(),
                router=Router({}, "bot"),
                archive=cast(Any, None),  # not reached: nothing was lost
                system_bus=cast(Any, None),
                settings=ArchiveSettings(),
                interval=0.05,
                bots=list,
                provision=provision,
            )
            watch = asyncio.create_task(repair.watch_identity())
            try:
                await asyncio.sleep(0.2)  # a few rounds with the first replica alone
                assert not provisioned.is_set()
                binary = sentinel_deployment.primary.binary
                assert binary is not None
                second = RedisServer(
                    tmp_path / "second-replica",
                    binary=binary,
                    extra_config={
                        "replicaof": f"127.0.0.1 {sentinel_deployment.primary.port}",
                        "appendonly": "no",
                    },
                )
                async with second:
                    await asyncio.wait_for(provisioned.wait(), 15)
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch


class TestDurableBots:
    @pytest.mark.parametrize("durable", [True, False])
    async def test_a_bot_may_wait_for_replicas_only_when_the_config_asks(
        self, sentinel_deployment: SentinelSet, durable: bool
    ) -> None:
        """With publish_replicas the bot's user may WAIT, and its publish through the outbox
        is confirmed on the replica; otherwise WAIT is refused like any command it needs
        not."""
        keys = Keys()
        async with redis_client(sentinel_deployment.url, decode_responses=True) as admin:
            username = await ensure_bot_user(admin, keys, "greeter", "pw", durable=durable)
        settings = BusSettings(
            redis_url=bot_redis_url(sentinel_deployment.url, username, "pw"),
            outbox=True,
            publish_replicas=1,
        )
        async with BusClient("greeter", settings=settings) as bot:
            publish = bot.publish("system.backup.completed", {"size_bytes": 1})
            if not durable:
                with pytest.raises(NoPermissionError, match="wait"):
                    await publish
                return
            await publish
        async with redis_client(sentinel_deployment.replica.url, decode_responses=True) as replica:
            assert await replica.xlen(keys.outbox("greeter")) == 1  # there when publish returned
