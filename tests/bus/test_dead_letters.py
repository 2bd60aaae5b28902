"""Failures: retries with backoff, dead letters, their retry, malformed entries, the breaker."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bus import BusClient, DeadLetterNotFoundError, DeadLetterReason, Event
from bus.breaker import BreakerState
from bus.errors import DeadLetterRetryError
from bus.settings import BreakerSettings, RetrySettings
from tests.conftest import BusFactory
from tests.support import config_set, redis_client, running, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.deployments]

FAST_RETRY = RetrySettings(max_attempts=3, backoff_base=0.05, backoff_cap=0.2, jitter=0.0)


async def failing_bot(
    bus_factory: BusFactory, bot: str, fail_on: set[int]
) -> tuple[BusClient, list[tuple[int, float]]]:
    """A bot whose handler raises for the listed ``n``; records (n, time) of each attempt."""
    client = await bus_factory(bot)
    attempts: list[tuple[int, float]] = []

    @client.subscribe("user.#", retry=FAST_RETRY, name="handle")
    async def handle(event: Event) -> None:
        attempts.append((event.data["n"], time.monotonic()))
        if event.data["n"] in fail_on:
            raise ValueError(f"cannot handle {event.data['n']}")

    return client, attempts


async def plant(client: BusClient, stream: str) -> str:
    """A dead letter of a user.x.y event failed by group a, naming ``stream``; its id."""
    return await client.dlq.add(
        fields={"id": "e1", "type": "user.x.y", "data": "{}"},
        reason=DeadLetterReason.HANDLER_ERROR, error="failed", stream=stream,
        entry_id="1-0", group="bot-group-a", consumer="a-0",
    )  # fmt: skip


class TestRetries:
    async def test_failure_is_retried_with_backoff_then_dead_lettered(
        self, bus_factory: BusFactory
    ) -> None:
        """A handler that keeps failing is tried max_attempts times, waiting longer each time,
        then the event goes to the DLQ with the error, and the source entry is acked."""
        client, attempts = await failing_bot(bus_factory, "a", fail_on={1})
        producer = await bus_factory("p")
        async with running(client):
            event_id = await producer.publish("user.x.y", {"n": 1})
            await producer.publish("user.x.y", {"n": 2})
            await wait_until(lambda: client.stats()["counters"].get("dead_lettered") == 1)
            await wait_until(lambda: client.stats()["counters"].get("acked") == 2)
        times = [t for n, t in attempts if n == 1]
        assert len(times) == 3
        assert times[2] - times[1] > times[1] - times[0] >= 0.04
        (letter,) = await client.dlq.list()
        assert letter.reason == "handler_error" and letter.error == "ValueError: cannot handle 1"
        assert "ValueError" in letter.traceback and letter.attempts == 3
        assert (letter.group, letter.consumer, letter.handler) == ("bot-group-a", "a-0", "handle")
        assert letter.stream == producer.keys.stream("user") and letter.entry_id
        assert letter.event is not None and letter.event.id == event_id
        pending = await client.redis.xpending(letter.stream, "bot-group-a")
        assert pending["pending"] == 0

    async def test_a_retry_that_succeeds_is_not_dead_lettered(
        self, bus_factory: BusFactory
    ) -> None:
        """A transient failure is absorbed by the retry."""
        client = await bus_factory("a")
        calls = 0

        @client.subscribe("user.#", retry=FAST_RETRY)
        async def flaky(event: Event) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ConnectionError("downstream hiccup")

        async with running(client):
            await (await bus_factory("p")).publish("user.x.y", {})
            await wait_until(lambda: client.stats()["counters"].get("handled") == 1)
        assert calls == 2 and await client.dlq.count() == 0


class TestDeadLetterRetry:
    async def test_retry_redelivers_only_to_the_failed_group(self, bus_factory: BusFactory) -> None:
        """A retried dead letter reaches the group that failed it, not the other bots."""
        failing, attempts = await failing_bot(bus_factory, "a", fail_on={7})
        other = await bus_factory("b")
        other_seen: list[int] = []

        @other.subscribe("user.#")
        async def watch(event: Event) -> None:
            other_seen.append(event.data["n"])

        producer = await bus_factory("p")
        async with running(failing, other):
            await producer.publish("user.x.y", {"n": 7})
            await wait_until(lambda: failing.stats()["counters"].get("dead_lettered") == 1)
            (letter,) = await failing.dlq.list()
            attempts.clear()
            new_entry = await failing.dlq.retry(letter.id)
            await wait_until(lambda: len(attempts) == 3)  # retried, failed again
            await wait_until(lambda: failing.stats()["counters"].get("dead_lettered") == 2)
            await wait_until(lambda: other.stats()["counters"].get("acked") == 2)
        assert other_seen == [7]
        (again,) = await failing.dlq.list()
        assert again.id != letter.id and again.entry_id == new_entry
        assert (
            again.fields["dlq_id"] == letter.id and again.fields["target"] == "bot-group-a/handle"
        )
        with pytest.raises(DeadLetterNotFoundError, match="retried or purged"):
            await failing.dlq.get(letter.id)

    async def test_a_letter_naming_another_key_is_refused_and_kept(
        self, bus_factory: BusFactory, redis: Redis
    ) -> None:
        """A letter planted with ``stream`` set to another bot's key, a stream its type is
        not routed to, or the dead-letter stream itself: retry writes nothing there, says
        why, and the letter stays."""
        client = await bus_factory("a")
        keys = client.keys
        await redis.hset(f"{keys.namespace}:state:{{other}}", "k", "v")
        targets = [
            f"{keys.namespace}:state:{{other}}",  # another bot's state
            keys.stream("system"),  # a stream, but not where user.* goes
            keys.dead_letters(),
        ]
        for target in targets:
            letter_id = await plant(client, target)
            with pytest.raises(DeadLetterRetryError, match="not retried, the letter is kept"):
                await client.dlq.retry(letter_id)
            assert (await client.dlq.get(letter_id)).stream == target
        assert await redis.hgetall(f"{keys.namespace}:state:{{other}}") == {"k": "v"}
        assert await redis.exists(keys.stream("system")) == 0
        assert await client.dlq.count() == len(targets)

    async def test_a_routed_key_that_is_not_a_stream_is_refused_and_the_letter_kept(
        self, bus_factory: BusFactory, redis: Redis
    ) -> None:
        """The right stream name holding another type (WRONGTYPE): nothing written, the
        letter kept (a MULTI would have run its XDEL anyway)."""
        client = await bus_factory("a")
        stream = client.keys.stream("user")
        await redis.set(stream, "not a stream")
        letter_id = await plant(client, stream)
        with pytest.raises(DeadLetterRetryError, match="not a stream"):
            await client.dlq.retry(letter_id)
        assert (await client.dlq.get(letter_id)).id == letter_id
        assert await redis.get(stream) == "not a stream"

    async def test_two_retries_at_once_deliver_the_event_once(
        self, bus_factory: BusFactory, redis: Redis
    ) -> None:
        """Two operators retrying the same letter at the same moment: one re-adds it, the
        other is told it is gone; the stream gets one copy."""
        client = await bus_factory("a")
        stream = client.keys.stream("user")
        letter_id = await plant(client, stream)
        results = await asyncio.gather(
            *(client.dlq.retry(letter_id) for _ in range(5)), return_exceptions=True
        )
        added = [r for r in results if isinstance(r, str)]
        assert len(added) == 1
        assert all(isinstance(r, DeadLetterNotFoundError) for r in results if r not in added)
        assert await redis.xlen(stream) == 1
        assert await client.dlq.count() == 0

    async def test_purge_removes_dead_letters(self, bus_factory: BusFactory) -> None:
        """Purge deletes the given dead letters, or all of them."""
        client, _ = await failing_bot(bus_factory, "a", fail_on={1, 2, 3})
        producer = await bus_factory("p")
        async with running(client):
            await producer.publish_many([("user.x.y", {"n": n}) for n in (1, 2, 3)])
            await wait_until(lambda: client.stats()["counters"].get("dead_lettered") == 3)
        letters = await client.dlq.list()
        assert await client.dlq.purge([letters[0].id]) == 1
        assert await client.dlq.purge() == 2
        assert await client.dlq.count() == 0


class TestMalformed:
    async def test_garbage_goes_to_dlq_and_consumer_goes_on(self, bus_factory: BusFactory) -> None:
        """Entries written by a raw XADD that do not decode are dead-lettered with the reason;
        the events after them are still handled."""
        client, attempts = await failing_bot(bus_factory, "a", fail_on=set())
        stream = client.keys.stream("user")
        async with running(client):
            await client.redis.xadd(stream, {"type": "user.x.y", "source": "x", "data": "{oops"})
            await client.redis.xadd(stream, {"hello": "world"})
            await client.redis.xadd(
                stream, {"type": "user.x.y", "source": "cli", "data": '{"n":5}'}
            )
            await wait_until(lambda: [n for n, _ in attempts] == [5])
            await wait_until(lambda: client.stats()["counters"].get("acked") == 3)
        # Dead-lettered by two workers at once: in either order; sort by the source entry.
        letters = sorted(await client.dlq.list(), key=lambda letter: letter.entry_id)
        assert [letter.reason for letter in letters] == ["malformed", "malformed"]
        assert "not valid JSON" in letters[0].error
        assert "'type' is missing" in letters[1].error
        assert letters[1].fields == {"hello": "world"}

    async def test_data_over_max_event_bytes_is_dead_lettered_not_handled(
        self, bus_factory: BusFactory
    ) -> None:
        """A data field over max_event_bytes, written past the publisher (a raw XADD), is
        dead-lettered as malformed saying its size and the limit; the handler never gets it
        and the next event is handled."""
        client, attempts = await failing_bot(bus_factory, "a", fail_on=set())
        stream = client.keys.stream("user")
        huge = '{"n": 1, "pad": "' + "x" * (client.settings.max_event_bytes + 1) + '"}'
        async with running(client):
            await client.redis.xadd(stream, {"type": "user.x.y", "source": "cli", "data": huge})
            await client.redis.xadd(
                stream, {"type": "user.x.y", "source": "cli", "data": '{"n":5}'}
            )
            await wait_until(lambda: client.stats()["counters"].get("acked") == 2)
        assert [n for n, _ in attempts] == [5]
        (letter,) = await client.dlq.list()
        assert letter.reason == "malformed"
        assert f"over the limit of {client.settings.max_event_bytes}" in letter.error
        assert letter.fields["data"] == huge  # kept whole: nothing is lost

    async def test_bytes_that_are_not_utf8_are_dead_lettered_with_their_raw_bytes(
        self, bus_factory: BusFactory, redis_url: str
    ) -> None:
        """An entry whose names or values are not UTF-8 (redis-cli can write any bytes) is
        dead-lettered as malformed, its exact bytes kept (base64) so a retry re-sends them,
        and the consumer goes on with the next event."""
        client, attempts = await failing_bot(bus_factory, "a", fail_on=set())
        stream = client.keys.stream("user")
        raw = redis_client(redis_url)  # bytes in, bytes out: what a foreign writer does
        hostile = {b"type": b"user.x.y", b"source\xff": b"cli", b"data": b'{"n": "\xfe\xff"}'}
        try:
            async with running(client):
                await raw.xadd(stream, hostile)  # type: ignore[arg-type]
                await client.redis.xadd(
                    stream, {"type": "user.x.y", "source": "c", "data": '{"n":6}'}
                )
                await wait_until(lambda: [n for n, _ in attempts] == [6])
                await wait_until(lambda: client.stats()["counters"].get("acked") == 2)
            (letter,) = await client.dlq.list()
            assert letter.reason == "malformed" and "not UTF-8" in letter.error
            assert letter.fields["source\ufffd"] == "cli"  # readable: U+FFFD for the bad byte
            assert letter.raw_entry() == hostile
            new_id = await client.dlq.retry(letter.id)
            entries: Any = await raw.xrange(stream, new_id, new_id)
            assert {k: v for k, v in entries[0][1].items() if k in hostile} == hostile
        finally:
            await raw.aclose()

    async def test_a_dead_letter_redis_refuses_leaves_the_entry_pending_until_it_is_stored(
        self, bus_factory: BusFactory, redis: Redis
    ) -> None:
        """When Redis refuses the dead letter (out of memory under `noeviction`), the failed
        entry is not acked: it stays pending, comes back after the visibility timeout, and
        is acked only once its dead letter is stored."""
        client = await bus_factory("a", consumer={"visibility_timeout": 1.0, "max_deliveries": 100})

        @client.subscribe("user.#", retry=FAST_RETRY)
        async def fail(event: Event) -> None:
            raise ValueError("no")

        producer = await bus_factory("p")
        stream = client.keys.stream("user")
        await producer.publish("user.x.y", {"n": 1})
        await redis.xgroup_create(stream, "bot-group-a", id="0")  # XGROUP CREATE needs memory
        await config_set(redis, "maxmemory-policy", "noeviction")
        await config_set(redis, "maxmemory", "1")  # every XADD (the dead letter) refused: OOM
        try:
            with capture_logs() as logs:
                async with running(client):
                    await wait_until(
                        lambda: client.stats()["counters"].get("kept_pending", 0) >= 1, timeout=20
                    )
                    pending = await redis.xpending(stream, "bot-group-a")
                    assert pending["pending"] == 1 and await client.dlq.count() == 0
                    await config_set(redis, "maxmemory", "0")
                    await wait_until(lambda: client.stats()["counters"].get("acked") == 1, 20)
        finally:
            await config_set(redis, "maxmemory", "0")
        assert any(e["event"].startswith("Redis refuses the dead letter") for e in logs)
        (letter,) = await client.dlq.list()
        assert letter.reason in ("handler_error", "poison")
        assert (await redis.xpending(stream, "bot-group-a"))["pending"] == 0


class TestHandlerTimeout:
    async def test_a_hung_handler_is_cancelled_retried_and_dead_lettered_while_others_go_on(
        self, bus_factory: BusFactory
    ) -> None:
        """A handler that never returns is cancelled at its timeout: each attempt counts as
        a failure, then the event is dead-lettered with reason `timeout`; events of other
        keys are handled meanwhile, and the stuck one is acked, not reclaimed for ever."""
        client = await bus_factory("a")
        handled: list[int] = []
        cancelled = 0

        @client.subscribe("user.#", retry=FAST_RETRY, timeout=0.3, name="handle")
        async def handle(event: Event) -> None:
            nonlocal cancelled
            if event.data["n"] == 0:
                try:
                    await asyncio.Event().wait()  # hangs: a lost network call, a deadlock
                except asyncio.CancelledError:
                    cancelled += 1
                    raise
            handled.append(event.data["n"])

        producer = await bus_factory("p")
        async with running(client):
            await producer.publish("user.x.y", {"n": 0}, key="stuck")
            for n in range(1, 6):
                await producer.publish("user.x.y", {"n": n}, key=f"k{n}")
            await wait_until(lambda: sorted(handled) == [1, 2, 3, 4, 5], timeout=2)
            await wait_until(lambda: client.stats()["counters"].get("acked") == 6, timeout=10)
        assert cancelled == FAST_RETRY.max_attempts
        (letter,) = await client.dlq.list()
        assert letter.reason == "timeout" and "ran past its timeout of 0.3s" in letter.error
        assert letter.attempts == FAST_RETRY.max_attempts

    async def test_timeout_defaults_to_the_consumer_setting_and_none_means_no_limit(
        self, bus_factory: BusFactory
    ) -> None:
        """subscribe() takes consumer.handler_timeout unless given; None turns it off."""
        client = await bus_factory("a", consumer={"handler_timeout": 7.5})
        client.subscribe("user.#", name="default")(_nothing)
        client.subscribe("user.#", name="unlimited", timeout=None)(_nothing)
        assert [s.timeout for s in client.subscriptions] == [7.5, None]


async def _nothing(event: Event) -> None:
    """A handler that does nothing."""


class TestCircuitBreaker:
    async def test_breaker_pauses_instead_of_draining_into_the_dlq(
        self, bus_factory: BusFactory
    ) -> None:
        """After K consecutive failures the subscription pauses: the failing event and the
        backlog wait in the stream instead of going to the DLQ; the state is logged and
        visible."""
        client = await bus_factory("a")

        @client.subscribe(
            "user.#",
            retry=RetrySettings(max_attempts=1),
            breaker=BreakerSettings(failure_threshold=3, cooldown=60),
        )
        async def broken(event: Event) -> None:
            raise RuntimeError("database is down")

        producer = await bus_factory("p")
        with capture_logs() as logs:
            async with running(client):
                await producer.publish_many([("user.x.y", {"n": n}) for n in range(20)])
                await wait_until(lambda: any(e["event"].startswith("circuit open") for e in logs))
                assert client.subscriptions[0].breaker.state is BreakerState.OPEN
                assert client.stats()["subscriptions"][0]["breaker"] == "open"
                await client.stop(timeout=0.2)
        assert await client.dlq.count() == 2, "only the failures before the breaker opened"
        pending = await client.redis.xpending(client.keys.stream("user"), "bot-group-a")
        assert pending["pending"] == 18, "the rest stays pending for after the cool-down"

    async def test_held_events_are_handled_after_recovery(self, bus_factory: BusFactory) -> None:
        """When the handler works again after the cool-down, the held events are handled."""
        client = await bus_factory("a")
        healthy = False
        handled: list[int] = []

        @client.subscribe(
            "user.#",
            retry=RetrySettings(max_attempts=1),
            breaker=BreakerSettings(failure_threshold=2, cooldown=0.3),
        )
        async def recovering(event: Event) -> None:
            if not healthy:
                raise RuntimeError("database is down")
            handled.append(event.data["n"])

        producer = await bus_factory("p")
        async with running(client):
            await producer.publish_many([("user.x.y", {"n": n}) for n in range(10)])
            await wait_until(lambda: client.subscriptions[0].breaker.state is BreakerState.OPEN)
            healthy = True
            await wait_until(lambda: client.stats()["counters"].get("acked") == 10)
        assert client.subscriptions[0].breaker.state is BreakerState.CLOSED
        assert len(handled) == 10 - await client.dlq.count()
        assert await client.dlq.count() == 1
