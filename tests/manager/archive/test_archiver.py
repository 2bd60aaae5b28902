"""The archiver: every event into PostgreSQL exactly once, across crashes and outages.

The issue's acceptance tests, on a private Redis (7.0 and 6.2) and PostgreSQL per test. The
archiver runs in this process, except where it must die by SIGKILL: then it runs as
``tests/manager/archive/archiver_proc.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import orjson
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bus import BusClient, DeadLetterReason, Event
from bus.archive import ArchiveStore
from bus.dlq import DeadLetters
from bus.wire import encode
from manager.archive.link import ArchiveLink
from manager.embedded.postgres_server import PostgresServer
from tests.conftest import BusFactory
from tests.manager.archive.archive_support import (
    KEYS,
    archived,
    archiving,
    backlog,
    caught_up,
    id_counts,
    make_archiver,
    pending_ids,
    positions,
    publish,
    running,
)
from tests.manager.archive.archiver_procs import (
    ArchiverProc,
    ArchiverProcs,
    producing,
)
from tests.support import entries, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

#: Entries no producer of ours writes: each fails to decode as an event for its own reason.
GARBAGE: tuple[dict[str, str], ...] = (
    {"hello": "world"},
    {"type": "user.note.added", "source": "x", "data": "{not json"},
    {"type": "User Message", "source": "x", "data": "{}"},
    {"type": "user.note.added", "source": "", "data": "{}"},
    {"type": "user.note.added", "source": "x", "data": "[1, 2]"},
    {"wire": "2", "type": "user.note.added", "source": "x", "data": "{}"},
    {"type": "user.note.added", "source": "x", "data": "{}", "id": "not-a-uuid"},
    {"type": "user.note.added", "source": "x", "data": "{}", "timestamp": "yesterday"},
    {"type": "user.note.added", "source": "x", "data": "{}", "version": "two"},
)


def wire_fields(**changed: str) -> dict[str, str]:
    """An entry as our publisher writes it (every field, in wire order), with ``changed``."""
    event = Event(type="user.note.added", data={}, source="x")
    fields = {k: v.decode() if isinstance(v, bytes) else v for k, v in encode(event).items()}
    return {**fields, **changed}


#: The same faults in entries that otherwise look like ours (the archiver's fast path).
WIRE_ORDER_GARBAGE = tuple(wire_fields(**fields) for fields in GARBAGE[1:])


# -- helpers --------------------------------------------------------------------------------


async def all_archived(store: ArchiveStore) -> list[Event]:
    """Every archived event, paging through ``query``."""
    found: list[Event] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.query(after=cursor, limit=500)
        found.extend(page)
        if cursor is None:
            return found


async def dead_letter_rows(dsn: str) -> list[Mapping[str, Any]]:
    """The rows of ``dead_letters``, by id."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return list(await conn.fetch("SELECT * FROM dead_letters ORDER BY id"))
    finally:
        await conn.close()


async def dead_letter_events(bus: BusClient, events: list[Event]) -> list[str]:
    """Dead-letter these published events as a failing handler would; the dead letter ids."""
    where = await positions(bus.redis)
    ids = []
    for event in events:
        stream, entry_id = where[event.id]
        ((_, fields),) = await entries(bus.redis, stream, entry_id, entry_id)
        ids.append(
            await bus.dlq.add(
                fields=fields,
                reason=DeadLetterReason.HANDLER_ERROR,
                error=f"ValueError: boom {event.id}",
                stream=stream,
                entry_id=entry_id,
                group="bot-group-worker",
                consumer="worker-0",
                handler="handle",
                attempts=3,
                traceback="Traceback (most recent call last): ...",
            )
        )
    return ids


# -- tests ----------------------------------------------------------------------------------


class TestArchiving:
    async def test_every_event_and_dead_letter_is_stored_once_with_every_field(
        self,
        admin: Redis,
        archive: ArchiveStore,
        link: ArchiveLink,
        bus_factory: BusFactory,
        postgres_server: PostgresServer,
    ) -> None:
        """2,000 events over three streams, published before and while the archiver runs,
        are each stored once with every field as read from Redis; dead letters land in
        dead_letters; then the archiver group has nothing pending or unread."""
        producer = await bus_factory("producer")
        events = await publish(producer, 1000)
        letters = await dead_letter_events(producer, events[:3])
        archiver = make_archiver(admin, link, batch_size=300)
        async with archiving(archiver) as task:
            events += await publish(producer, 1000, start=1000)
            await wait_until(
                lambda: archived(archive, 2000, running(task)), timeout=20, what="2000 archived"
            )
            await wait_until(lambda: caught_up(admin), what="every entry acked")

        counts = await id_counts(postgres_server.dsn)
        assert len(counts) == 2000 and set(counts.values()) == {1}
        where = await positions(admin)
        expected = {e.id: e.with_delivery(*where[e.id]) for e in events}
        stored = {e.id: e for e in await all_archived(archive)}
        assert stored.keys() == expected.keys()
        assert stored[events[1].id] == expected[events[1].id]  # a readable diff for one
        assert [i for i, e in stored.items() if e != expected[i]] == []
        assert {KEYS.stream_name(e.stream or "") for e in stored.values()} == {
            "user",
            "bot",
            "system",
        }
        for name in ("user", "bot", "system"):
            stream_entries = await entries(admin, KEYS.stream(name))
            assert await archive.last_archived(name) == stream_entries[-1][0]
        assert archiver.stats["archived"] == 2000
        assert (archiver.stats["dead_letters"], archiver.stats["skipped"]) == (3, 0)
        assert archiver.healthy and archiver.last_error is None

        rows = await dead_letter_rows(postgres_server.dsn)
        assert [row["id"] for row in rows] == sorted(letters)
        for row, letter in zip(rows, await producer.dlq.list(), strict=True):
            assert (row["id"], row["event_id"], row["type"], row["reason"]) == (
                letter.id,
                letter.event_id,
                letter.type,
                "handler_error",
            )
            assert (row["error"], row["traceback"], row["attempts"]) == (
                letter.error,
                letter.traceback,
                3,
            )
            assert (row["group_name"], row["consumer"], row["handler"]) == (
                "bot-group-worker",
                "worker-0",
                "handle",
            )
            assert (row["stream"], row["entry_id"]) == (letter.stream, letter.entry_id)
            assert row["failed_at"] == datetime.fromisoformat(letter.failed_at)
            assert orjson.loads(row["entry"]) == dict(letter.fields)

    async def test_event_retried_from_the_dead_letters_is_stored_once(
        self,
        admin: Redis,
        archive: ArchiveStore,
        link: ArchiveLink,
        bus_factory: BusFactory,
        postgres_server: PostgresServer,
    ) -> None:
        """A dead letter retried into its stream (the same event id and time in a second
        entry) is stored once, whether both entries come in one batch or the original was
        archived before the retry."""
        producer = await bus_factory("producer")
        first, second = await publish(producer, 2)
        (letter,) = await dead_letter_events(producer, [first])
        await producer.dlq.retry(letter)  # both entries of `first` wait in one batch
        archiver = make_archiver(admin, link)
        async with archiving(archiver) as task:
            await wait_until(lambda: archived(archive, 2, running(task)), what="2 archived")
            await wait_until(lambda: caught_up(admin), what="every entry acked")
            (letter,) = await dead_letter_events(producer, [second])
            await producer.dlq.retry(letter)  # `second` was archived before this copy
            await wait_until(lambda: caught_up(admin), what="the retried copy acked")
        assert await id_counts(postgres_server.dsn) == {first.id: 1, second.id: 1}
        assert archiver.stats["archived"] == 2


class TestArchiverCrash:
    async def test_exactly_once_across_restarts_and_sigkills_mid_batch(
        self,
        admin: Redis,
        archive: ArchiveStore,
        bus_factory: BusFactory,
        archiver_procs: ArchiverProcs,
        postgres_server: PostgresServer,
    ) -> None:
        """Under continuous publishing, an archiver process SIGKILLed with a batch in flight
        and started again, three times over, ends with every published event stored
        exactly once and nothing pending; SIGTERM then stops it cleanly."""
        producer = await bus_factory("producer")
        published = [e.id for e in await publish(producer, 30)]  # every stream exists
        in_flight: list[int] = []

        async def archiving_proc() -> ArchiverProc:
            """A new archiver process, once it has stored 200 more events."""
            proc = await archiver_procs(batch_size=50)
            floor = await archive.count()
            await wait_until(
                lambda: archived(archive, floor + 200, proc.check_alive),
                timeout=15,
                what="archiving under load",
            )
            return proc

        async with producing(producer, published):
            for _ in range(3):
                proc = await archiving_proc()
                in_flight.append(await proc.kill_mid_batch(admin))
            final = await archiving_proc()
        await wait_until(
            lambda: archived(archive, len(published), final.check_alive),
            timeout=20,
            what=f"all {len(published)} archived",
        )
        await wait_until(lambda: caught_up(admin), what="every entry acked")
        assert await final.terminate() == 0

        assert all(in_flight), f"a kill hit no batch in flight: {in_flight}"
        counts = await id_counts(postgres_server.dsn)
        assert [i for i, n in counts.items() if n > 1] == []
        assert counts.keys() == set(published)
        assert len(published) == len(set(published))
        assert await archive.count() == len(published)


class TestPostgresOutage:
    async def test_events_wait_in_redis_while_postgres_is_down_then_are_stored_once(
        self,
        admin: Redis,
        archive: ArchiveStore,
        link: ArchiveLink,
        bus_factory: BusFactory,
        postgres_server: PostgresServer,
    ) -> None:
        """With PostgreSQL stopped under load the archiver turns unhealthy with the error
        and acks nothing (what it read stays pending, the rest unread); once PostgreSQL is
        back every event is stored, none twice, and it is healthy again."""
        producer = await bus_factory("producer")
        published = [e.id for e in await publish(producer, 300)]
        archiver = make_archiver(admin, link, batch_size=100)
        with capture_logs() as logs:
            async with archiving(archiver) as task:
                await wait_until(lambda: archived(archive, 300, running(task)), what="archiving")
                async with producing(producer, published):
                    await postgres_server.stop()
                    await wait_until(lambda: not archiver.healthy, what="the archiver unhealthy")
                    assert archiver.last_error is not None
                    assert archiver.status().healthy is False
                    # The write in flight at the stop may fail otherwise; the retries then
                    # meet a closed port and say what to do.
                    await wait_until(
                        lambda: (archiver.last_error or "").startswith("ArchiveUnavailableError"),
                        what="retries failing as PostgreSQL unavailable",
                    )
                    held = await pending_ids(admin)
                    assert sum(map(len, held.values())) > 0
                    waiting, mark = sum(await backlog(admin)), len(published)
                    await wait_until(lambda: len(published) >= mark + 300, what="load while down")
                    published_meanwhile = len(published) - mark
                    assert not archiver.healthy
                    later = await pending_ids(admin)  # it may read ahead, but acks nothing:
                    assert all(set(ids) <= set(later[stream]) for stream, ids in held.items())
                    assert sum(await backlog(admin)) >= waiting + published_meanwhile
                    await postgres_server.start()
                    mark = len(published)
                    await wait_until(
                        lambda: archived(archive, mark, running(task)), timeout=20, what="resumed"
                    )
                await wait_until(
                    lambda: archived(archive, len(published), running(task)),
                    timeout=20,
                    what=f"all {len(published)} archived",
                )
                await wait_until(lambda: caught_up(admin), what="every entry acked")
        assert archiver.healthy and archiver.last_error is None
        counts = await id_counts(postgres_server.dsn)
        assert [i for i, n in counts.items() if n > 1] == []
        assert counts.keys() == set(published)
        said = [e["event"] for e in logs if e.get("log_level") in ("error", "info")]
        assert said.count("cannot write to PostgreSQL: events stay in Redis and are retried") == 1
        assert said.count("PostgreSQL reachable again: archiving resumed") == 1


class TestMalformedEntries:
    async def test_malformed_entries_are_skipped_and_the_events_around_them_stored(
        self,
        admin: Redis,
        archive: ArchiveStore,
        link: ArchiveLink,
        bus_factory: BusFactory,
        postgres_server: PostgresServer,
    ) -> None:
        """Entries that are not events (raw XADDs) are dead-lettered as malformed by the
        archiver and acked, and the events before, between and after them are all stored;
        batches span both."""
        producer = await bus_factory("producer")
        good = await publish(producer, 10)
        garbage = []
        for n, fields in enumerate(GARBAGE + WIRE_ORDER_GARBAGE):
            stream = KEYS.stream(("user", "bot")[n % 2])
            garbage.append(str(await admin.xadd(stream, fields)))  # type: ignore[arg-type]
            good += await publish(producer, 2, start=100 + 2 * n)
        archiver = make_archiver(admin, link, batch_size=3)
        with capture_logs() as logs:
            async with archiving(archiver) as task:
                await wait_until(
                    lambda: archived(archive, len(good), running(task)), what="good events"
                )
                await wait_until(lambda: caught_up(admin), what="every entry acked")
        assert await id_counts(postgres_server.dsn) == {e.id: 1 for e in good}
        assert archiver.stats["skipped"] == len(GARBAGE) + len(WIRE_ORDER_GARBAGE)
        warned = [e for e in logs if e["event"] == "entry not archived: dead-lettered"]
        assert sorted(e["entry_id"] for e in warned) == sorted(garbage)
        letters = await DeadLetters(admin, KEYS).list(count=1000)
        assert sorted(letter.entry_id for letter in letters) == sorted(garbage)
        assert {(letter.reason, letter.group) for letter in letters} == {("malformed", "archiver")}
        assert archiver.healthy

    @pytest.mark.parametrize(
        "entry",
        [
            pytest.param(("user", {"version": "4294967296"}), id="event-version-beyond-int4"),
            pytest.param(("user", {"timestamp": "9999-12-31T12:00:00Z"}), id="event-in-9999"),
            pytest.param(("wire", {"version": "4294967296"}), id="ours-version-beyond-int4"),
            pytest.param(("dlq", {"attempts": "4294967296"}), id="dead-letter-beyond-int4"),
        ],
    )
    async def test_entry_postgres_cannot_store_does_not_block_the_entries_after_it(
        self,
        admin: Redis,
        archive: ArchiveStore,
        link: ArchiveLink,
        bus_factory: BusFactory,
        entry: tuple[str, dict[str, str]],
    ) -> None:
        """An entry that decodes but can never be stored (a version or attempt count beyond
        the integer column, a time with no possible partition) is dead-lettered as
        unarchivable (a dead letter itself stays in the dead-letter stream): the entries
        after it are stored and acked and the archiver stays healthy."""
        stream, fields = entry
        producer = await bus_factory("producer")
        good = await publish(producer, 3)
        raw = {"type": "user.note.added", "source": "x", "data": "{}", **fields}
        if stream == "wire":  # every field, in wire order: the fast path takes it
            stream, raw = "user", wire_fields(**fields)
        key = KEYS.dead_letters() if stream == "dlq" else KEYS.stream(stream)
        await admin.xadd(key, raw)  # type: ignore[arg-type]
        good += await publish(producer, 3, start=3)
        archiver = make_archiver(admin, link)
        async with archiving(archiver) as task:

            async def settled() -> bool:  # stored, or failing: no waiting out a timeout
                return not archiver.healthy or (
                    await archived(archive, 6, running(task)) and await caught_up(admin)
                )

            await wait_until(settled, what="archived or failing")
            assert archiver.healthy, archiver.last_error
        assert await archive.count() == len(good)
        letters = await DeadLetters(admin, KEYS).list()
        if stream == "dlq":
            assert archiver.stats["unarchivable"] + archiver.stats["dead_letters"] == 1
        else:
            ((reason, group),) = {(letter.reason, letter.group) for letter in letters}
            assert (reason, group) == ("unarchivable", "archiver")
            assert archiver.stats["unarchivable"] == 1

    async def test_malformed_dead_letter_does_not_stop_the_archiver(
        self, admin: Redis, archive: ArchiveStore, link: ArchiveLink, bus_factory: BusFactory
    ) -> None:
        """A raw entry in the dead-letter stream whose attempts is not a number is skipped
        (or stored as it can be); the archiver keeps running and stores the events."""
        producer = await bus_factory("producer")
        await admin.xadd(KEYS.dead_letters(), {"event_id": "x", "attempts": "many"})
        good = await publish(producer, 3)
        archiver = make_archiver(admin, link)
        async with archiving(archiver) as task:

            async def settled() -> bool:
                return task.done() or await archive.count() >= 3

            await wait_until(settled, what="archived or stopped")
            assert not task.done()
            await wait_until(lambda: caught_up(admin), what="every entry acked")
        assert await archive.count() == len(good)
