"""Times and durations as operators type them: ``30s``, ``10m``, ``2h``, ``1d`` back from
now, or an ISO time; bounded, so a typo is a clear error rather than an overflow.

Shared by the command line (``--since``/``--until``) and the HTTP API (``since``/``until``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from manager.errors import ManagerError

_DURATION_RE = re.compile(r"^(\d+)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: The longest duration back from now (about 100 years).
MAX_AGO_DAYS = 36_500


class TimeRangeError(ManagerError, ValueError):
    """A time or a duration back from now outside the range a ``since`` or ``until``
    takes; the message says the range, the caller adds what to give instead."""


def duration_ago(text: str) -> datetime | None:
    """``30s``, ``10m``, ``2h``, ``1d`` back from now; None if ``text`` is not a duration.

    :class:`TimeRangeError` for a duration longer than :data:`MAX_AGO_DAYS` days.
    """
    duration = _DURATION_RE.match(text)
    if duration is None:
        return None
    digits = duration[1].lstrip("0") or "0"
    limit = MAX_AGO_DAYS * _UNIT_SECONDS["d"]
    unit = _UNIT_SECONDS[duration[2]]
    # Compared before int(): a digit string of any length must not become a huge number.
    if len(digits) > len(str(limit)) or int(digits) * unit > limit:
        raise TimeRangeError(
            f"{text!r} is out of range: a duration back from now is at most "
            f"{MAX_AGO_DAYS}d (about 100 years; {limit // unit}{duration[2]})"
        )
    return datetime.now(UTC) - timedelta(seconds=int(digits) * unit)


def utc_moment(moment: datetime) -> datetime:
    """``moment`` in UTC (naive taken as UTC); :class:`TimeRangeError` when it falls
    outside the years 1 to 9999 there (``0001-01-01T00:00:00+05:00``)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise TimeRangeError(
            f"{moment.isoformat()} is out of range: a time is between 0001-01-01 and "
            "9999-12-31 in UTC"
        ) from None
