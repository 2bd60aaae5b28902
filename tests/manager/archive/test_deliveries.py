"""Delivery records: what each group did with each event, from the consumers' acks through
the outbox relay into PostgreSQL, and the trail an operator reads (who handled it, who
dead-lettered it, who should have and did not); none lost to a PostgreSQL outage, none
taken from a hostile entry, and dropped with their day of events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from bus import BusClient, Event
from bus.archive import ArchiveStore
from bus.archive.deliveries import GroupTrail
from bus.delivery_records import DELIVERIES_MARK
from bus.outbox import OutboxRelay
from bus.routing import Router
from bus.settings import RetrySettings
from bus.wire import decode
from manager.archive.deliveries import DELIVERIES_GROUP, DeliveriesCopier
from manager.archive.link import ArchiveLink
from manager.embedded.postgres_server import PostgresServer
from tests.conftest import BusFactory
from tests.manager.archive.archive_support import KEYS
from tests.support import in_background, running, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

ONCE = RetrySettings(max_attempts=1)
ROUTER = Router({}, "bot")


@pytest.fixture
async def pipeline(admin: Redis, link: ArchiveLink) -> AsyncIterator[DeliveriesCopier]:
    """The relay of alice's, bob's and dave's outboxes and the copier, running."""
    relay = OutboxRelay(admin, KEYS, ROUTER, lambda: ["alice", "bob", "dave"], block=0.1)
    copier = DeliveriesCopier(admin, KEYS, link.get)
    async with in_background(relay.run()), in_background(copier.run()):
        yield copier


async def bot(bus_factory: BusFactory, bot_id: str, **settings: Any) -> BusClient:
    return await bus_factory(bot_id, outbox=True, delivery_records=True, **settings)


async def archived(store: ArchiveStore, client: BusClient, event_id: str) -> Event:
    """Put the event (as it sits in its stream) into the archive, as the archiver would."""
    rows: Any = await client.streams.xrange(KEYS.stream("bot"))
    for entry_id, fields in rows:
        if fields["id"] == event_id:
            event = decode(fields, KEYS.stream("bot"), entry_id)
            await store.insert_events([event])
            return event
    raise AssertionError(f"{event_id} not in the stream")


async def trail_of(store: ArchiveStore, event: Event) -> dict[str, GroupTrail]:
    trails = await store.deliveries.trail(event.id, event.timestamp, event.type)
    return {t.group: t for t in trails}


async def test_each_group_s_outcome_is_in_the_trail_and_a_silent_one_is_missed(
    bus_factory: BusFactory, archive: ArchiveStore, pipeline: DeliveriesCopier
) -> None:
    """Alice handles both orders, bob dead-letters the refund and skips the small order
    by its where conditions, dave is subscribed and never runs: the trail lists alice's
    two handled deliveries with her consumer and handler time, bob's dead-lettered and
    skipped ones, and dave as expected and not handled; the missed count names dave."""
    for name, conditions in (("alice", None), ("bob", {"total": {"gt": 10}}), ("dave", None)):
        await archive.upsert_subscriptions(name, [("order.#", conditions)])
    alice, bob = await bot(bus_factory, "alice"), await bot(bus_factory, "bob")

    @alice.subscribe("order.#")
    async def note(event: Event) -> None:
        await asyncio.sleep(0.01)

    @bob.subscribe("order.#", where={"total": {"gt": 10}}, retry=ONCE)
    async def refuse(event: Event) -> None:
        if event.type == "order.refunded":
            raise RuntimeError("refunds are not ours")

    publisher = await bus_factory("shop", outbox=False)
    small = await publisher.publish("order.placed", {"total": 5})
    refund = await publisher.publish("order.refunded", {"total": 50})
    async with running(alice, bob):
        await wait_until(lambda: _rows(archive, 4), what="four records in PostgreSQL")
    placed, refunded = await archived(archive, alice, small), await archived(archive, alice, refund)

    first = await trail_of(archive, placed)
    assert sorted(first) == ["bot-group-alice", "bot-group-bob", "bot-group-dave"]
    assert first["bot-group-alice"].status == "handled"
    (handled,) = first["bot-group-alice"].outcomes
    assert handled.consumer == "alice-0" and handled.attempts == 1 and handled.handler_ms >= 10
    assert handled.read_at <= handled.done_at <= datetime.now(UTC)
    assert first["bot-group-bob"].status == "skipped"
    assert first["bot-group-dave"].expected and first["bot-group-dave"].status == "not handled"

    second = await trail_of(archive, refunded)
    assert second["bot-group-bob"].status == "dead_lettered"
    assert [o.outcome for o in second["bot-group-bob"].outcomes] == ["dead_lettered"]

    since = placed.timestamp - timedelta(seconds=1)
    missed = await archive.deliveries.missed(since, datetime.now(UTC))
    assert missed == {"bot-group-dave": 2}


async def test_expected_groups_follow_the_subscriptions_declared_at_the_time(
    bus_factory: BusFactory, archive: ArchiveStore
) -> None:
    """Dave declares order.# and later withdraws it; erin declares it only after the first
    event: the first event was expected of dave alone, the second of erin alone. Declaring
    the same again changes no history; changing the conditions starts a new row."""
    publisher = await bus_factory("shop", outbox=False)
    await archive.upsert_subscriptions("dave", [("order.#", None)])
    first = await publisher.publish("order.placed", {})
    await archive.upsert_subscriptions("dave", [])
    await archive.upsert_subscriptions("erin", [("order.*", None)])
    await archive.upsert_subscriptions("erin", [("order.*", None)])
    second = await publisher.publish("order.placed", {})
    placed, later = (
        await archived(archive, publisher, first),
        await archived(archive, publisher, second),
    )
    assert [(t.group, t.expected) for t in (await trail_of(archive, placed)).values()] == [
        ("bot-group-dave", True)
    ]
    assert [(t.group, t.status) for t in (await trail_of(archive, later)).values()] == [
        ("bot-group-erin", "not handled")
    ]
    await archive.upsert_subscriptions("erin", [("order.*", {"total": {"gt": 1}})])
    async with archive.connection() as conn:
        rows = await conn.fetch(
            "SELECT subscriber, valid_to IS NULL AS open FROM subscription_history "
            "ORDER BY subscriber, valid_from"
        )
    assert [(r["subscriber"], r["open"]) for r in rows] == [
        ("dave", False),
        ("erin", False),
        ("erin", True),
    ]


async def test_an_archived_id_that_is_no_uuid_is_expected_and_never_an_error(
    archive: ArchiveStore,
) -> None:
    """An entry written with a 36-character id that is no UUID (the wire takes it as is) is
    archived under it: its trail lists the subscribed group as not handled, and the
    missed count counts it, instead of PostgreSQL refusing the cast."""
    await archive.upsert_subscriptions("dave", [("order.#", None)])
    odd = Event("order.placed", {}, "shop", id="z" * 36, stream=KEYS.stream("bot"), entry_id="1-0")
    await archive.insert_events([odd])
    trail = await trail_of(archive, odd)
    assert [(t.group, t.status) for t in trail.values()] == [("bot-group-dave", "not handled")]
    since = odd.timestamp - timedelta(seconds=1)
    assert await archive.deliveries.missed(since, datetime.now(UTC)) == {"bot-group-dave": 1}


async def test_records_are_stamped_with_the_bot_s_own_group(
    bus_factory: BusFactory, admin: Redis, archive: ArchiveStore, pipeline: DeliveriesCopier
) -> None:
    """A bot writing records in another group's name (or with no group) into its outbox:
    they are stored as its own group's."""
    forged = [["handled", "0190d5b6-6a8b-7c3d-8e4f-0a1b2c3d4e5f", 1_733_000_000_000_000,
               "1-0", 1, 1_733_000_000_000, 1_733_000_000_001, 0.5, "", 0]]  # fmt: skip
    await admin.xadd(
        KEYS.outbox("alice"),
        {
            DELIVERIES_MARK: "1",
            "group": "bot-group-bob",
            "consumer": "c",
            "records": orjson.dumps(forged),
        },
    )
    await wait_until(lambda: _rows(archive, 1), what="the record stored")
    async with archive.connection() as conn:
        assert await conn.fetchval("SELECT bot FROM deliveries") == "alice"


async def test_hostile_entries_are_dropped_and_hold_nothing_up(
    admin: Redis, archive: ArchiveStore, link: ArchiveLink
) -> None:
    """Entries anyone with the admin login could write: not records at all, bad JSON,
    a group that is no bot's, and records with every field wrong; each bad one is dropped
    (counted, logged), the good record among them is stored, and the stream is emptied."""
    good = ["handled", "0190d5b6-6a8b-7c3d-8e4f-0a1b2c3d4e5f", 1_733_000_000_000_000, "1-0",
            1, 1_733_000_000_000, 1_733_000_000_001, 0.5, "", 0]  # fmt: skip
    bad_records = [
        "not a list", [1, 2], ["maybe", *good[1:]], [good[0], "no-uuid", *good[2:]],
        [*good[:2], -5, *good[3:]], [*good[:3], "1-x", *good[4:]], [*good[:4], 0, *good[5:]],
        [*good[:5], "soon", *good[6:]], [*good[:7], -1.0, *good[8:]],
        [*good[:8], "a\x00b", good[9]], [*good[:9], 7], [*good[:4], True, *good[5:]],
    ]  # fmt: skip
    key = KEYS.deliveries()
    for fields in (
        {"hello": "world"},
        {"group": "bot-group-x", "consumer": "c", "records": "not json"},
        {"group": "archiver", "consumer": "c", "records": "[]"},
        {b"\xff": b"\xfe"},
    ):
        await admin.xadd(key, fields)  # type: ignore[arg-type]
    await admin.xadd(
        key,
        {"group": "bot-group-x", "consumer": "x-0", "records": orjson.dumps([*bad_records, good])},
    )
    copier = DeliveriesCopier(admin, KEYS, link.get)
    async with in_background(copier.run()):
        await wait_until(lambda: _rows(archive, 1), what="the good record stored")
        await wait_until(lambda: _length(admin, 0), what="every entry acked and deleted")
    assert copier.dropped == 4 + len(bad_records)
    assert copier.copied == 1


async def test_postgres_away_delays_the_records_and_loses_none(
    bus_factory: BusFactory,
    admin: Redis,
    link: ArchiveLink,
    postgres_server: PostgresServer,
    pipeline: DeliveriesCopier,
) -> None:
    """PostgreSQL stops while a bot handles 30 events: the records wait in Redis (a batch
    kept pending); once it is back each event has exactly one handled record."""
    async with await ArchiveStore.connect(postgres_server.dsn) as store:
        await store.migrate()
    alice = await bot(bus_factory, "alice")
    seen: list[str] = []

    @alice.subscribe("order.#")
    async def note(event: Event) -> None:
        seen.append(event.id)

    await postgres_server.stop()
    publisher = await bus_factory("shop", outbox=False)
    async with running(alice):
        ids = [await publisher.publish("order.placed", {"n": n}) for n in range(30)]
        await wait_until(lambda: len(seen) == 30, what="all handled")

        async def held() -> bool:
            summary: Any = await admin.xpending(KEYS.deliveries(), DELIVERIES_GROUP)
            return int(summary["pending"]) >= 1

        await wait_until(held, 20, "a batch read and kept pending")
        await postgres_server.start()
        await wait_until(lambda: _length(admin, 0), 30, "every record copied")
    async with await ArchiveStore.connect(postgres_server.dsn) as store, store.connection() as conn:
        rows = await conn.fetch("SELECT event_id, outcome FROM deliveries")
    assert sorted(str(r["event_id"]) for r in rows) == sorted(ids)
    assert {r["outcome"] for r in rows} == {"handled"}


async def test_deliveries_are_dropped_with_their_day_of_events(
    archive: ArchiveStore, admin: Redis, link: ArchiveLink
) -> None:
    """Records of events from three days ago and of today: retention's cut at yesterday
    drops the old day's events and deliveries partitions together and keeps today's."""
    now = datetime.now(UTC)
    old = now - timedelta(days=3)
    key = KEYS.deliveries()
    for moment, event_id in ((old, "0190d5b6-6a8b-7c3d-8e4f-0a1b2c3d4e51"),
                             (now, "0190d5b6-6a8b-7c3d-8e4f-0a1b2c3d4e52")):  # fmt: skip
        micros = int(moment.timestamp() * 1_000_000)
        record = ["handled", event_id, micros, "1-0", 1, micros / 1000, micros / 1000, 1.0, "", 0]
        await admin.xadd(key, {"group": "bot-group-x", "consumer": "x-0",
                               "records": orjson.dumps([record])})  # fmt: skip
    async with in_background(DeliveriesCopier(admin, KEYS, link.get).run()):
        await wait_until(lambda: _rows(archive, 2), what="both stored")
    dropped = await archive.drop_partitions_before((now - timedelta(days=1)).date())
    assert f"deliveries_{old:%Y%m%d}" in dropped
    async with archive.connection() as conn:
        ids = [str(r["event_id"]) for r in await conn.fetch("SELECT event_id FROM deliveries")]
    assert ids == ["0190d5b6-6a8b-7c3d-8e4f-0a1b2c3d4e52"]


async def _rows(store: ArchiveStore, n: int) -> bool:
    async with store.connection() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM deliveries")) >= n


async def _length(redis: Redis, n: int) -> bool:
    return int(await redis.xlen(KEYS.deliveries())) == n
