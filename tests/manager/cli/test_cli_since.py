"""Times and durations back from now (``--since``, ``since=``) at the edges of their range."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from manager.cli.events import _since_id
from manager.times import MAX_AGO_DAYS, TimeRangeError, duration_ago, utc_moment
from tests.manager.cli.test_cli import invoke, unreachable_url


class TestDurationAgo:
    def test_the_longest_duration_in_each_unit_is_taken(self) -> None:
        """36500d, and as many seconds, minutes or hours, are times about 100 years ago."""
        seconds = MAX_AGO_DAYS * 86400
        expected = datetime.now(UTC) - timedelta(days=MAX_AGO_DAYS)
        for text in (f"{MAX_AGO_DAYS}d", f"{seconds // 3600}h", f"{seconds // 60}m", f"{seconds}s"):
            moment = duration_ago(text)
            assert moment is not None
            assert abs(moment - expected) < timedelta(minutes=1), text
        assert duration_ago("000030s") is not None

    @pytest.mark.parametrize(
        "text", ["99999999999d", f"{MAX_AGO_DAYS + 1}d", "3153600001s", "9" * 5000 + "h"]
    )
    def test_a_longer_duration_says_the_range(self, text: str) -> None:
        """Past the range: a TimeRangeError naming it, not an OverflowError."""
        with pytest.raises(TimeRangeError, match=f"at most {MAX_AGO_DAYS}d"):
            duration_ago(text)

    def test_not_a_duration_is_none(self) -> None:
        """Text of another form is left to the caller."""
        assert duration_ago("yesterday") is None
        assert duration_ago("-5d") is None


class TestUtcMoment:
    def test_times_whose_utc_is_out_of_range_say_the_range(self) -> None:
        """An offset that moves a time past year 1 or 9999 in UTC: TimeRangeError."""
        for text in ("0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"):
            with pytest.raises(TimeRangeError, match="between 0001-01-01 and 9999-12-31"):
                utc_moment(datetime.fromisoformat(text))
        naive = datetime(2026, 1, 1)
        assert utc_moment(naive) == naive.replace(tzinfo=UTC)


class TestTailSince:
    @pytest.mark.parametrize(
        "since",
        [
            "99999999999d",
            "9" * 5000 + "s",
            "0001-01-01T00:00:00+05:00",
            "18446744073709551616-0",
            "0-18446744073709551616",
            "9" * 5000,
        ],
    )
    def test_out_of_range_is_a_usage_error(self, since: str) -> None:
        """A duration or time past what a date holds: exit 2 saying the range and what to
        give instead, before connecting, no traceback."""
        result = invoke(unreachable_url(), "events", "tail", "#", "--since", since)
        assert result.exit_code == 2, result.output
        assert "out of range" in result.stderr
        assert "give 0 for everything still in Redis" in result.stderr
        assert "Traceback" not in result.stderr

    def test_a_time_before_1970_means_everything(self) -> None:
        """Stream ids start at 1970: an earlier time or a long duration starts at 0 (a
        negative entry id is one Redis refuses)."""
        assert _since_id("1960-01-01T00:00:00Z") == "0"
        assert _since_id(f"{MAX_AGO_DAYS}d") == "0"
        assert _since_id("1d") != "0"

    def test_the_largest_entry_id_passes(self) -> None:
        """Entry ids up to 64 bits in each part are given to Redis as they are."""
        largest = f"{2**64 - 1}-{2**64 - 1}"
        assert _since_id(largest) == largest
