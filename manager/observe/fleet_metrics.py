"""The bus metrics of the whole fleet: every bot process's, and the manager's own.

Each bot process reports its cumulative snapshot on its status pipe (``m`` lines, see
``bus.supervision``); the supervisor hands them here. A fleet total is the sum of the live
processes' last snapshots, of the manager's own bus clients, and of the totals retained
from processes that exited: when a process exits, its last snapshot is folded into the
retained totals, so a restart never makes a counter go down (Prometheus counters must not).
What a process counted after its last report before dying is lost, never counted twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bus.metrics import BusMetrics, Snapshot, empty_snapshot, merge_snapshot


class FleetMetrics:
    """Counters and histograms of every bus client the manager knows, summed."""

    def __init__(self) -> None:
        self._live: dict[str, Mapping[str, Any]] = {}
        self._retained: Snapshot = empty_snapshot()
        self._local: list[BusMetrics] = []
        #: Processes whose last snapshot was folded into the retained totals.
        self.exited_processes = 0

    def add_local(self, metrics: BusMetrics) -> None:
        """Count a bus client of the manager's own process (its lifecycle and API events)."""
        self._local.append(metrics)

    def update(self, instance: str, snapshot: Mapping[str, Any]) -> None:
        """The latest snapshot of the running process of ``instance`` (``<bot>-<index>``)."""
        self._live[instance] = snapshot

    def exited(self, instance: str) -> None:
        """The process of ``instance`` exited: keep its last snapshot in the totals.

        Call it before the slot's next process can report (the supervisor does, first
        thing when it learns of the exit).
        """
        last = self._live.pop(instance, None)
        if last is not None:
            merge_snapshot(self._retained, last)
            self.exited_processes += 1

    def snapshot(self) -> Snapshot:
        """The fleet's totals, in the shape of :meth:`bus.metrics.BusMetrics.snapshot`."""
        total = empty_snapshot()
        merge_snapshot(total, self._retained)
        for snapshot in self._live.values():
            merge_snapshot(total, snapshot)
        for metrics in self._local:
            merge_snapshot(total, metrics.snapshot())
        return total

    def __repr__(self) -> str:
        return (
            f"<FleetMetrics live={sorted(self._live)} exited={self.exited_processes} "
            f"local={len(self._local)}>"
        )
