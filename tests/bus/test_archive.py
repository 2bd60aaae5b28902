"""The event archive in PostgreSQL: migrations, partitions, idempotent writes, queries, replay."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import pytest
from structlog.testing import capture_logs

from bus.archive import (
    LATEST_VERSION,
    MIGRATIONS,
    ArchiveStore,
    ArchiveUnavailableError,
    CursorError,
    SchemaTooNewError,
    migrate,
)
from bus.archive.filters import type_clause, type_regex
from bus.conditions import Where
from bus.dlq import DeadLetter
from bus.errors import SubscriptionError
from bus.event import Event
from bus.keys import Keys
from bus.patterns import Pattern
from manager.embedded.postgres_server import PostgresServer
from manager.embedded.redis_server import free_port

pytestmark = pytest.mark.postgres

KEYS = Keys()
DAY = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
_seq = itertools.count(1)


def delivered(
    type_: str = "user.message.received",
    data: Mapping[str, Any] | None = None,
    *,
    at: datetime = DAY,
    stream: str = "user",
    entry: str | None = None,
    **kw: Any,
) -> Event:
    """An event as the archiver reads it from ``stream`` (entry id from ``at`` unless given)."""
    entry = entry or f"{int(at.timestamp() * 1000)}-{next(_seq)}"
    event = Event(
        type=type_, data=data or {}, source=kw.pop("source", "greeter"), timestamp=at, **kw
    )
    return event.with_delivery(KEYS.stream(stream), entry)


async def connect(dsn: str) -> Any:
    """A plain asyncpg connection for looking at tables directly."""
    return await asyncpg.connect(dsn, timeout=5)


class TestMigrations:
    def test_versions_are_consecutive_from_one(self) -> None:
        """The migration list is ordered 1, 2, 3 … with a description and SQL each."""
        assert [m.version for m in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))
        assert all(m.description and m.sql.strip() for m in MIGRATIONS)

    async def test_twice_is_a_noop(self, postgres_server: PostgresServer) -> None:
        """A fresh database goes to the latest version; a second run changes nothing."""
        conn = await connect(postgres_server.dsn)
        try:
            assert await migrate(conn) == (0, LATEST_VERSION)
            assert await migrate(conn) == (LATEST_VERSION, LATEST_VERSION)
            versions = await conn.fetch("SELECT version FROM schema_version ORDER BY version")
            assert [r["version"] for r in versions] == list(range(1, LATEST_VERSION + 1))
        finally:
            await conn.close()

    async def test_newer_database_is_refused(self, postgres_server: PostgresServer) -> None:
        """A database at a version this code does not know is refused, naming both versions."""
        conn = await connect(postgres_server.dsn)
        try:
            await migrate(conn)
            newer = LATEST_VERSION + 5
            await conn.execute(
                "INSERT INTO schema_version (version, description) VALUES ($1, 'future')", newer
            )
            with pytest.raises(SchemaTooNewError) as caught:
                await migrate(conn)
            assert f"version {newer}" in str(caught.value)
            assert f"up to {LATEST_VERSION}" in str(caught.value)
            assert "upgrade multibot" in str(caught.value)
            assert await conn.fetchval("SELECT max(version) FROM schema_version") == newer
        finally:
            await conn.close()

    async def test_concurrent_runs_apply_each_version_once(
        self, postgres_server: PostgresServer
    ) -> None:
        """Two managers migrating at once both succeed; each version is applied once."""
        pool = await asyncpg.create_pool(postgres_server.dsn, min_size=2, max_size=2)
        try:
            async with pool.acquire() as first, pool.acquire() as second:
                results = await asyncio.gather(migrate(first), migrate(second))
            assert sorted(results)[0] == (0, LATEST_VERSION)
            assert all(after == LATEST_VERSION for _, after in results)
            rows = await pool.fetch("SELECT version FROM schema_version ORDER BY version")
            assert [r["version"] for r in rows] == list(range(1, LATEST_VERSION + 1))
            assert await migrate(pool) == (LATEST_VERSION, LATEST_VERSION)
        finally:
            await pool.close()


class TestTypePatterns:
    def test_regex_examples(self) -> None:
        """Patterns become anchored regexes, with '#' joined to the dots around it."""
        assert type_regex("user.message.*") == r"^user\.message\.[^.]+$"
        assert type_regex("user.#") == r"^user(?:\.[^.]+)*$"
        assert type_regex("#.error") == r"^(?:[^.]+\.)*error$"
        assert type_regex("a.#.#.b") == r"^a(?:\.[^.]+)*\.b$"
        assert type_regex("#") == type_regex("#.#") == r"^[^.]+(?:\.[^.]+)*$"

    def test_bad_pattern_is_refused(self) -> None:
        """A pattern Pattern refuses is refused here too."""
        with pytest.raises(SubscriptionError):
            type_regex("user..x")

    async def test_sql_matches_exactly_what_pattern_matches(
        self, postgres_server: PostgresServer
    ) -> None:
        """Every pattern of up to 3 segments over {a, error, *, #} selects in PostgreSQL exactly
        the types of up to 4 segments over {a, b, error} that Pattern.matches."""
        segments = ["a", "b", "error"]
        types = [".".join(p) for n in range(1, 5) for p in itertools.product(segments, repeat=n)]
        patterns = [
            ".".join(p)
            for n in range(1, 4)
            for p in itertools.product(["a", "error", "*", "#"], repeat=n)
        ]
        conn = await connect(postgres_server.dsn)
        try:
            await conn.execute('CREATE TEMP TABLE t (type text COLLATE "C")')
            await conn.executemany("INSERT INTO t VALUES ($1)", [(t,) for t in types])
            for pattern in patterns:
                args: list[Any] = []
                clause = type_clause([pattern], args)
                rows = await conn.fetch(f"SELECT type FROM t WHERE {clause}", *args)
                expected = {t for t in types if Pattern(pattern).matches(t)}
                assert {r["type"] for r in rows} == expected, pattern
            args = []
            clause = type_clause(["a.b", "b.*", "#.error"], args)
            rows = await conn.fetch(f"SELECT type FROM t WHERE {clause}", *args)
            assert {r["type"] for r in rows} == {
                t for t in types if t == "a.b" or Pattern("b.*").matches(t) or t.endswith("error")
            }
        finally:
            await conn.close()


class TestInsert:
    async def test_every_field_round_trips(self, store: ArchiveStore) -> None:
        """An archived event reads back equal: data (unicode, nested JSON), ids, tz-aware time."""
        root = delivered("user.message.received", {"text": "hi"})
        data = {
            "text": 'Привет, 世界 👋 "quoted" \\ back',
            "nested": {"list": [1, 2.5, None, True, {"deep": ["x"]}], "empty": {}},
            "big": 2**53 + 1,
            "neg": -0.125,
        }
        at = datetime(2026, 3, 10, 23, 30, 15, 123456, tzinfo=timezone(timedelta(hours=3)))
        event = root.caused("user.message.sent", data, "replier", key="chat-42", version=3)
        event = replace(event, timestamp=at).with_delivery(KEYS.stream("user"), "1773174615123-7")
        assert await store.insert_events([root, event]) == 2
        back = await store.get(event.id)
        assert back == event
        assert back is not None and back.timestamp.utcoffset() is not None
        assert back.correlation_id == root.id and back.causation_id == root.id
        assert await store.get("no-such-id") is None

    async def test_same_batch_twice_is_stored_once(self, store: ArchiveStore) -> None:
        """Archiving a batch again (or an event twice in one batch) stores each event once."""
        batch = [delivered(data={"n": n}) for n in range(20)]
        assert await store.insert_events([*batch, batch[0]]) == 20
        assert await store.insert_events(batch) == 0
        assert await store.count() == 20
        assert await store.insert_events([]) == 0

    async def test_archive_state_tracks_highest_entry_per_stream(self, store: ArchiveStore) -> None:
        """archive_state holds each stream's highest entry id and never moves back."""
        assert await store.last_archived("user") is None
        await store.insert_events(
            [
                delivered(stream="user", entry="1000-5"),
                delivered(stream="user", entry="999-9"),
                delivered(stream="user", entry="1000-12"),
                delivered("system.boot.done", stream="system", entry="5-0"),
            ]
        )
        assert await store.last_archived("user") == "1000-12"
        assert await store.last_archived(KEYS.stream("user")) == "1000-12"
        assert await store.last_archived("system") == "5-0"
        await store.insert_events([delivered(stream="user", entry="1000-3")])  # reclaimed, older
        assert await store.last_archived("user") == "1000-12"
        await store.insert_events([delivered(stream="user", entry="2000-0")])
        assert await store.last_archived("user") == "2000-0"

    async def test_event_not_read_from_redis_is_refused(self, store: ArchiveStore) -> None:
        """An event without stream or entry id is refused before anything is written."""
        with pytest.raises(ValueError, match="no stream"):
            await store.insert_events([Event(type="user.x.y", data={}, source="s", entry_id="1-1")])
        no_entry = Event(type="user.x.y", data={}, source="s", stream=KEYS.stream("user"))
        with pytest.raises(ValueError, match="no entry id"):
            await store.insert_events([delivered(), no_entry])
        assert await store.count() == 0

    async def test_nul_characters_do_not_block_the_batch(self, store: ArchiveStore) -> None:
        """NUL, which PostgreSQL cannot store, is kept as U+FFFD; a literal '\\u0000' stays."""
        event = delivered(data={"bad": "a\x00b", "fine": "\\u0000", "k\x00": ["\x00"]})
        with capture_logs() as logs:
            assert await store.insert_events([event]) == 1
        assert [e["log_level"] for e in logs if "NUL" in e["event"]] == ["warning"]
        back = await store.get(event.id)
        assert back is not None
        assert back.data == {"bad": "a\ufffdb", "fine": "\\u0000", "k\ufffd": ["\ufffd"]}


class TestPartitions:
    async def test_events_of_three_days_land_in_three_partitions(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """Partitions are created for the events' UTC days and each event lands in its day's."""
        times = [DAY - timedelta(days=1), DAY, DAY, DAY + timedelta(hours=12)]  # 3 UTC days
        await store.insert_events([delivered(at=t) for t in times])
        assert await store.partitions() == [date(2026, 3, 9), date(2026, 3, 10), date(2026, 3, 11)]
        conn = await connect(postgres_server.dsn)
        try:
            heads = await conn.fetch(
                "SELECT tableoid::regclass::text AS p, count(*) AS n FROM event_heads GROUP BY 1"
            )
            blocks = await conn.fetch(
                "SELECT tableoid::regclass::text AS p, sum(n) AS n FROM event_blocks GROUP BY 1"
            )
        finally:
            await conn.close()
        assert {r["p"]: r["n"] for r in heads} == {
            "event_heads_20260309": 1,
            "event_heads_20260310": 2,
            "event_heads_20260311": 1,
        }
        assert {r["p"]: r["n"] for r in blocks} == {
            "event_blocks_20260309": 1,
            "event_blocks_20260310": 2,
            "event_blocks_20260311": 1,
        }
        assert await store.size_bytes() > 0

    async def test_created_ahead_idempotently(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """Partitions for today and the next days are created once; again creates none."""
        today = date(2026, 5, 30)
        created = await store.create_partitions_ahead(today, 3)
        days = ["20260530", "20260531", "20260601", "20260602"]
        assert created == [
            f"{table}_{day}" for table in ("event_heads", "event_blocks", "event_odd_ids")
            for day in days
        ]  # fmt: skip
        assert await store.create_partitions_ahead(today, 3) == []
        async with await ArchiveStore.connect(postgres_server.dsn) as fresh:  # no cache
            assert await fresh.create_partitions_ahead(today, 3) == []
        assert len(await store.partitions()) == 4

    async def test_drop_before_drops_whole_partitions(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """Old days go by DROP (a DELETE would trip the trigger) and queries no longer see them."""
        conn = await connect(postgres_server.dsn)
        try:
            await conn.execute(
                """
                CREATE FUNCTION no_delete() RETURNS trigger LANGUAGE plpgsql AS
                $$ BEGIN RAISE EXCEPTION 'DELETE on %', TG_TABLE_NAME; END $$;
                CREATE TRIGGER no_delete AFTER DELETE ON event_heads
                    FOR EACH ROW EXECUTE FUNCTION no_delete();
                CREATE TRIGGER no_delete AFTER DELETE ON event_blocks
                    FOR EACH ROW EXECUTE FUNCTION no_delete();
                """
            )
        finally:
            await conn.close()
        days = [DAY - timedelta(days=2), DAY - timedelta(days=1), DAY]
        await store.insert_events([delivered(at=t) for t in days for _ in range(3)])
        dropped = await store.drop_partitions_before(DAY.date())
        assert dropped == [
            f"{table}_{day}" for table in ("event_heads", "event_blocks", "event_odd_ids")
            for day in ("20260308", "20260309")
        ]  # fmt: skip
        assert await store.partitions() == [DAY.date()]
        events, cursor = await store.query(since=days[0], until=DAY.replace(hour=0))
        assert (events, cursor) == ([], None)
        assert await store.count() == 3
        assert await store.drop_partitions_before(DAY.date()) == []
        assert await store.insert_events([delivered(at=days[0])]) == 1  # a late one re-creates it

    @pytest.mark.parametrize("warm", [True, False], ids=["after-insert", "first-insert"])
    async def test_partition_dropped_by_another_store_is_recreated(
        self, store: ArchiveStore, postgres_server: PostgresServer, warm: bool
    ) -> None:
        """A store whose cached partition was dropped elsewhere re-creates it and inserts."""
        if warm:
            await store.insert_events([delivered()])
        else:
            await store.ensure_partitions([DAY.date()])
        other = await ArchiveStore.connect(postgres_server.dsn)
        try:
            assert await other.drop_partitions_before(DAY.date() + timedelta(days=1))
        finally:
            await other.close()
        with capture_logs() as logs:
            assert await store.insert_events([delivered()]) == 1
        assert await store.count() == 1
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "archive partition vanished; re-creating"
        ]


class TestQuery:
    TYPES = (
        "user.message.received",
        "user.message.sent",
        "user.profile.updated",
        "user.login",
        "bot.lifecycle.error",
        "system.error",
        "system.error.fatal",
    )

    async def _types(self, store: ArchiveStore, *patterns: str) -> list[str]:
        events, cursor = await store.query(types=patterns, limit=1000)
        assert cursor is None
        return sorted(e.type for e in events)

    async def test_type_patterns(self, store: ArchiveStore) -> None:
        """Patterns select as Pattern.matches does: '#' at either end, '*' one segment."""
        await store.insert_events([delivered(t) for t in self.TYPES])
        assert await self._types(store, "user.#") == sorted(self.TYPES[:4])
        assert await self._types(store, "user.message.*") == [
            "user.message.received",
            "user.message.sent",
        ]
        assert await self._types(store, "#.error") == ["bot.lifecycle.error", "system.error"]
        assert await self._types(store, "system.error") == ["system.error"]
        assert await self._types(store, "user.login", "system.#") == [
            "system.error",
            "system.error.fatal",
            "user.login",
        ]
        assert await self._types(store, "nothing.here") == []
        one, _ = await store.query(types="user.login")  # a str is one pattern, not letters
        assert [e.type for e in one] == ["user.login"]

    async def test_source_and_time_range(self, store: ArchiveStore) -> None:
        """source filters exactly; since is inclusive and until exclusive."""
        t0 = DAY
        await store.insert_events(
            [
                delivered(at=t0, source="a"),
                delivered(at=t0 + timedelta(seconds=1), source="b"),
                delivered(at=t0 + timedelta(seconds=2), source="a"),
                delivered(at=t0 + timedelta(seconds=3), source="a"),
            ]
        )
        events, _ = await store.query(source="a")
        assert [e.timestamp for e in events] == [t0 + timedelta(seconds=s) for s in (0, 2, 3)]
        events, _ = await store.query(
            since=t0 + timedelta(seconds=1), until=t0 + timedelta(seconds=3)
        )
        assert [e.source for e in events] == ["b", "a"]
        naive, _ = await store.query(since=t0.replace(tzinfo=None) + timedelta(seconds=3))
        assert len(naive) == 1

    async def test_where_conditions_match_where_semantics(self, store: ArchiveStore) -> None:
        """where= keeps exactly what bus.conditions.Where keeps (eq, in, gte, exists, paths)."""
        datas: list[dict[str, Any]] = [
            {"user_id": 42, "lang": "en", "age": 30, "profile": {"city": "Paris"}},
            {"user_id": 42, "lang": "ru", "age": 17, "vip": False},
            {"user_id": 7, "lang": "de", "age": "30", "profile": {"city": "Berlin"}},
            {"user_id": 42, "age": True, "profile": "Paris"},
            {"lang": "en", "vip": None},
        ]
        await store.insert_events([delivered(data=d) for d in datas])
        specs: list[dict[str, Any]] = [
            {"user_id": 42},
            {"lang": {"in": ["en", "ru"]}},
            {"age": {"gte": 18}},
            {"vip": {"exists": True}},
            {"vip": {"exists": False}},
            {"profile.city": "Paris"},
            {"user_id": 42, "age": {"gte": 18, "lt": 65}},
        ]
        for spec in specs:
            events, cursor = await store.query(where=spec)
            assert cursor is None
            assert [e.data for e in events] == [d for d in datas if Where(spec).matches(d)], spec

    async def test_where_pages_fill_up_to_limit(self, store: ArchiveStore) -> None:
        """With where=, pages fill to the limit across many non-matching rows, each once."""
        batch = [delivered(data={"n": n}, at=DAY + timedelta(milliseconds=n)) for n in range(900)]
        await store.insert_events(batch)
        seen: list[int] = []
        cursor: str | None = None
        pages = 0
        while True:
            events, cursor = await store.query(where={"n": {"gte": 100}}, after=cursor, limit=300)
            seen.extend(e.data["n"] for e in events)
            pages += 1
            if cursor is None:
                break
        assert seen == list(range(100, 900)) and pages == 3

    async def test_rare_matches_give_short_pages_until_done(self, store: ArchiveStore) -> None:
        """A call reads at most max_scan rows: a rare match gives a short page and a cursor."""
        await store.insert_events([delivered(data={"n": n}) for n in range(900)])
        store.max_scan = 500
        first, cursor = await store.query(where={"n": {"gte": 850}}, limit=100)
        assert first == [] and cursor is not None
        rest, cursor = await store.query(where={"n": {"gte": 850}}, after=cursor, limit=100)
        assert sorted(e.data["n"] for e in rest) == list(range(850, 900)) and cursor is None

    async def test_paging_returns_each_event_once_in_order(self, store: ArchiveStore) -> None:
        """Over 300 events (some sharing a timestamp), cursors walk each exactly once in order."""
        batch = [
            delivered(data={"n": n}, at=DAY + timedelta(milliseconds=n // 3)) for n in range(301)
        ]
        await store.insert_events(batch)
        expected = sorted(batch, key=lambda e: (e.timestamp, e.id))
        for limit in (100, 70):
            seen: list[Event] = []
            cursor: str | None = None
            while True:
                page, cursor = await store.query(types=["user.#"], after=cursor, limit=limit)
                assert len(page) <= limit
                seen.extend(page)
                if cursor is None:
                    break
            assert [e.id for e in seen] == [e.id for e in expected]
        page, cursor = await store.query(limit=301)
        assert len(page) == 301 and cursor is None

    async def test_bad_cursor_is_refused(self, store: ArchiveStore) -> None:
        """A cursor query() did not make raises CursorError."""
        with pytest.raises(CursorError):
            await store.query(after="not-a-cursor")


class TestTrace:
    async def test_three_hop_chain(self, store: ArchiveStore) -> None:
        """trace() returns root, child and grandchild by time, and nothing of another chain."""
        root = delivered("user.message.received", {"text": "hi"}, at=DAY)
        child = _at(root.caused("user.reply.planned", {}, "planner"), DAY + timedelta(seconds=1))
        grandchild = _at(child.caused("user.message.sent", {}, "sender"), DAY + timedelta(days=1))
        other = delivered("user.message.received", {"text": "other"}, at=DAY)
        other_child = _at(other.caused("user.reply.planned", {}, "planner"), DAY)
        await store.insert_events([grandchild, other_child, child, other, root])
        chain = await store.trace(root.id)
        assert [e.id for e in chain] == [root.id, child.id, grandchild.id]
        assert grandchild.causation_id == child.id and grandchild.correlation_id == root.id
        assert await store.trace("unknown") == []


def _at(event: Event, moment: datetime) -> Event:
    """``event`` published at ``moment`` and read from the user stream."""
    entry = f"{int(moment.timestamp() * 1000)}-{next(_seq)}"
    return replace(event, timestamp=moment).with_delivery(KEYS.stream("user"), entry)


class TestEntries:
    async def test_by_entry_id_between_exclusive_bounds(self, store: ArchiveStore) -> None:
        """entries() returns a stream's events in entry id order strictly between the bounds,
        as they were read from Redis."""
        ids = ["100-0", "100-1", "100-2", "101-0", "205-3", "1000-0"]
        batch = [delivered(entry=e, data={"e": e}) for e in reversed(ids)]
        batch.append(delivered("system.boot.done", stream="system", entry="100-5"))
        batch.append(delivered("user.login", entry="101-1"))
        await store.insert_events(batch)
        events = await store.entries("user", after="100-0", before="1000-0")
        assert [e.entry_id for e in events] == ["100-1", "100-2", "101-0", "101-1", "205-3"]
        assert all(e.stream == KEYS.stream("user") for e in events)
        assert events[0] == next(e for e in batch if e.entry_id == "100-1")
        everything = await store.entries(KEYS.stream("user"))
        assert [e.entry_id for e in everything] == [*ids[:4], "101-1", *ids[4:]]
        after_100 = await store.entries("user", after="100")  # the whole millisecond excluded
        assert [e.entry_id for e in after_100] == ["101-0", "101-1", "205-3", "1000-0"]
        assert [e.entry_id for e in await store.entries("user", before="101")] == ids[:3]
        typed = await store.entries("user", types=["user.login"], limit=5)
        assert [e.entry_id for e in typed] == ["101-1"]
        assert [e.entry_id for e in await store.entries("user", limit=2)] == ids[:2]
        huge = await store.entries("user", after="1000-0", before="1000-18446744073709551615")
        assert huge == []


class TestDeadLetters:
    async def test_stored_once_with_every_field(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """Dead letters are stored once however often they are archived, fields intact."""
        letter = DeadLetter(
            id="1773144000000-0",
            event_id="e-1",
            type="user.message.received",
            reason="handler_error",
            error="ValueError: ✗",
            traceback="Traceback …",
            attempts=3,
            group="bot-group-a",
            consumer="a-0",
            handler="handle",
            stream=KEYS.stream("user"),
            entry_id="1773143999000-4",
            failed_at="2026-03-10T12:00:00.000001Z",
            fields={"id": "e-1", "data": '{"x": 1}'},
        )
        second = replace(letter, id="1773144000001-0", failed_at="")
        assert await store.insert_dead_letters([letter, second]) == 2
        assert await store.insert_dead_letters([letter]) == 0
        assert await store.insert_dead_letters([]) == 0
        conn = await connect(postgres_server.dsn)
        try:
            rows = await conn.fetch("SELECT * FROM dead_letters ORDER BY id")
        finally:
            await conn.close()
        assert len(rows) == 2
        row = rows[0]
        assert (row["group_name"], row["error"]) == ("bot-group-a", "ValueError: ✗")
        assert (row["attempts"], row["handler"], row["stream"]) == (
            3,
            "handle",
            KEYS.stream("user"),
        )
        assert row["failed_at"] == datetime(2026, 3, 10, 12, 0, 0, 1, tzinfo=UTC)
        assert row["entry"] == '{"id": "e-1", "data": "{\\"x\\": 1}"}'
        assert rows[1]["failed_at"] is None


class TestSubscriptions:
    async def test_upsert_replaces_a_subscribers_rows(self, store: ArchiveStore) -> None:
        """Upserting a subscriber's subscriptions replaces its rows and leaves others alone."""
        assert await store.upsert_subscriptions("a", [("user.#", {"lang": "en"}), ("bot.x", None)])
        await store.upsert_subscriptions("b", [("system.#", None)])
        await store.upsert_subscriptions("a", [("user.message.*", {"n": {"gte": 1}})])
        assert await store.subscriptions("a") == [("user.message.*", {"n": {"gte": 1}})]
        assert await store.subscriptions("b") == [("system.#", {})]
        with pytest.raises(SubscriptionError):
            await store.upsert_subscriptions("a", [("bad..pattern", None)])
        assert await store.subscriptions("a") == [("user.message.*", {"n": {"gte": 1}})]


class TestUnavailable:
    async def test_closed_port_fails_fast_with_what_to_do(self) -> None:
        """Connecting to a port nobody listens on raises ArchiveUnavailableError at once."""
        port = free_port()
        started = time.monotonic()
        with pytest.raises(ArchiveUnavailableError) as caught:
            await ArchiveStore.connect(
                f"postgresql://multibot:secret@127.0.0.1:{port}/multibot", connect_timeout=1
            )
        assert time.monotonic() - started < 2
        message = str(caught.value)
        assert f"127.0.0.1:{port}/multibot" in message and "secret" not in message
        assert "check that it is running" in message

    async def test_server_gone_after_connect(self, postgres_server: PostgresServer) -> None:
        """A store whose server stopped raises ArchiveUnavailableError, not asyncpg's errors."""
        archive = await ArchiveStore.connect(postgres_server.dsn)
        try:
            await archive.migrate()
            await postgres_server.stop()
            with pytest.raises(ArchiveUnavailableError):
                await archive.count()
            with pytest.raises(ArchiveUnavailableError):
                await archive.insert_events([delivered()])
        finally:
            await archive.close()
