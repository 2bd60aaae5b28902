"""The fleet's bus metrics (manager.observe.fleet_metrics): summed, and kept across restarts."""

from __future__ import annotations

from typing import Any

from bus.metrics import BusMetrics
from manager.observe.fleet_metrics import FleetMetrics

GROUP = "bot-group-worker"


def handled(n: int) -> dict[str, Any]:
    """The snapshot of a process that consumed ``n`` user events."""
    metrics = BusMetrics()
    for _ in range(n):
        metrics.group(GROUP).consumed("user.x.y", "1-0")
        metrics.group(GROUP).handled(0.001)
    return metrics.snapshot()


def consumed(fleet: FleetMetrics) -> int:
    """The fleet's consumed count of the group."""
    return int(fleet.snapshot()["counters"].get("consumed", {}).get(GROUP, {}).get("user", 0))


class TestFleetMetrics:
    def test_live_processes_add_up(self) -> None:
        """The last snapshot of each live process counts, the latest replacing the earlier."""
        fleet = FleetMetrics()
        fleet.update("worker-0", handled(2))
        fleet.update("worker-0", handled(3))
        fleet.update("worker-1", handled(4))
        assert consumed(fleet) == 7
        histogram = fleet.snapshot()["histograms"]["handler_duration"][GROUP]
        assert histogram["count"] == 7

    def test_counters_never_go_down_across_restarts(self) -> None:
        """An exited process's last counts are kept; its successor starts from zero on top."""
        fleet = FleetMetrics()
        fleet.update("worker-0", handled(5))
        fleet.exited("worker-0")
        assert consumed(fleet) == 5
        fleet.update("worker-0", handled(1))
        assert consumed(fleet) == 6
        fleet.exited("worker-0")
        fleet.exited("worker-0")  # an exit without a report since adds nothing
        assert consumed(fleet) == 6
        assert fleet.exited_processes == 2

    def test_the_managers_own_clients_count(self) -> None:
        """A local bus client's publishing is read live at each snapshot."""
        fleet, local = FleetMetrics(), BusMetrics()
        fleet.add_local(local)
        local.published("bot.lifecycle.started")
        assert fleet.snapshot()["counters"]["published"][""] == {"bot": 1}
        local.published("bot.lifecycle.stopped")
        assert fleet.snapshot()["counters"]["published"][""] == {"bot": 2}

    def test_snapshots_do_not_alias_what_they_sum(self) -> None:
        """Changing a returned snapshot changes nothing inside."""
        fleet = FleetMetrics()
        fleet.update("worker-0", handled(1))
        fleet.exited("worker-0")
        fleet.snapshot()["histograms"]["handler_duration"][GROUP]["counts"][0] += 100
        assert fleet.snapshot()["histograms"]["handler_duration"][GROUP]["counts"][0] == 1
