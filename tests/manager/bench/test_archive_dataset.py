"""Tests for manager.bench.archive_dataset: the synthetic day the query comparison loads."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from bus.archive.rows import EVENT_COLUMNS, record_event
from bus.event import TYPE_RE, event_time_ms
from bus.keys import Keys
from manager.bench.archive_dataset import (
    DAY,
    Sample,
    SyntheticDay,
    chunks,
    uuid7,
)

N = 20_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
COLUMN = {name: n for n, name in enumerate(EVENT_COLUMNS)}


@pytest.fixture(scope="module")
def records() -> list[tuple[Any, ...]]:
    return list(SyntheticDay(N).records())


def column(records: list[tuple[Any, ...]], name: str) -> list[Any]:
    return [record[COLUMN[name]] for record in records]


class TestUuid7:
    def test_is_a_canonical_uuid7_of_its_millisecond(self) -> None:
        """The id reads back as a version 7, RFC 9562 variant UUID of the given ms."""
        text = uuid7(1_767_571_200_123, 0xABC, 2**62 - 1)
        value = uuid.UUID(text)
        assert str(value) == text
        assert (value.version, value.variant) == (7, uuid.RFC_4122)
        assert event_time_ms(text) == 1_767_571_200_123


class TestSyntheticDay:
    def test_the_same_seed_makes_the_same_day(self, records: list[tuple[Any, ...]]) -> None:
        """Two passes of one seed give equal records (the day is loaded twice); another
        seed gives other ids."""
        assert list(SyntheticDay(N).records()) == records
        assert next(SyntheticDay(N, seed=1).records())[0] != records[0][0]

    def test_records_are_archive_records(self, records: list[tuple[Any, ...]]) -> None:
        """Every record has the archive's columns: a valid type, JSON object data, version
        1, an aware created_at in the day."""
        day = SyntheticDay(N)
        for record in records[:2000]:
            assert len(record) == len(EVENT_COLUMNS)
            assert TYPE_RE.match(record[COLUMN["type"]])
            assert isinstance(orjson.loads(record[COLUMN["data"]]), dict)
            assert record[COLUMN["version"]] == 1
            assert day.start <= record[COLUMN["created_at"]] < day.end

    def test_time_ids_and_entries_agree_and_ascend(self, records: list[tuple[Any, ...]]) -> None:
        """created_at ascends evenly over the day; each id is a UUIDv7 of its created_at's
        millisecond, as is its entry id; entry ids ascend in each stream."""
        created = column(records, "created_at")
        assert created == sorted(created)
        assert created[0].date() == created[-1].date() == DAY
        assert created[-1] - created[0] > timedelta(hours=23, minutes=59)
        last: dict[str, tuple[int, int]] = {}
        for record in records:
            ms = (record[COLUMN["created_at"]] - EPOCH) // timedelta(milliseconds=1)
            assert event_time_ms(record[COLUMN["id"]]) == ms == record[COLUMN["entry_ms"]]
            stream = record[COLUMN["stream"]]
            entry = (record[COLUMN["entry_ms"]], record[COLUMN["entry_seq"]])
            assert entry > last.get(stream, (-1, -1))
            last[stream] = entry
        assert len(set(column(records, "id"))) == N

    def test_variety(self, records: list[tuple[Any, ...]]) -> None:
        """About 10 streams, 20 sources, 30 types (a rare one ~0.1 %), keys on ~20 %,
        payloads of 3-6 fields averaging 80-150 bytes."""
        day = SyntheticDay(N)
        assert len(set(column(records, "stream"))) == 10
        assert len(set(column(records, "source"))) == 20
        types = Counter(column(records, "type"))
        assert len(types) == 30
        assert 0.0003 < types[day.rare.name] / N < 0.003
        assert types.most_common(1)[0][0] == day.common[0].name
        assert 0.15 < sum(k is not None for k in column(records, "key")) / N < 0.25
        data = column(records, "data")
        assert all(3 <= len(orjson.loads(d)) <= 6 for d in data)
        assert 80 <= sum(map(len, data)) / N <= 150

    def test_chains(self, records: list[tuple[Any, ...]]) -> None:
        """About 30 % of events are in chains: a follower's correlation id is its chain's
        root (an earlier event with no correlation id), its causation the previous event
        of that chain."""
        seen: dict[str, tuple[Any, ...]] = {}
        last_of_chain: dict[str, str] = {}
        for record in records:
            correlation = record[COLUMN["correlation_id"]]
            if correlation is not None:
                root = seen[correlation]
                assert root[COLUMN["correlation_id"]] is None
                expected = last_of_chain.get(correlation, correlation)
                assert record[COLUMN["causation_id"]] == expected
                last_of_chain[correlation] = record[COLUMN["id"]]
            else:
                assert record[COLUMN["causation_id"]] is None
            seen[record[COLUMN["id"]]] = record
        in_chains = sum(1 for r in records if r[COLUMN["correlation_id"]]) + len(last_of_chain)
        assert 0.25 < in_chains / N < 0.35

    def test_hours(self) -> None:
        """hour(n) is the n-th hour of the day, until exclusive of the next."""
        day = SyntheticDay(1000)
        since, until = day.hour(23)
        assert (since, until) == (day.start + timedelta(hours=23), day.end)

    def test_rejects_no_events(self) -> None:
        """An empty day is refused with the range."""
        with pytest.raises(ValueError, match=r"events must be in 1\.\."):
            SyntheticDay(0)


class TestRecords:
    def test_record_event_reads_back_as_the_archive_does(
        self, records: list[tuple[Any, ...]]
    ) -> None:
        """A record becomes the Event the archive returns: data parsed, the stream's key,
        the entry id as text."""
        record = records[0]
        event = record_event(record, Keys())
        assert event.id == record[COLUMN["id"]]
        assert event.data == orjson.loads(record[COLUMN["data"]])
        assert event.stream == Keys().stream(record[COLUMN["stream"]])
        assert event.entry_id == f"{record[COLUMN['entry_ms']]}-{record[COLUMN['entry_seq']]}"
        assert event.timestamp == record[COLUMN["created_at"]]

    def test_chunks(self) -> None:
        """chunks() cuts an iterable into lists of the size, the last one shorter."""
        assert [len(c) for c in chunks(((n,) for n in range(7)), 3)] == [3, 3, 1]

    def test_sample_keeps_every_stride_th(self, records: list[tuple[Any, ...]]) -> None:
        """The sample keeps about 1,000 ids and stream positions, fed in batches, and the
        roots of the chains it saw."""
        sample = Sample.of_size(N)
        for batch in chunks(records, 3000):
            sample.add(batch)
        assert len(sample.ids) == len(sample.positions) == 1000
        assert sample.ids[1] == records[sample.stride][COLUMN["id"]]
        ids = set(column(records, "id"))
        assert sample.roots
        assert all(root in ids for root in sample.roots)
