"""The archiver under faults: hostile bytes, PostgreSQL refusing for its own reasons, Redis away.

The rule it keeps: an entry is acked only once its row is committed or its dead letter is
stored. A server problem (a full disk, a read-only server, a timeout, a deadlock) holds the
batch in Redis; only PostgreSQL refusing the data itself sets a row aside, into the
dead-letter stream, where an operator can list and retry it.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bus.archive import ArchiveStore
from bus.connection import connect
from bus.dlq import DeadLetters
from bus.keys import ARCHIVER_GROUP
from bus.settings import BusSettings
from manager.archive.archiver import Archiver
from manager.archive.link import ArchiveLink
from manager.config import ArchiveSettings
from manager.embedded.postgres_server import PostgresServer
from manager.embedded.redis_server import RedisServer
from tests.conftest import BusFactory
from tests.manager.archive.archive_support import (
    KEYS,
    archived,
    archiving,
    caught_up,
    id_counts,
    make_archiver,
    pending_ids,
    publish,
    running,
)
from tests.support import redis_client, wait_until
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

# $1 ignored. A trigger function that refuses every row with the SQLSTATE in TG_ARGV[0].
_REFUSE = """
CREATE FUNCTION refuse_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'refused for the test' USING ERRCODE = TG_ARGV[0];
END $$;
"""


async def ids_stored(conn: Any) -> dict[str, int]:
    """How many rows each event id has in ``events``."""
    rows = await conn.fetch("SELECT id, count(*) AS n FROM event_index GROUP BY id")
    return {row["id"]: row["n"] for row in rows}


class TestHostileBytes:
    async def test_entry_that_is_not_utf8_is_dead_lettered_with_its_bytes(
        self,
        admin: Redis,
        link: ArchiveLink,
        bus_factory: BusFactory,
        redis_url: str,
        postgres_server: PostgresServer,
    ) -> None:
        """An entry whose names and values are not UTF-8 (redis-cli writes any bytes) does
        not stop the archiver: it is dead-lettered as malformed with its exact bytes, the
        events around it are stored, every entry is acked, and XINFO still reads the
        stream (it failed to decode there before)."""
        producer = await bus_factory("producer")
        good = await publish(producer, 5)
        hostile = {b"type": b"user.note.added", b"so\xffurce": b"x", b"data": b'{"a": "\xfe"}'}
        raw = redis_client(redis_url)
        try:
            added: Any = await raw.xadd(KEYS.stream("user"), hostile)  # type: ignore[arg-type]
            hostile_id = added.decode()
        finally:
            await raw.aclose()
        good += await publish(producer, 5, start=5)
        archiver, archive = make_archiver(admin, link), await link.get()
        async with archiving(archiver) as task:
            await wait_until(lambda: archived(archive, len(good), running(task)), what="events")
            await wait_until(lambda: caught_up(admin), what="every entry acked")
            assert not task.done()
        assert await id_counts(postgres_server.dsn) == {e.id: 1 for e in good}
        (letter,) = await DeadLetters(admin, KEYS).list()
        assert (letter.reason, letter.group) == ("malformed", "archiver")
        assert letter.entry_id == hostile_id and letter.raw_entry() == hostile
        info: Any = await admin.xinfo_stream(KEYS.stream("user"))  # it raised on the bytes
        assert info["length"] >= 1

    async def test_data_over_max_event_bytes_is_dead_lettered_like_consumers_do(
        self,
        admin: Redis,
        link: ArchiveLink,
        bus_factory: BusFactory,
        postgres_server: PostgresServer,
    ) -> None:
        """A data field over max_event_bytes (a raw XADD, or a producer in another language)
        is not stored: the archiver dead-letters it as malformed, as every bot's consumer
        does, and the events around it are stored."""
        producer = await bus_factory("producer")
        good = await publish(producer, 3)
        limit = producer.settings.max_event_bytes
        huge = '{"pad": "' + "x" * limit + '"}'
        fields = {"type": "user.note.added", "source": "cli", "data": huge}
        hostile_id = await admin.xadd(KEYS.stream("user"), fields)  # type: ignore[arg-type]
        good += await publish(producer, 3, start=3)
        settings = ArchiveSettings(fill_wait=0.05)
        archiver = Archiver(admin, KEYS, settings, link.get, max_data_bytes=limit)
        archive = await link.get()
        async with archiving(archiver) as task:
            await wait_until(lambda: archived(archive, len(good), running(task)), what="events")
            await wait_until(lambda: caught_up(admin), what="every entry acked")
        assert await id_counts(postgres_server.dsn) == {e.id: 1 for e in good}
        (letter,) = await DeadLetters(admin, KEYS).list()
        assert (letter.reason, letter.group, letter.entry_id) == (
            "malformed",
            "archiver",
            hostile_id,
        )
        assert f"over the limit of {limit}" in letter.error


#: SQLSTATEs of the server's trouble, not the row's: each must hold the batch in Redis.
SERVER_TROUBLE = {
    "53100": "disk full",
    "53200": "out of memory",
    "25006": "read-only transaction (a failover, a standby)",
    "57014": "statement timeout",
    "40P01": "deadlock",
    "55P03": "lock not available",
    "58030": "I/O error",
    "XX000": "internal error",
}


class TestServerTrouble:
    @pytest.mark.parametrize("sqlstate", SERVER_TROUBLE, ids=list(SERVER_TROUBLE.values()))
    async def test_server_trouble_holds_the_batch_in_redis_until_it_is_fixed(
        self,
        admin: Redis,
        link: ArchiveLink,
        bus_factory: BusFactory,
        superuser: Any,
        sqlstate: str,
    ) -> None:
        """While PostgreSQL fails every write with a server-side SQLSTATE, nothing is acked,
        dead-lettered or counted unarchivable; the archiver says it is failing; once the
        fault is gone every event is stored exactly once and acked."""
        producer = await bus_factory("producer")
        good = await publish(producer, 20)
        archive = await link.get()  # migrated: the table to put a trigger on exists
        await superuser.execute(_REFUSE)
        await superuser.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON event_heads FOR EACH ROW "
            f"EXECUTE FUNCTION refuse_rows('{sqlstate}')"
        )
        archiver = make_archiver(admin, link)
        async with archiving(archiver) as task:
            await wait_until(lambda: not archiver.healthy, what="the archiver failing")
            assert sqlstate in (archiver.last_error or "")
            held = await pending_ids(admin)
            assert sum(len(ids) for ids in held.values()) == len(good)
            assert not await caught_up(admin)
            assert await DeadLetters(admin, KEYS).count() == 0
            assert archiver.stats["unarchivable"] == archiver.stats["archived"] == 0
            await superuser.execute("DROP TRIGGER refuse ON event_heads")
            await wait_until(lambda: archived(archive, len(good), running(task)), what="stored")
            await wait_until(lambda: caught_up(admin), what="every entry acked")
        assert await ids_stored(superuser) == {e.id: 1 for e in good}
        assert archiver.healthy and archiver.stats["unarchivable"] == 0

    async def test_a_read_only_server_holds_the_batch(
        self,
        admin: Redis,
        link: ArchiveLink,
        bus_factory: BusFactory,
        superuser: Any,
    ) -> None:
        """default_transaction_read_only on the server (what a failover to a replica looks
        like to the archiver's open connections) keeps the events in Redis, not acked."""
        producer = await bus_factory("producer")
        first = await publish(producer, 5)
        archiver, archive = make_archiver(admin, link), await link.get()
        async with archiving(archiver) as task:
            await wait_until(lambda: archived(archive, 5, running(task)), what="first events")
            await superuser.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            await superuser.execute("SELECT pg_reload_conf()")
            try:
                later = await publish(producer, 5, start=5)
                await wait_until(lambda: not archiver.healthy, what="the archiver failing")
                assert "25006" in (archiver.last_error or "")
                assert sum(len(ids) for ids in (await pending_ids(admin)).values()) >= 1
                assert await DeadLetters(admin, KEYS).count() == 0
            finally:
                await superuser.execute("ALTER SYSTEM RESET default_transaction_read_only")
                await superuser.execute("SELECT pg_reload_conf()")
            await wait_until(lambda: archived(archive, 10, running(task)), what="all stored")
            await wait_until(lambda: caught_up(admin), what="every entry acked")
        assert await ids_stored(superuser) == {e.id: 1 for e in first + later}


class TestLostReply:
    async def test_entries_a_lost_read_reply_held_are_archived_at_once(
        self,
        admin: Redis,
        link: ArchiveLink,
        bus_factory: BusFactory,
        redis_server: RedisServer,
        postgres_server: PostgresServer,
    ) -> None:
        """Entries Redis handed the archiver in a reply its connection lost (pending under
        its name, never received) are archived as soon as it reads again, once each, not
        after ``claim_idle``."""
        url = urlsplit(redis_server.url)
        proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 6379)
        proxied = connect(BusSettings(redis_url=await proxy.start()))
        try:
            producer = await bus_factory("producer")
            first = await publish(producer, 3)
            archiver, archive = make_archiver(proxied, link, claim_idle=60.0), await link.get()
            with capture_logs() as logs:
                async with archiving(archiver) as task:
                    await wait_until(lambda: archived(archive, 3, running(task)), what="first")
                    proxy.lose_next_reply(b"XREADGROUP")
                    later = await publish(producer, 3, start=3)
                    await asyncio.wait_for(proxy.lost.wait(), timeout=10)
                    await wait_until(
                        lambda: archived(archive, 6, running(task)),
                        timeout=10,
                        what="the lost reply's events",
                    )
                    await wait_until(lambda: caught_up(admin), what="every entry acked")
            assert await id_counts(postgres_server.dsn) == {e.id: 1 for e in first + later}
            assert "took again the entries a lost read reply held" in [e["event"] for e in logs]
        finally:
            await proxied.aclose()
            await proxy.close()


@pytest.mark.slow
class TestRedisAway:
    async def test_redis_down_longer_than_its_retries_does_not_end_the_archiver(
        self,
        admin: Redis,
        archive: ArchiveStore,
        link: ArchiveLink,
        bus_factory: BusFactory,
        redis_server: RedisServer,
    ) -> None:
        """Redis stopped for longer than redis-py's retry budget: the archiver logs, keeps
        running, and archives what is published once Redis is back from its AOF."""
        producer = await bus_factory("producer")
        first = await publish(producer, 5)
        archiver, archive = make_archiver(admin, link), await link.get()
        with capture_logs() as logs:
            async with archiving(archiver) as task:
                await wait_until(lambda: archived(archive, 5, running(task)), what="first events")
                await redis_server.stop()
                await asyncio.sleep(6)  # the outage: longer than the client's retries (~3 s)
                assert not task.done()
                await redis_server.start()
                later = await publish(producer, 5, start=5)
                await wait_until(lambda: archived(archive, 10, running(task)), what="after")
                await wait_until(lambda: caught_up(admin), what="every entry acked")
        assert {e["event"] for e in logs} & {
            "archiver stopped on an error; starting over",
            "redis unavailable; the archiver waits",
        }
        stored = await archive.count()
        assert stored == len(first + later)


def test_archiver_group_name_is_what_the_trimmer_reads() -> None:
    """The dead letters the archiver writes name its group, which the trimmer and the
    operator see (``multibot dlq list``)."""
    assert ARCHIVER_GROUP == "archiver"
