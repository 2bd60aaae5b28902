"""BusClient against a real private Redis: delivery, fan-out, load sharing, order, schemas."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from bus import BusClient, Event, EventType, EventValidationError, SchemaError, SubscriptionError
from bus.settings import BusSettings
from tests.conftest import BusFactory, RedisFactory
from tests.support import entries, running, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.deployments]


class TestPublish:
    async def test_round_trip(self, bus_factory: BusFactory) -> None:
        """A published event reaches a subscriber with every field intact."""
        consumer, producer = await bus_factory("a"), await bus_factory("p")
        got: list[Event] = []

        @consumer.subscribe("user.message.*")
        async def handle(event: Event) -> None:
            got.append(event)

        async with running(consumer):
            event_id = await producer.publish(
                "user.message.received", {"user_id": 1, "bot_id": "p", "text": "hi"}, key="1"
            )
            await wait_until(lambda: len(got) == 1)
        event = got[0]
        assert (event.id, event.type, event.source, event.key) == (
            event_id, "user.message.received", "p", "1",
        )  # fmt: skip
        assert event.data == {"user_id": 1, "bot_id": "p", "text": "hi"}
        assert event.stream == producer.keys.stream("user") and event.entry_id

    async def test_entry_is_readable_with_plain_redis(self, bus_factory: BusFactory) -> None:
        """The stream entry has flat string fields a non-Python reader understands."""
        producer = await bus_factory("p")
        event_id = await producer.publish("system.backup.completed", {"size_bytes": 10})
        rows = await entries(producer.redis, producer.keys.stream("system"))
        ((_, fields),) = rows
        assert fields["id"] == event_id and fields["type"] == "system.backup.completed"
        assert fields["data"] == '{"size_bytes":10}' and fields["wire"] == "1"

    async def test_publish_many_is_one_pipeline_in_order(self, bus_factory: BusFactory) -> None:
        """A batch publish returns ids in order and lands every event."""
        producer = await bus_factory("p")
        ids = await producer.publish_many(
            [("bench.event.sent", {"n": n}) for n in range(100)]
            + [producer.event("bench.event.sent", {"n": 100}, key="k")]
        )
        assert len(ids) == 101 and ids[:100] == sorted(ids[:100])
        rows = await entries(producer.redis, producer.keys.stream("bot"))
        assert [r[1]["id"] for r in rows] == ids

    async def test_bad_input_is_refused_before_sending(self, bus_factory: BusFactory) -> None:
        """Invalid type, non-object data, oversize data and bad batches send nothing."""
        producer = await bus_factory("p", max_event_bytes=1024)
        with pytest.raises(EventValidationError, match=r"^type:"):
            await producer.publish("NotAType", {})
        with pytest.raises(EventValidationError, match=r"^data: must be a JSON object"):
            await producer.publish("user.x.y", [1, 2])  # type: ignore[arg-type]
        with pytest.raises(EventValidationError, match="exceeds the limit of 1024 bytes"):
            await producer.publish("user.x.y", {"blob": "x" * 2000})
        with pytest.raises(EventValidationError, match="not JSON-serialisable"):
            await producer.publish("user.x.y", {"obj": object()})
        with pytest.raises(EventValidationError):
            await producer.publish_many([("user.x.y", {}), ("Bad", {})])
        assert await producer.redis.dbsize() == 0


class TestSubscriptions:
    async def test_patterns_and_conditions_select_events(self, bus_factory: BusFactory) -> None:
        """Only events matching the pattern and the data conditions reach the handler."""
        consumer, producer = await bus_factory("a"), await bus_factory("p")
        got: list[int] = []

        @consumer.subscribe("user.#", where={"n": {"gte": 2}, "lang": {"in": ["en", "ru"]}})
        async def handle(event: Event) -> None:
            got.append(event.data["n"])

        async with running(consumer):
            for n in range(5):
                await producer.publish("user.chat.said", {"n": n, "lang": "en"})
            await producer.publish("user.chat.said", {"n": 9, "lang": "fr"})
            await producer.publish("system.chat.said", {"n": 9, "lang": "en"})
            await producer.publish("user.chat.said", {"n": 10, "lang": "ru"})
            await wait_until(lambda: 10 in got)
            await wait_until(lambda: consumer.stats()["counters"].get("acked", 0) == 7)
        assert sorted(got) == [2, 3, 4, 10]

    async def test_two_bots_each_get_every_event(self, bus_factory: BusFactory) -> None:
        """Every subscribing bot has its own group, so each one receives all events."""
        a, b, producer = await bus_factory("a"), await bus_factory("b"), await bus_factory("p")
        seen: dict[str, list[int]] = defaultdict(list)
        for client in (a, b):

            async def handle(event: Event, bot: str = client.bot_id) -> None:
                seen[bot].append(event.data["n"])

            client.subscribe("user.#", handle)
        async with running(a, b):
            await producer.publish_many([("user.x.y", {"n": n}) for n in range(50)])
            await wait_until(lambda: len(seen["a"]) == 50 and len(seen["b"]) == 50)
        assert sorted(seen["a"]) == sorted(seen["b"]) == list(range(50))

    async def test_replicas_split_the_load_without_duplicates(
        self, bus_factory: BusFactory
    ) -> None:
        """Two instances of one bot share its group: each event is handled by exactly one."""
        r0, r1 = await bus_factory("a", instance=0), await bus_factory("a", instance=1)
        producer = await bus_factory("p")
        handled: dict[int, list[int]] = {0: [], 1: []}
        for replica, client in enumerate((r0, r1)):

            async def handle(event: Event, replica: int = replica) -> None:
                handled[replica].append(event.data["n"])
                await asyncio.sleep(0.001)  # let the other replica take its share

            client.subscribe("user.#", handle)
        async with running(r0, r1):
            for chunk in range(20):
                await producer.publish_many(
                    [("user.x.y", {"n": chunk * 20 + i}) for i in range(20)]
                )
                await asyncio.sleep(0.005)
            await wait_until(lambda: len(handled[0]) + len(handled[1]) >= 400)
        everything = handled[0] + handled[1]
        assert sorted(everything) == list(range(400))
        assert handled[0] and handled[1]

    async def test_per_key_order_holds_under_concurrency(self, bus_factory: BusFactory) -> None:
        """Events of one key reach the handler in publish order while keys run concurrently."""
        consumer = await bus_factory("a", consumer={"concurrency": 16, "read_count": 50})
        producer = await bus_factory("p")
        seen: dict[str, list[int]] = defaultdict(list)
        running_now = 0
        peak = 0

        @consumer.subscribe("user.#")
        async def handle(event: Event) -> None:
            nonlocal running_now, peak
            running_now += 1
            peak = max(peak, running_now)
            await asyncio.sleep(random.random() / 1000)
            seen[event.key or ""].append(event.data["n"])
            running_now -= 1

        keys = [f"user-{k}" for k in range(300)]
        counters: dict[str, int] = defaultdict(int)
        drafts = []
        for _ in range(3000):
            key = random.choice(keys)
            drafts.append(producer.event("user.x.y", {"n": counters[key]}, key=key))
            counters[key] += 1
        async with running(consumer):
            for start in range(0, len(drafts), 100):
                await producer.publish_many(drafts[start : start + 100])
            await wait_until(lambda: sum(map(len, seen.values())) == 3000, timeout=30)
        assert all(seen[k] == list(range(counters[k])) for k in counters)
        assert peak > 1, "different keys should be handled concurrently"
        assert peak <= 16, "concurrency is bounded"

    async def test_duplicate_subscription_names_are_refused(self, bus_factory: BusFactory) -> None:
        """Two handlers with one name would be ambiguous for dead-letter retries; an option
        subscribe does not know is refused too, not ignored."""
        consumer = await bus_factory("a")

        async def handle(event: Event) -> None: ...

        consumer.subscribe("user.#", handle)
        with pytest.raises(SubscriptionError, match="pass name="):
            consumer.subscribe("bot.#", handle)
        options: Any = {"batch_wiat": 0.1}  # a typo: refused, not ignored
        with pytest.raises(
            SubscriptionError, match=r"unknown subscribe option\(s\) \['batch_wiat'\]"
        ):
            consumer.subscribe("bot.#", handle, name="other", **options)


class ProfileData(BaseModel):
    """A bot's own schema."""

    profile_id: int
    name: str


class TestSchemas:
    async def test_standard_types_are_validated_at_publish(self, bus_factory: BusFactory) -> None:
        """Publishing a standard type with wrong data fails and names the bad fields."""
        producer = await bus_factory("p")
        with pytest.raises(SchemaError, match="user_id: Field required"):
            await producer.publish(EventType.MESSAGE_RECEIVED, {"bot_id": "x"})
        await producer.publish(EventType.MESSAGE_RECEIVED, {"user_id": 1, "bot_id": "x"})

    async def test_strict_mode_refuses_unregistered_types(self, bus_factory: BusFactory) -> None:
        """With strict schemas, a type with no schema cannot be published."""
        producer = await bus_factory("p", strict_schemas=True)
        with pytest.raises(SchemaError, match="no schema is registered"):
            await producer.publish("custom.thing.done", {})
        producer.schemas.register("custom.thing.done", ProfileData)
        await producer.publish("custom.thing.done", {"profile_id": 1, "name": "x"})

    async def test_handler_can_ask_for_the_parsed_model(self, bus_factory: BusFactory) -> None:
        """With model=, the handler gets parsed data; data that does not fit is dead-lettered."""
        consumer, producer = await bus_factory("a"), await bus_factory("p")
        got: list[ProfileData] = []

        async def handle(event: Event, data: ProfileData) -> None:
            got.append(data)

        consumer.subscribe("profile.#", handle, model=ProfileData)
        async with running(consumer):
            await producer.publish("profile.custom.made", {"profile_id": 5, "name": "Ann"})
            await producer.publish("profile.custom.made", {"profile_id": "nope"})
            await wait_until(lambda: len(got) == 1)
            await wait_until(lambda: consumer.stats()["counters"].get("dead_lettered") == 1)
        assert got == [ProfileData(profile_id=5, name="Ann")]
        (letter,) = await consumer.dlq.list()
        assert letter.reason == "schema" and "profile_id" in letter.error


class TestCorrelation:
    async def test_three_hop_chain_is_linked(self, bus_factory: BusFactory) -> None:
        """Events published inside handlers carry the chain's correlation id and their cause."""
        a, b, c = await bus_factory("a"), await bus_factory("b"), await bus_factory("c")
        producer = await bus_factory("p")
        final: list[Event] = []

        @a.subscribe("user.hop.one")
        async def one(event: Event) -> None:
            await a.publish("user.hop.two", {})

        @b.subscribe("user.hop.two")
        async def two(event: Event) -> None:
            await b.publish("user.hop.three", {})

        @c.subscribe("user.hop.three")
        async def three(event: Event) -> None:
            final.append(event)

        async with running(a, b, c):
            root = await producer.publish("user.hop.one", {})
            await wait_until(lambda: bool(final))
        events = {e.type: e async for e in producer.replay("user.hop.*")}
        first, second, third = (events[f"user.hop.{n}"] for n in ("one", "two", "three"))
        assert first.id == root and first.correlation_id is None
        assert second.correlation_id == third.correlation_id == root
        assert second.causation_id == first.id and third.causation_id == second.id


class TestBatchesAndIdempotency:
    async def test_batch_handler_gets_lists(self, bus_factory: BusFactory) -> None:
        """A batch subscription receives lists of up to N events, all of them, in order."""
        consumer, producer = await bus_factory("a"), await bus_factory("p")
        batches: list[list[int]] = []

        async def handle(events: Sequence[Event]) -> None:
            batches.append([e.data["n"] for e in events])

        consumer.subscribe("user.#", handle, batch=10, batch_wait=0.05)
        async with running(consumer):
            await producer.publish_many([("user.x.y", {"n": n}) for n in range(35)])
            await wait_until(lambda: sum(map(len, batches)) == 35)
        assert [n for b in batches for n in b] == list(range(35))
        assert max(map(len, batches)) == 10

    async def test_idempotent_handler_runs_once_per_event(self, bus_factory: BusFactory) -> None:
        """The same event delivered twice runs an idempotent handler once."""
        consumer, producer = await bus_factory("a"), await bus_factory("p")
        runs: list[str] = []

        @consumer.subscribe("user.#", idempotent_ttl=60)
        async def handle(event: Event) -> None:
            runs.append(event.id)

        event = producer.event("user.x.y", {"n": 1})
        async with running(consumer):
            await producer.publish_many([event, event, event])
            await wait_until(lambda: consumer.stats()["counters"].get("acked", 0) == 3)
        assert runs == [event.id]


class TestReplay:
    async def test_replay_since_time_merges_streams_in_order(self, bus_factory: BusFactory) -> None:
        """Replay yields matching events from several streams in publish order."""
        producer = await bus_factory("p")
        await producer.publish("user.x.y", {"n": 0})
        await asyncio.sleep(0.002)  # the next events are a later millisecond
        since = datetime.now(UTC)
        types = ["bot.x.y", "user.x.y", "system.x.y", "bot.x.y", "user.x.z"]
        ids = [await producer.publish(t, {"n": n}) for n, t in enumerate(types, start=1)]
        replayed = [e async for e in producer.replay(["user.#", "bot.#"], since=since)]
        assert [e.id for e in replayed] == [ids[0], ids[1], ids[3], ids[4]]

    async def test_replay_until_bounds_the_range(self, bus_factory: BusFactory) -> None:
        """Replay stops at the given upper bound."""
        producer = await bus_factory("p")
        for n in range(5):
            await producer.publish("user.x.y", {"n": n})
        rows = await entries(producer.redis, producer.keys.stream("user"))
        got = [
            e.data["n"] async for e in producer.replay("user.#", since=rows[1][0], until=rows[3][0])
        ]
        assert got == [1, 2, 3]


async def test_publish_only_client_runs_until_stopped(bus_factory: BusFactory) -> None:
    """A client with no subscriptions can run() (for a bot that only publishes) and stop."""
    client: BusClient = await bus_factory("p")
    task = asyncio.create_task(client.run())
    await client.wait_ready()
    await client.stop()
    await asyncio.wait_for(task, 5)


class TestConnections:
    async def test_unix_socket_with_password(self, redis_factory: RedisFactory) -> None:
        """A unix:// URL with a password works for publishing and consuming."""
        server = await redis_factory(unix_socket=True, password="s3cret")
        assert server.url.startswith("unix://")
        await self._round_trip(BusSettings(redis_url=server.url))

    async def test_acl_user_limited_to_the_namespace(self, redis_factory: RedisFactory) -> None:
        """An ACL user allowed only the namespace's keys can run a bot (user:pass in the URL)."""
        server = await redis_factory(password="admin")
        admin = Redis.from_url(server.url)
        try:
            await admin.acl_setuser(
                "bot-a",
                enabled=True,
                passwords=["+botpass"],
                keys=["multibot:*"],
                commands=["+@stream", "+@connection", "+client|id", "+client|unblock",
                          "+client|setname", "+set", "+get", "+del"],
            )  # fmt: skip
        finally:
            await admin.aclose()
        url = f"redis://bot-a:botpass@127.0.0.1:{server.port}/0"
        await self._round_trip(BusSettings(redis_url=url))
        async with BusClient("x", settings=BusSettings(redis_url=url)) as client:
            with pytest.raises(NoPermissionError):
                await client.redis.set("other:key", "1")

    @staticmethod
    async def _round_trip(settings: BusSettings) -> None:
        got: list[str] = []
        async with (
            BusClient("a", settings=settings) as consumer,
            BusClient("p", settings=settings) as producer,
        ):

            @consumer.subscribe("user.#")
            async def handle(event: Event) -> None:
                got.append(event.id)

            async with running(consumer):
                event_id = await producer.publish("user.x.y", {})
                await wait_until(lambda: got == [event_id])
