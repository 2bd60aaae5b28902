"""The archiver's fast path builds the same row as decoding the event, or steps aside.

``entry_record`` turns an entry our publisher wrote straight into a row; anything else must
come back as None, so that ``wire.decode`` and ``event_record`` decide about it as they do
for every consumer. Pure functions: no Redis or PostgreSQL needed.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bus import Event
from bus.archive.rows import entry_bound, entry_record, event_record
from bus.wire import decode, encode

STREAM = "user"
ENTRY = "1700000000000-7"


def flat(event: Event, **changed: str) -> list[str]:
    """The entry's fields as XREADGROUP returns them: name, value, name, value, ..."""
    fields = {k: v.decode() if isinstance(v, bytes) else v for k, v in encode(event).items()}
    fields.update(changed)
    return [part for item in fields.items() for part in item]


def decoded_row(fields: list[str]) -> tuple[object, ...]:
    as_dict = dict(zip(fields[0::2], fields[1::2], strict=True))
    return event_record(decode(as_dict, f"multibot:stream:{{{STREAM}}}", ENTRY), STREAM)


EVENTS = [
    Event(type="user.note.added", data={}, source="x"),
    Event(
        type="user.message.received",
        data={"text": 'héllo \\ "there"\n', "n": [1, 2.5, None, True], "deep": {"a": {}}},
        source="api:client",
        correlation_id="0190f0f0-0000-7000-8000-000000000001",
        causation_id="0190f0f0-0000-7000-8000-000000000002",
        key="user-42",
        version=3,
        timestamp=datetime(2026, 11, 27, 4, 5, 6, 789012, tzinfo=UTC),
    ),
]


@pytest.mark.parametrize("event", EVENTS, ids=["minimal", "every-field"])
def test_an_entry_our_publisher_wrote_gives_the_row_decoding_gives(event: Event) -> None:
    fields = flat(event)
    assert entry_record(STREAM, ENTRY, fields) == decoded_row(fields)


def test_a_naive_timestamp_reads_as_utc_as_the_decoder_reads_it() -> None:
    fields = flat(EVENTS[1], timestamp="2026-11-27T04:05:06.789012")
    row = entry_record(STREAM, ENTRY, fields)
    assert row is not None and row == decoded_row(fields)
    assert row[8] == datetime(2026, 11, 27, 4, 5, 6, 789012, tzinfo=UTC)


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param({"wire": "2"}, id="other-wire-version"),
        pytest.param({"type": "User Message"}, id="bad-type"),
        pytest.param({"source": ""}, id="no-source"),
        pytest.param({"id": "not-a-uuid"}, id="short-id"),
        pytest.param({"id": ""}, id="no-id"),
        pytest.param({"timestamp": ""}, id="no-timestamp"),
        pytest.param({"timestamp": "yesterday, around noon"}, id="bad-timestamp"),
        pytest.param({"version": "two"}, id="bad-version"),
        pytest.param({"version": "-1"}, id="signed-version"),
        pytest.param({"data": "{not json"}, id="data-not-json"),
        pytest.param({"data": "[1, 2]"}, id="data-not-an-object"),
        pytest.param({"data": '{"t": "a\\u0000b"}'}, id="escaped-nul-in-data"),
        pytest.param({"source": "x\x00y"}, id="nul-in-source"),
        pytest.param({"key": "k\x00"}, id="nul-in-key"),
        pytest.param({"target": "some-group"}, id="redelivery-field"),
    ],
)
def test_anything_unusual_is_left_to_the_decoder(changed: dict[str, str]) -> None:
    assert entry_record(STREAM, ENTRY, flat(EVENTS[1], **changed)) is None


def test_fields_in_another_order_are_left_to_the_decoder() -> None:
    fields = flat(EVENTS[0])
    pairs = list(zip(fields[0::2], fields[1::2], strict=True))
    reordered = [part for pair in reversed(pairs) for part in pair]
    assert entry_record(STREAM, ENTRY, reordered) is None
    assert decoded_row(reordered) == decoded_row(fields)


def test_a_nul_the_fast_path_refuses_is_stored_replaced_by_the_decoder_path() -> None:
    fields = flat(EVENTS[1], source="x\x00y", data='{"t": "a\\u0000b"}')
    row = decoded_row(fields)
    assert row[2] == "x\ufffdy" and row[3] == '{"t":"a\ufffdb"}'


class TestEntryBound:
    BIGINT = 2**63 - 1

    def test_a_full_id_is_its_pair(self) -> None:
        """``ms-seq`` bounds at that very entry, above or below."""
        assert entry_bound("1700000000000-7", upper=False) == (1700000000000, 7)
        assert entry_bound("1700000000000-7", upper=True) == (1700000000000, 7)

    def test_ms_alone_excludes_the_whole_millisecond(self) -> None:
        """``ms`` alone is after the millisecond's last entry, or before its first."""
        assert entry_bound("1700000000000", upper=False) == (1700000000000, self.BIGINT)
        assert entry_bound("1700000000000", upper=True) == (1700000000000, 0)

    def test_parts_past_the_archive_bigint_are_capped(self) -> None:
        """A part up to 2^64-1 (any Redis id) is capped at 2^63-1, what the archive holds."""
        top = f"{2**64 - 1}-{2**64 - 1}"
        assert entry_bound(top, upper=True) == (self.BIGINT, self.BIGINT)

    @pytest.mark.parametrize("text", ["", "-", "abc", "1-", "-1", "1-2-3", "+5-0"])
    def test_text_that_is_no_id_is_a_value_error(self, text: str) -> None:
        """Anything but an entry id raises ValueError saying so."""
        with pytest.raises(ValueError, match="is not a stream entry id"):
            entry_bound(text, upper=False)
