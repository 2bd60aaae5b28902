"""The archiver and retention: an event older than ``archive.retention_days`` is not stored
into a partition the retention job drops within the hour; it is dead-lettered, saying why.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bus import BusClient, Event
from bus.archive import ArchiveStore
from bus.connection import connect
from bus.dlq import DeadLetters
from bus.settings import BusSettings
from bus.wire import DLQ_LINK_FIELD, TARGET_FIELD, encode
from manager.archive.link import ArchiveLink
from manager.archive.retention import cutoff_day
from manager.embedded.postgres_server import PostgresServer
from tests.conftest import BusFactory
from tests.manager.archive.archive_support import (
    KEYS,
    archived,
    archiving,
    caught_up,
    id_counts,
    make_archiver,
    pending_ids,
    positions,
    publish,
    running,
)
from tests.support import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

TOO_OLD = (
    "is older than archive.retention_days=7: it would be dropped; fix the publisher's clock "
    "or raise retention_days"
)


async def publish_at(bus: BusClient, *moments: datetime) -> list[Event]:
    """One event published (as a publisher with that clock would) at each moment."""
    events = [
        Event("user.note.added", {"n": n}, "skewed-clock", timestamp=moment)
        for n, moment in enumerate(moments)
    ]
    assert await bus.publish_many(events) == [e.id for e in events]
    return events


async def dead_letters_stored(redis: Redis, n: int) -> bool:
    """Whether the dead-letter stream holds ``n`` entries."""
    return (
        bool(await redis.exists(KEYS.dead_letters()))
        and await DeadLetters(redis, KEYS).count() == n
    )


class TestTooOld:
    async def test_an_event_older_than_retention_is_dead_lettered_not_stored(
        self,
        admin: Redis,
        archive: ArchiveStore,
        link: ArchiveLink,
        bus_factory: BusFactory,
        postgres_server: PostgresServer,
    ) -> None:
        """Events published 10 and 400 days ago (retention_days=7) are dead-lettered by the
        archiver as unarchivable, saying what to do, and acked; no partition is made for
        their days; the events around them and one at retention's edge are stored."""
        producer = await bus_factory("producer")
        now = datetime.now(UTC)
        good = await publish(producer, 3)
        old = await publish_at(producer, now - timedelta(days=10), now - timedelta(days=400))
        [edge] = await publish_at(producer, now - timedelta(days=7) + timedelta(minutes=1))
        good += await publish(producer, 3, start=3)
        archiver = make_archiver(admin, link, retention_days=7, batch_size=4)
        with capture_logs() as logs:
            async with archiving(archiver) as task:
                await wait_until(lambda: archived(archive, 7, running(task)), what="stored")
                await wait_until(lambda: dead_letters_stored(admin, 2), what="dead letters")
                await wait_until(lambda: caught_up(admin), what="every entry acked")
        assert await id_counts(postgres_server.dsn) == {e.id: 1 for e in [*good, edge]}
        oldest_kept = cutoff_day(now.date(), 7)
        assert min(await archive.partitions()) >= oldest_kept
        where = await positions(admin)
        letters = await DeadLetters(admin, KEYS).list()
        assert sorted((d.event_id, d.entry_id) for d in letters) == sorted(
            (e.id, where[e.id][1]) for e in old
        )
        for letter in letters:
            assert (letter.reason, letter.group) == ("unarchivable", "archiver")
            assert letter.error.startswith("timestamp "), letter.error
            assert TOO_OLD in letter.error
            assert oldest_kept.isoformat() in letter.error
            assert letter.event is not None  # the event as published, to retry later
        assert (archiver.stats["too_old"], archiver.stats["unarchivable"]) == (2, 2)
        assert archiver.stats["archived"] == 7 and archiver.healthy
        noted = [e for e in logs if e["event"] == "entry not archived: dead-lettered"]
        assert len(noted) == 2 and all(TOO_OLD in e["error"] for e in noted)

    async def test_a_retry_for_a_bot_is_only_acked(
        self, admin: Redis, archive: ArchiveStore, link: ArchiveLink, bus_factory: BusFactory
    ) -> None:
        """An old event retried from the dead letters for a bot's group (archived at its
        first delivery) is acked by the archiver without a dead letter of its own."""
        producer = await bus_factory("producer")
        old = Event("user.note.added", {}, "x", timestamp=datetime.now(UTC) - timedelta(days=9))
        fields = {**encode(old), TARGET_FIELD: "bot-group-notes/handle", DLQ_LINK_FIELD: "1-0"}
        await admin.xadd(KEYS.stream("user"), fields)  # type: ignore[arg-type]
        good = await publish(producer, 2)
        archiver = make_archiver(admin, link, retention_days=7)
        async with archiving(archiver) as task:
            await wait_until(lambda: archived(archive, 2, running(task)), what="stored")
            await wait_until(lambda: caught_up(admin), what="every entry acked")
        assert await archive.count() == len(good)
        assert (
            not await admin.exists(KEYS.dead_letters())
            or not await DeadLetters(admin, KEYS).count()
        )
        assert archiver.stats["too_old"] == archiver.stats["unarchivable"] == 0

    async def test_it_stays_pending_until_its_dead_letter_is_stored(
        self,
        admin: Redis,
        archive: ArchiveStore,
        link: ArchiveLink,
        bus_factory: BusFactory,
        redis_url: str,
    ) -> None:
        """While Redis refuses the dead letter (here: no permission to XADD), the too-old
        entry is not acked and not counted; once Redis takes it, with the next batch, it
        is dead-lettered and acked."""
        await admin.acl_setuser(
            "archiving",
            enabled=True,
            passwords=["+archiving-secret"],
            keys=["*"],
            channels=["*"],
            categories=["+@all"],
            commands=["-xadd"],
        )
        host = redis_url.removeprefix("redis://")
        settings = BusSettings(redis_url=f"redis://archiving:archiving-secret@{host}")
        limited = connect(settings, client_name="multibot-manager")
        producer = await bus_factory("producer")
        [old] = await publish_at(producer, datetime.now(UTC) - timedelta(days=30))
        good = await publish(producer, 2)
        archiver = make_archiver(limited, link, retention_days=7)
        try:
            async with archiving(archiver) as task:
                await wait_until(lambda: archived(archive, 2, running(task)), what="stored")

                async def held() -> bool:
                    return sum(map(len, (await pending_ids(admin)).values())) == 1

                await wait_until(held, what="the too-old entry held")
                assert not await dead_letters_stored(admin, 1)
                assert archiver.stats["too_old"] == 0
                await admin.acl_setuser("archiving", enabled=True, commands=["+xadd"])
                good += await publish(producer, 1, start=2)  # the next batch retries it
                await wait_until(lambda: dead_letters_stored(admin, 1), what="its dead letter")
                await wait_until(lambda: caught_up(admin), what="every entry acked")
        finally:
            await limited.aclose()
        [letter] = await DeadLetters(admin, KEYS).list()
        assert letter.event_id == old.id and TOO_OLD in letter.error
        assert archiver.stats["too_old"] == 1
        assert await archive.count() == len(good)


# A trigger function that refuses rows from the source TG_ARGV[0] as PostgreSQL refuses a
# row that fits no partition (SQLSTATE 23514, check_violation).
_NO_PARTITION = """
CREATE FUNCTION refuse_source() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT source FROM event_kinds WHERE id = NEW.kind_id) = TG_ARGV[0] THEN
        RAISE EXCEPTION 'no partition of relation "event_heads" found for row'
            USING ERRCODE = '23514';
    END IF;
    RETURN NEW;
END $$;
"""


class TestNoPartition:
    async def test_a_row_that_fits_no_partition_is_dead_lettered_saying_why(
        self,
        admin: Redis,
        link: ArchiveLink,
        bus_factory: BusFactory,
        superuser: Any,
    ) -> None:
        """A row PostgreSQL refuses as fitting no partition (its day's partition dropped
        while it was stored, by a retention with fewer days) is dead-lettered with its
        timestamp and what to do, not only PostgreSQL's words; the others are stored."""
        producer = await bus_factory("producer")
        archive = await link.get()  # migrated: the table to put a trigger on exists
        await superuser.execute(_NO_PARTITION)
        await superuser.execute(
            "CREATE TRIGGER no_partition BEFORE INSERT ON event_heads FOR EACH ROW "
            "EXECUTE FUNCTION refuse_source('skewed-clock')"
        )
        good = await publish(producer, 3)
        [lost] = await publish_at(producer, datetime.now(UTC) - timedelta(hours=1))
        archiver = make_archiver(admin, link, retention_days=7)
        async with archiving(archiver) as task:
            await wait_until(lambda: archived(archive, len(good), running(task)), what="stored")
            await wait_until(lambda: dead_letters_stored(admin, 1), what="its dead letter")
            await wait_until(lambda: caught_up(admin), what="every entry acked")
        [letter] = await DeadLetters(admin, KEYS).list()
        assert (letter.event_id, letter.reason) == (lost.id, "unarchivable")
        assert letter.error.startswith("timestamp "), letter.error
        assert "has no partition in the archive" in letter.error
        assert "same retention_days" in letter.error
        assert "23514" in letter.error  # PostgreSQL's own words follow
        assert (archiver.stats["unarchivable"], archiver.stats["too_old"]) == (1, 0)
