"""Operator actions on their way to ``audit_log``: through Redis, into PostgreSQL, none
lost to a PostgreSQL outage or held up by a hostile entry; listed, filtered, paged, aged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bus.archive import ArchiveStore
from manager.archive.link import ArchiveLink
from manager.audit import AUDIT_GROUP, AuditBuffer, AuditCopier, audit_key, record
from manager.embedded.postgres_server import PostgresServer
from tests.manager.archive.archive_support import KEYS
from tests.support import in_background, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def stored(dsn: str) -> int:
    """Rows in audit_log, on a connection of its own (PostgreSQL may have restarted)."""
    async with await ArchiveStore.connect(dsn) as store:
        return len(await store.audit.list(EPOCH, limit=1000))


async def test_records_reach_the_log_with_every_field_filtered_and_paged(
    admin: Redis, archive: ArchiveStore, link: ArchiveLink, postgres_server: PostgresServer
) -> None:
    """Two actions recorded: each stored with who, through what, what, on what, details
    and outcome, and gone from Redis; listed by actor, by action prefix, a page at a
    time, and deleted by age."""
    await record(admin, KEYS, actor="token:ops", channel="api", action="dlq.retry",
                 target="5-0", detail={"entry_id": "9-0"})  # fmt: skip
    await record(admin, KEYS, actor="user:root", channel="socket", action="reload",
                 outcome="refused", error="the config has an unknown key")  # fmt: skip
    async with in_background(AuditCopier(admin, KEYS, link.get).run()):
        await wait_until(lambda: _count_is(postgres_server.dsn, 2), what="both copied")
        await wait_until(lambda: _empty(admin), what="the stream emptied")
    rows = await archive.audit.list(EPOCH)
    assert [(r.actor, r.channel, r.action, r.target, r.outcome, r.error) for r in rows] == [
        ("token:ops", "api", "dlq.retry", "5-0", "ok", None),
        ("user:root", "socket", "reload", None, "refused", "the config has an unknown key"),
    ]
    assert rows[0].detail == {"entry_id": "9-0"}
    assert rows[0].at <= rows[1].at <= datetime.now(UTC)
    assert [r.action for r in await archive.audit.list(EPOCH, actor="user:root")] == ["reload"]
    assert [r.action for r in await archive.audit.list(EPOCH, action="dlq")] == ["dlq.retry"]
    first = await archive.audit.list(EPOCH, limit=1)
    rest = await archive.audit.list(EPOCH, after=(first[0].at, first[0].id))
    assert [r.id for r in first + rest] == [r.id for r in rows]
    assert await archive.audit.list(datetime.now(UTC) + timedelta(seconds=1)) == []
    assert await archive.audit.delete_before(datetime.now(UTC) + timedelta(seconds=1)) == 2


async def test_hostile_entries_are_dropped_and_hold_nothing_up(
    admin: Redis, archive: ArchiveStore, link: ArchiveLink, postgres_server: PostgresServer
) -> None:
    """Entries no recorder wrote (anyone with the admin login can XADD): not a record, an
    id that is no uuid, a NUL that PostgreSQL text refuses, detail that is no object; each
    is dropped with a log line, and the record behind them is stored."""
    key = audit_key(KEYS)
    good = {
        "at": datetime.now(UTC).isoformat(), "actor": "user:x", "channel": "cli",
        "action": "dlq.purge", "target": "", "detail": "{}", "outcome": "ok", "error": "",
    }  # fmt: skip
    hostile: list[dict[Any, Any]] = [
        {"hello": "world"},
        {**good, "id": "not-a-uuid"},
        {**good, "id": "6f1d5d34-0f38-4b0e-9a43-52b6a2c1f1aa", "actor": "user:\x00root"},
        {**good, "id": "0b5ad4b3-6c5e-4a4e-8d3a-2f0f5e8c9a10", "detail": "[1, 2]"},
        {**good, "id": "3c9d7c1e-2b7a-4f0e-8f5e-1d2c3b4a5f60", "outcome": "maybe"},
        {b"\xff\xfe": b"\x00\x01"},
        {"batch": "not json"},
        {"batch": '{"not": "a list"}'},
        {**good, "id": "5d7c1e2b-7a4f-4e8f-9e1d-2c3b4a5f6071", "actor": b"user:\xff\xfe"},
    ]
    for fields in hostile:
        await admin.xadd(key, fields)
    in_batch = {**good, "id": "9a0e6a53-1c7e-4c1f-9a57-0f3e1b2c4d5e"}
    await admin.xadd(key, {"batch": orjson.dumps([1, {"x": 1}, in_batch])})  # two bad, one not
    await record(admin, KEYS, actor="user:ops", channel="cli", action="dlq.purge")
    copier = AuditCopier(admin, KEYS, link.get)
    async with in_background(copier.run()):
        await wait_until(lambda: _count_is(postgres_server.dsn, 2), what="the good ones stored")
        await wait_until(lambda: _empty(admin), what="every entry acked and deleted")
    assert copier.dropped == len(hostile) + 2
    assert [r.actor for r in await archive.audit.list(EPOCH)] == ["user:x", "user:ops"]


async def test_buffered_records_are_written_together_and_flushed_at_the_end(
    admin: Redis, archive: ArchiveStore, link: ArchiveLink, postgres_server: PostgresServer
) -> None:
    """The API's publishes: three records queued are one stream entry at the next flush,
    and one queued as the buffer stops is flushed on the way out; all four stored."""
    buffer = AuditBuffer(admin, KEYS, interval=0.05)
    async with in_background(buffer.run()) as flushing:
        for n in range(3):
            buffer.add(actor="token:crm", channel="api", action="events.publish",
                       detail={"count": n})  # fmt: skip
        await wait_until(lambda: _length_is(admin, 1), what="one entry for the three")
        buffer.add(actor="token:crm", channel="api", action="events.publish")
        flushing.cancel()
    assert await admin.xlen(audit_key(KEYS)) == 2
    async with in_background(AuditCopier(admin, KEYS, link.get).run()):
        await wait_until(lambda: _count_is(postgres_server.dsn, 4), what="all four stored")
    rows = await archive.audit.list(EPOCH)
    assert [r.detail.get("count") for r in rows] == [0, 1, 2, None]


async def test_postgres_away_delays_the_records_and_loses_none(
    admin: Redis, link: ArchiveLink, postgres_server: PostgresServer
) -> None:
    """PostgreSQL stops: the records stay in Redis (the batch read kept pending, retried
    with backoff); once it is back every one is stored, once."""
    copier = AuditCopier(admin, KEYS, link.get)
    async with in_background(copier.run()):
        await record(admin, KEYS, actor="user:ops", channel="socket", action="maintenance")
        await wait_until(lambda: _count_is(postgres_server.dsn, 1), what="the first stored")
        await postgres_server.stop()
        for action in ("restart", "reload", "stop"):
            await record(admin, KEYS, actor="user:ops", channel="socket", action=action)

        async def held() -> bool:
            summary: Any = await admin.xpending(audit_key(KEYS), AUDIT_GROUP)
            return int(summary["pending"]) >= 1 and int(await admin.xlen(audit_key(KEYS))) == 3

        await wait_until(held, what="a batch read and kept pending, all three in Redis")
        await postgres_server.start()
        await wait_until(lambda: _count_is(postgres_server.dsn, 4), 30, "all four stored")
        await wait_until(lambda: _empty(admin), what="the stream emptied")
    async with await ArchiveStore.connect(postgres_server.dsn) as store:
        actions = [r.action for r in await store.audit.list(EPOCH)]
    assert actions == ["maintenance", "restart", "reload", "stop"]


async def _count_is(dsn: str, n: int) -> bool:
    try:
        return await stored(dsn) == n
    except Exception:  # PostgreSQL still starting
        return False


async def _length_is(admin: Redis, n: int) -> bool:
    return int(await admin.xlen(audit_key(KEYS))) == n


async def _empty(admin: Redis) -> bool:
    return int(await admin.xlen(audit_key(KEYS))) == 0


async def test_a_record_a_full_redis_refuses_goes_to_the_log_in_full(admin: Redis) -> None:
    """Redis at its maxmemory refuses the audit records, one recorded alone and one of the
    API's buffer: neither raises (the action itself went through), and the manager's log
    keeps every field of each at error level, with Redis's refusal."""
    buffer = AuditBuffer(admin, KEYS)
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", "1")
    try:
        with capture_logs() as logs:
            await record(admin, KEYS, actor="user:ops", channel="socket", action="reload",
                         outcome="failed", error="the config has an unknown key",
                         detail={"why": "config changed"})  # fmt: skip
            buffer.add(actor="token:crm", channel="api", action="events.publish")
            await buffer.flush()
    finally:
        await admin.config_set("maxmemory", "0")
    kept = [e for e in logs if e["event"].startswith("audit record not kept in Redis")]
    assert [(e["actor"], e["action"]) for e in kept] == [
        ("user:ops", "reload"),
        ("token:crm", "events.publish"),
    ]
    assert all(e["log_level"] == "error" and "maxmemory" in e["redis_error"] for e in kept)
    assert kept[0]["detail"] == {"why": "config changed"}
    assert kept[0]["error"] == "the config has an unknown key"
    assert await admin.xlen(audit_key(KEYS)) == 0
