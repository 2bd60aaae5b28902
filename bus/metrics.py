"""Counters and histograms of one process's bus traffic, for the manager's ``/metrics``.

Each :class:`~bus.client.BusClient` owns a :class:`BusMetrics` (``bus.metrics``). It counts
events published, consumed (handed to handlers), acked, retried and dead-lettered, by
consumer group and *category* (the event type's first dot segment), and keeps fixed-bucket
histograms per group of handler run time and of the delivery delay (the stream entry id's
millisecond part to the handler's start, and to the ack). The bot runtime sends
:meth:`BusMetrics.snapshot` to the manager, which adds up every process's snapshot
(:func:`merge_snapshot`); the metric names are in ``manager.observe.metrics``.

What is counted: *consumed*, an entry a handler starts on (once, however many of the
group's handlers match it); *acked*, an entry handed to handlers or dead-lettered whose
XACK Redis confirmed (entries no subscription wants are acked uncounted); *retried*, a
handler failure that will be tried again (the next attempt, or after an open circuit
breaker's cool-down); *dead_lettered*, an entry this process wrote to the dead-letter
stream.

It runs per event at tens of thousands of events per second, so a count is one dict lookup
by event type (whose hash Python caches on the string) and a list increment, and an
observation is one bisect over the bucket bounds: no allocation, no lock (one event loop).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import Any

from bus.entry_id import EntryId

#: EntryId.ms_of as a module global (found faster than a class attribute): the hot paths
#: below call it for every event.
_ms_of = EntryId.ms_of
#: Upper bounds in seconds of the histogram buckets; a last, implicit one is +Inf.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: The counters, in the order of a category's cell.
KINDS = ("published", "consumed", "acked", "retried", "dead_lettered")
#: The histograms of a group.
HISTOGRAMS = ("handler_duration", "delay_start", "delay_ack")
#: Category of an entry that did not decode as an event.
UNKNOWN = "unknown"
#: Category counted for every category past :data:`MAX_CATEGORIES` in one group (a foreign
#: producer inventing categories must not grow memory, the status line or label sets).
OTHER = "other"
MAX_CATEGORIES = 64
#: Event types remembered per group (past that, the category is found for each event).
_MAX_TYPES = 4096
_PUBLISHED, _CONSUMED, _ACKED, _RETRIED, _DEAD_LETTERED = range(len(KINDS))

#: A snapshot: ``{"counters": {kind: {group: {category: n}}}, "histograms": {name: {group:
#: {"counts": [per bucket, +Inf last], "sum": seconds, "count": n}}}}``; zeros are left out.
#: Bucket counts are per bucket, not cumulative (they add up across processes as they are).
Snapshot = dict[str, Any]


class Histogram:
    """Observations counted in the :data:`BUCKETS`, with their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        #: Observations per bucket: bucket i holds those <= BUCKETS[i], the last the rest.
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    @property
    def count(self) -> int:
        """How many observations there were."""
        return sum(self.counts)

    def observe(self, seconds: float) -> None:
        """Count one observation (negative ones are clamped to 0)."""
        if seconds < 0.0:  # noqa: PLR1730 - a branch costs less than a call to max() per event
            seconds = 0.0
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def to_json(self) -> dict[str, Any]:
        """The counts per bucket, the sum and the count."""
        return {"counts": list(self.counts), "sum": self.sum, "count": sum(self.counts)}

    def __repr__(self) -> str:
        return f"<Histogram count={self.count} sum={self.sum:.3f}>"


class GroupMetrics:
    """The counters and histograms of one consumer group in this process ("" for publishing).

    The hooks of the consumer (``bus.handling``, ``bus.acks``) hold one and call it per event.
    """

    __slots__ = ("_by_type", "_cells", "delay_ack", "delay_start", "handler_duration", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        #: category → its counts, in the order of :data:`KINDS`.
        self._cells: dict[str, list[int]] = {}
        #: event type → its category's cell (a bounded cache, so most events skip the split).
        self._by_type: dict[str, list[int]] = {}
        self.handler_duration = Histogram()
        self.delay_start = Histogram()
        self.delay_ack = Histogram()

    def _cell(self, event_type: str) -> list[int]:
        """The cell of ``event_type``'s category (``""``: an entry that did not decode)."""
        category = event_type.partition(".")[0] if event_type else UNKNOWN
        cell = self._cells.get(category)
        if cell is None:
            if len(self._cells) >= MAX_CATEGORIES:
                category = OTHER
                cell = self._cells.get(category)
            if cell is None:
                cell = self._cells[category] = [0] * len(KINDS)
        if len(self._by_type) < _MAX_TYPES:
            self._by_type[event_type] = cell
        return cell

    def published(self, event_type: str) -> None:
        """An event of ``event_type`` was written to its stream."""
        (self._by_type.get(event_type) or self._cell(event_type))[_PUBLISHED] += 1

    def consumed(self, event_type: str, entry_id: str) -> None:
        """A handler starts on the entry ``entry_id`` (first handler of the entry only)."""
        (self._by_type.get(event_type) or self._cell(event_type))[_CONSUMED] += 1
        # entry_age() and Histogram.observe(), inlined: this runs for every event.
        try:
            age = time.time() - _ms_of(entry_id) / 1000
        except ValueError:
            age = 0.0
        if age < 0.0:  # noqa: PLR1730 - a branch costs less than a call to max() per event
            age = 0.0
        histogram = self.delay_start
        histogram.counts[bisect_left(BUCKETS, age)] += 1
        histogram.sum += age

    def handled(self, seconds: float) -> None:
        """A handler call returned or raised after ``seconds``."""
        self.handler_duration.observe(seconds)

    def retried(self, event_type: str) -> None:
        """A handler failed on an event it will be tried on again."""
        (self._by_type.get(event_type) or self._cell(event_type))[_RETRIED] += 1

    def dead_lettered(self, event_type: str) -> None:
        """An entry went to the dead-letter stream (``""``: it did not decode)."""
        (self._by_type.get(event_type) or self._cell(event_type))[_DEAD_LETTERED] += 1

    def acked(self, event_types: Sequence[str], entry_ids: Sequence[str]) -> None:
        """Redis confirmed the XACK of these entries (pairwise: the type of each id)."""
        now = time.time()
        by_type, counts, total = self._by_type, self.delay_ack.counts, 0.0
        for event_type, entry_id in zip(event_types, entry_ids, strict=True):
            (by_type.get(event_type) or self._cell(event_type))[_ACKED] += 1
            # entry_age() and Histogram.observe(), inlined: this runs for every event.
            try:
                age = now - _ms_of(entry_id) / 1000
            except ValueError:
                age = 0.0
            if age < 0.0:  # noqa: PLR1730 - a branch costs less than a call to max() per event
                age = 0.0
            counts[bisect_left(BUCKETS, age)] += 1
            total += age
        self.delay_ack.sum += total

    def _add_to(self, snapshot: Snapshot) -> None:
        counters, histograms = snapshot["counters"], snapshot["histograms"]
        for category, cell in self._cells.items():
            for kind, count in zip(KINDS, cell, strict=True):
                if count:
                    counters.setdefault(kind, {}).setdefault(self.name, {})[category] = count
        for name in HISTOGRAMS:
            histogram: Histogram = getattr(self, name)
            if histogram.count:
                histograms.setdefault(name, {})[self.name] = histogram.to_json()

    def __repr__(self) -> str:
        return f"<GroupMetrics group={self.name!r} categories={len(self._cells)}>"


class BusMetrics:
    """Every group's metrics of one bus client, cumulative since the process started."""

    def __init__(self) -> None:
        self._groups: dict[str, GroupMetrics] = {}
        self._publishing = self.group("")

    def group(self, name: str) -> GroupMetrics:
        """The metrics of consumer group ``name`` (made on first use)."""
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = GroupMetrics(name)
        return group

    def published(self, event_type: str) -> None:
        """An event of ``event_type`` was written to its stream."""
        self._publishing.published(event_type)

    def snapshot(self) -> Snapshot:
        """Everything counted so far, JSON-ready (see :data:`Snapshot`)."""
        snapshot = empty_snapshot()
        for group in self._groups.values():
            group._add_to(snapshot)
        return snapshot

    def __repr__(self) -> str:
        return f"<BusMetrics groups={sorted(self._groups)}>"


def entry_age(entry_id: str, now: float) -> float:
    """Seconds from the millisecond part of stream id ``entry_id`` to ``now`` (at least 0)."""
    try:
        age = now - EntryId.ms_of(entry_id) / 1000
    except ValueError:
        return 0.0
    return age if age > 0.0 else 0.0


def empty_snapshot() -> Snapshot:
    """A snapshot of nothing counted."""
    return {"counters": {}, "histograms": {}}


def merge_snapshot(total: Snapshot, snapshot: Mapping[str, Any]) -> None:
    """Add ``snapshot`` into ``total``.

    ``snapshot`` comes from another process: parts not in the :data:`Snapshot` shape
    (negative counts, histograms with other buckets) are skipped, never raised on.
    """
    counters = snapshot.get("counters")
    if isinstance(counters, Mapping):
        for kind, groups in counters.items():
            if kind not in KINDS or not isinstance(groups, Mapping):
                continue
            into_kind = total["counters"].setdefault(kind, {})
            for group, categories in groups.items():
                if not isinstance(group, str) or not isinstance(categories, Mapping):
                    continue
                into = into_kind.setdefault(group, {})
                for category, count in categories.items():
                    if isinstance(category, str) and _is_count(count):
                        into[category] = into.get(category, 0) + count
    histograms = snapshot.get("histograms")
    if isinstance(histograms, Mapping):
        for name, groups in histograms.items():
            if name not in HISTOGRAMS or not isinstance(groups, Mapping):
                continue
            into_name = total["histograms"].setdefault(name, {})
            for group, histogram in groups.items():
                if isinstance(group, str) and _is_histogram(histogram):
                    _add_histogram(into_name, group, histogram)


def _add_histogram(into: dict[str, Any], group: str, histogram: Mapping[str, Any]) -> None:
    mine = into.get(group)
    if mine is None:
        into[group] = {
            "counts": list(histogram["counts"]),
            "sum": float(histogram["sum"]),
            "count": histogram["count"],
        }
        return
    mine["counts"] = [a + b for a, b in zip(mine["counts"], histogram["counts"], strict=True)]
    mine["sum"] += float(histogram["sum"])
    mine["count"] += histogram["count"]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_histogram(value: Any) -> bool:
    if not isinstance(value, Mapping):
        return False
    counts, total = value.get("counts"), value.get("sum")
    return (
        isinstance(counts, list)
        and len(counts) == len(BUCKETS) + 1
        and all(_is_count(c) for c in counts)
        and _is_count(value.get("count"))
        and isinstance(total, int | float)
        and not isinstance(total, bool)
        and total >= 0
    )
