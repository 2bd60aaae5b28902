"""What survives crashes: killed consumers, poison entries, a killed or flushed Redis, stops.

Consumers that must die by SIGKILL run as processes (``tests/bus/consumer_proc.py``); the
others run in this process. Every test uses a real private Redis (7.x and 6.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bus import BusClient, BusConnectionError, Event
from bus.connection import connect
from bus.keys import Keys
from bus.outbox import OutboxRelay
from bus.routing import Router
from bus.settings import BusSettings, RetrySettings
from manager.embedded.redis_server import RedisServer
from tests.bus.conftest import ConsumerProcs
from tests.conftest import BusFactory
from tests.support import in_background, running, wait_until
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.redis

GROUP = "bot-group-worker"
#: The stream events of type test.* go to.
KEY_BOT = Keys().stream("bot")
#: Fail fast while Redis is down (the defaults retry for a few seconds).
FAST_FAIL: dict[str, Any] = {"connect_retries": 2, "retry_cap": 0.2, "connect_timeout": 1.0}


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[TcpProxy]:
    """A proxy in front of the test's Redis (see tests/tcp_proxy.py)."""
    url = urlsplit(redis_server.url)
    proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 6379)
    await proxy.start()
    yield proxy
    await proxy.close()


class TestConsumerCrash:
    async def test_entry_of_a_killed_consumer_is_reclaimed_by_another_instance(
        self, bus_factory: BusFactory, consumer_procs: ConsumerProcs
    ) -> None:
        """An entry whose consumer was SIGKILLed mid-handler is handled by another instance
        of the bot once it has been idle for the visibility timeout."""
        first = await consumer_procs("worker", "a", hang_on="test.job.hang", visibility_timeout=1)
        producer = await bus_factory("producer")
        event_id = await producer.publish("test.job.hang", {})
        await first.wait_for("taken", event_id)
        other = await bus_factory("worker", instance="b", consumer={"visibility_timeout": 1.0})
        handled = recorder(other)
        async with running(other):
            await first.kill()
            killed_at = time.monotonic()
            await wait_until(lambda: event_id in handled, timeout=10, what="reclaimed entry")
            waited = time.monotonic() - killed_at
            await wait_until(lambda: _no_pending(other), timeout=5, what="ack")
        assert handled == [event_id]
        # The owner re-claimed the entry every timeout / 4, so it had been idle <= 0.5 s at the
        # kill: the other instance could only take it (idle >= 1 s) some 0.5 s later.
        assert waited > 0.3

    @pytest.mark.slow
    async def test_live_consumer_keeps_an_entry_it_handles_longer_than_the_timeout(
        self, bus_factory: BusFactory, consumer_procs: ConsumerProcs
    ) -> None:
        """A handler running past the visibility timeout on a live consumer is not taken
        over by another instance (its consumer keeps the entry's idle time low)."""
        first = await consumer_procs("worker", "a", hang_on="test.job.hang", visibility_timeout=1)
        producer = await bus_factory("producer")
        event_id = await producer.publish("test.job.hang", {})
        await first.wait_for("taken", event_id)
        other = await bus_factory("worker", instance="b", consumer={"visibility_timeout": 1.0})
        handled = recorder(other)
        async with running(other):
            await asyncio.sleep(2.5)  # a quiet period: 2.5 timeouts, 10 reclaim rounds of each
            assert handled == []
            assert await pending(producer) == {"worker-a": 1}

    async def test_restarted_consumer_drains_its_own_pending_entries_first(
        self, bus_factory: BusFactory, consumer_procs: ConsumerProcs
    ) -> None:
        """A consumer restarted under the same name after SIGKILL handles the entries it held
        at once (no visibility timeout) and before newer events."""
        first = await consumer_procs("worker", 0, hang_on="test.job.work")
        producer = await bus_factory("producer")
        held = [await producer.publish("test.job.work", {"n": n}) for n in range(3)]
        await first.wait_for("taken", *held)
        await first.kill()
        assert await pending(producer) == {"worker-0": 3}
        newer = await producer.publish("test.job.other", {})

        restarted = await consumer_procs("worker", 0)  # visibility timeout 60 s
        await restarted.wait_for("handled", *held, newer, timeout=5)
        taken = restarted.ids("taken")
        assert set(taken[:3]) == set(held) and taken[3:] == [newer]
        await wait_until(lambda: _no_pending(producer), timeout=5, what="acks")

    async def test_entry_that_kills_its_consumer_is_dead_lettered_as_poison(
        self, bus_factory: BusFactory, consumer_procs: ConsumerProcs
    ) -> None:
        """An entry that crashes its consumer on every delivery is dead-lettered as poison
        after max_deliveries deliveries, and the consumer goes on with the next events."""
        options: dict[str, Any] = {"die_on": "test.job.poison", "max_deliveries": 2}
        procs = [await consumer_procs("worker", 0, **options)]
        producer = await bus_factory("producer")
        poison_id = await producer.publish("test.job.poison", {"boom": True})
        for _ in range(2):  # max_deliveries deliveries, each crashing; a restart re-delivers
            assert await procs[-1].wait_exit() == -signal.SIGKILL
            procs.append(await consumer_procs("worker", 0, ready=False, **options))
        *crashed, survivor = procs
        await wait_until(lambda: _dlq_count(producer, 1), timeout=10, what="dead letter")

        (letter,) = await producer.dlq.list()
        stream = producer.keys.stream("bot")
        entries: Any = await producer.redis.xrange(stream)
        ((entry_id, _),) = entries
        assert (letter.reason, letter.group, letter.consumer) == ("poison", GROUP, "worker-0")
        assert (letter.stream, letter.entry_id) == (stream, entry_id)
        assert letter.error == "delivered 3 times (max_deliveries=2)"
        assert letter.event is not None and letter.event.id == poison_id
        assert letter.event.data == {"boom": True}
        letters: Any = await producer.redis.xrange(producer.dlq.key)
        ((_, raw),) = letters
        assert raw["event_id"] == poison_id and raw["type"] == "test.job.poison"
        assert [p.ids("taken") for p in crashed] == [[poison_id], [poison_id]]

        following = [await producer.publish("test.job.work", {"n": n}) for n in range(3)]
        await survivor.wait_for("handled", *following)
        await wait_until(lambda: _no_pending(producer), timeout=5, what="acks")
        assert survivor.process.returncode is None and survivor.ids("taken") == following


class TestRedisLoss:
    @pytest.mark.slow
    async def test_confirmed_events_survive_a_redis_crash_and_restart(
        self, redis_server: RedisServer, bus_factory: BusFactory
    ) -> None:
        """Every event whose publish returned, before or after Redis is SIGKILLed and
        restarted on its AOF, is handled; producers and consumers carry on by themselves."""
        handled: set[str] = set()

        async def record(event: Event) -> None:
            handled.add(event.id)

        # FAST_FAIL: redis-py's own retries give up quickly, so the consumers' back-off and
        # resume (not just the connection's retry) carry them through the outage.
        consumers = []
        for instance in range(2):
            consumer = await bus_factory(
                "worker", instance=instance, consumer={"visibility_timeout": 1.0}, **FAST_FAIL
            )
            consumer.subscribe("test.#", record)
            consumers.append(consumer)
        producers = [await bus_factory(f"producer{i}", **FAST_FAIL) for i in range(2)]
        confirmed: set[str] = set()
        stop = asyncio.Event()

        async def produce(producer: BusClient) -> None:
            n = 0
            while not stop.is_set():
                with contextlib.suppress(BusConnectionError):  # unconfirmed: maybe written
                    confirmed.add(await producer.publish("test.load.tick", {"n": n}))
                n += 1
                await asyncio.sleep(0.002)

        with capture_logs() as logs:
            async with running(*consumers):
                async with asyncio.TaskGroup() as tg:
                    for producer in producers:
                        tg.create_task(produce(producer))
                    await wait_until(lambda: len(confirmed) >= 200, what="traffic")
                    await redis_server.kill()
                    before = len(confirmed)
                    await asyncio.sleep(0.5)  # Redis stays down for a while
                    await redis_server.restart()
                    await wait_until(lambda: len(confirmed) >= before + 200, what="traffic")
                    stop.set()
                await wait_until(
                    lambda: confirmed <= handled,
                    timeout=15,
                    what=f"handling of every confirmed event (of {len(confirmed)})",
                )
        events = [e["event"] for e in logs if e.get("consumer", "").startswith("worker-")]
        assert "redis unavailable; backing off" in events
        assert "redis reachable again; resuming" in events


class TestLostReply:
    async def test_entries_a_lost_read_reply_held_are_handled_at_once(
        self, proxy: TcpProxy, bus_factory: BusFactory
    ) -> None:
        """Entries Redis handed a consumer in a reply the connection lost (pending under its
        name, never received) are handled as soon as it reads again, once, not a visibility
        timeout later."""
        worker = await bus_factory(
            "worker", redis_url=proxy.url, consumer={"visibility_timeout": 60.0}
        )
        handled = recorder(worker)
        producer = await bus_factory("producer")
        async with running(worker):
            first = await producer.publish("test.job.first", {})
            await wait_until(lambda: first in handled, timeout=10, what="the first event")
            proxy.lose_next_reply(b"XREADGROUP")
            lost = await producer.publish("test.job.lost", {})
            await asyncio.wait_for(proxy.lost.wait(), timeout=10)
            await wait_until(lambda: lost in handled, timeout=10, what="the lost reply's event")
            later = await producer.publish("test.job.later", {})
            await wait_until(lambda: later in handled, timeout=10, what="the next event")
            await wait_until(lambda: _no_pending(producer), timeout=5, what="acks")
            assert worker.stats()["counters"]["retaken"] == 1
        assert handled == [first, lost, later]

    async def test_a_failed_read_hands_out_nothing_taken_before_it(
        self, proxy: TcpProxy, bus_factory: BusFactory
    ) -> None:
        """What the consumer had taken before a read failed (an entry still in its handler,
        one handled and acked) is not handed out again by the retaking after it."""
        worker = await bus_factory(
            "worker", redis_url=proxy.url, consumer={"visibility_timeout": 60.0}
        )
        gate = asyncio.Event()
        handled: list[str] = []

        @worker.subscribe("test.#")
        async def record(event: Event) -> None:
            if event.type == "test.job.slow":
                await gate.wait()
            handled.append(event.id)

        producer = await bus_factory("producer")
        async with running(worker):
            done = await producer.publish("test.job.done", {})
            await wait_until(lambda: done in handled, timeout=10, what="the first event")
            slow = await producer.publish("test.job.slow", {})
            await wait_until(
                lambda: _pending_ids(producer, {slow}), timeout=10, what="the slow event"
            )
            proxy.lose_next_reply(b"XREADGROUP")
            lost = await producer.publish("test.job.lost", {})
            await asyncio.wait_for(proxy.lost.wait(), timeout=10)
            await wait_until(lambda: lost in handled, timeout=10, what="the lost reply's event")
            gate.set()
            await wait_until(lambda: slow in handled, timeout=10, what="the slow event")
            await wait_until(lambda: _no_pending(producer), timeout=5, what="acks")
            assert worker.stats()["counters"]["retaken"] == 1
        assert handled == [done, lost, slow]


class TestLostPublishReply:
    """A publish whose XADD reply the connection lost (a proxy drops it, then closes the
    connection): the client sends it again only if it is not there already."""

    async def test_an_event_whose_reply_was_lost_is_on_its_stream_once(
        self, proxy: TcpProxy, bus_factory: BusFactory
    ) -> None:
        producer = await bus_factory("producer", redis_url=proxy.url)
        await producer.publish("test.job.first", {})
        proxy.lose_next_reply(b"XADD")
        lost = await producer.publish("test.job.lost", {})
        assert proxy.lost.is_set()
        proxy.lose_next_reply(b"XADD")
        many = await producer.publish_many([("test.job.many", {"n": n}) for n in range(3)])
        assert proxy.lost.is_set()
        rows: Any = await producer.redis.xrange(KEY_BOT)
        assert [fields["id"] for _, fields in rows][1:] == [lost, *many]

    async def test_a_request_that_never_reached_redis_is_sent_again(
        self, proxy: TcpProxy, bus_factory: BusFactory
    ) -> None:
        producer = await bus_factory("producer", redis_url=proxy.url)
        proxy.cut_next_request(b"XADD", refuse_for=0.3)
        cut = await producer.publish("test.job.cut", {})
        assert proxy.lost.is_set()
        rows: Any = await producer.redis.xrange(KEY_BOT)
        assert [fields["id"] for _, fields in rows] == [cut]

    async def test_a_relayed_event_whose_outbox_reply_was_lost_is_not_sent_again(
        self, proxy: TcpProxy, redis_server: RedisServer, bus_factory: BusFactory
    ) -> None:
        """The relay moved the outbox entry before the client looked: it finds it in the
        stream the event is routed to."""
        admin = connect(BusSettings(redis_url=redis_server.url))
        relay = OutboxRelay(admin, Keys(), Router.of(BusSettings()), lambda: ["alice"], block=0.1)
        try:
            async with in_background(relay.run()):
                alice = await bus_factory("alice", redis_url=proxy.url, outbox=True)
                await alice.publish("test.job.first", {})
                proxy.lose_next_reply(b"XADD")
                lost = await alice.publish("test.job.lost", {})
                assert proxy.lost.is_set()

                async def relayed() -> bool:
                    return int(await admin.xlen(Keys().outbox("alice"))) == 0

                await wait_until(relayed, what="the outbox relayed")
                rows: Any = await admin.xrange(KEY_BOT)
                assert [f["id"] for _, f in rows].count(lost) == 1
        finally:
            await admin.aclose()


class TestRunOnceOutage:
    async def test_a_run_once_handler_waits_out_redis_instead_of_the_visibility_timeout(
        self, proxy: TcpProxy, bus_factory: BusFactory
    ) -> None:
        """Redis away for the consumer's marker write (longer than the connection's own
        retries): the handler runs once Redis answers again, once, not a visibility timeout
        later."""
        worker = await bus_factory(
            "worker", redis_url=proxy.url, consumer={"visibility_timeout": 60.0}, **FAST_FAIL
        )
        handled: list[str] = []

        @worker.subscribe("test.#", idempotent_ttl=60)
        async def record(event: Event) -> None:
            handled.append(event.id)

        producer = await bus_factory("producer")
        async with running(worker):
            first = await producer.publish("test.job.first", {})
            await wait_until(lambda: first in handled, timeout=10, what="the first event")
            proxy.cut_next_request(b"running:", refuse_for=2.0)
            cut = await producer.publish("test.job.cut", {})
            await asyncio.wait_for(proxy.lost.wait(), timeout=10)
            await wait_until(lambda: cut in handled, timeout=10, what="the cut marker's event")
            await wait_until(lambda: _no_pending(producer), timeout=5, what="acks")
        assert handled == [first, cut]


class TestRedisWipe:
    @pytest.mark.parametrize("wipe", ["flushall", "restart_empty"])
    async def test_consumer_recreates_its_lost_group_without_spinning(
        self, redis_server: RedisServer, bus_factory: BusFactory, wipe: str
    ) -> None:
        """When Redis loses the group (FLUSHALL, or a restart without its AOF), the consumer
        logs it loudly, recreates the group without looping on it, and handles new events."""
        consumer = await bus_factory("worker", consumer={"visibility_timeout": 1.0}, **FAST_FAIL)
        handled = recorder(consumer)
        producer = await bus_factory("producer", **FAST_FAIL)
        with capture_logs() as logs:
            async with running(consumer):
                first = await producer.publish("test.job.work", {})
                await wait_until(lambda: first in handled, what="first event")
                if wipe == "flushall":
                    await producer.redis.flushall()
                else:
                    await redis_server.kill()
                    shutil.rmtree(redis_server.data_dir / "appendonlydir", ignore_errors=True)
                    (redis_server.data_dir / "appendonly.aof").unlink(missing_ok=True)
                    await redis_server.restart()
                after = [await producer.publish("test.job.work", {"n": n}) for n in range(3)]
                await wait_until(lambda: set(after) <= set(handled), what="events after")
                # A quiet period in which a consumer stuck on the missing group would log again
                # (regroups are spaced 1 s apart, reads and reclaims run every 0.5 s).
                await asyncio.sleep(1.5)
        mine = [e for e in logs if e.get("consumer") == "worker-0"]
        regroups = [e for e in mine if e["event"].startswith("consumer group missing")]
        assert 1 <= len(regroups) <= 2, regroups
        assert all(e["log_level"] == "error" for e in regroups)
        loud = [e for e in mine if e["log_level"] in ("warning", "error", "critical")]
        assert len(loud) <= 6, [e["event"] for e in loud]
        assert handled == [first, *after]
        rows: Any = await producer.redis.xrange(producer.keys.stream("bot"))
        assert [fields["id"] for _, fields in rows] == after  # the wipe did happen

    async def test_group_deleted_under_a_blocked_read_is_not_an_unexpected_error(
        self, bus_factory: BusFactory
    ) -> None:
        """A FLUSHALL while the consumer blocks in XREADGROUP is handled as a lost group
        (Redis 7 answers the blocked read with UNBLOCKED), without an "unexpected" traceback."""
        consumer = await bus_factory("worker", consumer={"block_ms": 5000})
        handled = recorder(consumer)
        producer = await bus_factory("producer")
        with capture_logs() as logs:
            async with running(consumer):
                await wait_until(lambda: _reader_blocked(producer, "worker-0"), what="read")
                await producer.redis.flushall()
                event_id = await producer.publish("test.job.work", {})
                await wait_until(lambda: handled == [event_id], what="event after the flush")
        errors = [e["event"] for e in logs if e["log_level"] in ("error", "critical")]
        assert errors and all(e.startswith("consumer group missing") for e in errors), errors


class TestPublishWhileDown:
    @pytest.mark.parametrize(
        ("settings", "bound"),
        [
            pytest.param(FAST_FAIL, 3.0, id="fast"),
            pytest.param({}, 15.0, id="defaults", marks=pytest.mark.slow),  # 2-4 s of retries
        ],
    )
    async def test_publish_to_a_dead_redis_fails_in_bounded_time_saying_to_check_it(
        self,
        redis_server: RedisServer,
        bus_factory: BusFactory,
        settings: dict[str, Any],
        bound: float,
    ) -> None:
        """Publishing while Redis is down raises BusConnectionError within a bounded time,
        with a message that says to check Redis, instead of hanging."""
        producer = await bus_factory("producer", **settings)
        await producer.publish("test.job.work", {})  # the pool now holds a connection
        await redis_server.kill()
        for publish in _publishes(producer):
            started = time.monotonic()
            with pytest.raises(BusConnectionError, match="Check that Redis is running") as info:
                await publish()
            assert time.monotonic() - started < bound
            assert redis_server.url in str(info.value)

    async def test_publish_to_a_frozen_redis_fails_after_the_command_timeout(
        self, redis_server: RedisServer, bus_factory: BusFactory
    ) -> None:
        """A Redis that accepts connections but never answers makes publish fail after its
        command timeout and retries, not hang."""
        producer = await bus_factory(
            "producer", command_timeout=0.5, consumer={"block_ms": 100}, **FAST_FAIL
        )
        await producer.publish("test.job.work", {})
        assert redis_server.pid is not None
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(BusConnectionError, match="Check that Redis is running"):
                await producer.publish("test.job.work", {})
            assert time.monotonic() - started < 3 * 0.5 + 1.0  # 1 try + 2 retries, + backoff
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)


class TestGracefulStop:
    async def test_stop_lets_a_running_handler_finish_and_acks_its_entry(
        self, bus_factory: BusFactory
    ) -> None:
        """stop(timeout) waits for a running handler to finish, then acks its entry."""
        consumer = await bus_factory("worker", consumer={"visibility_timeout": 60.0})
        started, release = asyncio.Event(), asyncio.Event()
        finished: list[str] = []

        @consumer.subscribe("test.#")
        async def slow(event: Event) -> None:
            started.set()
            await release.wait()
            finished.append(event.id)

        producer = await bus_factory("producer")
        async with running(consumer):
            event_id = await producer.publish("test.job.work", {})
            await asyncio.wait_for(started.wait(), 10)
            stopping = asyncio.create_task(consumer.stop(timeout=10))
            done, _ = await asyncio.wait({stopping}, timeout=0.3)
            assert not done, "stop() returned while the handler was still running"
            release.set()
            await asyncio.wait_for(stopping, 5)
        assert finished == [event_id]
        assert await pending(producer) == {}

    async def test_a_stop_waits_for_the_acks_already_on_their_way(
        self, redis: Redis, bus_factory: BusFactory
    ) -> None:
        """One entry's XACK is on its way (Redis holds writes for a moment, as a loaded
        Redis can) when another entry is left pending (its replica lost its lease) and the
        stop comes: the stop waits for the XACK instead of taking the flush for done and
        cancelling it, which left the handled entry pending to be delivered again."""
        consumer = await bus_factory("worker", consumer={"visibility_timeout": 60.0})
        fence = [True]
        consumer.set_fence(lambda: fence[0], lambda: None)
        release = {"a": asyncio.Event(), "b": asyncio.Event()}
        handled: list[str] = []

        @consumer.subscribe("test.#", retry=RetrySettings(max_attempts=2, backoff_base=0.05))
        async def handle(event: Event) -> None:
            await release[event.data["k"]].wait()
            if event.data["k"] == "b":
                raise RuntimeError("try again")  # the second attempt meets the fence
            handled.append(event.id)

        producer = await bus_factory("producer")
        async with running(consumer):
            first = await producer.publish("test.job.work", {"k": "a"}, key="a")
            await producer.publish("test.job.work", {"k": "b"}, key="b")
            await wait_until(lambda: _taken(producer, 2), what="both entries taken")
            await redis.client_pause(500, all=False)  # writes only
            release["a"].set()  # handled: its XACK waits for Redis
            await wait_until(lambda: handled == [first], what="the first handled")
            fence[0] = False
            release["b"].set()  # fails once, then the fence keeps it pending
            await wait_until(
                lambda: consumer.stats()["counters"].get("kept_pending") == 1, what="kept"
            )
            await consumer.stop(timeout=5)
        left: Any = await redis.xpending_range(producer.keys.stream("bot"), GROUP, "-", "+", 10)
        (kept,) = [row["message_id"] for row in left]  # only the entry the fence kept
        entries: Any = await redis.xrange(producer.keys.stream("bot"), kept, kept)
        assert '"b"' in entries[0][1]["data"]

    async def test_handler_outliving_the_stop_timeout_stays_pending_for_the_next_start(
        self, bus_factory: BusFactory
    ) -> None:
        """A handler that does not finish within the stop timeout leaves its entry pending,
        and the next start of the same consumer handles it (without the visibility timeout)."""
        consumer = await bus_factory("worker", consumer={"visibility_timeout": 60.0})
        started = asyncio.Event()

        @consumer.subscribe("test.#")
        async def stuck(event: Event) -> None:
            started.set()
            await asyncio.Event().wait()

        producer = await bus_factory("producer")
        with capture_logs() as logs:
            async with running(consumer):
                event_id = await producer.publish("test.job.work", {})
                await asyncio.wait_for(started.wait(), 10)
                began = time.monotonic()
                await consumer.stop(timeout=0.2)
                assert time.monotonic() - began < 2.0
        assert await pending(producer) == {"worker-0": 1}
        (warning,) = [e for e in logs if e["event"].startswith("stop timeout")]
        assert warning["unfinished"] == 1

        restarted = await bus_factory("worker", consumer={"visibility_timeout": 60.0})
        handled = recorder(restarted)
        async with running(restarted):
            await wait_until(lambda: handled == [event_id], timeout=5, what="drained entry")
        assert await pending(producer) == {}

    async def test_stop_is_prompt_after_redis_restarted(
        self, redis_server: RedisServer, bus_factory: BusFactory
    ) -> None:
        """stop() wakes the blocked read at once even after the reader reconnected to a
        restarted Redis (it must not wait out the block time)."""
        for _ in range(10):  # Redis numbers clients from 1 again after a restart: make sure
            async with Redis.from_url(redis_server.url) as extra:  # the reader's id changes
                await extra.ping()
        consumer = await bus_factory("worker", consumer={"block_ms": 5000}, **FAST_FAIL)
        handled = recorder(consumer)
        producer = await bus_factory("producer", **FAST_FAIL)
        async with running(consumer):
            await wait_until(lambda: _reader_blocked(producer, "worker-0"), what="read")
            await redis_server.kill()
            await redis_server.restart()
            event_id = await producer.publish("test.job.work", {})
            await wait_until(lambda: handled == [event_id], what="event after the restart")
            await wait_until(lambda: _reader_blocked(producer, "worker-0"), what="read")
            began = time.monotonic()
            await consumer.stop(timeout=5)
            assert time.monotonic() - began < 1.0


async def pending(client: BusClient, stream: str = "bot") -> dict[str, int]:
    """Pending entries of the worker group on a stream, per consumer name."""
    summary: Any = await client.redis.xpending(client.keys.stream(stream), GROUP)
    return {row["name"]: int(row["pending"]) for row in summary["consumers"]}


def recorder(client: BusClient, pattern: str = "test.#") -> list[str]:
    """Subscribe ``client`` with a handler that records the ids of the events it handled."""
    handled: list[str] = []

    @client.subscribe(pattern, name="record")
    async def record(event: Event) -> None:
        handled.append(event.id)

    return handled


async def _pending_ids(client: BusClient, ids: set[str]) -> bool:
    """Whether the worker group holds pending exactly the entries of these event ids."""
    stream = client.keys.stream("bot")
    rows: Any = await client.redis.xpending_range(stream, GROUP, "-", "+", 100)
    pending = {row["message_id"] for row in rows}
    entries: Any = await client.redis.xrange(stream)
    return {fields["id"] for entry_id, fields in entries if entry_id in pending} == ids


async def _no_pending(client: BusClient) -> bool:
    return await pending(client) == {}


async def _dlq_count(client: BusClient, count: int) -> bool:
    return await client.dlq.count() == count


async def _reader_blocked(client: BusClient, name: str) -> bool:
    """Whether the consumer ``name`` is blocked in XREADGROUP right now."""
    clients: Any = await client.redis.client_list()
    return any(
        c["name"] == name and c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in clients
    )


def _publishes(producer: BusClient) -> list[Callable[[], Awaitable[object]]]:
    """Both ways to publish one event."""
    return [
        lambda: producer.publish("test.job.work", {}),
        lambda: producer.publish_many([("test.job.work", {})]),
    ]


async def _taken(client: BusClient, count: int) -> bool:
    return sum((await pending(client)).values()) == count
