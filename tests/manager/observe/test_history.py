"""The status page's history: a bounded window of samples, the groups furthest behind."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from manager.observe.history import MAX_GROUPS, History


def status(rate: float | None, lags: dict[str, tuple[int, int]]) -> Any:
    """What History reads of an API status document."""
    return SimpleNamespace(
        throughput=SimpleNamespace(events_per_s=rate),
        dead_letters=3,
        memory=SimpleNamespace(used=100, budget=1000),
        groups=[
            SimpleNamespace(
                stream=name.split("/")[0], group=name.split("/")[1], lag=behind, pending=held
            )
            for name, (behind, held) in lags.items()
        ],
    )


def test_keeps_only_the_window_and_charts_the_groups_furthest_behind() -> None:
    """15 s at 5 s a sample keeps four samples (both ends); a lag counts its unacked
    entries too; at most MAX_GROUPS groups are charted, the furthest behind first."""
    history = History(window=15.0, interval=5.0)
    for n in range(10):
        history.add(status(float(n), {"bot/a": (n, 1)}))
    assert [s.events_per_s for s in history.samples()] == [6.0, 7.0, 8.0, 9.0]
    assert history.samples()[-1].lag == {"bot/a": 10}
    many = {f"user/g{i}": (i, 0) for i in range(MAX_GROUPS + 3)}
    history.add(status(None, many))
    charted = history.charted_groups()
    assert len(charted) == MAX_GROUPS
    assert charted[0] == f"user/g{MAX_GROUPS + 2}"
    assert history.samples()[-1].events_per_s is None
