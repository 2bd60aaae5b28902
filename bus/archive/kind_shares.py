"""How common each kind of event is, from PostgreSQL's statistics of the newest day's heads.

A query for several kinds reads their heads one of two ways: each kind in time order on
(kind_id, created_at), merged, which costs an index descent per kind and is exact however
rare they are; or every head in time order on (created_at), keeping the matching ones,
which costs a head read per head passed over. For a few kinds, or rare ones, the merge is
cheaper; for many that together are common (a pattern such as ``orders.#`` over every
source: sixty kinds, a third of the events) the scan by time is: about three hundred
heads for a page of a hundred, against sixty descents.

The share of each kind is ANALYZE's list of most common values of ``kind_id`` on the
newest day partition that has statistics (autovacuum keeps it fresh); kinds not on the
list share what the list leaves. Without statistics (a new archive, or a role that may not
read them) queries merge, as they always could.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

# No parameters. Returns the most common kind ids of the newest day's heads with
# statistics, their frequencies (fractions of its rows), and its distinct count (negative:
# a fraction of its rows), or no row.
_STATS = r"""
SELECT most_common_vals::text::int[] AS vals, most_common_freqs AS freqs, n_distinct
FROM pg_stats
WHERE schemaname = current_schema() AND tablename LIKE 'event\_heads\_%'
  AND attname = 'kind_id' AND most_common_vals IS NOT NULL
ORDER BY tablename DESC LIMIT 1
"""
#: Seconds the statistics are used before they are read again.
REFRESH_S = 600.0
#: Heads passed over in a scan by time that cost about what one merged kind's index scan
#: does: about 1 µs against 23 µs, on the bench's synthetic day of two million events
#: (`multibot bench-archive --query-events`), warm cache.
HEADS_PER_DESCENT = 24


class KindShares:
    """The share of events each kind has, for choosing how a query reads its heads."""

    def __init__(self) -> None:
        self._freqs: dict[int, float] = {}
        self._rest = 0.0  # the share of each kind not in the list
        self._read_at = -math.inf

    async def refresh(self, conn: Any, known_kinds: int) -> None:
        """Read the statistics if they are older than :data:`REFRESH_S` (``known_kinds``:
        how many kinds are numbered, for those the statistics do not count)."""
        if time.monotonic() - self._read_at < REFRESH_S:
            return
        self._read_at = time.monotonic()
        row = await conn.fetchrow(_STATS)
        if row is None or not row["vals"]:
            self._freqs, self._rest = {}, 0.0
            return
        self._freqs = dict(zip(row["vals"], row["freqs"], strict=True))
        distinct = row["n_distinct"] if row["n_distinct"] > 0 else known_kinds
        others = max(1, int(distinct) - len(self._freqs))
        self._rest = max(0.0, 1.0 - sum(self._freqs.values())) / others

    def by_time(self, kind_ids: Sequence[int], limit: int) -> bool:
        """Whether reading every head in time order finds ``limit`` of these kinds for
        less than merging each kind's heads costs (False without statistics)."""
        if not self._freqs or len(kind_ids) < 2:
            return False
        share = sum(self._freqs.get(kind, self._rest) for kind in kind_ids)
        return share > 0 and limit / share < HEADS_PER_DESCENT * len(kind_ids)

    def __repr__(self) -> str:
        return f"<KindShares listed={len(self._freqs)} rest={self._rest:.2g}>"
