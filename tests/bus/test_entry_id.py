"""Stream entry ids: parsed, ordered and formatted as Redis does."""

from __future__ import annotations

import pytest

from bus.entry_id import MAX_PART, EntryId
from bus.errors import BusError, EntryIdRangeError


class TestEntryId:
    def test_ids_parse_and_format(self) -> None:
        """``ms-seq`` parses to a pair (``ms`` alone is seq 0) and formats back."""
        assert EntryId.parse("1700000000000-5") == (1700000000000, 5)
        assert EntryId.parse("1700000000000") == (1700000000000, 0)
        assert str(EntryId(1700000000000, 5)) == "1700000000000-5"
        assert str(EntryId.parse("12-345")) == "12-345"

    def test_parts_are_named(self) -> None:
        """The parts read as ``ms`` and ``seq``."""
        parsed = EntryId.parse("7-3")
        assert (parsed.ms, parsed.seq) == (7, 3)

    def test_ids_order_as_numbers_not_text(self) -> None:
        """``9-0`` comes before ``10-0``, and the sequence orders ids of one millisecond."""
        ids = [EntryId.parse(t) for t in ("10-0", "9-5", "9-10", "9-0")]
        assert [str(i) for i in sorted(ids)] == ["9-0", "9-5", "9-10", "10-0"]
        assert EntryId.parse("9-10") > EntryId.parse("9-5")

    def test_ids_compare_with_plain_pairs(self) -> None:
        """An id equals and sorts with the ``(ms, seq)`` pair it stands for."""
        assert EntryId(3, 2) == (3, 2)
        assert min([EntryId(5, 0), (3, 2)]) == (3, 2)

    @pytest.mark.parametrize(
        "text", ["", "-", "abc", "1-", "-1", "1-2-3", " 1-2", "1-2 ", "+5-0", "1_000-0", "1.5-0"]
    )
    def test_garbage_is_a_value_error(self, text: str) -> None:
        """Anything but digits, optionally a dash and digits, raises ValueError saying so."""
        with pytest.raises(ValueError, match="is not a stream entry id"):
            EntryId.parse(text)

    def test_parts_beyond_64_bits_are_refused(self) -> None:
        """A part above 2^64-1 raises ValueError, as Redis refuses it."""
        assert EntryId.parse(f"{MAX_PART}-{MAX_PART}") == (MAX_PART, MAX_PART)
        with pytest.raises(ValueError, match="beyond"):
            EntryId.parse(f"{MAX_PART + 1}-0")
        with pytest.raises(ValueError, match="beyond"):
            EntryId.parse(f"0-{MAX_PART + 1}")

    @pytest.mark.parametrize(
        "text", [f"{MAX_PART + 1}-0", f"0-{MAX_PART + 1}", "9" * 21, "9" * 5000, "1-" + "9" * 5000]
    )
    def test_out_of_range_is_its_own_error(self, text: str) -> None:
        """A well-formed id past 2^64-1, however long, is an EntryIdRangeError (a BusError
        and a ValueError), so a caller can tell it from text that is no id at all."""
        with pytest.raises(EntryIdRangeError, match="beyond") as raised:
            EntryId.parse(text)
        assert isinstance(raised.value, BusError)
        assert isinstance(raised.value, ValueError)

    def test_malformed_text_is_not_a_range_error(self) -> None:
        """Text that is no id raises a plain ValueError, not EntryIdRangeError."""
        with pytest.raises(ValueError, match="is not a stream entry id") as raised:
            EntryId.parse("10m")
        assert not isinstance(raised.value, EntryIdRangeError)

    def test_leading_zeros_are_read_as_redis_reads_them(self) -> None:
        """Leading zeros do not count, even thousands of them."""
        assert EntryId.parse("007-0003") == (7, 3)
        assert EntryId.parse("0" * 5000 + "1-" + "0" * 5000) == (1, 0)
        assert EntryId.parse("0" * 30 + str(MAX_PART)) == (MAX_PART, 0)

    def test_require_seq_refuses_ms_alone(self) -> None:
        """With ``require_seq`` only the full ``ms-seq`` form is an id."""
        assert EntryId.parse("5-0", require_seq=True) == (5, 0)
        with pytest.raises(ValueError, match="is not a stream entry id"):
            EntryId.parse("5", require_seq=True)

    def test_next_is_the_smallest_id_after(self) -> None:
        """The next id adds one to the sequence, or moves to the next millisecond at its top."""
        assert EntryId(5, 3).next() == (5, 4)
        assert EntryId(5, MAX_PART).next() == (6, 0)
        with pytest.raises(ValueError, match="no stream entry id comes after"):
            EntryId(MAX_PART, MAX_PART).next()

    def test_previous_is_the_largest_id_before(self) -> None:
        """The previous id takes one from the sequence, or wraps to the millisecond before."""
        assert EntryId(15, 3).previous() == (15, 2)
        assert EntryId(15, 0).previous() == (14, 2**64 - 1)
        assert EntryId(0, 0).previous() == (0, 0)

    def test_next_and_previous_undo_each_other(self) -> None:
        """Going forward then back (or back then forward) lands on the same id."""
        for entry in (EntryId(1, 0), EntryId(1, 7), EntryId(2, MAX_PART)):
            assert entry.next().previous() == entry
            assert entry.previous().next() == entry


class TestMsOf:
    @pytest.mark.parametrize("text", ["1700000000000-5", "1700000000000", "0-0", f"{MAX_PART}-1"])
    def test_it_is_the_ms_parse_gives(self, text: str) -> None:
        """For any id, ``ms_of`` is the ``ms`` that :meth:`EntryId.parse` reads."""
        assert EntryId.ms_of(text) == EntryId.parse(text).ms

    @pytest.mark.parametrize("text", ["", "-", "abc", "abc-1", "-1"])
    def test_a_non_number_before_the_dash_is_a_value_error(self, text: str) -> None:
        """No number before the dash: ValueError, which hot paths catch."""
        with pytest.raises(ValueError, match="invalid literal"):
            EntryId.ms_of(text)
