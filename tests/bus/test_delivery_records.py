"""Delivery records as consumers write them: one per outcome, sent with the acks through the
bot's outbox, exact when a consumer is SIGKILLed mid-batch (the entries it held show the
consumer that took them over and the one they were taken from)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bus import Event
from bus.keys import Keys
from bus.outbox import OutboxRelay
from bus.routing import Router
from bus.settings import RetrySettings
from tests.bus.conftest import ConsumerProc, ConsumerProcs
from tests.conftest import BusFactory
from tests.support import in_background, running, wait_until

pytestmark = [pytest.mark.redis]

KEYS = Keys()
GROUP = "bot-group-worker"


@pytest.fixture
async def relaying(redis: Redis) -> AsyncIterator[OutboxRelay]:
    """The manager's relay of worker's outbox, running."""
    relay = OutboxRelay(redis, KEYS, Router({}, "bot"), lambda: ["worker"], block=0.1)
    async with in_background(relay.run()):
        yield relay


async def records(redis: Redis) -> list[dict[str, Any]]:
    """Every record on the deliveries stream, each with its entry's group and consumer."""
    rows: Any = await redis.xrange(KEYS.deliveries())
    out = []
    for _, fields in rows:
        for item in orjson.loads(fields["records"]):
            outcome, event_id, _, entry_id, attempts, read, done, ran, previous, retry = item
            out.append({
                "group": fields["group"], "consumer": fields["consumer"], "outcome": outcome,
                "event_id": event_id, "entry_id": entry_id, "attempts": attempts,
                "read": read, "done": done, "ran": ran, "previous": previous, "retry": retry,
            })  # fmt: skip
    return out


@pytest.mark.deployments
async def test_each_outcome_is_one_record_sent_with_the_acks(
    redis: Redis, bus_factory: BusFactory, relaying: OutboxRelay
) -> None:
    """A handled event, one dead-lettered after its one attempt and one skipped by the
    where conditions: one record each, in the bot's group, with its consumer, delivery
    count 1, and read before done."""
    worker = await bus_factory("worker", outbox=True, delivery_records=True)

    @worker.subscribe("test.#", where={"n": {"gt": 0}}, retry=RetrySettings(max_attempts=1))
    async def handle(event: Event) -> None:
        if event.data["n"] == 2:
            raise RuntimeError("two is refused")

    producer = await bus_factory("producer")
    ids = [await producer.publish("test.job", {"n": n}) for n in range(3)]
    async with running(worker):
        await wait_until(lambda: _count(redis, 3), what="three records relayed")
    found = {r["event_id"]: r for r in await records(redis)}
    assert {i: found[i]["outcome"] for i in ids} == {
        ids[0]: "skipped",
        ids[1]: "handled",
        ids[2]: "dead_lettered",
    }
    for record in found.values():
        assert (record["group"], record["consumer"], record["attempts"]) == (GROUP, "worker-0", 1)
        assert record["read"] <= record["done"] and record["previous"] == ""


async def test_records_a_full_redis_refuses_are_dropped_and_the_entries_still_acked(
    redis: Redis, bus_factory: BusFactory
) -> None:
    """Redis at its maxmemory (noeviction) refuses the records' XADD but not the acks: the
    records are dropped with an error saying so, and every entry is acked once, not held
    to be delivered again."""
    worker = await bus_factory("worker", outbox=True, delivery_records=True)
    handled: list[str] = []
    full = asyncio.Event()

    @worker.subscribe("test.#")
    async def handle(event: Event) -> None:
        await full.wait()  # Redis fills up while the entries are in hand
        handled.append(event.id)

    producer = await bus_factory("producer")
    ids = [await producer.publish("test.job", {"n": n}) for n in range(5)]
    try:
        with capture_logs() as logs:
            async with running(worker):

                async def in_hand() -> bool:
                    summary: Any = await redis.xpending(KEYS.stream("bot"), GROUP)
                    return int(summary["pending"]) == 5

                await wait_until(in_hand, what="the five entries read")
                await redis.config_set("maxmemory-policy", "noeviction")
                await redis.config_set("maxmemory", "1")
                full.set()
                await wait_until(lambda: len(handled) == 5, what="all handled")

                async def acked() -> bool:
                    summary: Any = await redis.xpending(KEYS.stream("bot"), GROUP)
                    return int(summary["pending"]) == 0

                await wait_until(acked, what="every entry acked")
    finally:
        await redis.config_set("maxmemory", "0")
    assert sorted(handled) == sorted(ids)
    refused = [e for e in logs if e["event"].startswith("Redis refused delivery records")]
    assert refused and sum(e["records"] for e in refused) == 5
    assert await redis.xlen(KEYS.outbox("worker")) == 0


async def test_a_stop_while_an_ack_flush_waits_on_redis_acks_and_records_each_once(
    redis: Redis, bus_factory: BusFactory, relaying: OutboxRelay
) -> None:
    """Five handled events whose records and acks are on their way while Redis holds
    writes (CLIENT PAUSE WRITE), and the worker stopped then: the stop waits for that flush
    instead of cancelling it between the records and the acks, so every entry is acked
    and recorded once (a cancelled flush left them pending, to be handled again)."""
    worker = await bus_factory("worker", outbox=True, delivery_records=True)
    go = asyncio.Event()
    handled: list[str] = []

    @worker.subscribe("test.#")
    async def handle(event: Event) -> None:
        await go.wait()
        handled.append(event.id)

    producer = await bus_factory("producer")
    ids = [await producer.publish("test.job", {"n": n}) for n in range(5)]
    async with running(worker):

        async def in_hand() -> bool:
            summary: Any = await redis.xpending(KEYS.stream("bot"), GROUP)
            return int(summary["pending"]) == 5

        await wait_until(in_hand, what="the five entries read")
        await redis.client_pause(30_000, all=False)  # ended below, once the stop waits
        try:
            go.set()
            acks = worker._consumer._dispatcher._acks  # type: ignore[union-attr]
            await wait_until(lambda: len(handled) == 5 and acks._flushing == 1,
                             what="the acks' flush waiting on Redis")  # fmt: skip
            stopping = asyncio.create_task(worker.stop(timeout=0.05))
            await wait_until(lambda: acks._flushing == 2 or stopping.done(),
                             what="the stop's last flush")  # fmt: skip
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
        await stopping

    async def acked() -> bool:
        summary: Any = await redis.xpending(KEYS.stream("bot"), GROUP)
        return int(summary["pending"]) == 0

    await wait_until(acked, 5, "every entry acked once Redis takes writes again")
    await wait_until(lambda: _count(redis, 5), what="the records relayed")
    found = await records(redis)
    assert Counter(r["event_id"] for r in found if r["outcome"] == "handled") == Counter(ids)


async def test_records_are_exact_when_a_consumer_is_killed_mid_batch(
    redis: Redis,
    bus_factory: BusFactory,
    consumer_procs: ConsumerProcs,
    relaying: OutboxRelay,
) -> None:
    """Worker-a is SIGKILLed while it holds entries; worker-b takes them over. Every
    record is a handling that happened (b's records are exactly what b handled, a's a
    subset of what a handled), every event has exactly one handled record (a record goes
    out with its entry's ack, never without it), and each entry a held at the kill is
    recorded by b as taken over from worker-a, delivered twice or more."""
    options = {"visibility_timeout": 1.0, "extra": ["--records", "--handle-ms", "20"]}
    first = await consumer_procs("worker", "a", **options)  # type: ignore[arg-type]
    producer = await bus_factory("producer")
    ids = [await producer.publish("test.job", {"n": n}) for n in range(150)]
    await wait_until(lambda: len(first.ids("handled")) >= 40, 20, "a handling")
    held = await _kill_holding(redis, first, "worker-a")
    second = await consumer_procs("worker", "b", **options)  # type: ignore[arg-type]

    async def settled() -> bool:
        done = set(first.ids("handled")) | set(second.ids("handled"))
        summary: Any = await redis.xpending(KEYS.stream("bot"), GROUP)
        return done >= set(ids) and int(summary["pending"]) == 0

    await wait_until(settled, 30, "every event handled and acked")
    await wait_until(lambda: _count_of(redis, "worker-b", len(second.ids("handled"))), 10,
                     "b's records relayed")  # fmt: skip
    found = await records(redis)
    by_consumer = Counter(r["consumer"] for r in found)
    assert set(by_consumer) <= {"worker-a", "worker-b"}
    recorded = {c: [r["event_id"] for r in found if r["consumer"] == c] for c in by_consumer}
    assert sorted(recorded["worker-b"]) == sorted(second.ids("handled"))
    assert set(recorded.get("worker-a", [])) <= set(first.ids("handled"))
    assert len(recorded.get("worker-a", [])) == len(set(recorded.get("worker-a", [])))
    assert Counter(r["event_id"] for r in found if r["outcome"] == "handled") == Counter(ids)
    taken_over = {r["entry_id"]: r for r in found if r["consumer"] == "worker-b" and r["previous"]}
    assert held, "worker-a held nothing when killed"
    for entry_id in held:
        record = taken_over[entry_id]
        assert record["previous"] == "worker-a" and record["attempts"] >= 2
    unrecorded = set(first.ids("handled")) - set(recorded.get("worker-a", []))
    assert unrecorded <= {r["event_id"] for r in taken_over.values()}


async def _kill_holding(redis: Redis, proc: ConsumerProc, consumer: str) -> list[str]:
    """SIGKILL ``proc`` while its consumer holds entries read and not acked; their ids."""
    held: list[str] = []

    async def holding() -> bool:
        rows: Any = await redis.xpending_range(KEYS.stream("bot"), GROUP, "-", "+", 1000, consumer)
        held[:] = [row["message_id"] for row in rows]
        return bool(held)

    await proc.kill_while(holding, f"{consumer} holding entries", 20)
    return held


async def _count(redis: Redis, n: int) -> bool:
    return len(await records(redis)) >= n


async def _count_of(redis: Redis, consumer: str, n: int) -> bool:
    return sum(1 for r in await records(redis) if r["consumer"] == consumer) >= n
