"""The compact archive layout: events in compressed blocks with narrow heads (schema 6).

What a user depends on: every event comes back exactly as archived whatever its ids look
like, a batch stored twice (or claimed from a dead archiver and interleaved with others)
is stored once and replays in entry order, pages neither skip nor repeat events that share
a timestamp, events of the old layout still read alongside, and a damaged block is named.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import orjson
import pytest

from bus.archive import ArchiveStore
from bus.archive.block_codec import BlockDataError, decode_block, encode_block
from bus.archive.dictionaries import (
    PLAIN_COMPRESS,
    PLAIN_DECOMPRESS,
    TRAIN_SEGMENTS,
    Dictionaries,
)
from bus.archive.errors import ArchiveDataError
from bus.archive.inserts import stream_heads, write_events
from bus.archive.kind_shares import KindShares
from bus.archive.migrations import migrate
from bus.archive.partitions import create_partitions
from bus.archive.rows import event_record
from bus.event import Event, new_event_id
from bus.keys import Keys
from manager.embedded.postgres_server import PostgresServer

pytestmark = pytest.mark.postgres

KEYS = Keys()
DAY = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
_seq = itertools.count(1)


def record(
    *,
    at: datetime = DAY,
    stream: str = "orders",
    ms: int | None = None,
    seq: int | None = None,
    **fields: Any,
) -> tuple[Any, ...]:
    """An archive row (EVENT_COLUMNS order), its entry id from ``at`` unless given."""
    event = Event(
        type=fields.pop("type", "orders.order.placed"),
        data=fields.pop("data", {"n": next(_seq)}),
        source=fields.pop("source", "shop"),
        timestamp=at,
        **fields,
    )
    entry = (
        f"{int(at.timestamp() * 1000) if ms is None else ms}-{next(_seq) if seq is None else seq}"
    )
    return event_record(event.with_delivery(KEYS.stream(stream), entry), stream)


def same(record_: tuple[Any, ...], event: Event | None) -> bool:
    """Whether an event read back is the archived row, field by field."""
    assert event is not None
    back = event_record(event, KEYS.stream_name(event.stream or ""))
    return (
        back[:3] == record_[:3]
        and back[4:] == record_[4:]
        and orjson.loads(back[3]) == orjson.loads(record_[3])
    )


class TestCodec:
    def test_every_kind_of_value_round_trips(self) -> None:
        """Ids, correlations and causations that are no canonical UUID, text in any script,
        absent and empty keys, and entry ids up to the archive's limit come back as given."""
        root = new_event_id()
        rows = [
            record(id="not-a-uuid", correlation_id="corr-text", causation_id="cause-text"),
            record(id=new_event_id().upper(), correlation_id=root, causation_id=root),
            record(correlation_id=root, causation_id=str(uuid.uuid4()), key=""),
            record(key="ключ 🔑", data={"текст": "✓", "n": [1, 2.5, None]}, version=7),
            record(ms=2**63 - 1, seq=2**63 - 1, at=DAY + timedelta(microseconds=1)),
            *(record(at=DAY + timedelta(seconds=n)) for n in range(27)),
        ]
        block = encode_block(rows, PLAIN_COMPRESS)
        assert block.body[0] == 2  # 32 rows: two segments of 16
        assert block.ids[:32] == bytes(32)  # not canonical: in the body
        assert block.correlations == [root]
        back = decode_block(block.ids, block.correlations, block.body, PLAIN_DECOMPRESS)
        assert [back[n] for n in range(32)] == [(*r[:9], None, *r[10:]) for r in rows]
        some = decode_block(
            block.ids, block.correlations, block.body, PLAIN_DECOMPRESS, positions=[3, 20]
        )
        assert some == {3: back[3], 20: back[20]}
        chain = decode_block(
            block.ids, block.correlations, block.body, PLAIN_DECOMPRESS, correlation=root
        )
        assert chain == {1: back[1], 2: back[2]}

    def test_a_version_postgresql_integer_cannot_hold_is_refused(self) -> None:
        with pytest.raises(BlockDataError, match="version"):
            encode_block([record(version=2**31)], PLAIN_COMPRESS)

    def test_a_damaged_body_is_an_error_not_garbage(self) -> None:
        block = encode_block([record() for _ in range(3)], PLAIN_COMPRESS)
        middle = len(block.body) // 2
        flipped = (
            block.body[:middle] + bytes([block.body[middle] ^ 0x55]) + block.body[middle + 1 :]
        )
        broken = (block.body[:-3], block.body[:5] + b"\xff" + block.body[6:], flipped)
        for body in (*broken, b"", b"\x09"):
            with pytest.raises(BlockDataError):
                decode_block(block.ids, block.correlations, body, PLAIN_DECOMPRESS)


class TestStore:
    async def test_odd_ids_are_found_and_traced(self, store: ArchiveStore) -> None:
        """An id that is no UUID, one in capitals, and a UUIDv7 far from the event's own
        time (a client's) are each found by get; a correlation that is no UUID traces."""
        far = new_event_id()
        rows = [
            record(id="order-17", correlation_id="chain-9"),
            record(id=new_event_id().upper()),
            record(id=far, at=DAY + timedelta(days=0, hours=3)),
            record(correlation_id="chain-9", causation_id="order-17", at=DAY + timedelta(1)),
            record(),
        ]
        assert await store.insert_records(rows) == 5
        for row in rows:
            assert same(row, await store.get(row[0]))
        assert await store.get("order-18") is None
        assert await store.get(new_event_id()) is None
        chain = await store.trace("chain-9")
        assert [e.id for e in chain] == [rows[0][0], rows[3][0]]

    async def test_a_batch_again_and_a_claimed_interleaved_batch_store_once_in_order(
        self, store: ArchiveStore
    ) -> None:
        """The second copy of a batch stores nothing; a batch claimed from a dead archiver
        (entries below and above what is stored, interleaved with it) stores only what is
        new, and replay gives the stream in entry order, each entry once."""
        t0 = DAY
        rows = [record(at=t0 + timedelta(milliseconds=n), ms=1000 + n, seq=0) for n in range(300)]
        middle, outer = rows[100:200], rows[:100] + rows[200:]
        assert await store.insert_records(middle) == 100
        assert await store.insert_records(middle) == 0
        assert await store.insert_records(outer + middle[:5]) == 200
        assert await store.count() == 300
        replayed = await store.entries("orders", limit=1000)
        assert [e.entry_id for e in replayed] == [f"{1000 + n}-0" for n in range(300)]
        page = await store.entries("orders", after="1090-0", before="1210-0", limit=1000)
        assert [e.entry_id for e in page] == [f"{1000 + n}-0" for n in range(91, 210)]
        small = await store.entries("orders", after="1150-0", limit=7)
        assert [e.entry_id for e in small] == [f"{1000 + n}-0" for n in range(151, 158)]

    async def test_events_sharing_a_timestamp_page_without_gaps_or_repeats(
        self, store: ArchiveStore
    ) -> None:
        """More events in one microsecond than a page holds: paging by cursor returns each
        once, ordered by id within the instant."""
        rows = [record(at=DAY) for _ in range(250)] + [record(at=DAY + timedelta(seconds=1))]
        await store.insert_records(rows)
        seen: list[str] = []
        cursor = None
        while True:
            page, cursor = await store.query(after=cursor, limit=40)
            seen += [e.id for e in page]
            if cursor is None:
                break
        instant = sorted(r[0] for r in rows[:250])
        assert seen == [*instant, rows[-1][0]]

    async def test_the_old_layout_reads_alongside(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """Events archived before the upgrade (the events table) are found, queried in one
        time order with the new ones, replayed in entry order, and not stored again when
        their batch comes back."""
        old = [record(at=DAY + timedelta(seconds=2 * n), ms=5000 + 2 * n, seq=0) for n in range(5)]
        new = [
            record(at=DAY + timedelta(seconds=2 * n + 1), ms=5001 + 2 * n, seq=0) for n in range(5)
        ]
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            await create_partitions(conn, [DAY.date()], ("events",))
            await write_events(conn, old, stream_heads(old))
        finally:
            await conn.close()
        assert await store.insert_records(new + old[:2]) == 5  # the old two: stored already
        assert same(old[0], await store.get(old[0][0]))
        both = sorted(old + new, key=lambda r: r[8])
        page, cursor = await store.query(limit=4)
        rest, end = await store.query(after=cursor, limit=100)
        assert [e.id for e in page + rest] == [r[0] for r in both] and end is None
        replayed = await store.entries("orders", limit=100)
        assert [e.entry_id for e in replayed] == [f"{5000 + n}-0" for n in range(10)]
        assert await store.count() == 10

    async def test_query_by_type_and_source_and_where(self, store: ArchiveStore) -> None:
        rows = [
            record(type="orders.order.placed", source="shop", data={"total": 5}),
            record(type="orders.order.paid", source="till", data={"total": 50}),
            record(type="users.user.joined", source="shop", data={"total": 500}),
        ]
        await store.insert_records(rows)
        by_pattern, _ = await store.query(types=["orders.#"])
        assert [e.id for e in by_pattern] == [rows[0][0], rows[1][0]]
        by_source, _ = await store.query(source="shop", types=["#"])
        assert [e.id for e in by_source] == [rows[0][0], rows[2][0]]
        unknown, cursor = await store.query(source="nobody")
        assert (unknown, cursor) == ([], None)
        big, _ = await store.query(where={"total": {"gte": 50}})
        assert [e.id for e in big] == [rows[1][0], rows[2][0]]

    async def test_a_reader_finds_kinds_another_writer_numbered_after_its_first_query(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """A reader that already asked for a type and a source (and found nothing) finds
        their events once another archiver has stored them: what it matched is not kept
        past a change of the kinds."""
        async with await ArchiveStore.connect(postgres_server.dsn) as reader:
            for _ in range(2):  # asked twice: the answer would be kept if anything is
                assert await reader.query(types=["orders.refund.#"]) == ([], None)
                assert await reader.query(source="refunder") == ([], None)
            rows = [record(type="orders.refund.issued", source="refunder")]
            await store.insert_records(rows)
            by_type, _ = await reader.query(types=["orders.refund.#"])
            by_source, _ = await reader.query(source="refunder")
        assert [e.id for e in by_type] == [e.id for e in by_source] == [rows[0][0]]

    async def test_common_kinds_read_by_time_and_rare_ones_merged_give_the_same_pages(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """Once ANALYZE has counted the kinds, a pattern over six common kinds is read by
        time (every head, keeping its kinds) and one over two rare kinds by merging each
        kind's heads: both give exactly the matching events, in order, page after page."""
        rows = [
            record(
                at=DAY + timedelta(milliseconds=n // 2),  # pairs of equal timestamps
                type=("orders.order.placed", "orders.order.paid", "orders.order.sent")[n % 3],
                source=("shop", "till")[n // 3 % 2],
            )
            for n in range(600)
        ]
        rows += [
            record(at=DAY + timedelta(milliseconds=n * 100), type="users.user.gone", source=s)
            for n, s in enumerate(("shop", "till"))
        ]
        await store.insert_records(rows)
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            await conn.execute("ANALYZE event_heads")
            kinds = {
                (r["type"], r["source"]): r["id"]
                for r in await conn.fetch("SELECT id, type, source FROM event_kinds")
            }
            shares = KindShares()
            await shares.refresh(conn, len(kinds))
        finally:
            await conn.close()
        orders = [i for (t, _), i in kinds.items() if t.startswith("orders.")]
        gone = [i for (t, _), i in kinds.items() if t == "users.user.gone"]
        assert (len(orders), len(gone)) == (6, 2)
        assert shares.by_time(orders, 103) and not shares.by_time(gone, 103)
        for pattern in ("orders.#", "users.#"):
            expected = sorted(
                (r for r in rows if r[1].startswith(pattern[:-1])), key=lambda r: (r[8], r[0])
            )
            found, cursor = await store.query(types=[pattern], limit=100)
            while cursor is not None:
                more, cursor = await store.query(types=[pattern], limit=100, after=cursor)
                found += more
            assert [e.id for e in found] == [r[0] for r in expected]

    async def test_a_sources_events_share_blocks_and_replay_stays_in_entry_order(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """Two sources taking turns on one stream: each source's events are stored in
        blocks of their own (a query by source inflates one block per 32 of its events),
        and replay still gives the stream's entries in order."""
        rows = [
            record(at=DAY + timedelta(milliseconds=n), ms=50_000 + n, seq=0, source=f"s{n % 2}")
            for n in range(64)
        ]
        await store.insert_records(rows)
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            sources = await conn.fetch(
                "SELECT h.loc >> 5 AS block, array_agg(DISTINCT k.source) AS sources"
                " FROM event_heads h JOIN event_kinds k ON k.id = h.kind_id GROUP BY 1"
            )
        finally:
            await conn.close()
        assert sorted(r["sources"] for r in sources) == [["s0"], ["s1"]]
        replayed = await store.entries("orders", limit=100)
        assert [e.id for e in replayed] == [r[0] for r in rows]
        replayed = await store.entries("orders", after="50010-0", limit=7)
        assert [e.id for e in replayed] == [r[0] for r in rows[11:18]]
        found, _ = await store.query(source="s1")
        assert [e.id for e in found] == [r[0] for r in rows[1::2]]

    async def test_kinds_beyond_the_numbering_are_still_stored_and_found(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """A writer inventing a source per event fills the numbering of kinds; events of
        kinds past it are stored whole, and a query by such a source or type still finds
        exactly them."""
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            await conn.execute(
                "INSERT INTO event_kinds (type, source)"
                " SELECT 'orders.order.placed', 'filler-' || g FROM generate_series(1, 65535) g"
            )
        finally:
            await conn.close()
        rows = [
            record(source="late-a"),
            record(source="late-b", type="orders.order.paid"),
            record(source="filler-7"),
        ]
        assert await store.insert_records(rows) == 3
        found, _ = await store.query(source="late-b")
        assert [e.id for e in found] == [rows[1][0]]
        paid, _ = await store.query(types=["orders.order.paid"])
        assert [e.id for e in paid] == [rows[1][0]]
        assert same(rows[0], await store.get(rows[0][0]))

    async def test_a_damaged_block_is_named(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        row = record()
        await store.insert_records([row])
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            await conn.execute("UPDATE event_blocks SET body = '\\xdeadbeef'::bytea")
        finally:
            await conn.close()
        with pytest.raises(ArchiveDataError, match=r"block -?\d+ is damaged"):
            await store.get(row[0])

    async def test_a_stream_across_midnight_is_cut_by_day(self, store: ArchiveStore) -> None:
        """One batch whose entries straddle midnight lands in both days' partitions and
        replays in entry order."""
        midnight = datetime(2026, 3, 11, tzinfo=UTC)
        rows = [
            record(at=midnight + timedelta(milliseconds=n - 5), ms=9000 + n, seq=0)
            for n in range(10)
        ]
        assert await store.insert_records(rows) == 10
        assert len(await store.partitions()) == 2
        replayed = await store.entries("orders", limit=100)
        assert [e.entry_id for e in replayed] == [f"{9000 + n}-0" for n in range(10)]


class TestDictionaries:
    async def test_trained_on_the_first_events_and_read_by_every_store(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """After a few thousand events a dictionary is trained and stored; blocks made
        with it read back through a store that never saw it; a day later a new one is
        trained from what is archived then."""
        words = ["alpha", "beta", "gamma", "delta", "omega"]
        rows = [
            record(
                at=DAY + timedelta(milliseconds=n),
                ms=10_000 + n,
                seq=0,
                data={"user": n % 97, "word": words[n % 5], "note": f"item {n}"},
            )
            for n in range(TRAIN_SEGMENTS * 16 + 1000)
        ]
        for start in range(0, len(rows), 1000):
            await store.insert_records(rows[start : start + 1000])
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM event_dictionaries") == 1
            used = await conn.fetch("SELECT dict_id, sum(n) AS n FROM event_blocks GROUP BY 1")
            assert {r["dict_id"] for r in used} == {None, 1}  # the first blocks had none
            await conn.execute(
                "UPDATE event_dictionaries SET created_at = now() - interval '2 days'"
            )
        finally:
            await conn.close()
        async with await ArchiveStore.connect(postgres_server.dsn) as fresh:
            replayed = await fresh.entries("orders", limit=len(rows))
            assert [e.id for e in replayed] == [r[0] for r in rows]
            assert same(rows[-1], await fresh.get(rows[-1][0]))
            more = [
                record(at=DAY + timedelta(seconds=30, milliseconds=n), ms=50_000 + n, seq=0)
                for n in range(TRAIN_SEGMENTS * 16)
            ]
            await fresh.insert_records(more)
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM event_dictionaries") == 2
        finally:
            await conn.close()

    async def test_a_writer_takes_the_newest_stored_over_an_older_one(
        self, postgres_server: PostgresServer
    ) -> None:
        """A writer with no dictionary of its own takes the newest stored, even a week old,
        over none; holding one, it takes a newer one another writer stored."""
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            await migrate(conn)
            store_dict = (
                "INSERT INTO event_dictionaries (created_at, dict) VALUES ($1, $2) RETURNING id"
            )
            week_ago = datetime.now(UTC) - timedelta(days=7)
            first = await conn.fetchval(store_dict, week_ago, b"first dictionary " * 64)
            dicts = Dictionaries()
            assert (await dicts.for_writing(conn, []))[0] == first
            second = await conn.fetchval(store_dict, week_ago, b"second dictionary " * 64)
            dict_id, compress = await dicts.for_writing(conn, [])
            assert dict_id == second
            await dicts.load(conn, [second])
            assert dicts.reader(second)(compress(b"some segment")) == b"some segment"
        finally:
            await conn.close()
