"""Tests for bus.lease: the leader lease of active/standby bots, with fencing tokens."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.asyncio import Redis

from bus import Event
from bus.keys import Keys
from bus.lease import Lease, holder, parse_holder, release_for
from tests.conftest import BusFactory
from tests.support import redis_client, running, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.deployments]

KEYS = Keys("leasetest")
BOT = "detector"
TTL = 5.0


def lease(redis: Redis, instance: str, ttl: float = TTL) -> Lease:
    """Instance ``instance``'s handle on the test bot's lease."""
    return Lease(redis, KEYS, BOT, instance, ttl)


async def lease_gone(redis: Redis) -> bool:
    """Whether the lease key has expired (or was deleted)."""
    return not await redis.exists(KEYS.lease(BOT))


class TestAcquire:
    async def test_first_instance_acquires_with_token_1(self, redis: Redis) -> None:
        """The first instance to try takes the lease with fencing token 1."""
        first = lease(redis, "0")
        assert await first.try_acquire()
        assert first.token == 1
        assert first.held
        assert await redis.get(KEYS.lease(BOT)) == "0 1"
        assert await holder(redis, KEYS, BOT) == ("0", 1)

    async def test_second_instance_cannot_while_held(self, redis: Redis) -> None:
        """Another instance is refused while the lease is held, and holds no token."""
        first, second = lease(redis, "0"), lease(redis, "1")
        assert await first.try_acquire()
        assert not await second.try_acquire()
        assert second.token is None
        assert not second.held
        assert await holder(redis, KEYS, BOT) == ("0", 1)

    async def test_lease_key_has_the_ttl(self, redis: Redis) -> None:
        """The lease key expires after the TTL unless renewed."""
        assert await lease(redis, "0", ttl=5.0).try_acquire()
        pttl: Any = await redis.pttl(KEYS.lease(BOT))
        assert 4000 < pttl <= 5000

    async def test_reacquire_by_the_same_instance_keeps_the_token(self, redis: Redis) -> None:
        """The holder trying again (even through a new handle) keeps its token."""
        first = lease(redis, "0")
        assert await first.try_acquire()
        again = lease(redis, "0")
        assert await again.try_acquire()
        assert again.token == first.token == 1
        assert await holder(redis, KEYS, BOT) == ("0", 1)

    async def test_reacquire_extends_the_ttl(self, redis: Redis) -> None:
        """Trying again as the holder pushes the expiry back out to the full TTL."""
        first = lease(redis, "0", ttl=5.0)
        assert await first.try_acquire()
        await redis.pexpire(KEYS.lease(BOT), 100)
        assert await first.try_acquire()
        pttl: Any = await redis.pttl(KEYS.lease(BOT))
        assert pttl > 4000


class TestRenewAndRelease:
    async def test_renew_keeps_the_lease(self, redis: Redis) -> None:
        """Renewing extends the key's TTL and the holder's own deadline."""
        first = lease(redis, "0", ttl=5.0)
        assert await first.try_acquire()
        deadline = first.valid_until
        await redis.pexpire(KEYS.lease(BOT), 100)
        assert await first.renew()
        assert first.valid_until >= deadline
        assert first.token == 1
        pttl: Any = await redis.pttl(KEYS.lease(BOT))
        assert pttl > 4000
        assert not await lease(redis, "1").try_acquire()

    async def test_renew_without_holding_is_false(self, redis: Redis) -> None:
        """A handle that never acquired cannot renew."""
        assert not await lease(redis, "0").renew()

    async def test_release_lets_another_acquire_with_the_next_token(self, redis: Redis) -> None:
        """After a release the next holder gets token 2: tokens strictly increase."""
        first, second = lease(redis, "0"), lease(redis, "1")
        assert await first.try_acquire()
        await first.release()
        assert first.token is None
        assert not first.held
        assert await second.try_acquire()
        assert second.token == 2
        await second.release()
        assert await first.try_acquire()
        assert first.token == 3

    async def test_release_without_holding_does_nothing(self, redis: Redis) -> None:
        """A handle that does not hold the lease leaves the holder's key alone."""
        first, second = lease(redis, "0"), lease(redis, "1")
        assert await first.try_acquire()
        await second.release()
        assert await holder(redis, KEYS, BOT) == ("0", 1)

    async def test_expired_lease_is_taken_by_another(self, redis: Redis) -> None:
        """Once the holder stops renewing and the TTL passes, another instance acquires."""
        first, second = lease(redis, "0", ttl=0.3), lease(redis, "1", ttl=0.3)
        assert await first.try_acquire()
        assert not await second.try_acquire()
        await wait_until(lambda: lease_gone(redis), timeout=5, what="the lease to expire")
        assert await second.try_acquire()
        assert second.token == 2

    async def test_renew_after_another_took_over_is_false(self, redis: Redis) -> None:
        """A stale holder's renew fails, clears its token, and leaves the new holder's lease."""
        first, second = lease(redis, "0", ttl=0.3), lease(redis, "1")
        assert await first.try_acquire()
        await wait_until(lambda: lease_gone(redis), timeout=5, what="the lease to expire")
        assert await second.try_acquire()
        assert not await first.renew()
        assert first.token is None
        assert not first.held
        assert await holder(redis, KEYS, BOT) == ("1", 2)

    async def test_stale_release_leaves_the_new_holders_lease(self, redis: Redis) -> None:
        """A stale holder's release does not delete the lease another instance took."""
        first, second = lease(redis, "0", ttl=0.3), lease(redis, "1")
        assert await first.try_acquire()
        await wait_until(lambda: lease_gone(redis), timeout=5, what="the lease to expire")
        assert await second.try_acquire()
        await first.release()
        assert await holder(redis, KEYS, BOT) == ("1", 2)


class TestHeld:
    async def test_held_turns_false_after_valid_until(self, redis: Redis) -> None:
        """The holder stops counting itself active at its own deadline, without Redis."""
        short = lease(redis, "0", ttl=0.05)
        before = time.monotonic()
        assert await short.try_acquire()
        assert before + 0.05 <= short.valid_until <= time.monotonic() + 0.05
        await wait_until(lambda: not short.held, timeout=5, what="the deadline to pass")
        assert time.monotonic() >= short.valid_until
        assert short.token == 1

    async def test_deadline_starts_before_the_request(self, redis: Redis) -> None:
        """valid_until counts from before the request was sent, so it is never late."""
        first = lease(redis, "0", ttl=TTL)
        before = time.monotonic()
        assert await first.try_acquire()
        after = time.monotonic()
        assert before + TTL <= first.valid_until <= after + TTL

    async def test_repr_says_whether_held(self, redis: Redis) -> None:
        """repr names the key, the instance and the token while held."""
        first = lease(redis, "0")
        assert repr(first) == "<Lease leasetest:lease:{detector} instance=0 not held>"
        assert await first.try_acquire()
        assert repr(first) == "<Lease leasetest:lease:{detector} instance=0 held token=1>"


class TestReleaseFor:
    async def test_deletes_the_named_instances_lease(self, redis: Redis) -> None:
        """The manager drops a dead instance's lease so a standby can take it at once."""
        assert await lease(redis, "0").try_acquire()
        assert await release_for(redis, KEYS, BOT, "0")
        assert await holder(redis, KEYS, BOT) is None
        standby = lease(redis, "1")
        assert await standby.try_acquire()
        assert standby.token == 2

    async def test_leaves_another_instances_lease(self, redis: Redis) -> None:
        """Naming an instance that does not hold the lease changes nothing."""
        assert await lease(redis, "1").try_acquire()
        assert not await release_for(redis, KEYS, BOT, "0")
        assert await holder(redis, KEYS, BOT) == ("1", 1)

    async def test_no_lease_is_false(self, redis: Redis) -> None:
        """With no lease there is nothing to release."""
        assert not await release_for(redis, KEYS, BOT, "0")

    async def test_works_on_a_bytes_client(self, redis_url: str) -> None:
        """release_for and holder also work with a client that does not decode replies."""
        raw = redis_client(redis_url)
        try:
            assert await lease(raw, "0").try_acquire()
            assert await holder(raw, KEYS, BOT) == ("0", 1)
            assert await release_for(raw, KEYS, BOT, "0")
            assert await holder(raw, KEYS, BOT) is None
        finally:
            await raw.aclose()


class TestHolder:
    async def test_no_lease_is_none(self, redis: Redis) -> None:
        """holder() is None when nobody holds the lease."""
        assert await holder(redis, KEYS, BOT) is None

    async def test_malformed_value_is_none(self, redis: Redis) -> None:
        """A lease key that does not read "<instance> <token>" is reported as no holder."""
        await redis.set(KEYS.lease(BOT), "garbage")
        assert await holder(redis, KEYS, BOT) is None

    def test_parse_holder(self) -> None:
        """A "<instance> <token>" value parses to (instance, token)."""
        assert parse_holder("0 1") == ("0", 1)
        assert parse_holder("replica-2 42") == ("replica-2", 42)

    @pytest.mark.parametrize(
        "value", [None, "", "0", "0 ", " 1", "0 x", "0 -1", "0 1.5", "01", "0 1 "]
    )
    def test_parse_holder_malformed(self, value: str | None) -> None:
        """Missing, empty or malformed values parse to None."""
        assert parse_holder(value) is None

    def test_parse_holder_non_ascii_digit_is_none(self) -> None:
        """A token of digits int() cannot read is malformed too: None, not an exception."""
        assert parse_holder("0 ²") is None


class TestFencing:
    async def test_a_stalled_active_runs_no_handler_once_its_lease_may_have_expired(
        self, redis: Redis, bus_factory: BusFactory
    ) -> None:
        """The active's event loop stalls past the lease TTL inside a handler (a blocking
        call): the standby can take the lease meanwhile. The next entry is not handled by
        the stalled process: the fence is checked before the handler, the loss is reported,
        and the entry stays pending for the new active."""
        active = lease(redis, "0", ttl=1.0)
        client = await bus_factory("detector")
        handled: list[int] = []
        lost: list[float] = []
        client.set_fence(lambda: active.held, lambda: lost.append(time.monotonic()))

        @client.subscribe("user.#")
        async def handle(event: Event) -> None:
            handled.append(event.data["n"])
            if event.data["n"] == 1:
                time.sleep(1.5)  # noqa: ASYNC251 - the stall under test: nothing renews the lease

        producer = await bus_factory("p")
        async with running(client):
            # Taken only now: the TTL counts from here, not from a slow start (a cluster).
            assert await active.try_acquire()
            for n in (1, 2):
                await producer.publish("user.x.y", {"n": n}, key="same")
            await wait_until(lambda: bool(lost), timeout=10, what="the fence to trip")
            standby = lease(redis, "1", ttl=1.0)
            await wait_until(standby.try_acquire, timeout=5, what="the standby to take over")
        assert handled == [1]
        assert standby.token == 2
        pending: Any = await redis.xpending(client.keys.stream("user"), "bot-group-detector")
        assert pending["pending"] == 1  # the second entry, kept for the new active
